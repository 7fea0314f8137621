package nvmlbackend_test

// Compute processes through the production backend on a simulated node:
// the simulator's real code path under the guarded library, with the
// process calls counted (and their lastSeen recorded) on the mocks.

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// procEnv is the NVML backend on a simulated node with a manual clock.
type procEnv struct {
	clk    *testkit.Clock
	node   *sim.Node
	lib    *nvml.Library
	inv    *nvml.Inventory
	layout *telemetry.Layout
	b      *nvmlbackend.Backend
	logs   *testkit.Buffer

	listCalls atomic.Int64 // GetComputeRunningProcesses, GPU and MIG handles
	mpsCalls  atomic.Int64 // GetMPSComputeRunningProcesses, GPU and MIG handles
	utilCalls atomic.Int64 // GetProcessUtilization
	mu        sync.Mutex
	lastSeen  map[int][]uint64 // GPU index → the lastSeen of each utilization call
	mpsByGPU  map[int]int      // GPU index → GetMPSComputeRunningProcesses calls
}

func newProcEnv(tb testing.TB, profile string) *procEnv {
	tb.Helper()
	p, err := sim.LoadProfile(profile)
	if err != nil {
		tb.Fatal(err)
	}
	e := &procEnv{clk: testkit.NewClock(time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)), logs: &testkit.Buffer{}, lastSeen: map[int][]uint64{}, mpsByGPU: map[int]int{}}
	e.node = sim.NewNode(p, e.clk.Now)
	if e.lib, err = nvml.Open(e.node.NVML()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { e.lib.Close() })
	if e.inv, err = nvml.Scan(e.lib, nvml.ScanOptions{}); err != nil {
		tb.Fatal(err)
	}
	e.layout = telemetry.NewLayout(e.inv, 1)
	// Count the process calls on every handle before anything samples.
	for _, g := range e.inv.GPUs {
		e.countCalls(tb, g.UUID, g.Index)
		for _, m := range g.MIGDevices {
			e.countCalls(tb, m.UUID, g.Index)
		}
	}
	e.b = nvmlbackend.New(nvmlbackend.Options{Lib: e.lib, Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
	tb.Cleanup(func() { e.b.Close() })
	return e
}

func (e *procEnv) countCalls(tb testing.TB, uuid string, gpu int) {
	h, _ := e.inv.Handle(uuid)
	m, ok := sim.Mock(h)
	if !ok {
		tb.Fatalf("%s is not a simulated handle", uuid)
	}
	list, mps, util := m.GetComputeRunningProcessesFunc, m.GetMPSComputeRunningProcessesFunc, m.GetProcessUtilizationFunc
	m.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
		e.listCalls.Add(1)
		return list()
	}
	m.GetMPSComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
		e.mpsCalls.Add(1)
		e.mu.Lock()
		e.mpsByGPU[gpu]++
		e.mu.Unlock()
		return mps()
	}
	m.GetProcessUtilizationFunc = func(lastSeen uint64) ([]gonvml.ProcessUtilizationSample, gonvml.Return) {
		e.utilCalls.Add(1)
		e.mu.Lock()
		e.lastSeen[gpu] = append(e.lastSeen[gpu], lastSeen)
		e.mu.Unlock()
		return util(lastSeen)
	}
}

// sample runs one round and returns the results by target key.
func (e *procEnv) sample(tb testing.TB, fields telemetry.Mask, procs bool) map[string]telemetry.Result {
	tb.Helper()
	return e.sampleCtx(tb, context.Background(), fields, procs)
}

func (e *procEnv) sampleCtx(tb testing.TB, ctx context.Context, fields telemetry.Mask, procs bool) map[string]telemetry.Result {
	tb.Helper()
	out := make([]telemetry.Result, len(e.layout.Targets))
	req := &telemetry.Request{Inventory: e.inv, Targets: e.layout.Targets, Fields: fields, Processes: procs, Out: out}
	if err := e.b.Sample(ctx, req); err != nil {
		tb.Fatal(err)
	}
	res := make(map[string]telemetry.Result, len(out))
	for i, t := range e.layout.Targets {
		res[t.Key] = out[i]
	}
	return res
}

func (e *procEnv) setProcs(tb testing.TB, gpu int, procs ...sim.Process) {
	tb.Helper()
	if err := e.node.SetProcesses(gpu, procs); err != nil {
		tb.Fatal(err)
	}
}

func (e *procEnv) gpuKey(i int) string { return e.inv.GPUs[i].UUID }

func (e *procEnv) migKey(gpu, k int) string { return e.inv.GPUs[gpu].MIGDevices[k].UUID }

func (e *procEnv) lastSeenOf(gpu int) []uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.lastSeen[gpu])
}

var allFields = telemetry.DefaultMetricSet().Fields()

func procsEqual(a, b []telemetry.Process) bool { return slices.Equal(a, b) }

