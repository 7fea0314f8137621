package kubelet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// draDaemon starts the daemon in an allocation mode against the real
// kubelet DRA manager and the API shim, with its DRA directories in tmp.
// Without a device-plugin kubelet in the test, the device plugin side
// watches a directory of its own (split mode passes the real one).
func draDaemon(t testing.TB, k *draKubelet, reg, plugins string, flags ...string) *plugin {
	t.Helper()
	dp := filepath.Join(filepath.Dir(reg), "device-plugins")
	if err := os.MkdirAll(dp, 0o755); err != nil {
		t.Fatal(err)
	}
	return startPlugin(t, append([]string{k.kubeconfigFlag(), "--kubelet-socket-dir=" + dp, "--cdi-spec-dir=" + filepath.Join(filepath.Dir(reg), "cdi"),
		"--kubelet-registrar-directory-path=" + reg, "--kubelet-plugins-directory-path=" + plugins}, flags...)...)
}

func sliceDevice(s []resourcev1.ResourceSlice, name string) *resourcev1.Device {
	for i := range s {
		for j := range s[i].Spec.Devices {
			if s[i].Spec.Devices[j].Name == name {
				return &s[i].Spec.Devices[j]
			}
		}
	}
	return nil
}

func deviceCount(s []resourcev1.ResourceSlice) int {
	n := 0
	for _, sl := range s {
		n += len(sl.Spec.Devices)
	}
	return n
}

func deviceNodePaths(p *plugin, names []string) ([]string, error) {
	spec, err := p.injectCDI(names...)
	if err != nil {
		return nil, err
	}
	var out []string
	if spec.Linux != nil {
		for _, d := range spec.Linux.Devices {
			out = append(out, d.Path)
		}
	}
	return out, nil
}

