package cdi_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi"
	"github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi/transform"
	transformroot "github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi/transform/root"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/driverroot"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// fakeNode is a simulated node's inventory, its NVML, and a driver root
// laid out for it.
type fakeNode struct {
	inv  *nvml.Inventory
	node *sim.Node
	root string
}

func newFakeNode(t testing.TB, profile string) *fakeNode {
	t.Helper()
	node, _, inv := testkit.SimNode(t, profile)
	return &fakeNode{inv: inv, node: node, root: testkit.DriverRoot(t, inv)}
}

// TestGenerateMatchesNVCDI checks the spec against nvcdi itself: nvcdi
// given the simulator's NVML directly (not our inventory view), with its
// own namers, on the same driver root, must produce the same spec.
func TestGenerateMatchesNVCDI(t *testing.T) {
	n := newFakeNode(t, "dgx-h100")
	for _, tc := range []struct {
		name     string
		disabled []string
		flags    []string
	}{
		{name: "defaults"},
		{name: "hooks disabled", disabled: []string{"create-symlinks", "enable-cuda-compat"}},
		{name: "feature flags", flags: []string{"disable-ipc-discoverer"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ours, err := cdi.Generate(n.inv, cdi.Options{DriverRoot: n.root, HostDriverRoot: "/", DisabledHooks: tc.disabled, FeatureFlags: tc.flags})
			if err != nil {
				t.Fatal(err)
			}
			uuidNamer, _ := nvcdi.NewDeviceNamer(nvcdi.DeviceNameStrategyUUID)
			indexNamer, _ := nvcdi.NewDeviceNamer(nvcdi.DeviceNameStrategyIndex)
			lib, err := nvcdi.New(nvcdi.WithMode(nvcdi.ModeNvml), nvcdi.WithNvmlLib(n.node.NVML()),
				nvcdi.WithDriverRoot(n.root), nvcdi.WithVendor(cdi.Vendor), nvcdi.WithClass(cdi.Class),
				nvcdi.WithDeviceNamers(uuidNamer, indexNamer), nvcdi.WithDisabledHooks(tc.disabled...),
				nvcdi.WithFeatureFlags(tc.flags...), nvcdi.WithLogger(quiet{}),
				nvcdi.WithMergedDeviceOptions(transform.WithName("all"), transform.WithSkipIfExists(true)))
			if err != nil {
				t.Fatal(err)
			}
			theirs, err := lib.GetSpec()
			if err != nil {
				t.Fatal(err)
			}
			raw := theirs.Raw()
			if err := transformroot.New(transformroot.WithRoot(n.root), transformroot.WithTargetRoot("/"), transformroot.WithRelativeTo("host")).Transform(raw); err != nil {
				t.Fatal(err)
			}
			raw.Version = ours[0].Version
			if got, want := mustJSON(t, ours[0]), mustJSON(t, raw); got != want {
				t.Errorf("our spec differs from nvcdi's on the same node and root\nours:   %s\nnvcdi's: %s", got, want)
			}
		})
	}
}