// TestProcessesWholeGPU: memory and SM utilization per process; each
// round asks for samples newer than the newest seen, so a round without
// new samples reads 0 for a process that is still listed with its memory.
func TestProcessesWholeGPU(t *testing.T) {
	e := newProcEnv(t, "dgx-a100-mig") // GPUs 5-7 whole
	e.setProcs(t, 5, sim.Process{PID: 101, UsedMiB: 512}, sim.Process{PID: 100, UsedMiB: 2048, SMUtil: 40, MemUtil: 5})
	busy := []telemetry.Process{{PID: 100, MemoryBytes: 2048 << 20, SMUtil: 40}, {PID: 101, MemoryBytes: 512 << 20}}
	idle := []telemetry.Process{{PID: 100, MemoryBytes: 2048 << 20}, {PID: 101, MemoryBytes: 512 << 20}}

	for _, round := range []struct {
		name    string
		advance time.Duration
		want    []telemetry.Process
	}{
		{"first: every buffered sample", 0, busy},
		{"same sampling period: no new sample", 0, idle},
		{"a second later: a new sample", time.Second, busy},
		{"again none", 0, idle},
	} {
		e.clk.Advance(round.advance)
		res := e.sample(t, allFields, true)
		r := res[e.gpuKey(5)]
		if r.Err != nil || !r.ProcsRead || !r.ProcUtil || !procsEqual(r.Procs, round.want) {
			t.Errorf("%s: GPU 5: err %v read %v util %v procs %+v, want %+v", round.name, r.Err, r.ProcsRead, r.ProcUtil, r.Procs, round.want)
		}
		if _, ok := r.Get(telemetry.GPUTemp); !ok {
			t.Errorf("%s: the fields were not read alongside", round.name)
		}
		for _, gpu := range []int{6, 7} {
			if r := res[e.gpuKey(gpu)]; !r.ProcsRead || !r.ProcUtil || len(r.Procs) != 0 {
				t.Errorf("%s: idle GPU %d: read %v util %v procs %+v, want read, none", round.name, gpu, r.ProcsRead, r.ProcUtil, r.Procs)
			}
		}
	}
	// lastSeen: 0 only on the first call, then the newest sample's
	// timestamp, never going back.
	seen := e.lastSeenOf(5)
	if len(seen) != 4 || seen[0] != 0 || seen[1] == 0 || seen[2] != seen[1] || seen[3] <= seen[2] {
		t.Errorf("GPU 5 asked for samples after %v: want 0, then the newest timestamp seen, never back", seen)
	}
	if seen := e.lastSeenOf(6); len(seen) != 4 || slices.ContainsFunc(seen, func(ts uint64) bool { return ts != 0 }) {
		t.Errorf("GPU 6 (never sampled) asked after %v, want 0 each time", seen)
	}
}

// TestProcessesMIG: a MIG device's processes come from its own handle,
// memory only; process utilization is never asked on a MIG GPU.
func TestProcessesMIG(t *testing.T) {
	e := newProcEnv(t, "dgx-a100-mig")
	// GPU 1: 3g.20gb (GI 1), 2g.10gb (GI 2), 1g.5gb (GI 3), 1g.5gb (GI 4).
	e.setProcs(t, 1,
		sim.Process{PID: 300, UsedMiB: 1000, SMUtil: 50, MIG: "1"},
		sim.Process{PID: 200, UsedMiB: 100, SMUtil: 10, MIG: "1"},
		sim.Process{PID: 400, UsedMiB: 300, MIG: e.migKey(1, 2)})
	for range 2 {
		res := e.sample(t, allFields, true)
		for k, want := range [][]telemetry.Process{
			{{PID: 200, MemoryBytes: 100 << 20}, {PID: 300, MemoryBytes: 1000 << 20}},
			{},
			{{PID: 400, MemoryBytes: 300 << 20}},
			{},
		} {
			r := res[e.migKey(1, k)]
			if r.Err != nil || !r.ProcsRead || r.ProcUtil || !procsEqual(r.Procs, want) {
				t.Errorf("MIG device %d: err %v read %v util %v procs %+v, want memory only %+v", k, r.Err, r.ProcsRead, r.ProcUtil, r.Procs, want)
			}
			if used, ok := r.Get(telemetry.FBUsed); k == 0 && (!ok || used != 1100) {
				t.Errorf("MIG device 0: FB used %v %v, want its processes' 1100 MiB", used, ok)
			}
		}
	}
	for gpu := range 5 {
		if seen := e.lastSeenOf(gpu); len(seen) != 0 {
			t.Errorf("MIG GPU %d was asked for process utilization (%d times)", gpu, len(seen))
		}
	}
}

