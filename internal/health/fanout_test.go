package health_test

import (
	"context"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

// stack is a simulated node, its health monitor and the plugin servers,
// talking to a stand-in kubelet over real unix sockets.
type stack struct {
	node      *sim.Node
	inv       *nvml.Inventory
	state     *health.State
	monitor   *health.Monitor
	kubelet   *fakekubelet.Kubelet
	resources []*sharing.Resource
}

// startStack runs the stack; configYAML shapes the resources (MIG
// strategy, time-slicing) as the config file would.
func startStack(t testing.TB, profile, configYAML string, stateLog *slog.Logger, mopts health.MonitorOptions) *stack {
	t.Helper()
	p, err := sim.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	s := &stack{node: sim.NewNode(p, nil), state: health.NewState(stateLog, nil)}
	lib, err := nvml.Open(s.node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	if s.inv, err = nvml.Scan(lib, nvml.ScanOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse([]byte(configYAML))
	if err != nil {
		t.Fatal(err)
	}
	if s.resources, err = sharing.Build(s.inv, sharing.OptionsFrom(cfg)); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "gph") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if s.kubelet, err = fakekubelet.Start(dir, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.kubelet.Stop)
	mgr := plugin.NewManager(plugin.Options{
		SocketDir: dir, Health: s.state,
		Respond:      plugin.ResponseOptions{Envvar: true, DevRoot: "/"},
		PollInterval: 50 * time.Millisecond, Logger: slog.New(slog.DiscardHandler),
	})
	mopts.Lib, mopts.Inventory, mopts.State = lib, func() *nvml.Inventory { return s.inv }, s.state
	if mopts.ProbeInterval == 0 {
		mopts.ProbeInterval = 20 * time.Millisecond
	}
	if mopts.Recovery == "" {
		mopts.Recovery = health.RecoverNever
	}
	s.monitor = health.NewMonitor(mopts)

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = mgr.Run(ctx, s.resources) }()
	go func() { defer wg.Done(); _ = s.monitor.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })

	wctx := waitCtx(t)
	for _, r := range s.resources {
		if err := s.kubelet.WaitForAllocatable(wctx, r.Name, len(r.Devices), len(r.Devices)); err != nil {
			t.Fatalf("%s never fully allocatable: %v", r.Name, err)
		}
	}
	if err := s.monitor.WaitFor(wctx, func(st health.MonitorStatus) bool { return st.Mode == health.ModeEvents }); err != nil {
		t.Fatal(err)
	}
	return s
}

func waitCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// unhealthyIDs is what the kubelet holds as unhealthy, by resource.
func (s *stack) unhealthyIDs() map[string][]string {
	out := map[string][]string{}
	for _, r := range s.resources {
		for _, d := range s.kubelet.Devices(r.Name) {
			if d.Health != pluginapi.Healthy {
				out[r.Name] = append(out[r.Name], d.ID)
			}
		}
	}
	return out
}

func (s *stack) waitAllocatable(t testing.TB, resource string, capacity, allocatable int) {
	t.Helper()
	if err := s.kubelet.WaitForAllocatable(waitCtx(t), resource, capacity, allocatable); err != nil {
		c, a := s.kubelet.Capacity(resource)
		t.Fatalf("%s: kubelet sees %d/%d, want %d/%d: %v", resource, c, a, capacity, allocatable, err)
	}
}

func resource(t testing.TB, rs []*sharing.Resource, name string) *sharing.Resource {
	t.Helper()
	for _, r := range rs {
		if r.Name == name {
			return r
		}
	}
	t.Fatalf("no resource %s", name)
	return nil
}

const timeSliced8 = `
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        replicas: 8
`

// TestFanOutToReplicas: an XID on one GPU takes all 8 of its replicas out,
// and only them; the others keep allocating and preferring.
func TestFanOutToReplicas(t *testing.T) {
	s := startStack(t, "dgx-h100", timeSliced8, nil, health.MonitorOptions{})
	res := resource(t, s.resources, "nvidia.com/gpu")
	if len(res.Devices) != 64 {
		t.Fatalf("%d replicas, want 64", len(res.Devices))
	}
	sick := s.inv.GPUs[2].UUID
	if _, err := s.node.InjectXID(2, 48, -1, -1); err != nil {
		t.Fatal(err)
	}
	s.waitAllocatable(t, res.Name, 64, 56)
	bad := s.unhealthyIDs()[res.Name]
	for _, id := range bad {
		if !strings.HasPrefix(id, sick+sharing.ReplicaSeparator) {
			t.Errorf("replica %s unhealthy; only GPU 2's replicas should be", id)
		}
	}
	ctx := waitCtx(t)
	if _, err := s.kubelet.Allocate(ctx, res.Name, bad[0]); err == nil || !strings.Contains(err.Error(), "XID 48") {
		t.Errorf("Allocate of an unhealthy replica: %v, want a refusal naming XID 48", err)
	}
	healthyID := s.inv.GPUs[3].UUID + "::0"
	if _, err := s.kubelet.Allocate(ctx, res.Name, healthyID); err != nil {
		t.Errorf("Allocate of a healthy replica: %v", err)
	}
	// The kubelet may still offer the sick replicas; they are skipped, not
	// an error that would fail the pod's admission.
	got, err := s.kubelet.Preferred(ctx, res.Name, []string{bad[0], bad[1], healthyID}, nil, 1)
	if err != nil || len(got) != 1 || got[0] != healthyID {
		t.Errorf("Preferred = %v, %v; want [%s]", got, err, healthyID)
	}
}

