package dcgmbackend

// No DCGM library exists on the machines this project is built and tested
// on: the backend is tested against fakeClient, and the real go-dcgm
// client only on its Init failure path.

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-dcgm/pkg/dcgm"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// fakeClient is a DCGM hostengine with two whole GPUs and one split into
// two GPU instances.
type fakeClient struct {
	mu          sync.Mutex
	connected   bool
	connects    int
	disconnects int
	connectErr  error
	lost        bool          // every call fails with ErrConnectionLost
	profErr     error         // watching profiling fields fails
	block       chan struct{} // Latest waits for it to close
	watches     map[string][]uint16
	latestAsked []uint16
}

func newFake() *fakeClient { return &fakeClient{watches: map[string][]uint16{}} }

func (f *fakeClient) Connect() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.connects++
	if f.connectErr != nil {
		return f.connectErr
	}
	f.connected, f.lost = true, false
	return nil
}

func (f *fakeClient) Disconnect() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.disconnects++
	f.connected = false
	return nil
}

func (f *fakeClient) check() error {
	if !f.connected {
		return errors.New("fake: not connected (the backend called DCGM without a successful Init)")
	}
	if f.lost {
		return ErrConnectionLost
	}
	return nil
}

func (f *fakeClient) GPUs() ([]GPU, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return nil, err
	}
	// DCGM numbers GPUs its own way; the backend must match on UUID.
	return []GPU{{ID: 7, UUID: "GPU-0"}, {ID: 3, UUID: "GPU-1"}, {ID: 5, UUID: "GPU-2"}}, nil
}

func (f *fakeClient) Instances() ([]Instance, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return nil, err
	}
	return []Instance{{ID: 21, GPUUUID: "GPU-2", GPUInstanceID: 1}, {ID: 22, GPUUUID: "GPU-2", GPUInstanceID: 2}}, nil
}

func (f *fakeClient) Watch(name string, _ []Entity, fields []uint16, _ time.Duration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return err
	}
	if strings.Contains(name, "prof") && f.profErr != nil {
		return f.profErr
	}
	f.watches[name] = fields
	return nil
}