// TestProcessesNotAsked: without Request.Processes nothing changes and no
// process call is made.
func TestProcessesNotAsked(t *testing.T) {
	e := newProcEnv(t, "dgx-a100-mig")
	e.setProcs(t, 5, sim.Process{PID: 100, UsedMiB: 2048, SMUtil: 40})
	e.setProcs(t, 1, sim.Process{PID: 200, UsedMiB: 100, MIG: "1"})
	without := e.sample(t, allFields, false)
	if n, m, u := e.listCalls.Load(), e.mpsCalls.Load(), e.utilCalls.Load(); n != 0 || m != 0 || u != 0 {
		t.Errorf("%d process list, %d MPS list and %d utilization calls without Processes, want none", n, m, u)
	}
	with := e.sample(t, allFields, true)
	for key, r := range without {
		if r.Err != nil || r.Procs != nil || r.ProcsRead || r.ProcUtil {
			t.Errorf("%s without Processes: err %v procs %+v read %v util %v", key, r.Err, r.Procs, r.ProcsRead, r.ProcUtil)
		}
		if w := with[key]; w.Values != r.Values {
			t.Errorf("%s: asking for processes changed the field values:\n%+v\n%+v", key, r.Values, w.Values)
		}
	}
}

// TestProcessesOnly: an empty field mask reads processes and nothing
// else, as the sampler asks while DCGM serves the fields.
func TestProcessesOnly(t *testing.T) {
	e := newProcEnv(t, "dgx-a100-mig")
	e.setProcs(t, 6, sim.Process{PID: 100, UsedMiB: 64, SMUtil: 7})
	want := int64(0) // two lists (compute, MPS) per target, plus utilization on whole GPUs
	for _, tg := range e.layout.Targets {
		want += 2
		if tg.MIG == nil {
			want++
		}
	}
	before, _ := e.lib.Stats()
	res := e.sample(t, 0, true)
	after, _ := e.lib.Stats()
	procCalls := e.listCalls.Load() + e.mpsCalls.Load() + e.utilCalls.Load()
	if int64(after-before) != want || procCalls != want {
		t.Errorf("%d NVML calls (%d of them process calls), want only the %d process calls", after-before, procCalls, want)
	}
	for key, r := range res {
		if r.Err != nil || r.Have != 0 || !r.ProcsRead {
			t.Errorf("%s: err %v fields %b read %v, want processes only", key, r.Err, r.Have, r.ProcsRead)
		}
	}
	if r := res[e.gpuKey(6)]; !procsEqual(r.Procs, []telemetry.Process{{PID: 100, MemoryBytes: 64 << 20, SMUtil: 7}}) {
		t.Errorf("GPU 6: %+v", r.Procs)
	}
}

// TestProcessFailureKeepsFields: a failing process list leaves the
// target's processes unread (a failing utilization call, their
// utilization) and its field values as they are, and is
// logged once per GPU until the GPU's processes are listed again.
func TestProcessFailureKeepsFields(t *testing.T) {
	for _, tc := range []struct {
		name     string
		gpu      int // dgx-a100-mig: 1 is MIG (4 devices), 5 whole
		call     string
		code     gonvml.Return
		read     bool // processes still read, memory only
		utilLeft bool // utilization still asked after the failure
		warns    int  // warnings over the 3 failing rounds
	}{
		{"list fails", 5, "GetComputeRunningProcesses", gonvml.ERROR_UNKNOWN, false, true, 1},
		{"list: GPU lost", 5, "GetComputeRunningProcesses", gonvml.ERROR_GPU_IS_LOST, false, true, 1},
		{"utilization fails", 5, "GetProcessUtilization", gonvml.ERROR_UNKNOWN, true, true, 1},
		{"utilization not supported", 5, "GetProcessUtilization", gonvml.ERROR_NOT_SUPPORTED, true, false, 0},
		{"MIG list fails", 1, "GetComputeRunningProcesses", gonvml.ERROR_TIMEOUT, false, false, 1},
		// Without the MPS clients the list is not complete: unread, as
		// when the compute list fails.
		{"MPS list fails", 5, "GetMPSComputeRunningProcesses", gonvml.ERROR_UNKNOWN, false, true, 1},
		{"MPS list: no permission", 5, "GetMPSComputeRunningProcesses", gonvml.ERROR_NO_PERMISSION, false, true, 1},
		{"MIG MPS list fails", 1, "GetMPSComputeRunningProcesses", gonvml.ERROR_TIMEOUT, false, false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newProcEnv(t, "dgx-a100-mig")
			mig := ""
			if tc.gpu == 1 {
				mig = "1"
			}
			e.setProcs(t, tc.gpu, sim.Process{PID: 100, UsedMiB: 64, SMUtil: 7, MIG: mig})
			keys := []string{e.gpuKey(tc.gpu)}
			if tc.gpu == 1 {
				keys = keys[:0]
				for k := range e.inv.GPUs[1].MIGDevices {
					keys = append(keys, e.migKey(1, k))
				}
			}
			fields := e.sample(t, allFields, false)
			if err := e.node.SetFault(tc.gpu, tc.call, tc.code); err != nil {
				t.Fatal(err)
			}
			for round := range 3 {
				res := e.sample(t, allFields, true)
				for _, key := range keys {
					r := res[key]
					if r.Err != nil || r.Values != fields[key].Values {
						t.Fatalf("round %d, %s: err %v, fields %+v; want the fields as without processes %+v", round, key, r.Err, r.Values, fields[key].Values)
					}
					if r.ProcsRead != tc.read || (tc.read && (r.ProcUtil || len(r.Procs) != 1)) {
						t.Errorf("round %d, %s: read %v util %v procs %+v, want read %v (memory only)", round, key, r.ProcsRead, r.ProcUtil, r.Procs, tc.read)
					}
				}
				if r := res[e.gpuKey(6)]; !r.ProcsRead {
					t.Errorf("round %d: another GPU's processes were not read", round)
				}
			}
			warned := e.logs.Count("cannot list the compute processes")
			if warned != tc.warns {
				t.Errorf("%d warnings over 3 rounds, want %d:\n%s", warned, tc.warns, e.logs)
			}
			utilBefore := len(e.lastSeenOf(tc.gpu))
			e.node.SetFault(tc.gpu, tc.call, gonvml.SUCCESS)
			res := e.sample(t, allFields, true)
			for _, key := range keys {
				if r := res[key]; !r.ProcsRead {
					t.Errorf("%s: processes not read once the fault cleared", key)
				}
			}
			if asked := len(e.lastSeenOf(tc.gpu)) > utilBefore; asked != tc.utilLeft {
				t.Errorf("utilization asked after the fault cleared: %v, want %v", asked, tc.utilLeft)
			}
			if again := e.logs.Count("listed again"); again != warned {
				t.Errorf("%d recovery lines after %d warnings:\n%s", again, warned, e.logs)
			}
		})
	}
}