// TestDRAThroughKubelet drives the daemon's DRA plugin with the real
// kubelet DRA manager (registration over the real socket, prepare and
// unprepare over real gRPC) and an API that validates the ResourceSlice
// as the API server does: the slice, a claim's CDI devices resolving to
// the claimed GPU's device node, health as a device taint, and prepared
// claims surviving a daemon restart.
func TestDRAThroughKubelet(t *testing.T) {
	requireKubeletNamespace(t)
	tmp := t.TempDir()
	reg, plugins := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins")
	k := startDRAKubelet(t, reg)
	p := draDaemon(t, k, reg, plugins, "--allocation-mode=dra")
	k.waitRegistered(draDriver)
	s := k.waitSlices("one slice of 8 GPUs", func(s []resourcev1.ResourceSlice) bool { return len(s) == 1 && deviceCount(s) == 8 })
	if got := s[0].Spec; got.Driver != draDriver || got.Pool.Name != draNodeName || got.NodeName == nil || *got.NodeName != draNodeName {
		t.Errorf("slice spec: driver %s pool %s node %v", got.Driver, got.Pool.Name, got.NodeName)
	}
	if own := s[0].OwnerReferences; len(own) != 1 || own[0].Kind != "Node" || string(own[0].UID) != string(k.nodeUID) {
		t.Errorf("slice owners %+v, want the node", own)
	}
	if st := p.d.Plugins().Status(); len(st) != 0 {
		t.Errorf("dra mode registers device plugin resources: %+v", st)
	}
	g := p.d.Inventory().GPUs[2]
	dev := fmt.Sprintf("gpu-%d", g.Minor)
	sd := sliceDevice(s, dev)
	if sd == nil || sd.Attributes["uuid"].StringValue == nil || *sd.Attributes["uuid"].StringValue != g.UUID || *sd.Attributes["type"].StringValue != "gpu" {
		t.Fatalf("slice device %s: %+v", dev, sd)
	}
	if q := sd.Capacity["memory"].Value; q.Value() != int64(g.MemoryBytes) {
		t.Errorf("memory capacity %s, want %d bytes", q.String(), g.MemoryBytes)
	}

	// One claim, two pods sharing it.
	c := k.claim(draNamespace, "shared", draResult(dev))
	podA, podB := k.pod("a", "shared"), k.pod("b", "shared")
	start := time.Now()
	if err := k.prepare(podA); err != nil {
		t.Fatal(err)
	}
	t.Logf("prepare through the kubelet: %s", time.Since(start))
	want := []string{"k8s.gpu.nvidia.com/claim=" + string(c.UID) + "-" + dev}
	if got := k.cdiDevices(podA, containerName); !slices.Equal(got, want) {
		t.Fatalf("CDI devices %v, want %v", got, want)
	}
	nodes, err := deviceNodePaths(p, want)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(nodes, fmt.Sprintf("/dev/nvidia%d", g.Minor)) || slices.Contains(nodes, fmt.Sprintf("/dev/nvidia%d", p.d.Inventory().GPUs[0].Minor)) {
		t.Errorf("the claim injects %v, want /dev/nvidia%d and no other GPU", nodes, g.Minor)
	}

	// XID 48 on the claimed GPU: a taint in the slice, the claim untouched;
	// recovery removes it.
	if _, err := p.d.SimNode().InjectXID(2, 48, -1, -1); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	s = k.waitSlices("an XID taint on "+dev, func(s []resourcev1.ResourceSlice) bool {
		d := sliceDevice(s, dev)
		return d != nil && len(d.Taints) == 1 && d.Taints[0].Key == "gpu.nvidia.com/xid" && d.Taints[0].Value == "48"
	})
	t.Logf("XID → taint in the API: %s", time.Since(start))
	if tn := sliceDevice(s, dev).Taints[0]; tn.Effect != resourcev1.DeviceTaintEffectNoSchedule {
		t.Errorf("taint effect %s", tn.Effect)
	}
	// The kubelet hears it over the DRA health service, and shows it in the
	// status of the pod using the device.
	if err := poll(10*time.Second, func() bool { return podDeviceHealth(k, podA) == "Unhealthy" }); err != nil {
		t.Errorf("pod a's container status shows device health %q, want Unhealthy", podDeviceHealth(k, podA))
	}
	p.d.Health().SetHealthy(g.UUID, "test: recovered")
	k.waitSlices("the taint gone", func(s []resourcev1.ResourceSlice) bool {
		d := sliceDevice(s, dev)
		return d != nil && len(d.Taints) == 0
	})

	// The daemon restarts with the claim prepared (and a new simulated
	// driver root, as a driver upgrade moves files): the second pod of the
	// shared claim gets the same devices from a spec written for the new
	// root, and no slice is duplicated.
	if err := p.stop(); err != nil {
		t.Fatal(err)
	}
	regs := k.registrations(draDriver)
	p = draDaemon(t, k, reg, plugins, "--allocation-mode=dra")
	if err := poll(10*time.Second, func() bool { return k.registrations(draDriver) > regs }); err != nil {
		t.Fatalf("the restarted daemon did not register again: %v", err)
	}
	if err := k.prepare(podB); err != nil {
		t.Fatal(err)
	}
	if got := k.cdiDevices(podB, containerName); !slices.Equal(got, want) {
		t.Errorf("after a daemon restart: CDI devices %v, want %v", got, want)
	}
	if _, err := deviceNodePaths(p, want); err != nil {
		t.Errorf("after a daemon restart the claim's spec does not resolve: %v", err)
	}
	k.waitSlices("still one slice", func(s []resourcev1.ResourceSlice) bool { return len(s) == 1 && deviceCount(s) == 8 })

	// Unprepare once both pods are gone: the spec leaves the CDI dir.
	for _, pod := range []*v1.Pod{podA, podB} {
		if err := k.unprepare(pod); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := deviceNodePaths(p, want); err == nil || !strings.Contains(err.Error(), "unresolved") {
		t.Errorf("the claim's CDI device still resolves after unprepare (err %v)", err)
	}
}

// TestDRASplitMode: a split node offers the named GPUs to DRA and the
// rest to the device plugin, as the two kubelet managers see them, with
// no GPU in both.
func TestDRASplitMode(t *testing.T) {
	requireKubeletNamespace(t)
	tmp := t.TempDir()
	reg, plugins := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins")
	kd := startDRAKubelet(t, reg)
	kp := startKubelet(t)
	p := draDaemon(t, kd, reg, plugins, "--allocation-mode=split", "--dra-devices=0,7", "--kubelet-socket-dir="+pluginapi.DevicePluginPath)
	kd.waitRegistered(draDriver)
	s := kd.waitSlices("two GPUs", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 2 })
	kp.waitCapacity("nvidia.com/gpu", counts{Capacity: 6, Allocatable: 6})
	viaDRA := map[string]bool{}
	for _, d := range s[0].Spec.Devices {
		viaDRA[*d.Attributes["uuid"].StringValue] = true
	}
	inv := p.d.Inventory()
	if !viaDRA[inv.GPUs[0].UUID] || !viaDRA[inv.GPUs[7].UUID] {
		t.Errorf("DRA offers %v, want GPUs 0 and 7", viaDRA)
	}
	for id := range kp.devices("nvidia.com/gpu") {
		if viaDRA[id] {
			t.Errorf("%s offered by both APIs", id)
		}
	}
}

