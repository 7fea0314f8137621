package kubelet

// MIG on the production NVML path: the gpu-plugin binary without
// --simulate on the fake library's MIG layouts (dgx-a100-mig, and a profile
// file with one layout on every GPU), under the real device manager. The
// library reports GPU-instance profile IDs as the driver does (19 for
// 1g.5gb, not its index 0), so a daemon that mixes IDs and indices
// advertises the wrong resources here. NVIDIA's plugin v0.20.0 on the same
// library (fakenvml README) advertises the mixed map below.

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// nvidiaMixedA100 is what NVIDIA's plugin advertises on dgx-a100-mig with
// --mig-strategy=mixed.
var nvidiaMixedA100 = map[string]int64{
	"nvidia.com/gpu":           3,
	"nvidia.com/mig-1g.5gb":    9,
	"nvidia.com/mig-2g.10gb":   2,
	"nvidia.com/mig-3g.20gb":   3,
	"nvidia.com/mig-4g.20gb":   1,
	"nvidia.com/mig-7g.40gb":   1,
	"nvidia.com/mig-1g.5gb.me": 1,
}

// a100MIGLayout is dgx-a100-mig's MIG devices per GPU as the fakenvml
// README lists them: profile and GPU-instance ID, in index order.
var a100MIGLayout = map[int][]struct {
	profile string
	gi      int
}{
	0: {{"1g.5gb", 7}, {"1g.5gb", 8}, {"1g.5gb", 9}, {"1g.5gb", 10}, {"1g.5gb", 11}, {"1g.5gb", 12}, {"1g.5gb", 13}},
	1: {{"3g.20gb", 2}, {"2g.10gb", 4}, {"1g.5gb", 7}, {"1g.5gb", 8}},
	2: {{"3g.20gb", 1}, {"3g.20gb", 2}},
	3: {{"7g.40gb", 0}},
	4: {{"4g.20gb", 1}, {"2g.10gb", 5}, {"1g.5gb+me", 13}},
}

// driverCaps are the cap device nodes the driver gives GPU instance gi and
// its compute instance ci on GPU minor gpu: config and monitor take minors 1
// and 2, then every GPU minor has 15 GPU instances of one access
// capability plus 8 compute instances each (NVIDIA's documented listing:
// gpu3/gi3/ci3/access is 439).
func driverCaps(gpu, gi, ci int) []string {
	base := 3 + 135*gpu + 9*gi
	return []string{fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", base), fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", base+1+ci)}
}

// mountMIGMinors puts a driver-numbered /proc/driver/nvidia-caps/mig-minors
// for GPU minors 0 to gpus-1 into this test binary's private mount
// namespace (a tmpfs over /proc/driver, removed at cleanup), where the
// daemon reads the MIG capability minors as on a node.
func mountMIGMinors(t *testing.T, gpus int) {
	t.Helper()
	requireKubeletNamespace(t)
	const dir = "/proc/driver"
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=4m,mode=0755"); err != nil {
		t.Fatalf("mounting a tmpfs over %s for mig-minors: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
		}
	})
	path := filepath.Join(dir, "nvidia-caps", "mig-minors")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nvml.DriverMIGMinors(gpus), 0o444); err != nil {
		t.Fatal(err)
	}
}

// advertised is every nvidia.com resource the manager reports with a
// non-zero capacity, as "capacity/allocatable" keyed by name.
func (k *kubelet) advertised() map[string]int64 {
	c, a, _ := k.manager().GetCapacity(k.logger)
	out := map[string]int64{}
	for name, q := range c {
		if !strings.HasPrefix(string(name), "nvidia.com/") || q.Value() == 0 {
			continue
		}
		if alloc := a[name]; alloc.Value() != q.Value() {
			out[string(name)] = -q.Value() // not all allocatable: never equal to a want
			continue
		}
		out[string(name)] = q.Value()
	}
	return out
}

// waitAdvertised waits until the manager's nvidia.com resources are
// exactly want, all allocatable, and returns how long that took.
func (k *kubelet) waitAdvertised(want map[string]int64) time.Duration {
	k.tb.Helper()
	start := time.Now()
	var last map[string]int64
	if err := poll(waitTimeout, func() bool { last = k.advertised(); return maps.Equal(last, want) }); err != nil {
		k.tb.Fatalf("kubelet device manager: advertised %v, want exactly %v (within %v)", last, want, waitTimeout)
	}
	return time.Since(start)
}

