package telemetry_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

func newClock() *testkit.Clock { return testkit.NewClock(time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)) }

// fakeBackend answers with a fixed temperature per backend, so a test can
// tell which backend a value came from.
type fakeBackend struct {
	name string
	temp float64

	mu         sync.Mutex
	connectErr error
	connects   int
	sampleErr  error         // returned by the next Sample calls
	deviceErr  map[int]error // by GPU index
	calls      int           // Sample calls
	block      chan struct{} // when set, Sample waits for it to close, ignoring ctx
	entered    chan struct{} // closed when a blocked Sample has started
	closed     bool
	lastFields telemetry.Mask // what the last request asked for
	procs      bool           // lists processes when asked (NVML does, DCGM here does not)
	procCalls  int            // requests that asked for processes
}

func (b *fakeBackend) Name() string { return b.name }

func (b *fakeBackend) Connect(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.connects++
	return b.connectErr
}

func (b *fakeBackend) Sample(_ context.Context, req *telemetry.Request) error {
	b.mu.Lock()
	block, entered := b.block, b.entered
	b.mu.Unlock()
	if block != nil {
		close(entered)
		<-block
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls++
	b.lastFields = req.Fields
	if b.sampleErr != nil {
		return b.sampleErr
	}
	for i, t := range req.Targets {
		if err := b.deviceErr[t.GPU.Index]; err != nil {
			req.Out[i].Err = err
			continue
		}
		if req.Fields != 0 {
			req.Out[i].Set(telemetry.GPUTemp, b.temp)
		}
		if req.Processes && b.procs {
			// An MPS client beside a plain process.
			req.Out[i].Procs = []telemetry.Process{{PID: uint32(100 + i), MemoryBytes: 1 << 20}, {PID: uint32(200 + i), MPSClient: true}}
			req.Out[i].ProcsRead, req.Out[i].MPSRead = true, true
		}
	}
	if req.Processes {
		b.procCalls++
	}
	return nil
}

func (b *fakeBackend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	return nil
}

func (b *fakeBackend) set(f func(b *fakeBackend)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f(b)
}

func (b *fakeBackend) get() fakeBackend {
	b.mu.Lock()
	defer b.mu.Unlock()
	return fakeBackend{connects: b.connects, calls: b.calls, closed: b.closed, lastFields: b.lastFields, procCalls: b.procCalls}
}

// fakeInventory is two whole GPUs and one with two MIG devices.
func fakeInventory() *nvml.Inventory {
	return &nvml.Inventory{DriverVersion: "550.54.15", GPUs: []nvml.GPU{
		{Index: 0, UUID: "GPU-0", Name: "NVIDIA A100-SXM4-40GB", PCIBusID: "00000000:07:00.0"},
		{Index: 1, UUID: "GPU-1", Name: "NVIDIA A100-SXM4-40GB", PCIBusID: "00000000:0F:00.0"},
		{Index: 2, UUID: "GPU-2", Name: "NVIDIA A100-SXM4-40GB", PCIBusID: "00000000:47:00.0", MIGEnabled: true,
			MIGDevices: []nvml.MIGDevice{{UUID: "MIG-a", Profile: "3g.20gb", GPUInstanceID: 1}, {UUID: "MIG-b", Profile: "3g.20gb", GPUInstanceID: 2}}},
		{Index: 3, Problem: "unidentified"}, // never sampled
	}}
}

func newSampler(t *testing.T, clk *testkit.Clock, sel telemetry.Selection, logs *bytes.Buffer) *telemetry.Sampler {
	t.Helper()
	inv := fakeInventory()
	var log *slog.Logger
	if logs != nil {
		log = slog.New(slog.NewTextHandler(logs, nil))
	}
	return telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory: func() *nvml.Inventory { return inv }, Backends: sel, Interval: time.Second,
		Logger: log, Now: clk.Now,
	})
}

