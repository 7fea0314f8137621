package kubelet

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	kubecontainer "k8s.io/kubernetes/pkg/kubelet/container"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// dgxH100 is a healthy simulated dgx-h100 as the kubelet reports it.
var dgxH100 = counts{Capacity: 8, Allocatable: 8}

// The daemon registers nvidia.com/gpu and the manager shows all eight GPUs,
// with our IDs and NUMA nodes.
func TestCapacityAppears(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t)
	k.waitCapacity(gpuResource, dgxH100)

	devs := k.devices(gpuResource)
	for _, g := range p.d.Inventory().GPUs {
		d, ok := devs[g.UUID]
		if !ok {
			t.Errorf("GPU %d (%s): not among the manager's allocatable devices", g.Index, g.UUID)
			continue
		}
		if d.Topology == nil || len(d.Topology.Nodes) != 1 || d.Topology.Nodes[0].ID != int64(g.NUMANode) {
			t.Errorf("GPU %d (%s): manager topology %v, want NUMA node %d", g.Index, g.UUID, d.Topology, g.NUMANode)
		}
	}
	if len(devs) != len(p.d.Inventory().GPUs) {
		t.Errorf("manager knows %d devices, the inventory has %d GPUs", len(devs), len(p.d.Inventory().GPUs))
	}
	if _, err := os.Stat(p.socket(gpuResource)); err != nil {
		t.Errorf("our plugin socket: %v", err)
	}
}