// slicedUUIDs are the GPU UUIDs that any ResourceSlice the API stored so
// far offered, from the API's change log (a slice later rewritten
// counts).
func (k *draKubelet) slicedUUIDs() map[string]bool {
	k.api.mu.Lock()
	defer k.api.mu.Unlock()
	out := map[string]bool{}
	for _, ev := range k.api.events {
		if s, ok := ev.obj.(*resourcev1.ResourceSlice); ok && ev.typ != watch.Deleted {
			for _, d := range s.Spec.Devices {
				if u := d.Attributes["uuid"].StringValue; u != nil {
					out[*u] = true
				}
			}
		}
	}
	return out
}

// TestDRAStartKeepsDevicePluginPodsGPUs: a daemon started in dra mode on a
// node where a pod holds a GPU through the device plugin (the kubelet's
// pod-resources API lists it) never publishes that GPU, so the scheduler
// cannot give it to a claim as well; it joins the slice once the pod is
// gone. The daemon's first advertisement is built before pod-resources has
// answered: the e2e node (scenario 4d) caught the slice offering all 8.
func TestDRAStartKeepsDevicePluginPodsGPUs(t *testing.T) {
	requireKubeletNamespace(t)
	tmp := t.TempDir()
	reg, plugins := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins")
	k := startDRAKubelet(t, reg)
	_, _, inv := testkit.SimNode(t, "dgx-h100")
	held := inv.GPUs[3].UUID
	sock := filepath.Join(tmp, "pod-resources.sock")
	pr, err := fakepodresources.Start(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pr.Stop)
	pr.SetPods(fakepodresources.Pod("default", "dp-pod", fakepodresources.Container{Name: "main",
		Devices: []fakepodresources.Devices{{Resource: "nvidia.com/gpu", IDs: []string{held}}}}))

	draDaemon(t, k, reg, plugins, "--allocation-mode=dra", "--pod-resources-socket="+sock)
	k.waitRegistered(draDriver)
	k.waitSlices("the 7 GPUs the pod does not hold", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 7 })
	if k.slicedUUIDs()[held] {
		t.Fatalf("a slice offered GPU 3 (%s), which a device plugin pod holds: %s", held, dumpJSON(k.slices()))
	}
	// The pod ends: GPU 3 moves to DRA (drain check every 5 s, pod-resources every 5 s).
	pr.SetPods()
	k.waitSlices("all 8 GPUs once the pod is gone", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 8 })
}

// TestDRAWithoutDeviceTaints: an API server that drops device taints gets
// the sick device left out of the slice instead, and back on recovery.
func TestDRAWithoutDeviceTaints(t *testing.T) {
	requireKubeletNamespace(t)
	tmp := t.TempDir()
	reg, plugins := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins")
	k := startDRAKubelet(t, reg, draDropDeviceTaints())
	p := draDaemon(t, k, reg, plugins, "--allocation-mode=dra")
	k.waitSlices("8 GPUs", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 8 })
	g := p.d.Inventory().GPUs[4]
	if _, err := p.d.SimNode().InjectXID(4, 48, -1, -1); err != nil {
		t.Fatal(err)
	}
	dev := fmt.Sprintf("gpu-%d", g.Minor)
	k.waitSlices(dev+" left out", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 7 && sliceDevice(s, dev) == nil })
	p.d.Health().SetHealthy(g.UUID, "test: recovered")
	k.waitSlices(dev+" back", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 8 })
}