// Latest answers in DCGM's units: temperature by GPU id, utilization,
// framebuffer in MiB, profiling ratios per instance; GPU 3 has no memory
// temperature (blank).
func (f *fakeClient) Latest(entities []Entity, fields []uint16) ([]Value, error) {
	f.mu.Lock()
	block := f.block
	f.mu.Unlock()
	if block != nil {
		<-block
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(); err != nil {
		return nil, err
	}
	f.latestAsked = fields
	var out []Value
	for _, e := range entities {
		for _, id := range fields {
			v := Value{Entity: e, Field: id}
			switch {
			case e.Group == GroupGPU && id == 150: // GPU_TEMP
				v.Value = float64(40 + e.ID)
			case e.Group == GroupGPU && id == 140: // MEMORY_TEMP
				v.Value, v.Blank = 50, e.ID == 3
			case e.Group == GroupGPU && id == 203: // GPU_UTIL
				v.Value = 90
			case id == 252: // FB_USED
				v.Value = float64(1000 * (e.ID + 1))
			case e.Group == GroupGPUInstance && id == 1001: // PROF_GR_ENGINE_ACTIVE
				v.Value = 0.25
			case e.Group == GroupGPU && id == 1001:
				v.Value = 0.5
			default:
				v.Blank = true
			}
			out = append(out, v)
		}
	}
	return out, nil
}

func (f *fakeClient) set(fn func(f *fakeClient)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func inventory() *nvml.Inventory {
	return &nvml.Inventory{GPUs: []nvml.GPU{
		{Index: 0, UUID: "GPU-0"}, {Index: 1, UUID: "GPU-1"},
		{Index: 2, UUID: "GPU-2", MIGEnabled: true, MIGDevices: []nvml.MIGDevice{{UUID: "MIG-a", GPUInstanceID: 1}, {UUID: "MIG-b", GPUInstanceID: 2}}},
		{Index: 3, UUID: "GPU-9"}, // not known to DCGM
	}}
}

var fields = telemetry.MaskOf(telemetry.GPUTemp, telemetry.MemoryTemp, telemetry.GPUUtil, telemetry.FBUsed, telemetry.ProfGREngineActive, telemetry.DriverVersion)

func request(inv *nvml.Inventory) *telemetry.Request {
	l := telemetry.NewLayout(inv, 0)
	return &telemetry.Request{Inventory: inv, Targets: l.Targets, Fields: fields, Out: make([]telemetry.Result, len(l.Targets))}
}

func show(req *telemetry.Request) string {
	var out []string
	for i, t := range req.Targets {
		r := req.Out[i]
		s := t.Key + ":"
		if r.Err != nil {
			s += "err"
		}
		for _, f := range []telemetry.Field{telemetry.GPUTemp, telemetry.MemoryTemp, telemetry.GPUUtil, telemetry.FBUsed, telemetry.ProfGREngineActive} {
			if v, ok := r.Get(f); ok {
				s += " " + strings.TrimPrefix(strings.TrimPrefix(f.String(), "DCGM_FI_DEV_"), "DCGM_FI_PROF_") + "=" + trim(v)
			}
		}
		out = append(out, s)
	}
	return strings.Join(out, " | ")
}

func trim(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }

func TestSampleMapsEntities(t *testing.T) {
	f := newFake()
	b := New(Options{Client: f, Interval: time.Second})
	if err := b.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	req := request(inventory())
	if err := b.Sample(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	want := "GPU-0: GPU_TEMP=47 MEMORY_TEMP=50 GPU_UTIL=90 FB_USED=8000 GR_ENGINE_ACTIVE=0.5" +
		" | GPU-1: GPU_TEMP=43 GPU_UTIL=90 FB_USED=4000 GR_ENGINE_ACTIVE=0.5" +
		// MIG: the GPU's temperatures, the instance's memory and profiling, no utilization.
		" | MIG-a: GPU_TEMP=45 MEMORY_TEMP=50 FB_USED=22000 GR_ENGINE_ACTIVE=0.25" +
		" | MIG-b: GPU_TEMP=45 MEMORY_TEMP=50 FB_USED=23000 GR_ENGINE_ACTIVE=0.25" +
		" | GPU-9:err"
	if got := show(req); got != want {
		t.Errorf("sample:\n got %s\nwant %s", got, want)
	}
	if got := f.watches["gpu-plugin-prof"]; len(got) != 1 || got[0] != 1001 {
		t.Errorf("profiling watch %v, want [1001] apart from the other fields", got)
	}
	if got := f.watches["gpu-plugin"]; len(got) != 4 {
		t.Errorf("field watch %v: want the 4 plain fields (no driver version label)", got)
	}
}

func TestProfilingUnavailable(t *testing.T) {
	f := newFake()
	f.profErr = errors.New("DCGM_ST_REQUIRES_ROOT")
	b := New(Options{Client: f})
	if err := b.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	req := request(inventory())
	if err := b.Sample(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(show(req), "GR_ENGINE_ACTIVE") {
		t.Errorf("profiling values without a profiling watch: %s", show(req))
	}
	for _, id := range f.latestAsked {
		if id >= 1001 {
			t.Errorf("profiling field %d still read", id)
		}
	}
}

// TestConnectionLoss: a lost hostengine turns into telemetry.ErrBackendLost,
// the backend disconnects, calls nothing until Connect succeeds again,
// then re-watches.
func TestConnectionLoss(t *testing.T) {
	f := newFake()
	b := New(Options{Client: f})
	if err := b.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := b.Sample(context.Background(), request(inventory())); err != nil {
		t.Fatal(err)
	}
	f.set(func(f *fakeClient) { f.lost = true })
	err := b.Sample(context.Background(), request(inventory()))
	if !errors.Is(err, telemetry.ErrBackendLost) {
		t.Fatalf("sample after the hostengine went away: %v, want ErrBackendLost", err)
	}
	if f.disconnects != 1 {
		t.Errorf("%d disconnects after the loss, want 1", f.disconnects)
	}
	// Not connected: Sample fails without calling DCGM.
	if err := b.Sample(context.Background(), request(inventory())); !errors.Is(err, telemetry.ErrBackendLost) {
		t.Errorf("sample while disconnected: %v", err)
	}
	f.set(func(f *fakeClient) { f.connectErr = errors.New("connection refused") })
	if err := b.Connect(context.Background()); err == nil {
		t.Fatal("Connect while the hostengine is down succeeded")
	}
	f.set(func(f *fakeClient) { f.connectErr = nil; f.watches = map[string][]uint16{} })
	if err := b.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	req := request(inventory())
	if err := b.Sample(context.Background(), req); err != nil || !strings.Contains(show(req), "GPU-0: GPU_TEMP=47") {
		t.Errorf("after reconnecting: %v %s", err, show(req))
	}
	if len(f.watches) == 0 {
		t.Error("fields not watched again after reconnecting")
	}
}

// TestHangingCall: a DCGM call that does not return costs one round (every
// device times out), not the sampler; no second call piles up.
func TestHangingCall(t *testing.T) {
	f := newFake()
	b := New(Options{Client: f})
	if err := b.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := b.Sample(context.Background(), request(inventory())); err != nil { // watches
		t.Fatal(err)
	}
	block := make(chan struct{})
	f.set(func(f *fakeClient) { f.block = block })
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	req := request(inventory())
	if err := b.Sample(ctx, req); err != nil {
		t.Fatal(err)
	}
	for i := range req.Out {
		if !errors.Is(req.Out[i].Err, telemetry.ErrTimeout) {
			t.Errorf("target %d: %v, want ErrTimeout", i, req.Out[i].Err)
		}
	}
	if err := b.Sample(context.Background(), request(inventory())); err == nil || !strings.Contains(err.Error(), "has not returned") {
		t.Errorf("second sample while the first hangs: %v", err)
	}
	if err := b.Close(); err != nil || f.disconnects != 0 {
		t.Errorf("Close during a hanging call: %v, %d disconnects (must not call DCGM concurrently)", err, f.disconnects)
	}
	f.set(func(f *fakeClient) { f.block = nil })
	close(block)
}

// TestSamplerDegradesToNVML: through the sampler, a lost DCGM connection
// falls back to the other backend in the same round and comes back after
// a reconnect; the process never exits.
func TestSamplerDegradesToNVML(t *testing.T) {
	f := newFake()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	inv := inventory()
	s := telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory: func() *nvml.Inventory { return inv },
		Backends:  telemetry.Selection{Configured: "dcgm", Primary: New(Options{Client: f}), Fallback: nvmlLike{}, RetryPrimary: true},
		Now:       clock,
	})
	temp := func() float64 { v, _ := s.Snapshot().Devices[0].Get(telemetry.GPUTemp); return v }
	s.SampleOnce(context.Background())
	if st := s.Stats(); st.Backend != "dcgm" || temp() != 47 {
		t.Fatalf("start: backend %s temp %v, want dcgm 47", st.Backend, temp())
	}
	f.set(func(f *fakeClient) { f.lost = true; f.connectErr = errors.New("connection refused") })
	s.SampleOnce(context.Background())
	if st := s.Stats(); st.Backend != "nvml" || temp() != 1 || st.Fallbacks != 1 {
		t.Fatalf("after the loss: backend %s temp %v fallbacks %d, want nvml 1 1", st.Backend, temp(), st.Fallbacks)
	}
	f.set(func(f *fakeClient) { f.connectErr = nil })
	mu.Lock()
	now = now.Add(2 * time.Second)
	mu.Unlock()
	s.SampleOnce(context.Background())
	if st := s.Stats(); st.Backend != "dcgm" || temp() != 47 {
		t.Errorf("after reconnecting: backend %s temp %v, want dcgm 47", st.Backend, temp())
	}
}

// nvmlLike stands in for the NVML backend: temperature 1 everywhere.
type nvmlLike struct{}

func (nvmlLike) Name() string { return "nvml" }
func (nvmlLike) Close() error { return nil }
func (nvmlLike) Sample(_ context.Context, req *telemetry.Request) error {
	for i := range req.Out {
		req.Out[i].Set(telemetry.GPUTemp, 1)
	}
	return nil
}

// TestCatalogIDs: our field ids are DCGM's (as go-dcgm names them).
func TestCatalogIDs(t *testing.T) {
	for f := range telemetry.NumFields {
		id, ok := dcgm.GetFieldID(f.String())
		if !ok || uint16(id) != f.Info().ID {
			t.Errorf("%s: our id %d, go-dcgm's %d (found %v)", f, f.Info().ID, id, ok)
		}
	}
}

// libdcgmPresent reports whether libdcgm.so.4 can be found, in which case
// an embedded Init would really start a hostengine.
func libdcgmPresent() bool {
	if out, err := exec.Command("ldconfig", "-p").Output(); err == nil && strings.Contains(string(out), "libdcgm.so.4") {
		return true
	}
	for _, dir := range append(strings.Split(os.Getenv("LD_LIBRARY_PATH"), ":"), "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib") {
		if dir == "" {
			continue
		}
		if _, err := os.Stat(dir + "/libdcgm.so.4"); err == nil {
			return true
		}
	}
	return false
}

// TestRealInitFailure runs the real go-dcgm Init where libdcgm.so.4 is
// absent: it returns an error, and the client then refuses every call
// (a go-dcgm call after a failed Init would kill the process).
func TestRealInitFailure(t *testing.T) {
	if libdcgmPresent() {
		t.Skip("libdcgm.so.4 is installed here; this test covers the machine without it")
	}
	for _, addr := range []string{"", "127.0.0.1:5555", "unix:///run/nvidia/dcgm.sock"} {
		c := NewClient(addr)
		err := c.Connect()
		if err == nil || !strings.Contains(err.Error(), "libdcgm.so.4 not found") {
			t.Fatalf("Init with %q and no libdcgm.so.4: %v, want \"libdcgm.so.4 not found\"", addr, err)
		}
		if _, err := c.GPUs(); !errors.Is(err, errNotConnected) {
			t.Errorf("GPUs after a failed Init: %v, want refused", err)
		}
		if _, err := c.Latest([]Entity{{GroupGPU, 0}}, []uint16{150}); !errors.Is(err, errNotConnected) {
			t.Errorf("Latest after a failed Init: %v, want refused", err)
		}
		if err := c.Watch("x", nil, nil, time.Second); !errors.Is(err, errNotConnected) {
			t.Errorf("Watch after a failed Init: %v, want refused", err)
		}
		if err := c.Disconnect(); err != nil {
			t.Errorf("Disconnect after a failed Init: %v", err)
		}
		// And through the backend, as the sampler uses it.
		b := New(Options{Client: c})
		if err := b.Connect(context.Background()); err == nil {
			t.Error("backend Connect succeeded without libdcgm")
		}
		if err := b.Sample(context.Background(), request(inventory())); !errors.Is(err, telemetry.ErrBackendLost) {
			t.Errorf("backend Sample without a connection: %v", err)
		}
	}

	// auto, as the daemon sets it up on a GPU node: the real Init fails,
	// the sampler serves through the other backend and never calls DCGM
	// again.
	inv := inventory()
	s := telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory: func() *nvml.Inventory { return inv },
		Backends:  telemetry.Selection{Configured: "auto", Primary: New(Options{Client: NewClient("")}), Fallback: nvmlLike{}},
	})
	for range 3 {
		s.SampleOnce(context.Background())
	}
	if st := s.Stats(); st.Backend != "nvml" || st.Configured != "auto" {
		t.Errorf("auto without libdcgm: backend %s (configured %s), want nvml", st.Backend, st.Configured)
	}
	if v, ok := s.Snapshot().Devices[0].Get(telemetry.GPUTemp); !ok || v != 1 {
		t.Errorf("auto without libdcgm serves %v %v, want the NVML value", v, ok)
	}
}