// TestGenerateContent checks what a container is given per device, with
// the driver root mapped to a driver container's host path.
func TestGenerateContent(t *testing.T) {
	n := newFakeNode(t, "dgx-a100-mig")
	const host = "/run/nvidia/driver"
	ss, err := cdi.Generate(n.inv, cdi.Options{
		DriverRoot: n.root, HostDriverRoot: host, HookPath: "/usr/local/nvidia/toolkit/nvidia-cdi-hook",
		DisabledHooks: []string{"update-ldcache"},
		IMEXChannels:  []int{0, 3},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ss) != 2 || ss[0].Kind != cdi.Kind || ss[1].Kind != cdi.Vendor+"/"+cdi.IMEXClass {
		t.Fatalf("specs %v, want the gpu and imex-channel classes", kinds(ss))
	}
	gpu := ss[0]

	// Every host path is under the host's driver root, none under the
	// directory this process read.
	for _, p := range hostPaths(gpu) {
		if strings.HasPrefix(p, n.root) || (!strings.HasPrefix(p, host+"/") && p != "/dev/null") {
			t.Errorf("host path %s is not under the host driver root %s", p, host)
		}
	}
	// The driver's libraries and binaries are common edits.
	var mounted []string
	for _, m := range gpu.ContainerEdits.Mounts {
		mounted = append(mounted, m.ContainerPath)
	}
	for _, lib := range driverroot.Libraries {
		want := "/" + driverroot.LibDir + "/" + lib + "." + n.inv.DriverVersion
		if !slices.Contains(mounted, want) {
			t.Errorf("library %s not mounted; mounts %v", want, mounted)
		}
	}
	if !slices.Contains(mounted, "/usr/bin/nvidia-smi") {
		t.Errorf("nvidia-smi not mounted")
	}
	// Hooks: the configured path; update-ldcache disabled, create-symlinks kept.
	var hooks []string
	for _, h := range gpu.ContainerEdits.Hooks {
		if h.Path != "/usr/local/nvidia/toolkit/nvidia-cdi-hook" {
			t.Errorf("hook path %s", h.Path)
		}
		hooks = append(hooks, h.Args[1])
	}
	if slices.Contains(hooks, "update-ldcache") || !slices.Contains(hooks, "create-symlinks") {
		t.Errorf("hooks %v: want create-symlinks and no update-ldcache", hooks)
	}
	for _, node := range []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"} {
		if !slices.Contains(nodePaths(gpu.ContainerEdits), node) {
			t.Errorf("common device node %s missing: %v", node, nodePaths(gpu.ContainerEdits))
		}
	}

	// The runtime's CDI library resolves every name Allocate returns.
	dir := t.TempDir()
	if _, err := cdi.WriteAll(dir, ss); err != nil {
		t.Fatal(err)
	}
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(dir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if errs := cache.GetErrors(); len(errs) > 0 {
		t.Fatalf("the runtime's CDI library rejects the spec: %v", errs)
	}
	mig := n.inv.GPUs[1].MIGDevices[2]
	migNodes := []string{"/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap165", "/dev/nvidia-caps/nvidia-cap166"}
	whole := n.inv.GPUs[7]
	for _, tc := range []struct {
		name  string
		nodes []string
	}{
		{cdi.QualifiedName(cdi.Class, whole.UUID), []string{"/dev/nvidia7"}},
		{cdi.QualifiedName(cdi.Class, "7"), []string{"/dev/nvidia7"}},
		{cdi.QualifiedName(cdi.Class, mig.UUID), migNodes},
		{cdi.QualifiedName(cdi.Class, "1:2"), migNodes},
		{cdi.QualifiedName(cdi.IMEXClass, "3"), []string{"/dev/nvidia-caps-imex-channels/channel3"}},
	} {
		d := cache.GetDevice(tc.name)
		if d == nil {
			t.Errorf("%s does not resolve", tc.name)
			continue
		}
		if got := nodePaths(d.ContainerEdits); !slices.Equal(got, tc.nodes) {
			t.Errorf("%s device nodes %v, want %v", tc.name, got, tc.nodes)
		}
		for _, node := range d.ContainerEdits.DeviceNodes {
			// nvcdi gives GPU nodes their numbers; IMEX nodes (as in
			// NVIDIA's plugin) carry paths only.
			if node.HostPath != filepath.Join(host, node.Path) || (node.Major == 0 && !strings.Contains(tc.name, cdi.IMEXClass)) {
				t.Errorf("%s: node %+v, want host path under %s and its device numbers", tc.name, node, host)
			}
		}
	}
	// "all" holds every GPU's node and every MIG device's caps.
	all := cache.GetDevice(cdi.QualifiedName(cdi.Class, "all"))
	if all == nil {
		t.Fatal("no all device")
	}
	allNodes := nodePaths(all.ContainerEdits)
	for _, want := range append(migNodes, "/dev/nvidia7", "/dev/nvidia0") {
		if !slices.Contains(allNodes, want) {
			t.Errorf("all lacks %s", want)
		}
	}
	names := 0
	for _, g := range n.inv.GPUs {
		if g.MIGEnabled {
			names += 2 * len(g.MIGDevices)
		} else {
			names += 2
		}
	}
	if got := len(cache.ListDevices()); got != names+1+2 {
		t.Errorf("%d CDI devices, want %d: two names per GPU and MIG device, all, two IMEX channels", got, names+3)
	}
}

// TestWriteAllRemovesStaleClasses: a class no longer generated (IMEX turned
// off by a reload) leaves no spec behind for the runtime to inject.
func TestWriteAllRemovesStaleClasses(t *testing.T) {
	n := newFakeNode(t, "dgx-h100")
	dir := t.TempDir()
	opts := cdi.Options{DriverRoot: n.root, IMEXChannels: []int{0}}
	ss, err := cdi.Generate(n.inv, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cdi.WriteAll(dir, ss); err != nil {
		t.Fatal(err)
	}
	imex := filepath.Join(dir, "k8s.device-plugin.nvidia.com-imex-channel.json")
	if _, err := os.Stat(imex); err != nil {
		t.Fatal(err)
	}
	opts.IMEXChannels = nil
	if ss, err = cdi.Generate(n.inv, opts); err != nil {
		t.Fatal(err)
	}
	paths, err := cdi.WriteAll(dir, ss)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(imex); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale IMEX spec still there (%v); wrote %v", err, paths)
	}
}

// TestGenerateRefusesWhatItCannotDescribe: a MIG device whose capability
// nodes are missing is an error naming it, not a spec without them.
func TestGenerateRefusesWhatItCannotDescribe(t *testing.T) {
	n := newFakeNode(t, "dgx-a100-mig")
	mig := n.inv.GPUs[1].MIGDevices[2]
	if err := os.Remove(filepath.Join(n.root, mig.CapDevicePaths[0])); err != nil {
		t.Fatal(err)
	}
	_, err := cdi.Generate(n.inv, cdi.Options{DriverRoot: n.root})
	if err == nil || !strings.Contains(err.Error(), mig.UUID) || !strings.Contains(err.Error(), "not a character device") {
		t.Fatalf("err = %v, want one naming %s and its missing node", err, mig.UUID)
	}
	if _, err := cdi.Generate(&nvml.Inventory{DriverVersion: "550.54.15"}, cdi.Options{DriverRoot: n.root}); err == nil {
		t.Error("an inventory without GPUs gave a spec")
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func kinds(ss []*specs.Spec) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Kind)
	}
	return out
}