func temps(s *telemetry.Snapshot) string {
	var out []string
	for i, d := range s.Devices {
		v, ok := d.Get(telemetry.GPUTemp)
		x := "-"
		if ok {
			x = fmt.Sprint(v)
		}
		if d.Stale {
			x += "(stale)"
		}
		out = append(out, s.Layout.Targets[i].Key+"="+x)
	}
	return strings.Join(out, " ")
}

func TestLayoutFlexMode(t *testing.T) {
	l := telemetry.NewLayout(fakeInventory(), 0)
	var keys []string
	for _, tg := range l.Targets {
		keys = append(keys, tg.Key)
	}
	if got := strings.Join(keys, " "); got != "GPU-0 GPU-1 MIG-a MIG-b" {
		t.Errorf("targets %q: want whole GPUs, MIG devices instead of their GPU, no unidentified GPU", got)
	}
}

func TestBackendSelection(t *testing.T) {
	lost := fmt.Errorf("%w: hostengine went away", telemetry.ErrBackendLost)
	for _, tc := range []struct {
		name       string
		configured string
		connectErr error
		retry      bool
		noFallback bool
		// steps run a round each after changing the fake; want is the
		// backend in use and the temperatures served after it.
		steps []step
	}{
		{name: "auto without DCGM uses NVML and does not retry", configured: "auto",
			connectErr: errors.New("libdcgm.so.4 not found"),
			steps: []step{
				{want: "nvml", temps: "GPU-0=40 GPU-1=40 MIG-a=40 MIG-b=40", connects: 1},
				{advance: time.Hour, want: "nvml", connects: 1},
			}},
		{name: "auto with DCGM uses it", configured: "auto",
			steps: []step{{want: "dcgm", temps: "GPU-0=70 GPU-1=70 MIG-a=70 MIG-b=70", connects: 1}}},
		{name: "explicit dcgm retries with backoff until it connects", configured: "dcgm", retry: true,
			connectErr: errors.New("connection refused"),
			steps: []step{
				{want: "nvml", connects: 1},
				{advance: 500 * time.Millisecond, want: "nvml", connects: 1},  // backoff 1 s not over
				{advance: 600 * time.Millisecond, want: "nvml", connects: 2},  // retried, failed: backoff 2 s
				{advance: 1500 * time.Millisecond, want: "nvml", connects: 2}, // not yet
				{advance: 600 * time.Millisecond, connectOK: true, want: "dcgm", connects: 3, temps: "GPU-0=70 GPU-1=70 MIG-a=70 MIG-b=70"},
			}},
		{name: "a lost connection falls back in the same round and reconnects", configured: "auto",
			steps: []step{
				{want: "dcgm", connects: 1},
				{primaryErr: lost, want: "nvml", temps: "GPU-0=40 GPU-1=40 MIG-a=40 MIG-b=40", connects: 1, fallbacks: 1},
				{primaryErr: nil, advance: 1100 * time.Millisecond, want: "dcgm", temps: "GPU-0=70 GPU-1=70 MIG-a=70 MIG-b=70", connects: 2, fallbacks: 1},
			}},
		{name: "a DCGM error that persists falls back, with growing backoff", configured: "auto",
			steps: []step{
				{want: "dcgm"},
				{primaryErr: errors.New("watching fields: DCGM_ST_REQUIRES_ROOT"), want: "nvml", temps: "GPU-0=40 GPU-1=40 MIG-a=40 MIG-b=40", fallbacks: 1},
				{primaryErr: errors.New("again"), advance: 1100 * time.Millisecond, want: "nvml", fallbacks: 2},              // retried at 1 s: backoff 2 s
				{primaryErr: errors.New("again"), advance: 1100 * time.Millisecond, want: "nvml", fallbacks: 2},              // not yet
				{primaryErr: errors.New("again"), advance: 1000 * time.Millisecond, want: "nvml", fallbacks: 3},              // retried: backoff 4 s
				{advance: 4100 * time.Millisecond, want: "dcgm", temps: "GPU-0=70 GPU-1=70 MIG-a=70 MIG-b=70", fallbacks: 3}, // served again
			}},
		{name: "without NVML a lost connection leaves stale samples, no crash", configured: "dcgm", noFallback: true,
			steps: []step{
				{want: "dcgm", temps: "GPU-0=70 GPU-1=70 MIG-a=70 MIG-b=70"},
				{primaryErr: lost, want: "none", temps: "GPU-0=70(stale) GPU-1=70(stale) MIG-a=70(stale) MIG-b=70(stale)", fallbacks: 1},
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newClock()
			primary := &fakeBackend{name: "dcgm", temp: 70, connectErr: tc.connectErr}
			fallback := &fakeBackend{name: "nvml", temp: 40}
			sel := telemetry.Selection{Configured: tc.configured, Primary: primary, RetryPrimary: tc.retry, Fallback: fallback}
			if tc.noFallback {
				sel.Fallback = nil
			}
			s := newSampler(t, clk, sel, nil)
			for i, st := range tc.steps {
				clk.Advance(st.advance)
				primary.set(func(b *fakeBackend) {
					b.sampleErr = st.primaryErr
					if st.connectOK {
						b.connectErr = nil
					}
				})
				s.SampleOnce(context.Background())
				stats := s.Stats()
				if stats.Backend != st.want || stats.Configured != tc.configured {
					t.Errorf("step %d: backend %s (configured %s), want %s", i, stats.Backend, stats.Configured, st.want)
				}
				if st.temps != "" {
					if got := temps(s.Snapshot()); got != st.temps {
						t.Errorf("step %d: served %s, want %s", i, got, st.temps)
					}
				}
				if st.connects != 0 && primary.get().connects != st.connects {
					t.Errorf("step %d: %d DCGM connect attempts, want %d", i, primary.get().connects, st.connects)
				}
				if stats.Fallbacks != st.fallbacks {
					t.Errorf("step %d: %d fallbacks, want %d", i, stats.Fallbacks, st.fallbacks)
				}
			}
		})
	}
}