// migCheck compares one GPU's MIG devices with (profile, GI ID) pairs and
// checks their caps.
func migCheck(t *testing.T, g nvml.GPU, want []struct {
	profile string
	gi      int
}) {
	t.Helper()
	if len(g.MIGDevices) != len(want) {
		t.Errorf("GPU %d: %d MIG devices %v (problem %q), want %d", g.Index, len(g.MIGDevices), g.MIGDevices, g.Problem, len(want))
		return
	}
	for k, m := range g.MIGDevices {
		if m.Profile != want[k].profile || m.GPUInstanceID != want[k].gi || m.ComputeInstanceID != 0 {
			t.Errorf("GPU %d MIG %d: %s GI %d CI %d, want %s GI %d CI 0", g.Index, k, m.Profile, m.GPUInstanceID, m.ComputeInstanceID, want[k].profile, want[k].gi)
		}
		if caps := driverCaps(g.Minor, m.GPUInstanceID, m.ComputeInstanceID); !slices.Equal(m.CapDevicePaths, caps) {
			t.Errorf("GPU %d MIG %d: caps %v, want %v", g.Index, k, m.CapDevicePaths, caps)
		}
	}
	if g.Problem != "" {
		t.Errorf("GPU %d: problem %q", g.Index, g.Problem)
	}
}

// Mixed strategy: exactly NVIDIA's map; every MIG device with the profile
// and GI the library laid out and the driver's caps; a pod asking for the
// 1g.5gb+me device gets its UUID and, with PASS_DEVICE_SPECS, its parent's
// node and both caps. A run-time re-layout through the control socket
// (which also delivers nvmlEventMigConfigChange) is advertised at the
// daemon's next re-scan (--rescan-interval).
func TestRealNVMLMIGMixed(t *testing.T) {
	fakeNVMLDir(t)
	mountMIGMinors(t, 8)
	k := startKubelet(t)
	d := startReal(t, realOptions{Profile: "dgx-a100-mig", Flags: []string{
		"--mig-strategy=mixed", "--pass-device-specs=true", "--rescan-interval=200ms",
	}})
	t.Logf("mixed: advertised %v, %v after the daemon's running line", nvidiaMixedA100, k.waitAdvertised(nvidiaMixedA100))

	inv := d.debugDevices().Inventory
	if inv == nil || len(inv.GPUs) != 8 {
		t.Fatalf("inventory: %+v", inv)
	}
	for i, g := range inv.GPUs {
		migCheck(t, g, a100MIGLayout[i])
		if want := i <= 4; g.MIGEnabled != want {
			t.Errorf("GPU %d: MIG enabled %v, want %v", i, g.MIGEnabled, want)
		}
	}

	me := inv.GPUs[4].MIGDevices[2]
	pod := gpuPod("media", "nvidia.com/mig-1g.5gb.me", 1)
	opts, err := k.admit(pod)
	if err != nil {
		t.Fatalf("admitting a pod asking for mig-1g.5gb.me: %v", err)
	}
	if got := envMap(opts.Envs)["NVIDIA_VISIBLE_DEVICES"]; got != me.UUID {
		t.Errorf("NVIDIA_VISIBLE_DEVICES %q, want the 1g.5gb+me device %s", got, me.UUID)
	}
	var nodes []string
	for _, dev := range opts.Devices {
		nodes = append(nodes, dev.PathInContainer)
		if dev.PathOnHost != dev.PathInContainer {
			t.Errorf("device %s from host %s, want the same path (driver root /)", dev.PathInContainer, dev.PathOnHost)
		}
	}
	for _, want := range append([]string{"/dev/nvidia4"}, driverCaps(4, 13, 0)...) {
		if !slices.Contains(nodes, want) {
			t.Errorf("container devices %v lack %s", nodes, want)
		}
	}
	if slices.Contains(nodes, "/dev/nvidia0") {
		t.Errorf("container devices %v include another GPU's node", nodes)
	}

	// GPU 0: 7 × 1g.5gb → 2 × 3g.20gb.
	if got := d.mustCtl("mig 0 3g.20gb,3g.20gb"); !strings.Contains(got, "devices=2") {
		t.Fatalf("re-layout: %s", got)
	}
	want := maps.Clone(nvidiaMixedA100)
	want["nvidia.com/mig-1g.5gb"] = 2
	want["nvidia.com/mig-3g.20gb"] = 5
	t.Logf("re-layout of GPU 0: advertised %v after %v (--rescan-interval=200ms)", want, k.waitAdvertised(want))
	g0 := d.debugDevices().Inventory.GPUs[0]
	migCheck(t, g0, []struct {
		profile string
		gi      int
	}{{"3g.20gb", 1}, {"3g.20gb", 2}})
	devs := k.devices("nvidia.com/mig-3g.20gb")
	for _, m := range g0.MIGDevices {
		if _, ok := devs[m.UUID]; !ok {
			t.Errorf("re-laid-out %s (%s) not among the manager's mig-3g.20gb devices", m.UUID, m.Profile)
		}
	}

	// MIG turned on with a layout on a whole GPU: it leaves nvidia.com/gpu.
	d.mustCtl("mig 7 7g.40gb")
	want["nvidia.com/gpu"] = 2
	want["nvidia.com/mig-7g.40gb"] = 2
	t.Logf("MIG on GPU 7: advertised %v after %v", want, k.waitAdvertised(want))
}