// TestProcessCallHangs: a hanging process call is a timed-out GPU, then a
// busy one, like a hanging field read; other GPUs are served.
func TestProcessCallHangs(t *testing.T) {
	e := newProcEnv(t, "dgx-a100-mig")
	h, _ := e.inv.Handle(e.gpuKey(5))
	m, _ := sim.Mock(h)
	release := make(chan struct{})
	list := m.GetComputeRunningProcessesFunc
	m.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
		<-release
		return list()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	res := e.sampleCtx(t, ctx, allFields, true)
	cancel()
	if r := res[e.gpuKey(5)]; r.Err != telemetry.ErrTimeout {
		t.Errorf("hanging GPU: %v, want ErrTimeout", r.Err)
	}
	if r := res[e.gpuKey(6)]; r.Err != nil || !r.ProcsRead {
		t.Errorf("another GPU: err %v read %v", r.Err, r.ProcsRead)
	}
	if r := e.sample(t, allFields, true)[e.gpuKey(5)]; r.Err == nil {
		t.Errorf("the hanging GPU is read again while its call hangs")
	}
	close(release)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := e.sample(t, allFields, true)[e.gpuKey(5)]
		if r.Err == nil && r.ProcsRead {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GPU 5 never came back: %v", r.Err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkSampleProcesses: a round of the default fields on 8 simulated
// H100s with 100 compute processes (half of them busy), with and without
// processes. The clock moves a second per round, so every round has new
// utilization samples.
func BenchmarkSampleProcesses(b *testing.B) {
	for _, procs := range []bool{false, true} {
		b.Run(fmt.Sprintf("processes=%v", procs), func(b *testing.B) {
			e := newProcEnv(b, "dgx-h100")
			pid := uint32(1000)
			for gpu := range 8 {
				var ps []sim.Process
				for k := range 100/8 + min(1, 100%8/(gpu+1)) { // 13 on GPUs 0-3, 12 on 4-7
					ps = append(ps, sim.Process{PID: pid, UsedMiB: 256, SMUtil: uint32(k%2) * 30})
					pid++
				}
				e.setProcs(b, gpu, ps...)
			}
			if pid-1000 != 100 {
				b.Fatalf("%d processes, want 100", pid-1000)
			}
			out := make([]telemetry.Result, len(e.layout.Targets))
			req := &telemetry.Request{Inventory: e.inv, Targets: e.layout.Targets, Fields: allFields, Processes: procs, Out: out}
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				e.clk.Advance(time.Second)
				clear(out)
				if err := e.b.Sample(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			n := 0
			for _, r := range out {
				if r.Err != nil {
					b.Fatal(r.Err)
				}
				n += len(r.Procs)
			}
			if procs && n != 100 {
				b.Fatalf("%d processes listed, want 100", n)
			}
		})
	}
}
