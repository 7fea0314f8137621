package daemon_test

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// The names NVIDIA's plugin and container toolkit agree on; spelled out
// here rather than taken from the code under test.
const (
	visibleDevices = "NVIDIA_VISIBLE_DEVICES"
	mountsRoot     = "/var/run/nvidia-container-devices"
	cdiKind        = "k8s.device-plugin.nvidia.com/gpu"
)

// migConfig shares one 1g.5gb MIG device (GPU 1's MIG device 3) as two
// replicas under its own name, so the MIG node also serves a MIG replica
// (rename and devices apply with --resource-customization).
const migConfig = `version: v1
sharing:
  timeSlicing:
    resources:
    - {name: mig-1g.5gb, rename: mig-1g.5gb.shared, devices: ["1:3"], replicas: 2}
`

// replicaConfig time-slices every whole GPU into two replicas.
const replicaConfig = `version: v1
sharing:
  timeSlicing:
    resources:
    - {name: nvidia.com/gpu, replicas: 2}
`

// injNode is one daemon of the matrix, on a simulated node, with its CDI
// spec directory.
type injNode struct {
	r       *running
	specDir string
	// root is the simulated node's laid-out driver root, whose dev/ holds
	// the device nodes.
	root string
	caps nvml.MIGCaps // the node's mig-minors
}

// injDevice is one device an allocation must name: a whole GPU (mig nil)
// or a MIG device.
type injDevice struct {
	gpu *nvml.GPU
	mig *nvml.MIGDevice
}

// injCase is one allocation: the IDs the kubelet passes and the devices
// the container must get (a replica's physical device, once however many
// of its replicas were allocated).
type injCase struct {
	name     string
	node     *injNode
	resource string
	ids      []string
	want     []injDevice
}

// TestInjectionMatrix allocates whole GPUs, MIG devices and time-sliced
// replicas (of a whole GPU and of a MIG device) under every device-list
// strategy (and one combination) × device-ID strategy × passDeviceSpecs,
// and checks that each response names exactly the allocated devices, that
// every CDI name it returns resolves in the spec the daemon wrote, and that
// every device node it passes is a character device on the simulated
// node's driver root.
func TestInjectionMatrix(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the simulated node's driver root holds device nodes: mknod needs root")
	}
	for _, list := range []string{"envvar", "volume-mounts", "cdi-annotations", "cdi-cri", "envvar,cdi-cri"} {
		for _, id := range []string{"uuid", "index"} {
			for _, pass := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s/%s/pass=%v", list, id, pass), func(t *testing.T) {
					t.Parallel()
					args := []string{"--device-list-strategy=" + list, "--device-id-strategy=" + id,
						"--pass-device-specs=" + strconv.FormatBool(pass)}
					mig := startInjNode(t, "dgx-a100-mig", migConfig, append(args, "--mig-strategy=mixed", "--resource-customization")...)
					ts := startInjNode(t, "pcie-l4x4", replicaConfig, args...)
					for _, c := range injCases(t, mig, ts) {
						t.Run(c.name, func(t *testing.T) { checkAllocation(t, c, strings.Split(list, ","), id, pass) })
					}
				})
			}
		}
	}
}

