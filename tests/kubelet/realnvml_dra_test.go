package kubelet

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	resourcev1 "k8s.io/api/resource/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/driverroot"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// TestRealNVMLDRA runs the DRA plugin on the production NVML path: the
// daemon process loads the fake libnvidia-ml.so.1 through go-nvml's dlopen
// (dgx-a100-mig: MIG devices from NVML's own GPU and compute instances),
// before the real kubelet DRA manager and an API that validates every
// ResourceSlice as the API server does. The slice's versions, MIG profiles
// and capacities are NVML's; a MIG claim's CDI spec carries the parent's
// device node and the MIG capability nodes; an XID on the parent taints
// its MIG devices.
func TestRealNVMLDRA(t *testing.T) {
	requireKubeletNamespace(t)
	libDir := fakeNVMLDir(t)
	mountMIGMinors(t, 8)

	// A driver root for the CDI spec, laid out for what the library reports.
	t.Setenv("FAKE_NVML_PROFILE", "dgx-a100-mig")
	t.Setenv("FAKE_NVML_SOCKET", filepath.Join(t.TempDir(), "ctl.sock"))
	lib, err := nvml.Open(gonvml.New(gonvml.WithLibraryPath(filepath.Join(libDir, fakeNVMLSoname))))
	if err != nil {
		t.Fatal(err)
	}
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	lib.Close()
	if err != nil {
		t.Fatal(err)
	}
	minors, err := os.ReadFile("/proc/driver/nvidia-caps/mig-minors")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if err := driverroot.Create(root, inv, minors); err != nil {
		t.Fatal(err)
	}

	tmp := t.TempDir()
	reg, plugins, dp := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins"), filepath.Join(tmp, "device-plugins")
	if err := os.MkdirAll(dp, 0o755); err != nil {
		t.Fatal(err)
	}
	k := startDRAKubelet(t, reg)
	d := startReal(t, realOptions{Profile: "dgx-a100-mig", Flags: []string{
		"--allocation-mode=dra", k.kubeconfigFlag(), "--node-name=" + draNodeName,
		"--kubelet-registrar-directory-path=" + reg, "--kubelet-plugins-directory-path=" + plugins, "--kubelet-socket-dir=" + dp,
		"--driver-root=" + root, "--driver-root-ctr-path=" + root, "--nvml-library=" + filepath.Join(libDir, fakeNVMLSoname),
	}})
	k.waitRegistered(draDriver)
	units := 0
	for _, g := range inv.GPUs {
		if g.MIGEnabled {
			units += len(g.MIGDevices)
		} else {
			units++
		}
	}
	s := k.waitSlices(fmt.Sprintf("%d devices", units), func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == units })

	// A 3g.20gb MIG device, as NVML describes it.
	var parent = -1
	var mig nvml.MIGDevice
	for i, g := range inv.GPUs {
		for _, m := range g.MIGDevices {
			if m.Profile == "3g.20gb" && parent < 0 {
				parent, mig = i, m
			}
		}
	}
	if parent < 0 {
		t.Fatal("no 3g.20gb MIG device on dgx-a100-mig")
	}
	g := inv.GPUs[parent]
	var dev *resourcev1.Device
	for i := range s[0].Spec.Devices {
		if a := s[0].Spec.Devices[i].Attributes["uuid"]; a.StringValue != nil && *a.StringValue == mig.UUID {
			dev = &s[0].Spec.Devices[i]
		}
	}
	if dev == nil {
		t.Fatalf("MIG device %s not in the slice: %s", mig.UUID, dumpJSON(s))
	}
	// NVIDIA's device name: the driver's profile ID of a 3g.20gb (9, not
	// its index 2) and where the GPU instance sits (start 0 or 4, 4 memory
	// slices), with a capacity for each of those slices.
	if m := regexp.MustCompile(fmt.Sprintf(`^gpu-%d-mig-9-([04])-4$`, g.Minor)).FindStringSubmatch(dev.Name); m == nil {
		t.Errorf("3g.20gb MIG device named %s, want gpu-%d-mig-9-<0 or 4>-4 as NVIDIA's driver names it", dev.Name, g.Minor)
	} else {
		start, _ := strconv.Atoi(m[1])
		for i := range 8 {
			q, held := dev.Capacity[resourcev1.QualifiedName(fmt.Sprintf("memorySlice%d", i))]
			if want := i >= start && i < start+4; held != want || (held && q.Value.Value() != 1) {
				t.Errorf("%s: memorySlice%d capacity %v (present %v), want present %v", dev.Name, i, q.Value, held, want)
			}
		}
	}
	str := func(name resourcev1.QualifiedName) string {
		if a := dev.Attributes[name]; a.StringValue != nil {
			return *a.StringValue
		} else if a.VersionValue != nil {
			return "v" + *a.VersionValue
		}
		return "<none>"
	}
	for name, want := range map[resourcev1.QualifiedName]string{"type": "mig", "profile": "3g.20gb", "parentUUID": g.UUID, "productName": g.Name} {
		if got := str(name); got != want {
			t.Errorf("MIG device %s attribute %s = %q, want %q", dev.Name, name, got, want)
		}
	}
	if v := str("driverVersion"); !strings.HasPrefix(v, "v") || strings.Count(v, ".") != 2 {
		t.Errorf("driverVersion %q, want NVML's %q as a version", v, inv.DriverVersion)
	}
	if mig.Attributes != nil {
		if q := dev.Capacity["multiprocessors"].Value; q.Value() != int64(mig.Attributes.Multiprocessors) {
			t.Errorf("multiprocessors %s, want NVML's %d", q.String(), mig.Attributes.Multiprocessors)
		}
	}

	// A claim for it: the CDI spec carries the parent's node and the MIG
	// capability nodes NVML's instances map to.
	k.claim(draNamespace, "mig", draResult(dev.Name))
	pod := k.pod("mig-pod", "mig")
	if err := k.prepare(pod); err != nil {
		t.Fatal(err)
	}
	names := k.cdiDevices(pod, containerName)
	p := &plugin{cdiDir: filepath.Join(d.tmp, "cdi")}
	nodes, err := deviceNodePaths(p, names)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range append([]string{fmt.Sprintf("/dev/nvidia%d", g.Minor)}, mig.CapDevicePaths...) {
		if !slices.Contains(nodes, want) {
			t.Errorf("the MIG claim injects %v, missing %s", nodes, want)
		}
	}

	// An XID on the parent GPU taints each of its MIG devices.
	d.xid(parent, 48)
	k.waitSlices("the parent's MIG devices tainted", func(s []resourcev1.ResourceSlice) bool {
		n := 0
		for _, dv := range s[0].Spec.Devices {
			if a := dv.Attributes["parentUUID"]; a.StringValue != nil && *a.StringValue == g.UUID && len(dv.Taints) == 1 && dv.Taints[0].Value == "48" {
				n++
			}
		}
		return n == len(g.MIGDevices)
	})
	if err := k.unprepare(pod); err != nil {
		t.Fatal(err)
	}
}