func nodePaths(e specs.ContainerEdits) []string {
	var out []string
	for _, n := range e.DeviceNodes {
		out = append(out, n.Path)
	}
	return out
}

func hostPaths(s *specs.Spec) []string {
	var out []string
	edits := append([]specs.ContainerEdits{s.ContainerEdits}, func() []specs.ContainerEdits {
		var e []specs.ContainerEdits
		for _, d := range s.Devices {
			e = append(e, d.ContainerEdits)
		}
		return e
	}()...)
	for _, e := range edits {
		for _, n := range e.DeviceNodes {
			out = append(out, n.HostPath)
		}
		for _, m := range e.Mounts {
			out = append(out, m.HostPath)
		}
	}
	return out
}

// quiet discards nvcdi's log when the test runs it directly.
type quiet struct{}

func (quiet) Debugf(string, ...any)   {}
func (quiet) Errorf(string, ...any)   {}
func (quiet) Infof(string, ...any)    {}
func (quiet) Warningf(string, ...any) {}
func (quiet) Tracef(string, ...any)   {}

// BenchmarkGenerate is the spec generation done at start and after a
// re-scan that changed the GPUs, on a MIG node.
func BenchmarkGenerate(b *testing.B) {
	for _, profile := range []string{"dgx-h100", "dgx-a100-mig"} {
		b.Run(profile, func(b *testing.B) {
			n := newFakeNode(b, profile)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := cdi.Generate(n.inv, cdi.Options{DriverRoot: n.root}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
