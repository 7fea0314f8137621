package labels_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/labels"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// gfdKey is every label name NVIDIA's GPU feature discovery v0.20 writes
// (internal/lm and its README's table), vGPU labels aside.
var gfdKey = regexp.MustCompile(`^nvidia\.com/(` +
	`cuda\.driver\.(major|minor|rev)|cuda\.runtime\.(major|minor)|` +
	`cuda\.driver-version\.(major|minor|revision|full)|cuda\.runtime-version\.(major|minor|full)|` +
	`gfd\.timestamp|mig\.capable|mig\.strategy|mps\.capable|` +
	`gpu\.(machine|mode|clique|family|compute\.major|compute\.minor)|` +
	`(gpu|mig-[0-9a-z.]+)\.(product|count|replicas|sharing-strategy|memory|multiprocessors|slices\.gi|slices\.ci|` +
	`engines\.(copy|decoder|encoder|jpeg|ofa)))$`)

var migAttributeKeys = []string{"memory", "multiprocessors", "slices.gi", "slices.ci",
	"engines.copy", "engines.decoder", "engines.encoder", "engines.jpeg", "engines.ofa"}

// TestComputeEveryProfile checks the labels of every built-in simulated
// profile against GFD's rules: only GFD's names, the version labels split
// from the driver's strings (deprecated ones equal to the new), the family
// from the compute capability, compute mode for 3D controllers, no clique
// without an NVLink fabric, and each MIG type's SMs, slices and engines.
func TestComputeEveryProfile(t *testing.T) {
	want := map[string]map[string]string{
		"dgx-a100": {"gpu.product": "NVIDIA-A100-SXM4-40GB", "gpu.count": "8", "gpu.memory": "40960", "gpu.family": "ampere",
			"gpu.compute.major": "8", "gpu.compute.minor": "0", "cuda.driver-version.full": "550.54.15", "mig.capable": "true"},
		"dgx-a100-mig": {"gpu.product": "NVIDIA-A100-SXM4-40GB", "gpu.count": "8", "gpu.family": "ampere", "mig.capable": "true",
			"mig.strategy": "mixed", "mig-1g.5gb.count": "9", "mig-1g.5gb.multiprocessors": "14", "mig-1g.5gb.slices.gi": "1",
			"mig-1g.5gb.engines.decoder": "0", "mig-1g.5gb.me.engines.decoder": "1", "mig-1g.5gb.me.engines.jpeg": "1",
			"mig-1g.5gb.me.engines.ofa": "1", "mig-1g.5gb.me.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb.me",
			"mig-3g.20gb.memory": "19968", "mig-3g.20gb.multiprocessors": "42", "mig-3g.20gb.slices.gi": "3",
			"mig-3g.20gb.slices.ci": "3", "mig-3g.20gb.engines.copy": "3", "mig-3g.20gb.engines.decoder": "2",
			"mig-7g.40gb.multiprocessors": "98", "mig-7g.40gb.engines.ofa": "1", "mig-7g.40gb.memory": "40192"},
		"dgx-h100": {"gpu.product": "NVIDIA-H100-80GB-HBM3", "gpu.count": "8", "gpu.memory": "81920", "gpu.family": "hopper",
			"gpu.compute.major": "9", "cuda.driver.rev": "07", "cuda.driver-version.revision": "07"},
		"dgx1-volta": {"gpu.product": "Tesla-V100-SXM2-16GB", "gpu.count": "8", "gpu.family": "volta", "gpu.compute.major": "7",
			"gpu.compute.minor": "0", "cuda.driver.major": "535", "cuda.driver.minor": "183", "cuda.runtime.minor": "2",
			"cuda.runtime-version.full": "12.2", "mig.capable": "false"},
		"pcie-l4x4": {"gpu.product": "NVIDIA-L4", "gpu.count": "4", "gpu.family": "ada-lovelace", "gpu.compute.minor": "9",
			"mig.capable": "false"},
	}
	for _, name := range sim.BuiltinNames() {
		t.Run(name, func(t *testing.T) {
			exp, ok := want[name]
			if !ok {
				t.Fatalf("no expected labels for profile %s: add them here", name)
			}
			inv, rs, o := build(t, name, "flags: {migStrategy: mixed}")
			l := labels.Compute(inv, rs, o)
			for k, v := range l {
				if !gfdKey.MatchString(k) {
					t.Errorf("%s=%s: GFD has no such label", k, v)
				}
			}
			for k, v := range exp {
				if got, ok := l["nvidia.com/"+k]; !ok || got != v {
					t.Errorf("%s=%q (set %t), want %q", k, got, ok, v)
				}
			}
			// Versions: split from the driver's strings, old names as new.
			parts := strings.Split(inv.DriverVersion, ".")
			major, minor, _ := strings.Cut(inv.CUDADriverVersion, ".")
			for k, v := range map[string]string{
				"cuda.driver-version.full": inv.DriverVersion, "cuda.driver-version.major": parts[0],
				"cuda.driver-version.minor": parts[1], "cuda.driver-version.revision": parts[2],
				"cuda.driver.major": parts[0], "cuda.driver.minor": parts[1], "cuda.driver.rev": parts[2],
				"cuda.runtime-version.full": inv.CUDADriverVersion, "cuda.runtime-version.major": major,
				"cuda.runtime-version.minor": minor, "cuda.runtime.major": major, "cuda.runtime.minor": minor,
				"gpu.mode": "compute", "gpu.machine": "unknown", "mps.capable": "false", "gfd.timestamp": "1700000000",
				"gpu.replicas": "1", "gpu.sharing-strategy": "none",
			} {
				if got := l["nvidia.com/"+k]; got != v {
					t.Errorf("%s=%q, want %q", k, got, v)
				}
			}
			if c, ok := l["nvidia.com/gpu.clique"]; ok {
				t.Errorf("gpu.clique=%s without an NVLink fabric", c)
			}
			// Every MIG type has all of GFD's attribute labels, and as
			// many devices as the inventory.
			counts := map[string]int{}
			for _, g := range inv.GPUs {
				for _, m := range g.MIGDevices {
					counts[strings.ReplaceAll(m.Profile, "+", ".")]++
				}
			}
			for profile, n := range counts {
				p := "nvidia.com/mig-" + profile + "."
				if got := l[p+"count"]; got != strconv.Itoa(n) {
					t.Errorf("%scount=%s, want %d", p, got, n)
				}
				for _, k := range migAttributeKeys {
					if _, ok := l[p+k]; !ok {
						t.Errorf("%s%s missing", p, k)
					}
				}
			}
		})
	}
}