// Allocate through the manager, as pod admission and container creation
// do, yields what each device list strategy promises.
func TestAllocateThroughManager(t *testing.T) {
	const (
		cdiPrefix     = "k8s.device-plugin.nvidia.com/gpu="
		volumeMounts  = "/var/run/nvidia-container-devices"
		visibleDevEnv = "NVIDIA_VISIBLE_DEVICES"
	)
	// want describes the run options for the allocated devices, named as
	// the runtime will see them (UUIDs, or indices with --device-id-strategy=index).
	type want struct {
		env            bool // NVIDIA_VISIBLE_DEVICES is set (to the names, or to the mount root)
		cdi            bool // one CDI device per allocated device
		cdiAnnotation  bool // one cdi.k8s.io/ annotation listing the CDI names
		mounts         bool // one /dev/null mount per device under volumeMounts
		devNodes       bool // /dev/nvidiactl, /dev/nvidia-uvm[-tools], /dev/nvidia<minor>
		namesAreIndex  bool
		envIsMountRoot bool
	}
	cases := []struct {
		name   string
		flags  []string
		config string // a config file, when set
		want   want
	}{
		{"default envvar", nil, "", want{env: true}},
		{"device-id-strategy index", []string{"--device-id-strategy=index"}, "", want{env: true, namesAreIndex: true}},
		{"cdi-cri", []string{"--device-list-strategy=cdi-cri"}, "", want{cdi: true}},
		{"cdi-annotations", []string{"--device-list-strategy=cdi-annotations"}, "", want{cdiAnnotation: true}},
		{"envvar and cdi-cri", []string{"--device-list-strategy=envvar,cdi-cri"}, "", want{env: true, cdi: true}},
		{"volume-mounts", []string{"--device-list-strategy=volume-mounts"}, "", want{env: true, mounts: true, envIsMountRoot: true}},
		{"pass-device-specs", []string{"--pass-device-specs"}, "", want{env: true, devNodes: true}},
		{"config file cdi-cri", nil, "version: v1\nflags:\n  plugin:\n    deviceListStrategy: [cdi-cri]\n", want{cdi: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			devRoot := fakeDevRoot(t)
			flags := append([]string{"--dev-root=" + devRoot}, tc.flags...)
			if tc.config != "" {
				flags = append(flags, configFile(t, tc.config))
			}
			k := startKubelet(t)
			p := startPlugin(t, flags...)
			k.waitCapacity(gpuResource, dgxH100)

			pod := gpuPod("two-gpus", gpuResource, 2)
			opts, err := k.admit(pod)
			if err != nil {
				t.Fatalf("admitting a pod asking for 2 GPUs: %v", err)
			}
			ids := k.allocated(pod, gpuResource)
			if len(ids) != 2 {
				t.Fatalf("manager allocated %v, want 2 devices", ids)
			}
			names := deviceNames(t, p, ids, tc.want.namesAreIndex)

			envs := envMap(opts.Envs)
			switch {
			case !tc.want.env:
				if v, ok := envs[visibleDevEnv]; ok {
					t.Errorf("%s=%q, want it absent (CDI only)", visibleDevEnv, v)
				}
			case tc.want.envIsMountRoot:
				if envs[visibleDevEnv] != volumeMounts {
					t.Errorf("%s=%q, want %q", visibleDevEnv, envs[visibleDevEnv], volumeMounts)
				}
			default:
				if got := sortedList(envs[visibleDevEnv]); !slices.Equal(got, names) {
					t.Errorf("%s=%q, want the allocated devices %v", visibleDevEnv, envs[visibleDevEnv], names)
				}
			}

			var wantCDI []string
			for _, n := range names {
				wantCDI = append(wantCDI, cdiPrefix+n)
			}
			var gotCDI []string
			for _, c := range opts.CDIDevices {
				gotCDI = append(gotCDI, c.Name)
			}
			slices.Sort(gotCDI)
			if tc.want.cdi != (len(gotCDI) > 0) || (tc.want.cdi && !slices.Equal(gotCDI, wantCDI)) {
				t.Errorf("CDI devices %v, want %v (wanted: %v)", gotCDI, wantCDI, tc.want.cdi)
			}

			var annotated []string
			for _, a := range opts.Annotations {
				if strings.HasPrefix(a.Name, "cdi.k8s.io/") {
					annotated = append(annotated, sortedList(a.Value)...)
				}
			}
			if tc.want.cdiAnnotation != (len(annotated) > 0) || (tc.want.cdiAnnotation && !slices.Equal(annotated, wantCDI)) {
				t.Errorf("CDI annotations %v, want %v (wanted: %v)", opts.Annotations, wantCDI, tc.want.cdiAnnotation)
			}
			// The runtime can resolve every CDI name against the spec the
			// daemon wrote, and each device brings its GPU's device node.
			if tc.want.cdi || tc.want.cdiAnnotation {
				spec, err := p.injectCDI(wantCDI...)
				if err != nil {
					t.Errorf("a container runtime would fail: %v", err)
				} else {
					for _, id := range ids {
						minor := gpuByUUID(t, p, id).Minor
						node := fmt.Sprintf("/dev/nvidia%d", minor)
						if spec.Linux == nil || !slices.ContainsFunc(spec.Linux.Devices, func(d oci.LinuxDevice) bool {
							return d.Path == node && d.Type == "c" && d.Major == 195 && d.Minor == int64(minor)
						}) {
							t.Errorf("CDI injection for %s: no character device %s (195:%d) among the container's devices", id, node, minor)
						}
					}
				}
			}

			var mounted []string
			for _, m := range opts.Mounts {
				if m.HostPath != "/dev/null" || !m.ReadOnly {
					t.Errorf("mount %+v: want a read-only /dev/null", m)
				}
				mounted = append(mounted, strings.TrimPrefix(m.ContainerPath, volumeMounts+"/"))
			}
			slices.Sort(mounted)
			if tc.want.mounts != (len(mounted) > 0) || (tc.want.mounts && !slices.Equal(mounted, names)) {
				t.Errorf("mounts %v, want %v under %s (wanted: %v)", mounted, names, volumeMounts, tc.want.mounts)
			}

			var nodes []string
			for _, d := range opts.Devices {
				nodes = append(nodes, d.PathInContainer)
				if d.PathOnHost != filepath.Join(devRoot, d.PathInContainer) || d.Permissions != "rw" {
					t.Errorf("device %+v: want host path under --dev-root %s, permissions rw", d, devRoot)
				}
			}
			if tc.want.devNodes {
				wantNodes := []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}
				for _, id := range ids {
					wantNodes = append(wantNodes, fmt.Sprintf("/dev/nvidia%d", gpuByUUID(t, p, id).Minor))
				}
				slices.Sort(nodes)
				slices.Sort(wantNodes)
				if !slices.Equal(nodes, wantNodes) {
					t.Errorf("device nodes %v, want %v", nodes, wantNodes)
				}
			} else if len(nodes) > 0 {
				t.Errorf("device nodes %v, want none without --pass-device-specs", nodes)
			}

			// The manager's bookkeeping agrees: 6 left for a second pod.
			if _, err := k.admit(gpuPod("nine-gpus", gpuResource, 9)); err == nil || !strings.Contains(err.Error(), "Available: 6") {
				t.Errorf("a second pod asking for 9 GPUs: err %v, want the manager to refuse it with 6 available", err)
			}
		})
	}
}