// startInjNode starts a daemon on profile with configDoc as its config
// file and waits until the kubelet has every resource's device list.
func startInjNode(t *testing.T, profile, configDoc string, args ...string) *injNode {
	t.Helper()
	n := &injNode{specDir: t.TempDir()}
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cfg, []byte(configDoc), 0o644); err != nil {
		t.Fatal(err)
	}
	n.r = start(t, true, append([]string{"--simulate=" + profile, "--config=" + cfg, "--cdi-spec-dir=" + n.specDir,
		"--node-labels=false", "--rescan-interval=0", "--pod-resources-socket="}, args...)...)
	if n.root = n.r.d.SimDriverRoot(); n.root == "" {
		t.Fatalf("%s: the simulated node laid out no driver root", profile)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	want := injResources[profile]
	err := n.r.kubelet.WaitFor(ctx, func(k *fakekubelet.Kubelet) bool {
		for _, res := range want {
			if c, _ := k.Capacity(res); c == 0 {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatalf("%s: waiting for %v: %v (registered: %v)", profile, want, err, n.r.kubelet.Resources())
	}
	n.caps = migMinors(t, n)
	return n
}

// injResources are the resources each node must register before the
// allocations start.
var injResources = map[string][]string{
	"dgx-a100-mig": {"nvidia.com/gpu", "nvidia.com/mig-1g.5gb", "nvidia.com/mig-1g.5gb.shared"},
	"pcie-l4x4":    {"nvidia.com/gpu"},
}

// migMinors reads the MIG capability minors the driver root lists in
// proc/driver/nvidia-caps/mig-minors (absent on a node without MIG).
func migMinors(t *testing.T, n *injNode) nvml.MIGCaps {
	t.Helper()
	caps, err := nvml.ReadMIGCaps(filepath.Join(n.root, "proc"))
	if err != nil && n.r.d.Inventory().GPUs[0].MIGEnabled {
		t.Fatalf("the MIG node's driver root: %v", err)
	}
	return caps
}

// injCases are the allocations made on the two nodes.
func injCases(t *testing.T, mig, ts *injNode) []injCase {
	t.Helper()
	inv := mig.r.d.Inventory()
	gpu := func(n *injNode, i int) injDevice {
		g := &n.r.d.Inventory().GPUs[i]
		if g.MIGEnabled || g.UUID == "" {
			t.Fatalf("GPU %d: %+v, want a whole GPU", i, g)
		}
		return injDevice{gpu: g}
	}
	migDev := func(gi, mi int) injDevice {
		g := &inv.GPUs[gi]
		if !g.MIGEnabled || mi >= len(g.MIGDevices) || g.MIGDevices[mi].Profile != "1g.5gb" {
			t.Fatalf("GPU %d: %+v, want a 1g.5gb MIG device at %d", gi, g.MIGDevices, mi)
		}
		return injDevice{gpu: g, mig: &g.MIGDevices[mi]}
	}
	// replicas returns n of the kubelet's device IDs on resource whose
	// physical device is uuid ("<uuid>::<n>").
	replicas := func(node *injNode, resource, uuid string, n int) []string {
		var ids []string
		for _, d := range node.r.kubelet.Devices(resource) {
			if strings.HasPrefix(d.ID, uuid+"::") && len(ids) < n {
				ids = append(ids, d.ID)
			}
		}
		if len(ids) != n {
			t.Fatalf("%s lists %d replicas of %s, want %d", resource, len(ids), uuid, n)
		}
		return ids
	}
	g5, g7, m04, m12, m13 := gpu(mig, 5), gpu(mig, 7), migDev(0, 4), migDev(1, 2), migDev(1, 3)
	t1, t2 := gpu(ts, 1), gpu(ts, 2)
	return []injCase{
		{"gpu", mig, "nvidia.com/gpu", []string{g5.gpu.UUID}, []injDevice{g5}},
		{"two-gpus", mig, "nvidia.com/gpu", []string{g5.gpu.UUID, g7.gpu.UUID}, []injDevice{g5, g7}},
		{"mig", mig, "nvidia.com/mig-1g.5gb", []string{m12.mig.UUID}, []injDevice{m12}},
		{"two-migs", mig, "nvidia.com/mig-1g.5gb", []string{m04.mig.UUID, m12.mig.UUID}, []injDevice{m04, m12}},
		{"mig-replicas", mig, "nvidia.com/mig-1g.5gb.shared", replicas(mig, "nvidia.com/mig-1g.5gb.shared", m13.mig.UUID, 2), []injDevice{m13}},
		{"replica", ts, "nvidia.com/gpu", replicas(ts, "nvidia.com/gpu", t1.gpu.UUID, 1), []injDevice{t1}},
		{"replicas-of-two-gpus", ts, "nvidia.com/gpu",
			append(replicas(ts, "nvidia.com/gpu", t1.gpu.UUID, 2), replicas(ts, "nvidia.com/gpu", t2.gpu.UUID, 1)...), []injDevice{t1, t2}},
	}
}

// name is how the runtime is told about d under the device-ID strategy.
func (d injDevice) name(idStrategy string) string {
	switch {
	case idStrategy == "index" && d.mig != nil:
		return fmt.Sprintf("%d:%d", d.gpu.Index, d.mig.Index)
	case idStrategy == "index":
		return strconv.Itoa(d.gpu.Index)
	case d.mig != nil:
		return d.mig.UUID
	}
	return d.gpu.UUID
}

// nodes are the device nodes d needs besides the control nodes: its GPU's
// /dev/nvidia<minor> and, for a MIG device, its GPU instance's and compute
// instance's capability nodes.
func (d injDevice) nodes(t *testing.T, caps nvml.MIGCaps) []string {
	t.Helper()
	out := []string{fmt.Sprintf("/dev/nvidia%d", d.gpu.Minor)}
	if d.mig == nil {
		return out
	}
	for _, c := range []string{
		fmt.Sprintf("gpu%d/gi%d/access", d.gpu.Minor, d.mig.GPUInstanceID),
		fmt.Sprintf("gpu%d/gi%d/ci%d/access", d.gpu.Minor, d.mig.GPUInstanceID, d.mig.ComputeInstanceID),
	} {
		minor, ok := caps[c]
		if !ok {
			t.Fatalf("the node's mig-minors lack %s", c)
		}
		out = append(out, fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", minor))
	}
	return out
}

var controlNodes = []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}

func checkAllocation(t *testing.T, c injCase, lists []string, idStrategy string, pass bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.node.r.kubelet.Allocate(ctx, c.resource, c.ids...)
	if err != nil {
		t.Fatalf("Allocate %s %v: %v", c.resource, c.ids, err)
	}
	names := make([]string, len(c.want))
	cdiNames := make([]string, len(c.want))
	for i, d := range c.want {
		names[i] = d.name(idStrategy)
		cdiNames[i] = cdiKind + "=" + names[i]
	}
	has := func(s string) bool { return slices.Contains(lists, s) }
	onlyCDI := !has("envvar") && !has("volume-mounts")

	// The environment and the mounts.
	wantEnv := map[string]string{}
	var wantMounts []string
	switch {
	case has("volume-mounts"):
		wantEnv[visibleDevices] = mountsRoot
		for _, n := range names {
			wantMounts = append(wantMounts, mountsRoot+"/"+n)
		}
	case has("envvar"):
		wantEnv[visibleDevices] = strings.Join(names, ",")
	}
	if got := resp.Envs; !maps.Equal(got, wantEnv) {
		t.Errorf("Envs %v, want %v", got, wantEnv)
	}
	var gotMounts []string
	for _, m := range resp.Mounts {
		gotMounts = append(gotMounts, m.ContainerPath)
		if m.HostPath != "/dev/null" || !m.ReadOnly {
			t.Errorf("mount %+v, want a read-only /dev/null", m)
		}
	}
	if !slices.Equal(gotMounts, wantMounts) {
		t.Errorf("mounts %v, want %v", gotMounts, wantMounts)
	}

	// The CDI names, and what they resolve to.
	var gotCRI []string
	for _, d := range resp.CdiDevices {
		gotCRI = append(gotCRI, d.Name)
	}
	var wantCRI []string
	if has("cdi-cri") {
		wantCRI = cdiNames
	}
	if !slices.Equal(gotCRI, wantCRI) {
		t.Errorf("CdiDevices %v, want %v", gotCRI, wantCRI)
	}
	keys, annotated, err := cdi.ParseAnnotations(resp.Annotations)
	switch {
	case err != nil:
		t.Errorf("annotations %v: %v", resp.Annotations, err)
	case !has("cdi-annotations") && len(resp.Annotations) != 0:
		t.Errorf("annotations %v without cdi-annotations", resp.Annotations)
	case has("cdi-annotations") && (len(keys) != 1 || len(resp.Annotations) != 1 || !slices.Equal(annotated, cdiNames)):
		t.Errorf("annotations %v, want one cdi.k8s.io/ key naming %v", resp.Annotations, cdiNames)
	}
	if has("cdi-cri") || has("cdi-annotations") {
		checkCDI(t, c, cdiNames)
	}

	// The device nodes passed with PASS_DEVICE_SPECS; a pure CDI strategy
	// passes none (the spec carries them), as NVIDIA's plugin does.
	if !pass || onlyCDI {
		if len(resp.Devices) != 0 {
			t.Errorf("DeviceSpecs %v with passDeviceSpecs=%v under %v", resp.Devices, pass, lists)
		}
		return
	}
	checkDeviceSpecs(t, c, resp.Devices)
}

func checkDeviceSpecs(t *testing.T, c injCase, specs []*pluginapi.DeviceSpec) {
	t.Helper()
	required := slices.Clone(controlNodes)
	for _, d := range c.want {
		for _, n := range d.nodes(t, c.node.caps) {
			if !slices.Contains(required, n) {
				required = append(required, n)
			}
		}
	}
	var got []string
	for _, s := range specs {
		if slices.Contains(got, s.ContainerPath) {
			t.Errorf("DeviceSpecs pass %s twice", s.ContainerPath)
		}
		got = append(got, s.ContainerPath)
		// Optional nodes NVIDIA's plugin passes when present.
		if !slices.Contains(required, s.ContainerPath) && s.ContainerPath != "/dev/nvidia-modeset" {
			t.Errorf("DeviceSpec %s: not a node of the allocated devices %v", s.ContainerPath, c.ids)
		}
		if s.Permissions != "rw" {
			t.Errorf("DeviceSpec %s: permissions %q, want rw", s.ContainerPath, s.Permissions)
		}
		if !strings.HasPrefix(s.HostPath, c.node.root+"/") {
			t.Errorf("DeviceSpec %s: host path %s is not on the simulated driver root %s", s.ContainerPath, s.HostPath, c.node.root)
		}
		checkCharDevice(t, s.ContainerPath, s.HostPath)
	}
	for _, n := range required {
		if !slices.Contains(got, n) {
			t.Errorf("DeviceSpecs %v lack %s", got, n)
		}
	}
}

// checkCDI resolves every name in the spec directory the daemon wrote;
// each device adds its GPU's node (and a MIG device its caps) and no other,
// the spec the control nodes, and every device node it adds is a character
// device on the driver root.
func checkCDI(t *testing.T, c injCase, names []string) {
	t.Helper()
	cache, err := cdi.NewCache(cdi.WithSpecDirs(c.node.specDir), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatalf("CDI specs in %s: %v", c.node.specDir, err)
	}
	for i, name := range names {
		dev := cache.GetDevice(name)
		if dev == nil {
			t.Errorf("%s does not resolve in %s (devices: %v)", name, c.node.specDir, cache.ListDevices())
			continue
		}
		own := c.want[i].nodes(t, c.node.caps)
		var paths []string
		for k, edits := range []*cdispec.ContainerEdits{&dev.ContainerEdits, &dev.GetSpec().ContainerEdits} {
			for _, n := range edits.DeviceNodes {
				paths = append(paths, n.Path)
				if k == 0 && !slices.Contains(own, n.Path) {
					t.Errorf("%s: the device adds %s, not a node of its own (%v)", name, n.Path, own)
				}
				host := n.HostPath
				if host == "" {
					host = n.Path
				}
				if !strings.HasPrefix(host, c.node.root+"/") {
					t.Errorf("%s: device node %s at %s, not on the simulated driver root %s", name, n.Path, host, c.node.root)
				}
				checkCharDevice(t, n.Path, host)
			}
		}
		for _, want := range append(own, controlNodes...) {
			if !slices.Contains(paths, want) {
				t.Errorf("%s: the CDI spec adds %v, not %s", name, paths, want)
			}
		}
	}
}

// checkCharDevice checks that host is a character device, and for
// /dev/nvidia<N> and /dev/nvidia-caps/nvidia-cap<N> that its minor is N.
func checkCharDevice(t *testing.T, ctrPath, host string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(host, &st); err != nil {
		t.Errorf("%s: %v", ctrPath, err)
		return
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		t.Errorf("%s: %s is not a character device (mode %o)", ctrPath, host, st.Mode)
		return
	}
	base := filepath.Base(ctrPath)
	num := strings.TrimPrefix(strings.TrimPrefix(base, "nvidia-cap"), "nvidia")
	if n, err := strconv.Atoi(num); err == nil && base != num && uint32(n) != unix.Minor(st.Rdev) {
		t.Errorf("%s: %s has minor %d, want %d", ctrPath, host, unix.Minor(st.Rdev), n)
	}
}
