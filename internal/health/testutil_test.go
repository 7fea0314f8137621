package health

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// mockNode is go-nvml's dgxa100 mock server with an event set fed from a
// channel and a probe whose answer each GPU can change. Its mock functions
// are fixed before any goroutine runs; behaviour changes go through atomics.
type mockNode struct {
	srv    *server.Server
	events chan gonvml.EventData
	lost   [8]atomic.Bool
	// createErr and waitErr make EventSetCreate and Wait fail (0: succeed).
	createErr atomic.Int32
	waitErr   atomic.Int32
	creates   atomic.Int32
	waits     atomic.Int64
	frees     atomic.Int32
	lib       *nvml.Library
	inv       *nvml.Inventory
}

func newMockNode(t testing.TB) *mockNode {
	t.Helper()
	n := &mockNode{srv: dgxa100.New(), events: make(chan gonvml.EventData, 1<<16)}
	n.srv.EventSetCreateFunc = func() (gonvml.EventSet, gonvml.Return) {
		n.creates.Add(1)
		if r := gonvml.Return(n.createErr.Load()); r != gonvml.SUCCESS {
			return nil, r
		}
		return &mock.EventSet{
			WaitFunc: func(ms uint32) (gonvml.EventData, gonvml.Return) {
				n.waits.Add(1)
				if r := gonvml.Return(n.waitErr.Load()); r != gonvml.SUCCESS {
					return gonvml.EventData{}, r
				}
				t := time.NewTimer(time.Duration(ms) * time.Millisecond)
				defer t.Stop()
				select {
				case e := <-n.events:
					return e, gonvml.SUCCESS
				case <-t.C:
					return gonvml.EventData{}, gonvml.ERROR_TIMEOUT
				}
			},
			FreeFunc: func() gonvml.Return { n.frees.Add(1); return gonvml.SUCCESS },
		}, gonvml.SUCCESS
	}
	for i, d := range n.srv.Devices {
		dev := d.(*server.Device)
		dev.GetSupportedEventTypesFunc = func() (uint64, gonvml.Return) {
			return gonvml.EventTypeXidCriticalError | gonvml.EventTypeDoubleBitEccError | gonvml.EventTypeSingleBitEccError, gonvml.SUCCESS
		}
		dev.RegisterEventsFunc = func(uint64, gonvml.EventSet) gonvml.Return {
			if n.lost[i].Load() {
				return gonvml.ERROR_GPU_IS_LOST
			}
			return gonvml.SUCCESS
		}
		// A current driver: recovery action none, no row remap pending.
		dev.GetFieldValuesFunc = func(v []gonvml.FieldValue) gonvml.Return {
			for k := range v {
				v[k].NvmlReturn, v[k].ValueType, v[k].Value = uint32(gonvml.SUCCESS), uint32(gonvml.VALUE_TYPE_UNSIGNED_INT), [8]byte{}
			}
			return gonvml.SUCCESS
		}
		dev.GetRemappedRowsFunc = func() (int, int, bool, bool, gonvml.Return) { return 0, 0, false, false, gonvml.SUCCESS }
		dev.GetPerformanceStateFunc = func() (gonvml.Pstates, gonvml.Return) {
			if n.lost[i].Load() {
				return 0, gonvml.ERROR_GPU_IS_LOST
			}
			return gonvml.PSTATE_0, gonvml.SUCCESS
		}
	}
	lib, err := nvml.Open(n.srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.lib, n.inv = lib, inv
	return n
}

func (n *mockNode) uuid(i int) string { return n.inv.GPUs[i].UUID }

// xid queues an XID on GPU i for the whole GPU.
func (n *mockNode) xid(i int, code uint64) {
	n.events <- gonvml.EventData{Device: n.srv.Devices[i], EventType: gonvml.EventTypeXidCriticalError, EventData: code,
		GpuInstanceId: noInstance, ComputeInstanceId: noInstance}
}

// newFakeClock is a settable clock for quiet periods.
func newFakeClock() *testkit.Clock {
	return testkit.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
}

// running is a monitor running in the background until the test ends.
type running struct {
	m     *Monitor
	state *State
	done  chan error
	stop  context.CancelFunc
}

func runMonitor(t testing.TB, opts MonitorOptions) *running {
	t.Helper()
	if opts.State == nil {
		opts.State = NewState(nil, nil)
	}
	if opts.ProbeInterval == 0 {
		opts.ProbeInterval = 10 * time.Millisecond
	}
	if opts.WaitTimeout == 0 {
		opts.WaitTimeout = 20 * time.Millisecond
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	r := &running{m: NewMonitor(opts), state: opts.State, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	r.stop = func() {
		cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("monitor Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("monitor did not stop within 5 s of its context ending")
		}
	}
	go func() { r.done <- r.m.Run(ctx) }()
	t.Cleanup(func() {
		if ctx.Err() == nil {
			r.stop()
		}
	})
	return r
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitUnit waits until a unit's health is as wanted.
func (r *running) waitUnit(t testing.TB, unit string, healthy bool) Status {
	t.Helper()
	ctx := ctxT(t)
	for {
		ch := r.state.Changed()
		if st := r.state.Status(unit); st.Healthy == healthy {
			return st
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("unit %s: healthy=%v never happened (now %+v; monitor %+v)", unit, healthy, r.state.Status(unit), r.m.Status())
		}
	}
}

// waitStatus waits for a condition on the monitor's status.
func (r *running) waitStatus(t testing.TB, what string, cond func(MonitorStatus) bool) MonitorStatus {
	t.Helper()
	if err := r.m.WaitFor(ctxT(t), cond); err != nil {
		t.Fatalf("%s: %v (status %+v)", what, err, r.m.Status())
	}
	return r.m.Status()
}

// rounds waits for n more probe rounds.
func (r *running) rounds(t testing.TB, n uint64) {
	t.Helper()
	base := r.m.Status().ProbeRounds
	r.waitStatus(t, "probe rounds", func(s MonitorStatus) bool { return s.ProbeRounds >= base+n })
}

// simNode opens a simulated node's NVML and scans it.
func simNode(t testing.TB, profile string) (*sim.Node, *nvml.Library, *nvml.Inventory) {
	t.Helper()
	p, err := sim.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	node := sim.NewNode(p, nil)
	lib, err := nvml.Open(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return node, lib, inv
}

func fixed(inv *nvml.Inventory) func() *nvml.Inventory { return func() *nvml.Inventory { return inv } }