// A GPU marked unhealthy leaves allocatable (capacity stays) and the
// manager stops handing it out; marked healthy, it comes back.
func TestUnhealthyDeviceLowersAllocatable(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t)
	k.waitCapacity(gpuResource, dgxH100)
	sick := p.gpuUUIDs()[3]

	p.d.Health().SetUnhealthy(sick, "conformance test: marked unhealthy")
	k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 7})
	if _, ok := k.devices(gpuResource)[sick]; ok {
		t.Errorf("unhealthy GPU %s is still among the manager's allocatable devices", sick)
	}
	if _, err := k.admit(gpuPod("all-eight", gpuResource, 8)); err == nil || !strings.Contains(err.Error(), "Available: 7") {
		t.Errorf("a pod asking for 8 GPUs with one unhealthy: err %v, want a refusal with 7 available", err)
	}
	pod := gpuPod("seven", gpuResource, 7)
	if _, err := k.admit(pod); err != nil {
		t.Fatalf("a pod asking for the 7 healthy GPUs: %v", err)
	}
	if ids := k.allocated(pod, gpuResource); slices.Contains(ids, sick) {
		t.Errorf("the manager allocated the unhealthy GPU %s: %v", sick, ids)
	}
	k.deletePod(pod)

	p.d.Health().SetHealthy(sick, "conformance test: healthy again")
	k.waitCapacity(gpuResource, dgxH100)
	if _, ok := k.devices(gpuResource)[sick]; !ok {
		t.Errorf("GPU %s healthy again but not allocatable", sick)
	}
}

// A restarted kubelet (a new manager that deletes every plugin socket) gets
// us registered again, and a GPU that was unhealthy is still unhealthy in
// the first list the new manager receives.
func TestKubeletRestartReregisters(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t)
	k.waitCapacity(gpuResource, dgxH100)
	sick := p.gpuUUIDs()[5]
	p.d.Health().SetUnhealthy(sick, "conformance test: unhealthy across the restart")
	degraded := counts{Capacity: 8, Allocatable: 7}
	k.waitCapacity(gpuResource, degraded)
	p.waitRegistered("before the restarts")
	before := p.registrations(gpuResource)

	for i := range 3 {
		k.restart()
		k.waitUntil(gpuResource, degraded.String(), func(c counts) bool {
			if c.Allocatable == 8 {
				t.Errorf("restart %d: the new manager saw all 8 GPUs allocatable: health state was lost", i+1)
			}
			return c == degraded
		})
		if _, ok := k.devices(gpuResource)[sick]; ok {
			t.Errorf("restart %d: unhealthy GPU %s allocatable after the restart", i+1, sick)
		}
		if _, err := os.Stat(p.socket(gpuResource)); err != nil {
			t.Errorf("restart %d: our socket after re-registering: %v", i+1, err)
		}
		// Registered once per restart: a second Register is refused as
		// "already connected" and leaves the daemon unregistered for good.
		p.waitRegistered(fmt.Sprintf("restart %d", i+1))
	}
	if got := p.registrations(gpuResource); got != before+3 {
		t.Errorf("registrations: %d before three restarts, %d after; want %d", before, got, before+3)
	}

	// The new manager allocates through the re-registered endpoint.
	pod := gpuPod("after-restart", gpuResource, 1)
	opts, err := k.admit(pod)
	if err != nil {
		t.Fatalf("admitting a pod after the restarts: %v", err)
	}
	if ids := k.allocated(pod, gpuResource); len(ids) != 1 || envMap(opts.Envs)["NVIDIA_VISIBLE_DEVICES"] != ids[0] {
		t.Errorf("after the restarts: allocated %v, env %v", ids, opts.Envs)
	}
}