type step struct {
	advance    time.Duration
	primaryErr error
	connectOK  bool
	want       string
	temps      string
	connects   int
	fallbacks  uint64
}

// TestStaleDevice: a device that stops answering keeps its last values,
// marked stale and counted, for StaleAfter; then it is no longer served.
func TestStaleDevice(t *testing.T) {
	clk := newClock()
	nv := &fakeBackend{name: "nvml", temp: 40}
	var logs bytes.Buffer
	s := newSampler(t, clk, telemetry.Selection{Configured: "nvml", Fallback: nv}, &logs)
	s.SampleOnce(context.Background())
	t0 := clk.Now()
	if s.StaleAfter() != 5*time.Second {
		t.Fatalf("StaleAfter at a 1 s interval: %s, want 5s", s.StaleAfter())
	}

	nv.set(func(b *fakeBackend) { b.temp = 41; b.deviceErr = map[int]error{1: errors.New("ERROR_UNKNOWN")} })
	for range 3 {
		clk.Advance(time.Second)
		s.SampleOnce(context.Background())
	}
	snap := s.Snapshot()
	if got := temps(snap); got != "GPU-0=41 GPU-1=40(stale) MIG-a=41 MIG-b=41" {
		t.Errorf("while GPU 1 fails: %s", got)
	}
	d := snap.Devices[1]
	if !d.At.Equal(t0) || d.Failures != 3 || d.Err != "ERROR_UNKNOWN" {
		t.Errorf("GPU 1: at %s failures %d err %q, want at %s, 3 failures, the error", d.At, d.Failures, d.Err, t0)
	}
	if !d.Servable(clk.Now(), s.StaleAfter()) {
		t.Error("GPU 1 not served 3 s after its last good sample")
	}
	clk.Advance(3 * time.Second)
	s.SampleOnce(context.Background())
	d = s.Snapshot().Devices[1]
	if d.Servable(clk.Now(), s.StaleAfter()) {
		t.Error("GPU 1 still served 6 s after its last good sample")
	}
	if n := strings.Count(logs.String(), "telemetry sampling failing"); n != 1 {
		t.Errorf("failure logged %d times, want once:\n%s", n, logs.String())
	}

	nv.set(func(b *fakeBackend) { b.deviceErr = nil })
	clk.Advance(time.Second)
	s.SampleOnce(context.Background())
	d = s.Snapshot().Devices[1]
	if d.Stale || !d.At.Equal(clk.Now()) || d.Failures != 4 || !d.Servable(clk.Now(), s.StaleAfter()) {
		t.Errorf("GPU 1 after recovery: %+v", d)
	}
	if !strings.Contains(logs.String(), "telemetry sampling recovered") {
		t.Errorf("recovery not logged:\n%s", logs.String())
	}
}