// TestComputeMIGSingle: under mig-strategy single, the MIG type's labels
// take nvidia.com/gpu.*, attributes included; a node GFD cannot label that
// way gets its "-MIG-INVALID" labels.
func TestComputeMIGSingle(t *testing.T) {
	inv, rs, o := build(t, "name: u\ngpus:\n  - {model: A100-SXM4-40GB, count: 2, migEnabled: true, migDevices: [3g.20gb, 3g.20gb]}\n",
		"flags: {migStrategy: single}")
	l := labels.Compute(inv, rs, o)
	for k, v := range map[string]string{
		"gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", "gpu.count": "4", "gpu.memory": "19968",
		"gpu.multiprocessors": "42", "gpu.slices.gi": "3", "gpu.slices.ci": "3", "gpu.engines.copy": "3",
		"gpu.engines.decoder": "2", "gpu.engines.encoder": "0", "gpu.engines.jpeg": "0", "gpu.engines.ofa": "0",
		"gpu.family": "ampere", "mig.strategy": "single", "gpu.replicas": "1",
	} {
		if got := l["nvidia.com/"+k]; got != v {
			t.Errorf("%s=%q, want %q", k, got, v)
		}
	}
	// dgx-a100-mig mixes profiles and whole GPUs: GFD's invalid labels.
	_, _, o = build(t, "dgx-a100", "")
	o.MigStrategy = "single"
	l = labels.Compute(testkit.Inventory(t, "dgx-a100-mig"), nil, o)
	for k, v := range map[string]string{
		"gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-INVALID", "gpu.count": "0", "gpu.replicas": "0",
		"gpu.sharing-strategy": "", "gpu.memory": "0", "mig.strategy": "single",
	} {
		if got, ok := l["nvidia.com/"+k]; !ok || got != v {
			t.Errorf("%s=%q (set %t), want %q", k, got, ok, v)
		}
	}
}