// Cancelling the daemon's context (SIGTERM) removes our socket, ends the
// streams, and the manager sees the endpoint stop: nothing is allocatable
// and allocation fails, while capacity stays for the kubelet's grace period.
func TestCleanShutdown(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t)
	k.waitCapacity(gpuResource, dgxH100)
	socket := p.socket(gpuResource)

	if err := p.stop(); err != nil {
		t.Fatalf("daemon Run after cancel: %v", err)
	}
	if _, err := os.Lstat(socket); !os.IsNotExist(err) {
		t.Errorf("our socket %s after shutdown: %v, want it removed", socket, err)
	}
	k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 0})
	if _, err := k.admit(gpuPod("after-shutdown", gpuResource, 1)); err == nil {
		t.Error("the manager allocated a GPU from a stopped plugin")
	}
	entries, err := os.ReadDir(filepath.Dir(socket))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 && e.Name() != "kubelet.sock" {
			t.Errorf("socket %s left in the device-plugin directory after shutdown", e.Name())
		}
	}
}

// Many kubelet restarts leak nothing: goroutines and open fds stay flat,
// and only kubelet.sock and our socket remain as sockets. The count
// defaults to 20; KUBELET_RESTARTS overrides it (e.g. 100).
func TestNoLeakAcrossKubeletRestarts(t *testing.T) {
	restarts := 20
	if s := os.Getenv("KUBELET_RESTARTS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("KUBELET_RESTARTS=%q: want a positive number", s)
		}
		restarts = n
	}
	k := startKubelet(t)
	p := startPlugin(t)
	k.waitCapacity(gpuResource, dgxH100)
	p.waitRegistered("first registration")
	// One restart first, so one-time allocations (gRPC and klog internals)
	// are not counted as a leak.
	k.restart()
	k.waitCapacity(gpuResource, dgxH100)
	p.waitRegistered("warm-up restart")
	before := checkNoLeak(t, currentUsage(t), 0)

	for i := range restarts {
		k.restart()
		k.waitCapacity(gpuResource, dgxH100)
		// Capacity shows before our Register call has returned; a restart
		// in between would fail that call and skew the count below.
		p.waitRegistered(fmt.Sprintf("restart %d", i+1))
	}
	// A leak of one goroutine or fd per restart would exceed this slack.
	after := checkNoLeak(t, before, restarts/4)
	t.Logf("%d kubelet restarts: before %s, after %s", restarts, before, after)

	entries, err := os.ReadDir(filepath.Dir(p.socket(gpuResource)))
	if err != nil {
		t.Fatal(err)
	}
	var sockets []string
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 {
			sockets = append(sockets, e.Name())
		}
	}
	if want := []string{"kubelet.sock", "nvidia-gpu.sock"}; !slices.Equal(sockets, want) {
		t.Errorf("sockets in the device-plugin directory after %d restarts: %v, want %v", restarts, sockets, want)
	}
	p.waitRegistered(fmt.Sprintf("after %d restarts", restarts))
	if got := p.registrations(gpuResource); got != uint64(restarts+2) {
		t.Errorf("registrations after %d restarts: %d, want %d", restarts, got, restarts+2)
	}
}

// deviceNames maps allocated device IDs to the names the runtime sees,
// sorted.
func deviceNames(t *testing.T, p *plugin, ids []string, byIndex bool) []string {
	t.Helper()
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = id
		if byIndex {
			out[i] = strconv.Itoa(gpuByUUID(t, p, id).Index)
		}
	}
	slices.Sort(out)
	return out
}

func gpuByUUID(t *testing.T, p *plugin, uuid string) nvml.GPU {
	t.Helper()
	for _, g := range p.d.Inventory().GPUs {
		if g.UUID == uuid {
			return g
		}
	}
	t.Fatalf("device %q is not a GPU of the simulated node", uuid)
	return nvml.GPU{}
}

func envMap(envs []kubecontainer.EnvVar) map[string]string {
	m := map[string]string{}
	for _, e := range envs {
		m[e.Name] = e.Value
	}
	return m
}

// sortedList splits a comma-separated list and sorts it.
func sortedList(s string) []string {
	if s == "" {
		return nil
	}
	l := strings.Split(s, ",")
	slices.Sort(l)
	return l
}