// uniformA100Profile is a fakenvml profile file: two A100-SXM4-40GB with
// the same MIG layout, as mig-strategy single needs.
const uniformA100Profile = `name a100-uniform-mig
driver 550.54.15
cuda 12040
gpu GPU-a1000c3b-4d5e-4f60-9a8b-b10000000000 00000000:07:00.0 40960 0 8.0 Nvidia Ampere 0x20b010de NVIDIA A100-SXM4-40GB
mig 1g.5gb,1g.5gb,1g.5gb,1g.5gb,1g.5gb,1g.5gb,1g.5gb
gpu GPU-a1000c3b-4d5e-4f60-9a8b-b10000000001 00000000:0F:00.0 40960 0 8.0 Nvidia Ampere 0x20b010de NVIDIA A100-SXM4-40GB
mig 1g.5gb,1g.5gb,1g.5gb,1g.5gb,1g.5gb,1g.5gb,1g.5gb
topo X    NV12
topo NV12 X
`

// Single strategy: every MIG device is an nvidia.com/gpu (NVIDIA's single
// outcome: 14 on two 7 × 1g.5gb GPUs, no mig-* resource), named by its MIG
// UUID. Re-laying out both GPUs to 2 × 3g.20gb re-advertises 4; while only
// one is done the layout is mixed and the 14 stay.
func TestRealNVMLMIGSingle(t *testing.T) {
	fakeNVMLDir(t)
	mountMIGMinors(t, 2)
	profile := filepath.Join(t.TempDir(), "uniform.profile")
	if err := os.WriteFile(profile, []byte(uniformA100Profile), 0o600); err != nil {
		t.Fatal(err)
	}
	k := startKubelet(t)
	d := startReal(t, realOptions{Profile: profile, Flags: []string{"--mig-strategy=single", "--rescan-interval=200ms"}})
	t.Logf("single: advertised nvidia.com/gpu 14 after %v", k.waitAdvertised(map[string]int64{"nvidia.com/gpu": 14}))

	inv := d.debugDevices().Inventory
	var migUUIDs []string
	for _, g := range inv.GPUs {
		for _, m := range g.MIGDevices {
			migUUIDs = append(migUUIDs, m.UUID)
			if m.Profile != "1g.5gb" || len(m.CapDevicePaths) != 2 {
				t.Errorf("GPU %d MIG %d: %s caps %v", g.Index, m.Index, m.Profile, m.CapDevicePaths)
			}
		}
	}
	if got := slices.Sorted(maps.Keys(k.devices("nvidia.com/gpu"))); !slices.Equal(got, slices.Sorted(slices.Values(migUUIDs))) {
		t.Errorf("manager's nvidia.com/gpu devices %v, want the 14 MIG UUIDs %v", got, migUUIDs)
	}

	d.mustCtl("mig 0 3g.20gb,3g.20gb")
	d.waitLog("the re-scan refusing a mixed layout", func(l logLine) bool {
		return l.Level == "ERROR" && strings.Contains(fmt.Sprint(l.Fields["err"]), "mig-strategy single")
	})
	if got := k.advertised(); !maps.Equal(got, map[string]int64{"nvidia.com/gpu": 14}) {
		t.Errorf("after re-laying out one GPU only: advertised %v, want the 14 kept", got)
	}
	d.mustCtl("mig 1 3g.20gb,3g.20gb")
	t.Logf("single after both re-layouts: nvidia.com/gpu 4 after %v", k.waitAdvertised(map[string]int64{"nvidia.com/gpu": 4}))
}

// `gpu-plugin inventory` on dgx-a100-mig lists every MIG device with the
// profile, GI and caps the library and the driver's numbering give it.
func TestRealNVMLMIGInventory(t *testing.T) {
	fakeNVMLDir(t)
	mountMIGMinors(t, 8)
	var doc daemon.DebugDevices
	out := runInventory(t, "dgx-a100-mig", nil, "-o", "json")
	if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.Inventory == nil {
		t.Fatalf("inventory -o json: %v\n%s", err, out)
	}
	for i, g := range doc.Inventory.GPUs {
		migCheck(t, g, a100MIGLayout[i])
	}
	table := runInventory(t, "dgx-a100-mig", nil)
	for _, want := range []string{"4:2  MIG 1g.5gb+me", "nvidia-cap660,nvidia-cap661", "3:0  MIG 7g.40gb", "nvidia-cap408,nvidia-cap409"} {
		if !strings.Contains(table, want) {
			t.Errorf("inventory table lacks %q:\n%s", want, table)
		}
	}
}