// TestAliveAndFresh: liveness fails when no round finishes for 30 s (a
// backend hanging past every timeout); readiness needs a recent snapshot.
func TestAliveAndFresh(t *testing.T) {
	nv := &fakeBackend{name: "nvml", temp: 40, block: make(chan struct{}), entered: make(chan struct{})}
	s := telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory: func() *nvml.Inventory { return fakeInventory() },
		Backends:  telemetry.Selection{Configured: "nvml", Fallback: nv}, Interval: time.Second,
	})
	if err := s.Alive(time.Now()); err != nil {
		t.Errorf("Alive before Run: %v", err)
	}
	if err := s.Fresh(time.Now()); err == nil || !strings.Contains(err.Error(), "no sample") {
		t.Errorf("Fresh before any round: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- s.Run(ctx) }()
	select {
	case <-nv.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the sampler never called the backend")
	}
	if err := s.Alive(start.Add(20 * time.Second)); err != nil {
		t.Errorf("Alive 20 s into a hanging round: %v", err)
	}
	if err := s.Alive(start.Add(40 * time.Second)); err == nil || !strings.Contains(err.Error(), "stuck") {
		t.Errorf("Alive 40 s into a hanging round: %v, want stuck", err)
	}
	var block chan struct{}
	nv.set(func(b *fakeBackend) { block, b.block = b.block, nil })
	close(block)
	wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer wcancel()
	if err := s.WaitFor(wctx, func(snap *telemetry.Snapshot) bool { return snap != nil }); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := s.Alive(now); err != nil {
		t.Errorf("Alive after a round: %v", err)
	}
	if err := s.Fresh(now); err != nil {
		t.Errorf("Fresh after a round: %v", err)
	}
	if err := s.Fresh(now.Add(10 * time.Second)); err == nil {
		t.Error("Fresh 10 s after the last round: want an error")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
	if !nv.get().closed {
		t.Error("backend not closed when Run returned")
	}
}

// TestFieldsRequested: the backend is asked for exactly the metric set's
// fields.
func TestFieldsRequested(t *testing.T) {
	set, err := telemetry.ParseCounters(strings.NewReader("DCGM_FI_DEV_GPU_TEMP, gauge, t\nDCGM_FI_DRIVER_VERSION, label, v\n"))
	if err != nil {
		t.Fatal(err)
	}
	nv := &fakeBackend{name: "nvml"}
	s := telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory: func() *nvml.Inventory { return fakeInventory() },
		Backends:  telemetry.Selection{Fallback: nv}, Metrics: set,
	})
	s.SampleOnce(context.Background())
	if got, want := nv.get().lastFields, telemetry.MaskOf(telemetry.GPUTemp, telemetry.DriverVersion); got != want {
		t.Errorf("fields requested %b, want %b", got, want)
	}
}