// TestDRALiveModeSwitch: the config file's dra section applies live, and a
// device in a prepared claim stays out of the device plugin until the
// claim is released.
func TestDRALiveModeSwitch(t *testing.T) {
	requireKubeletNamespace(t)
	tmp := t.TempDir()
	reg, plugins := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins")
	kd := startDRAKubelet(t, reg)
	kp := startKubelet(t)
	cfg := configFile(t, "version: v1\ndra:\n  mode: split\n  devices: [0]\n")
	path := strings.TrimPrefix(cfg, "--config=")
	p := draDaemon(t, kd, reg, plugins, cfg, "--kubelet-socket-dir="+pluginapi.DevicePluginPath)
	kd.waitRegistered(draDriver)
	inv := p.d.Inventory()
	gpu := func(i int) string { return fmt.Sprintf("gpu-%d", inv.GPUs[i].Minor) }
	kd.waitSlices("GPU 0 through DRA", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 1 && sliceDevice(s, gpu(0)) != nil })
	kp.waitCapacity("nvidia.com/gpu", counts{Capacity: 7, Allocatable: 7})

	kd.claim(draNamespace, "held", draResult(gpu(0)))
	pod := kd.pod("holder", "held")
	if err := kd.prepare(pod); err != nil {
		t.Fatal(err)
	}
	// GPU 0 goes back to the device plugin and GPU 1 to DRA: GPU 1 moves
	// at once; GPU 0 is in a prepared claim, so it is offered by neither.
	if err := os.WriteFile(path, []byte("version: v1\ndra:\n  mode: split\n  devices: [1]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p.d.Reload()
	kd.waitSlices("only GPU 1 through DRA", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 1 && sliceDevice(s, gpu(1)) != nil })
	kp.waitCapacity("nvidia.com/gpu", counts{Capacity: 6, Allocatable: 6})
	if _, ok := kp.devices("nvidia.com/gpu")[inv.GPUs[0].UUID]; ok {
		t.Fatal("GPU 0 offered to the device plugin while a prepared claim holds it")
	}
	// The claim is released: GPU 0 joins the device plugin.
	if err := kd.unprepare(pod); err != nil {
		t.Fatal(err)
	}
	kp.waitCapacity("nvidia.com/gpu", counts{Capacity: 7, Allocatable: 7})
	// Back to the device plugin only: the slice goes, every GPU is offered
	// to the device plugin.
	if err := os.WriteFile(path, []byte("version: v1\ndra:\n  mode: device-plugin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p.d.Reload()
	kd.waitSlices("no slice", func(s []resourcev1.ResourceSlice) bool { return len(s) == 0 })
	kp.waitCapacity("nvidia.com/gpu", counts{Capacity: 8, Allocatable: 8})
}

// podDeviceHealth is the health the kubelet would write into the pod's
// container status for its claimed devices ("" if none).
func podDeviceHealth(k *draKubelet, pod *v1.Pod) string {
	st := &v1.PodStatus{ContainerStatuses: []v1.ContainerStatus{{Name: containerName}}}
	k.manager().UpdateAllocatedResourcesStatus(klog.Background(), pod, st)
	for _, rs := range st.ContainerStatuses[0].AllocatedResourcesStatus {
		for _, r := range rs.Resources {
			return string(r.Health)
		}
	}
	return ""
}

// TestDRAMPSClaim: a claim shared through MPS (NVIDIA's GpuConfig with
// sharing.strategy MPS) gets its own supervised MPS control daemon with
// the claim's limits, and its containers the daemon's pipe directory and
// shared memory; while that daemon is down, the pod's status shows its
// devices unhealthy; unpreparing the claim quits the daemon.
func TestDRAMPSClaim(t *testing.T) {
	requireKubeletNamespace(t)
	tmp := t.TempDir()
	reg, plugins := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins")
	root := mpsRoot(t)
	k := startDRAKubelet(t, reg)
	p := draDaemon(t, k, reg, plugins, "--allocation-mode=dra", "--mps-root="+root, "--mps-control-binary="+testkit.FakeMPSControl(t))
	k.waitRegistered(draDriver)
	k.waitSlices("8 GPUs", func(s []resourcev1.ResourceSlice) bool { return deviceCount(s) == 8 })
	inv := p.d.Inventory()
	a, b := fmt.Sprintf("gpu-%d", inv.GPUs[2].Minor), fmt.Sprintf("gpu-%d", inv.GPUs[5].Minor)
	c := k.claim(draNamespace, "mps", draResult(a), draResult(b))
	c.Status.Allocation.Devices.Config = []resourcev1.DeviceAllocationConfiguration{{
		Source: resourcev1.AllocationConfigSourceClaim,
		DeviceConfiguration: resourcev1.DeviceConfiguration{Opaque: &resourcev1.OpaqueDeviceConfiguration{
			Driver: draDriver,
			Parameters: runtime.RawExtension{Raw: []byte(`{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharing":{"strategy":"MPS",` +
				`"mpsConfig":{"defaultActiveThreadPercentage":30,"defaultPinnedDeviceMemoryLimit":"10Gi","defaultPerDevicePinnedMemoryLimit":{"1":"4Gi"}}}}`)},
		}},
	}}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if _, err := k.client.ResourceV1().ResourceClaims(draNamespace).UpdateStatus(ctx, c, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	dirs := filepath.Join(root, "dra", string(c.UID))
	pipe := filepath.Join(dirs, "pipe")
	t.Cleanup(func() {
		if err := testkit.KillFakeMPS(pipe); err != nil {
			t.Errorf("killing a fake MPS control daemon left behind: %v", err)
		}
	})
	pod := k.pod("mps-pod", "mps")
	if err := k.prepare(pod); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(pipe, "control")); err != nil {
		t.Fatalf("the claim's MPS control daemon is not serving after prepare: %v", err)
	}
	names := k.cdiDevices(pod, containerName)
	spec, err := p.injectCDI(names...)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(spec.Process.Env, "CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps") {
		t.Errorf("env %v, want CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps", spec.Process.Env)
	}
	mounts := map[string]string{}
	for _, m := range spec.Mounts {
		mounts[m.Destination] = m.Source
	}
	if mounts["/tmp/nvidia-mps"] != pipe || mounts["/dev/shm"] != filepath.Join(root, "shm") {
		t.Errorf("mounts %v, want the pipe %s and %s/shm", mounts, pipe, root)
	}
	log := readControlLog(t, filepath.Join(dirs, "log", "control.log"))
	for _, want := range []string{"set_default_device_pinned_mem_limit 0 10240M", "set_default_device_pinned_mem_limit 1 4096M", "set_default_active_thread_percentage 30"} {
		if !slices.Contains(log.cmds, want) {
			t.Errorf("the daemon got %q, missing %q", log.cmds, want)
		}
	}

	// The claim's daemon dies: the pod's status shows its devices
	// unhealthy until the daemon is back (held down 3 s by the fake's
	// start delay, after the manager's 1 s backoff).
	if err := poll(10*time.Second, func() bool { return podDeviceHealth(k, pod) == "Healthy" }); err != nil {
		t.Errorf("with the MPS daemon ready, the pod's device health is %q, want Healthy", podDeviceHealth(k, pod))
	}
	t.Setenv("FAKE_MPS_READY_DELAY", "3s")
	if err := testkit.KillFakeMPS(pipe); err != nil {
		t.Fatal(err)
	}
	if err := poll(10*time.Second, func() bool { return podDeviceHealth(k, pod) == "Unhealthy" }); err != nil {
		t.Errorf("with the claim's MPS daemon killed, the pod's device health is %q, want Unhealthy", podDeviceHealth(k, pod))
	}
	if err := poll(30*time.Second, func() bool { return podDeviceHealth(k, pod) == "Healthy" }); err != nil {
		t.Errorf("after the MPS daemon's restart, the pod's device health is %q, want Healthy", podDeviceHealth(k, pod))
	}

	if err := k.unprepare(pod); err != nil {
		t.Fatal(err)
	}
	if err := poll(15*time.Second, func() bool { _, err := os.Stat(filepath.Join(pipe, "control")); return os.IsNotExist(err) }); err != nil {
		t.Errorf("the claim's MPS daemon still serves after unprepare")
	}
}