// TestComputeFeatures: machine type, GPU mode and clique from what NVML
// and the machine type file report, and the timestamp option.
func TestComputeFeatures(t *testing.T) {
	p, err := sim.LoadProfile("dgx-h100")
	if err != nil {
		t.Fatal(err)
	}
	node := sim.NewNode(p, nil)
	cluster := [16]uint8{0x7b, 0x96, 0x8a, 0x6d, 0xc8, 0xaa, 0x45, 0xe1, 0x9e, 0x07, 0xe1, 0xe5, 0x1b, 0xe9, 0x9c, 0x31}
	fabric := gonvml.GpuFabricInfo{ClusterUuid: cluster, CliqueId: 1, State: gonvml.GPU_FABRIC_STATE_COMPLETED}
	for i := 0; i < 8; i++ {
		if err := node.SetFabric(i, fabric); err != nil {
			t.Fatal(err)
		}
	}
	if err := node.SetFault(7, "GetGpuFabricInfo", gonvml.ERROR_NOT_SUPPORTED); err != nil { // one GPU off the fabric is ignored
		t.Fatal(err)
	}
	lib, err := nvml.Open(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Close()
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, rs, o := buildFor(t, inv, "")
	dmi := filepath.Join(t.TempDir(), "product_name")
	if err := os.WriteFile(dmi, []byte("NVIDIA DGX H100\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	o.MachineTypeFile = dmi
	l := labels.Compute(inv, rs, o)
	for k, v := range map[string]string{
		"gpu.machine": "NVIDIA-DGX-H100", "gpu.mode": "compute",
		"gpu.clique": "7b968a6d-c8aa-45e1-9e07-e1e51be99c31.1", "gfd.timestamp": "1700000000",
	} {
		if got := l["nvidia.com/"+k]; got != v {
			t.Errorf("%s=%q, want %q", k, got, v)
		}
	}

	// Edge cases on a copied inventory: GPUs in two cliques, or in
	// different PCI classes, get no clique and mode unknown; a missing
	// machine type file is "unknown"; noTimestamp drops the timestamp.
	two := *inv
	two.GPUs = append([]nvml.GPU(nil), inv.GPUs...)
	two.GPUs[1].Fabric = &nvml.Fabric{ClusterUUID: inv.GPUs[0].Fabric.ClusterUUID, CliqueID: 2}
	two.GPUs[2].PCIClass = nvml.PCIClassVGA
	o.MachineTypeFile = filepath.Join(t.TempDir(), "missing")
	o.NoTimestamp = true
	l = labels.Compute(&two, rs, o)
	for k, v := range map[string]string{"gpu.machine": "unknown", "gpu.mode": "unknown", "gpu.clique": "", "gfd.timestamp": ""} {
		if got, ok := l["nvidia.com/"+k]; got != v || (v == "" && ok) {
			t.Errorf("%s=%q (set %t), want %q", k, got, ok, v)
		}
	}
	for i := range two.GPUs {
		two.GPUs[i].PCIClass = nvml.PCIClassVGA
	}
	if got := labels.Compute(&two, rs, o)["nvidia.com/gpu.mode"]; got != "graphics" {
		t.Errorf("every GPU a VGA controller: gpu.mode=%q, want graphics", got)
	}
}

// TestTimestampIsNoChange: a new timestamp alone neither rewrites the file
// nor counts as a labels change; any other change writes the new stamp.
func TestTimestampIsNoChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gpu-plugin")
	l := labels.Labels{"nvidia.com/gpu.count": "8", labels.TimestampKey: "100"}
	if wrote, err := labels.Write(path, l); !wrote || err != nil {
		t.Fatalf("first write: %t %v", wrote, err)
	}
	later := labels.Labels{"nvidia.com/gpu.count": "8", labels.TimestampKey: "200"}
	if !labels.Equal(l, later) {
		t.Error("labels differing only in the timestamp are not Equal")
	}
	if wrote, err := labels.Write(path, later); wrote || err != nil {
		t.Errorf("only the timestamp changed: wrote=%t err=%v; want no write", wrote, err)
	}
	if raw, _ := os.ReadFile(path); !strings.Contains(string(raw), "gfd.timestamp=100") {
		t.Errorf("the file's timestamp changed without a write:\n%s", raw)
	}
	changed := labels.Labels{"nvidia.com/gpu.count": "7", labels.TimestampKey: "300"}
	if labels.Equal(l, changed) {
		t.Error("a changed count is Equal")
	}
	if wrote, err := labels.Write(path, changed); !wrote || err != nil {
		t.Errorf("count changed: wrote=%t err=%v", wrote, err)
	}
	if raw, _ := os.ReadFile(path); !strings.Contains(string(raw), "gfd.timestamp=300") {
		t.Errorf("the rewrite kept the old timestamp:\n%s", raw)
	}
	unstamped := labels.Labels{"nvidia.com/gpu.count": "7"}
	if labels.Equal(changed, unstamped) {
		t.Error("dropping the timestamp (noTimestamp) is Equal")
	}
	if wrote, err := labels.Write(path, unstamped); !wrote || err != nil {
		t.Errorf("timestamp dropped: wrote=%t err=%v", wrote, err)
	}
}

// TestOptionsFrom: flags.gfd.noTimestamp and machineTypeFile apply; the
// machine type file defaults to DMI under --sys-root.
func TestOptionsFrom(t *testing.T) {
	c, err := config.Parse([]byte("version: v1\nflags: {migStrategy: mixed}\n"))
	if err != nil {
		t.Fatal(err)
	}
	c.Daemon.SysRoot = "/host/sys"
	if o := labels.OptionsFrom(c); o.MigStrategy != "mixed" || o.NoTimestamp || o.MachineTypeFile != "/host/sys/class/dmi/id/product_name" {
		t.Errorf("defaults: %+v", o)
	}
	c, err = config.Parse([]byte("version: v1\nflags: {gfd: {noTimestamp: true, machineTypeFile: /etc/machine}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if o := labels.OptionsFrom(c); !o.NoTimestamp || o.MachineTypeFile != "/etc/machine" {
		t.Errorf("flags.gfd: %+v", o)
	}
}