// TestSamplerReportsDeviceErrors: every failed device of a round is handed
// to OnDeviceError by UUID with the NVML error intact (the daemon passes
// GPU_IS_LOST on to the health monitor); devices that answer are not.
func TestSamplerReportsDeviceErrors(t *testing.T) {
	reported := map[string]error{}
	e := newSimEnv(t, "dgx-h100", envOptions{onDeviceError: func(key string, err error) { reported[key] = err }})
	if err := e.node.SetFault(2, "GetTemperature", gonvml.ERROR_GPU_IS_LOST); err != nil {
		t.Fatal(err)
	}
	e.sample()
	lost := e.inv.GPUs[2].UUID
	if len(reported) != 1 || !nvml.IsLost(reported[lost]) {
		t.Fatalf("reported %v, want only %s with GPU_IS_LOST", reported, lost)
	}
	if err := e.node.SetFault(2, "GetTemperature", gonvml.SUCCESS); err != nil {
		t.Fatal(err)
	}
	clear(reported)
	e.clk.Advance(time.Second)
	e.sample()
	if len(reported) != 0 {
		t.Errorf("after the fault was cleared, reported %v", reported)
	}
}

// attributorFunc is a telemetry.Attributor.
type attributorFunc func(*telemetry.Snapshot) *telemetry.Usage

func (f attributorFunc) Attribute(s *telemetry.Snapshot) *telemetry.Usage { return f(s) }

// TestSamplerProcesses: with an Attributor the sampler asks for processes;
// while DCGM serves the fields they come from the NVML fallback in a
// processes-only request; the Attributor's answer is published with the
// snapshot.
func TestSamplerProcesses(t *testing.T) {
	for _, tc := range []struct {
		name    string
		primary bool
	}{{"NVML serves", false}, {"DCGM serves the fields", true}} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newClock()
			fallback := &fakeBackend{name: "nvml", temp: 40, procs: true}
			sel := telemetry.Selection{Configured: "auto", Fallback: fallback}
			var primary *fakeBackend
			if tc.primary {
				primary = &fakeBackend{name: "dcgm", temp: 50}
				sel.Primary = primary
			}
			usage := &telemetry.Usage{}
			var seen []*telemetry.Snapshot
			s := telemetry.NewSampler(telemetry.SamplerOptions{
				Inventory: fakeInventory, Backends: sel, Now: clk.Now,
				Attributor: attributorFunc(func(snap *telemetry.Snapshot) *telemetry.Usage {
					seen = append(seen, snap)
					return usage
				}),
			})
			s.SampleOnce(context.Background())
			snap := s.Snapshot()
			if len(seen) != 1 || seen[0] != snap || snap.Usage != usage {
				t.Fatalf("the Attributor saw %d snapshots; the published one carries %p, want %p", len(seen), snap.Usage, usage)
			}
			wantTemp := 40.0
			if tc.primary {
				wantTemp = 50
				if got := primary.get(); got.procCalls != 1 {
					t.Errorf("DCGM was asked for processes %d times; it serves fields only here", got.procCalls)
				}
				if got := fallback.get(); got.calls != 1 || got.lastFields != 0 || got.procCalls != 1 {
					t.Errorf("NVML fallback: %d calls, last fields %b, %d process requests; want one processes-only request", got.calls, got.lastFields, got.procCalls)
				}
			}
			for i, d := range snap.Devices {
				if temp, _ := d.Get(telemetry.GPUTemp); temp != wantTemp {
					t.Errorf("device %d: temperature %v, want %v", i, temp, wantTemp)
				}
				if !d.ProcsRead || len(d.Procs) != 2 || d.Procs[0].PID != uint32(100+i) {
					t.Errorf("device %d: processes %+v (read %v), want pids %d and %d", i, d.Procs, d.ProcsRead, 100+i, 200+i)
				}
				// Counted once, in the round.
				if !d.MPSRead || d.MPSClients != 1 {
					t.Errorf("device %d: MPS read %v, %d clients; want read, 1", i, d.MPSRead, d.MPSClients)
				}
			}
		})
	}
}