const migMixed = `
flags:
  migStrategy: mixed
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/mig-1g.5gb
        replicas: 2
`

// TestFanOutMIG: an event with GI/CI reaches that MIG device and its
// replicas only; an event for the whole GPU reaches every MIG device on it
// across resources.
func TestFanOutMIG(t *testing.T) {
	s := startStack(t, "dgx-a100-mig", migMixed, nil, health.MonitorOptions{})
	g := s.inv.GPUs[1] // 3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb
	target := g.MIGDevices[2]
	if target.Profile != "1g.5gb" {
		t.Fatalf("GPU 1's MIG device 2 is %s, want 1g.5gb", target.Profile)
	}
	small := resource(t, s.resources, "nvidia.com/mig-1g.5gb")
	if _, err := s.node.InjectXID(1, 94, target.GPUInstanceID, target.ComputeInstanceID); err != nil {
		t.Fatal(err)
	}
	s.waitAllocatable(t, small.Name, len(small.Devices), len(small.Devices)-2)
	bad := s.unhealthyIDs()
	if len(bad) != 1 || len(bad[small.Name]) != 2 || !strings.HasPrefix(bad[small.Name][0], target.UUID+"::") {
		t.Fatalf("unhealthy after a MIG XID: %v, want the 2 replicas of %s only", bad, target.UUID)
	}

	// The whole GPU: every MIG device on GPU 1, in every resource.
	if _, err := s.node.InjectXID(1, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	want := map[string]int{}
	for _, m := range g.MIGDevices {
		if m.Profile == "1g.5gb" {
			want[small.Name] += 2
		} else {
			want[sharing.MIGResourceName(m.Profile)]++
		}
	}
	for name, n := range want {
		r := resource(t, s.resources, name)
		s.waitAllocatable(t, name, len(r.Devices), len(r.Devices)-n)
	}
	for name, ids := range s.unhealthyIDs() {
		for _, id := range ids {
			d, _ := resource(t, s.resources, name).Lookup(id)
			if d.GPUIndex != 1 {
				t.Errorf("%s %s (GPU %d) unhealthy after an XID on GPU 1", name, id, d.GPUIndex)
			}
		}
	}
}

// countingHandler counts log records.
type countingHandler struct {
	mu    sync.Mutex
	lines []string
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lines = append(h.lines, r.Message)
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

// TestXIDStormKeepsServing: 10 000 XIDs on one GPU while the kubelet keeps
// allocating: every call answers, the kubelet gets one device-list update,
// and the log gets one line.
func TestXIDStormKeepsServing(t *testing.T) {
	logs := &countingHandler{}
	s := startStack(t, "dgx-h100", timeSliced8, slog.New(logs), health.MonitorOptions{Logger: slog.New(logs)})
	res := resource(t, s.resources, "nvidia.com/gpu")
	before := len(s.kubelet.Events())

	const storm = 10000
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < storm; i++ {
			code := uint64(48)
			if i%2 == 1 {
				code = 13
			}
			// Like a driver whose queue is full, the simulator drops
			// events; pace the storm so that all of them arrive.
			for n, _ := s.node.InjectXID(0, code, -1, -1); n == 0; n, _ = s.node.InjectXID(0, code, -1, -1) {
				runtime.Gosched()
			}
		}
	}()
	ctx := waitCtx(t)
	calls := 0
	var slowest time.Duration
	healthyID := s.inv.GPUs[5].UUID + "::3"
	for storming := true; storming; {
		select {
		case <-done:
			storming = false
		default:
		}
		t0 := time.Now()
		if _, err := s.kubelet.Allocate(ctx, res.Name, healthyID); err != nil {
			t.Fatalf("Allocate during the storm: %v", err)
		}
		calls++
		slowest = max(slowest, time.Since(t0))
	}
	elapsed := time.Since(start)
	s.waitAllocatable(t, res.Name, 64, 56)
	if err := s.monitor.WaitFor(ctx, func(st health.MonitorStatus) bool { return st.Events >= storm }); err != nil {
		t.Fatal(err)
	}
	t.Logf("storm: %d XIDs in %s (%.0f/s); %d Allocate calls during it, slowest %s",
		storm, elapsed.Round(time.Millisecond), storm/elapsed.Seconds(), calls, slowest)
	updates := 0
	for _, e := range s.kubelet.Events()[before:] {
		if e.Kind == "devices" && e.Resource == res.Name {
			updates++
		}
	}
	if updates != 1 {
		t.Errorf("the kubelet got %d device-list updates for one GPU turning unhealthy, want 1", updates)
	}
	logs.mu.Lock()
	lines := append([]string(nil), logs.lines...)
	logs.mu.Unlock()
	if len(lines) != 1 || lines[0] != "device unhealthy" {
		t.Errorf("log lines during the storm: %q, want exactly one 'device unhealthy'", lines)
	}
}
