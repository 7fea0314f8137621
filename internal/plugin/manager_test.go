package plugin_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

const gpuResource = sharing.DefaultResourceName

// env is one plugin manager serving a simulated node to a stand-in kubelet
// over real sockets in a temporary directory.
type env struct {
	dir     string
	inv     *nvml.Inventory
	health  *health.State
	mgr     *plugin.Manager
	kubelet *fakekubelet.Kubelet
	logs    *testkit.Buffer // the manager's log, Debug and up
	cancel  context.CancelFunc
	done    chan error
}

func defaultRespond() plugin.ResponseOptions {
	return plugin.ResponseOptions{Envvar: true, DevRoot: "/"}
}

func inventory(t testing.TB, profile string) *nvml.Inventory {
	t.Helper()
	return testkit.Inventory(t, profile)
}

// shortTempDir keeps socket paths under the 108-byte unix limit.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "gp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func startEnv(t testing.TB, profile string, respond plugin.ResponseOptions, startKubelet bool) *env {
	t.Helper()
	return startEnvWith(t, inventory(t, profile), respond, startKubelet, nil)
}

// startEnvWith serves an inventory with a given preferrer (nil: FirstFit).
func startEnvWith(t testing.TB, inv *nvml.Inventory, respond plugin.ResponseOptions, startKubelet bool, pref plugin.Preferrer) *env {
	t.Helper()
	return startEnvAt(t, shortTempDir(t), inv, respond, startKubelet, pref)
}

// startEnvAt is startEnvWith in a given socket directory.
func startEnvAt(t testing.TB, dir string, inv *nvml.Inventory, respond plugin.ResponseOptions, startKubelet bool, pref plugin.Preferrer) *env {
	t.Helper()
	e := &env{dir: dir, inv: inv, health: health.NewState(nil, nil), done: make(chan error, 1), logs: &testkit.Buffer{}}
	if startKubelet {
		k, err := fakekubelet.Start(e.dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		e.kubelet = k
		t.Cleanup(k.Stop)
	}
	e.mgr = plugin.NewManager(plugin.Options{
		SocketDir: e.dir, Health: e.health, Respond: respond, Preferrer: pref,
		PollInterval: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		StreamGrace: 50 * time.Millisecond,
		Logger:      slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	resources, err := sharing.Build(e.inv, sharing.Options{MigStrategy: config.MigNone})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	go func() { e.done <- e.mgr.Run(ctx, resources) }()
	t.Cleanup(e.stop)
	return e
}

func (e *env) stop() {
	if e.cancel != nil {
		e.cancel()
		<-e.done
		e.cancel = nil
	}
}

func waitCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func (e *env) waitAllocatable(t testing.TB, capacity, allocatable int) {
	t.Helper()
	if err := e.kubelet.WaitForAllocatable(waitCtx(t), gpuResource, capacity, allocatable); err != nil {
		c, a := e.kubelet.Capacity(gpuResource)
		t.Fatalf("kubelet sees capacity %d allocatable %d, want %d/%d: %v", c, a, capacity, allocatable, err)
	}
}

func (e *env) uuids() []string {
	var out []string
	for _, g := range e.inv.GPUs {
		out = append(out, g.UUID)
	}
	return out
}

func TestRegisterAndListAndWatch(t *testing.T) {
	e := startEnv(t, "dgx-h100", defaultRespond(), true)
	e.waitAllocatable(t, 8, 8)
	devs := e.kubelet.Devices(gpuResource)
	for i, d := range devs {
		g := e.inv.GPUs[i]
		if d.ID != g.UUID || d.Health != pluginapi.Healthy {
			t.Errorf("device %d: %s %s, want %s Healthy", i, d.ID, d.Health, g.UUID)
		}
		if d.Topology == nil || len(d.Topology.Nodes) != 1 || d.Topology.Nodes[0].ID != int64(g.NUMANode) {
			t.Errorf("device %d: topology %v, want NUMA node %d", i, d.Topology, g.NUMANode)
		}
	}
	if _, err := os.Stat(filepath.Join(e.dir, "nvidia-gpu.sock")); err != nil {
		t.Errorf("plugin socket: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(e.dir, "nvidia-gpu.sock")); err == nil && fi.Mode().Perm() != 0o600 {
		t.Errorf("plugin socket mode %v, want 0600", fi.Mode().Perm())
	}

	// A health change reaches the kubelet's stream, and back.
	e.health.SetUnhealthy(e.inv.GPUs[5].UUID, "test")
	e.waitAllocatable(t, 8, 7)
	e.health.SetHealthy(e.inv.GPUs[5].UUID, "test over")
	e.waitAllocatable(t, 8, 8)
	// The kubelet lists our devices before our Register call returns.
	ctx := waitCtx(t)
	for !e.mgr.Registered() {
		select {
		case <-ctx.Done():
			t.Fatal("manager does not report itself registered")
		case <-time.After(time.Millisecond):
		}
	}
}

func TestAllocateStrategies(t *testing.T) {
	tests := []struct {
		name    string
		respond plugin.ResponseOptions
		pick    []int
		check   func(t *testing.T, r *pluginapi.ContainerAllocateResponse, uuids []string)
	}{
		{
			name: "envvar uuid", respond: defaultRespond(), pick: []int{0, 3},
			check: func(t *testing.T, r *pluginapi.ContainerAllocateResponse, u []string) {
				if got := r.Envs["NVIDIA_VISIBLE_DEVICES"]; got != u[0]+","+u[3] {
					t.Errorf("NVIDIA_VISIBLE_DEVICES=%q", got)
				}
				if len(r.Mounts)+len(r.Devices)+len(r.CdiDevices)+len(r.Annotations) != 0 {
					t.Errorf("unexpected extras: %+v", r)
				}
			},
		},
		{
			name:    "envvar index",
			respond: plugin.ResponseOptions{Envvar: true, IndexIDs: true},
			pick:    []int{6, 1},
			check: func(t *testing.T, r *pluginapi.ContainerAllocateResponse, _ []string) {
				if got := r.Envs["NVIDIA_VISIBLE_DEVICES"]; got != "6,1" {
					t.Errorf("NVIDIA_VISIBLE_DEVICES=%q, want 6,1", got)
				}
			},
		},
		{
			name:    "volume-mounts",
			respond: plugin.ResponseOptions{VolumeMounts: true},
			pick:    []int{2},
			check: func(t *testing.T, r *pluginapi.ContainerAllocateResponse, u []string) {
				if r.Envs["NVIDIA_VISIBLE_DEVICES"] != "/var/run/nvidia-container-devices" || len(r.Mounts) != 1 ||
					r.Mounts[0].HostPath != "/dev/null" || r.Mounts[0].ContainerPath != "/var/run/nvidia-container-devices/"+u[2] {
					t.Errorf("volume-mounts response: %+v", r)
				}
			},
		},
		{
			name:    "cdi-annotations",
			respond: plugin.ResponseOptions{CDIAnnotations: true, CDIAnnotationPrefix: "cdi.k8s.io/"},
			pick:    []int{0, 1},
			check: func(t *testing.T, r *pluginapi.ContainerAllocateResponse, u []string) {
				if len(r.Envs) != 0 || len(r.Annotations) != 1 {
					t.Fatalf("CDI-only response must carry one annotation and no env: %+v", r)
				}
				for k, v := range r.Annotations {
					if !strings.HasPrefix(k, "cdi.k8s.io/gpu-plugin_") {
						t.Errorf("annotation key %q", k)
					}
					if v != "k8s.device-plugin.nvidia.com/gpu="+u[0]+",k8s.device-plugin.nvidia.com/gpu="+u[1] {
						t.Errorf("annotation value %q", v)
					}
				}
			},
		},
		{
			name: "cdi-cri with envvar, GDS and IMEX",
			respond: plugin.ResponseOptions{Envvar: true, CDICRI: true, IndexIDs: true,
				GDS: true, IMEXChannels: []int{0}},
			pick: []int{4},
			check: func(t *testing.T, r *pluginapi.ContainerAllocateResponse, _ []string) {
				var names []string
				for _, c := range r.CdiDevices {
					names = append(names, c.Name)
				}
				want := "k8s.device-plugin.nvidia.com/gpu=4 k8s.device-plugin.nvidia.com/gds=all k8s.device-plugin.nvidia.com/imex-channel=0"
				if strings.Join(names, " ") != want {
					t.Errorf("CDI devices %v, want %s", names, want)
				}
				if r.Envs["NVIDIA_VISIBLE_DEVICES"] != "4" || r.Envs["NVIDIA_GDS"] != "enabled" || r.Envs["NVIDIA_IMEX_CHANNELS"] != "0" {
					t.Errorf("envs %v", r.Envs)
				}
			},
		},
		{
			name: "passDeviceSpecs",
			respond: plugin.ResponseOptions{Envvar: true,
				PassDeviceSpecs: true, DevRoot: "/run/nvidia/driver", ControlNodes: []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}},
			pick: []int{7, 2},
			check: func(t *testing.T, r *pluginapi.ContainerAllocateResponse, _ []string) {
				var got []string
				for _, d := range r.Devices {
					got = append(got, d.ContainerPath+"="+d.HostPath+":"+d.Permissions)
				}
				want := []string{
					"/dev/nvidiactl=/run/nvidia/driver/dev/nvidiactl:rw",
					"/dev/nvidia-uvm=/run/nvidia/driver/dev/nvidia-uvm:rw",
					"/dev/nvidia-uvm-tools=/run/nvidia/driver/dev/nvidia-uvm-tools:rw",
					"/dev/nvidia7=/run/nvidia/driver/dev/nvidia7:rw",
					"/dev/nvidia2=/run/nvidia/driver/dev/nvidia2:rw",
				}
				if strings.Join(got, " ") != strings.Join(want, " ") {
					t.Errorf("device specs:\n got  %v\n want %v", got, want)
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := startEnv(t, "dgx-h100", tc.respond, true)
			e.waitAllocatable(t, 8, 8)
			u := e.uuids()
			var ids []string
			for _, i := range tc.pick {
				ids = append(ids, u[i])
			}
			resp, err := e.kubelet.Allocate(waitCtx(t), gpuResource, ids...)
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, resp, u)
		})
	}
}

func TestAllocateRefusesBadIDs(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), true)
	e.waitAllocatable(t, 4, 4)
	u := e.uuids()
	e.health.SetUnhealthy(u[1], "XID 79: GPU has fallen off the bus")
	e.waitAllocatable(t, 4, 3)
	tests := []struct {
		name string
		ids  []string
		want string
	}{
		{"unknown", []string{u[0], "GPU-nope"}, `unknown device ID "GPU-nope"`},
		{"unhealthy", []string{u[1]}, "XID 79"},
		{"empty", nil, "empty allocation request"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.kubelet.Allocate(waitCtx(t), gpuResource, tc.ids...)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want InvalidArgument mentioning %q", err, tc.want)
			}
		})
	}
	// The plugin still serves afterwards.
	if _, err := e.kubelet.Allocate(waitCtx(t), gpuResource, u[2]); err != nil {
		t.Errorf("allocation after refusals: %v", err)
	}
}

func TestPreferredAllocation(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), true)
	e.waitAllocatable(t, 4, 4)
	u := e.uuids()
	e.health.SetUnhealthy(u[0], "test")
	e.waitAllocatable(t, 4, 3)
	ctx := waitCtx(t)

	got, err := e.kubelet.Preferred(ctx, gpuResource, []string{u[0], "GPU-unknown", u[1], u[2], u[3]}, []string{u[3]}, 2)
	if err != nil {
		t.Fatalf("unknown and unhealthy IDs must be skipped, not fail admission: %v", err)
	}
	if len(got) != 2 || got[0] != u[3] || (got[1] != u[1] && got[1] != u[2]) {
		t.Errorf("preferred %v: want 2 devices including the must-include %s, none unhealthy or unknown", got, u[3])
	}
	for _, bad := range []struct {
		name      string
		available []string
		must      []string
		size      int
		want      string
	}{
		{"size too big", []string{u[1]}, nil, 2, "allocation size 2"},
		{"must-include not available", []string{u[1], u[2]}, []string{u[3]}, 2, "not among the available"},
	} {
		_, err := e.kubelet.Preferred(ctx, gpuResource, bad.available, bad.must, bad.size)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s: got %v, want InvalidArgument mentioning %q", bad.name, err, bad.want)
		}
	}
}

// TestKubeletRestart: a restarting kubelet deletes every plugin socket; the
// manager re-creates its socket and registers again, keeping health.
func TestKubeletRestart(t *testing.T) {
	e := startEnv(t, "dgx-h100", defaultRespond(), true)
	e.waitAllocatable(t, 8, 8)
	e.health.SetUnhealthy(e.uuids()[4], "test")
	e.waitAllocatable(t, 8, 7)
	for i := 0; i < 3; i++ {
		if err := e.kubelet.Restart(); err != nil {
			t.Fatal(err)
		}
		e.waitAllocatable(t, 8, 7)
	}
	registered := 0
	for _, ev := range e.kubelet.Events() {
		if ev.Kind == "registered" {
			registered++
		}
	}
	if registered != 4 {
		t.Errorf("%d registrations, want 4 (start + 3 restarts)", registered)
	}
}

// TestOwnSocketRemoved: the plugin notices its socket vanishing.
func TestOwnSocketRemoved(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), true)
	e.waitAllocatable(t, 4, 4)
	sock := filepath.Join(e.dir, "nvidia-gpu.sock")
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	err := e.kubelet.WaitFor(waitCtx(t), func(k *fakekubelet.Kubelet) bool {
		n := 0
		for _, ev := range k.Events() {
			if ev.Kind == "registered" {
				n++
			}
		}
		return n == 2
	})
	if err != nil {
		t.Fatalf("no re-registration after the socket was removed: %v", err)
	}
	e.waitAllocatable(t, 4, 4)
	if _, err := os.Stat(sock); err != nil {
		t.Errorf("socket not re-created: %v", err)
	}
}

// TestKubeletLate: the kubelet is absent at start; the manager keeps
// retrying and registers as soon as it appears.
func TestKubeletLate(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), false)
	ctx := waitCtx(t)
	for !hasRegisterError(e.mgr) {
		select {
		case <-ctx.Done():
			t.Fatal("no registration attempt recorded without a kubelet")
		case <-time.After(10 * time.Millisecond):
		}
	}
	k, err := fakekubelet.Start(e.dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	e.kubelet = k
	e.waitAllocatable(t, 4, 4)
}

func hasRegisterError(m *plugin.Manager) bool {
	st := m.Status()
	return len(st) == 1 && st[0].LastRegisterError != ""
}

// TestShutdown: stopping removes the socket and ends the stream.
func TestShutdown(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), true)
	e.waitAllocatable(t, 4, 4)
	e.stop()
	if _, err := os.Stat(filepath.Join(e.dir, "nvidia-gpu.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after shutdown: %v", err)
	}
	err := e.kubelet.WaitFor(waitCtx(t), func(k *fakekubelet.Kubelet) bool {
		evs := k.Events()
		return len(evs) > 0 && evs[len(evs)-1].Kind == "stream-ended"
	})
	if err != nil {
		t.Errorf("the kubelet's stream did not end: %v", err)
	}
}

// TestUpdateResources: a new device list reaches open streams; unchanged
// resources keep their stream.
func TestUpdateResources(t *testing.T) {
	e := startEnv(t, "dgx-h100", defaultRespond(), true)
	e.waitAllocatable(t, 8, 8)
	res := e.mgr.Resources()[0]
	fewer := sharing.NewResource(res.Name, res.Devices[:6])
	e.mgr.Update([]*sharing.Resource{fewer}, defaultRespond())
	e.waitAllocatable(t, 6, 6)
	for _, ev := range e.kubelet.Events() {
		if ev.Kind == "registered" && ev.At.After(e.kubelet.Events()[0].At) {
			t.Error("an update of the device list re-registered instead of resending on the open stream")
		}
	}
	e.mgr.Update(nil, defaultRespond())
	if err := e.kubelet.WaitFor(waitCtx(t), func(k *fakekubelet.Kubelet) bool {
		_, err := os.Stat(filepath.Join(e.dir, "nvidia-gpu.sock"))
		return errors.Is(err, os.ErrNotExist)
	}); err != nil {
		t.Errorf("a removed resource keeps its socket: %v", err)
	}
}

// TestNoLeaksAcrossKubeletRestarts: a hundred kubelet restarts leave
// goroutines, file descriptors and sockets where they were.
func TestNoLeaksAcrossKubeletRestarts(t *testing.T) {
	restarts := 100
	if testing.Short() {
		restarts = 20
	}
	e := startEnv(t, "dgx-h100", defaultRespond(), true)
	e.waitAllocatable(t, 8, 8)
	// Warm up once so lazily created runtime goroutines are counted in the baseline.
	if err := e.kubelet.Restart(); err != nil {
		t.Fatal(err)
	}
	e.waitAllocatable(t, 8, 8)
	g0, f0 := settledGoroutines(), openFDs(t)
	for i := 0; i < restarts; i++ {
		if err := e.kubelet.Restart(); err != nil {
			t.Fatal(err)
		}
		e.waitAllocatable(t, 8, 8)
	}
	g1, f1 := settledGoroutines(), openFDs(t)
	if g1 > g0+3 {
		t.Errorf("goroutines grew from %d to %d over %d kubelet restarts", g0, g1, restarts)
	}
	if f1 > f0+3 {
		t.Errorf("open file descriptors grew from %d to %d over %d kubelet restarts", f0, f1, restarts)
	}
	entries, _ := os.ReadDir(e.dir)
	if len(entries) != 2 {
		var names []string
		for _, en := range entries {
			names = append(names, en.Name())
		}
		t.Errorf("socket directory holds %v, want kubelet.sock and nvidia-gpu.sock", names)
	}
}

// settledGoroutines counts goroutines once connection teardown has had a
// moment to finish (bounded).
func settledGoroutines() int {
	n := runtime.NumGoroutine()
	for i := 0; i < 50; i++ {
		time.Sleep(10 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m == n {
			return m
		}
		n = m
	}
	return n
}

func openFDs(t testing.TB) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd on this system")
	}
	return len(entries)
}
