package nvmlbackend_test

// MPS clients through the production backend on a simulated node: NVML's
// compute list has the MPS server, its MPS list the clients.

import (
	"cmp"
	"fmt"
	"slices"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

func (e *procEnv) mpsCallsOf(gpu int) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.mpsByGPU[gpu]
}

func byPID(procs ...telemetry.Process) []telemetry.Process {
	slices.SortFunc(procs, func(a, b telemetry.Process) int { return cmp.Compare(a.PID, b.PID) })
	return procs
}

// TestMPSClients: the clients are listed with the other processes,
// marked, with their memory and SM utilization; the server is an ordinary
// process; a PID on both lists is one process.
func TestMPSClients(t *testing.T) {
	// PIDs far from a test binary's, which is the simulated MPS server.
	const plain, c1, c2 = 4_000_100, 4_000_200, 4_000_201
	clients := []sim.Process{
		{PID: plain, UsedMiB: 1024, SMUtil: 20},
		{PID: c1, UsedMiB: 512, SMUtil: 30, MPS: true},
		{PID: c2, UsedMiB: 256, MPS: true},
	}
	for _, tc := range []struct {
		name  string
		procs []sim.Process
		// also adds these to NVML's compute list of GPU 5 (drivers that
		// list clients on both)
		alsoCompute []gonvml.ProcessInfo
		want        func(server uint32) []telemetry.Process
	}{
		{
			name:  "clients marked, server not, utilization by PID",
			procs: clients,
			want: func(server uint32) []telemetry.Process {
				return byPID(
					telemetry.Process{PID: plain, MemoryBytes: 1024 << 20, SMUtil: 20},
					telemetry.Process{PID: c1, MemoryBytes: 512 << 20, SMUtil: 30, MPSClient: true},
					telemetry.Process{PID: c2, MemoryBytes: 256 << 20, MPSClient: true},
					telemetry.Process{PID: server})
			},
		},
		{
			name:  "a client on both lists counts once",
			procs: clients,
			alsoCompute: []gonvml.ProcessInfo{
				{Pid: c1, UsedGpuMemory: 0xFFFFFFFFFFFFFFFF, GpuInstanceId: 0xFFFFFFFF, ComputeInstanceId: 0xFFFFFFFF}, // memory not available
				{Pid: c2, UsedGpuMemory: 256 << 20, GpuInstanceId: 0xFFFFFFFF, ComputeInstanceId: 0xFFFFFFFF},
			},
			want: func(server uint32) []telemetry.Process {
				return byPID(
					telemetry.Process{PID: plain, MemoryBytes: 1024 << 20, SMUtil: 20},
					telemetry.Process{PID: c1, MemoryBytes: 512 << 20, SMUtil: 30, MPSClient: true},
					telemetry.Process{PID: c2, MemoryBytes: 256 << 20, MPSClient: true},
					telemetry.Process{PID: server})
			},
		},
		{
			name:  "no MPS",
			procs: []sim.Process{{PID: plain, UsedMiB: 1024, SMUtil: 20}},
			want: func(uint32) []telemetry.Process {
				return []telemetry.Process{{PID: plain, MemoryBytes: 1024 << 20, SMUtil: 20}}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newProcEnv(t, "dgx-a100-mig") // GPUs 5-7 whole
			e.setProcs(t, 5, tc.procs...)
			if tc.alsoCompute != nil {
				h, _ := e.inv.Handle(e.gpuKey(5))
				m, _ := sim.Mock(h)
				list := m.GetComputeRunningProcessesFunc
				m.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
					ps, ret := list()
					return append(ps, tc.alsoCompute...), ret
				}
			}
			want := tc.want(e.node.MPSServerPID())
			for round := range 2 {
				r := e.sample(t, allFields, true)[e.gpuKey(5)]
				if r.Err != nil || !r.ProcsRead || !r.ProcUtil || !r.MPSRead || !procsEqual(r.Procs, want) {
					t.Errorf("round %d: err %v read %v util %v MPS read %v procs %+v, want %+v", round, r.Err, r.ProcsRead, r.ProcUtil, r.MPSRead, r.Procs, want)
				}
				// The next round is a second later: new samples again.
				e.clk.Advance(time.Second)
			}
			if n := e.logs.Count("cannot list"); n != 0 {
				t.Errorf("%d warnings:\n%s", n, e.logs)
			}
		})
	}
}

// TestMPSNotSupported: a GPU whose NVML has no MPS list (NOT_SUPPORTED,
// or a library without the call) is asked once, quietly: its processes are
// read without telling the clients apart (MPSRead false), until the
// inventory changes.
func TestMPSNotSupported(t *testing.T) {
	for _, tc := range []struct {
		name string
		gpu  int // dgx-a100-mig: 1 is MIG (4 devices), 5 whole
		code gonvml.Return
	}{
		{"whole GPU", 5, gonvml.ERROR_NOT_SUPPORTED},
		{"older library", 5, gonvml.ERROR_FUNCTION_NOT_FOUND},
		{"MIG GPU: one answer for its devices", 1, gonvml.ERROR_NOT_SUPPORTED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newProcEnv(t, "dgx-a100-mig")
			mig := ""
			if tc.gpu == 1 {
				mig = "1"
			}
			e.setProcs(t, tc.gpu, sim.Process{PID: 4_000_100, UsedMiB: 64, MIG: mig})
			keys := []string{e.gpuKey(tc.gpu)}
			if tc.gpu == 1 {
				keys = keys[:0]
				for k := range e.inv.GPUs[1].MIGDevices {
					keys = append(keys, e.migKey(1, k))
				}
			}
			must(t, e.node.SetFault(tc.gpu, "GetMPSComputeRunningProcesses", tc.code))
			check := func(round string, mpsRead bool) {
				t.Helper()
				res := e.sample(t, allFields, true)
				for k, key := range keys {
					r := res[key]
					if r.Err != nil || !r.ProcsRead || r.MPSRead != mpsRead || (k == 0 && len(r.Procs) != 1) {
						t.Errorf("%s, %s: err %v read %v MPS read %v procs %+v; want read, MPS read %v", round, key, r.Err, r.ProcsRead, r.MPSRead, r.Procs, mpsRead)
					}
				}
				if r := res[e.gpuKey(6)]; !r.MPSRead {
					t.Errorf("%s: another GPU's MPS list was not read", round)
				}
			}
			for round := range 3 {
				check(fmt.Sprintf("round %d", round+1), false)
			}
			if n := e.mpsCallsOf(tc.gpu); n != 1 {
				t.Errorf("MPS list asked %d times over 3 rounds, want once", n)
			}
			// Remembered even once the call would work...
			must(t, e.node.SetFault(tc.gpu, "GetMPSComputeRunningProcesses", gonvml.SUCCESS))
			check("fault cleared", false)
			if n := e.mpsCallsOf(tc.gpu); n != 1 {
				t.Errorf("MPS list asked again (%d calls) before the inventory changed", n)
			}
			// ...until the inventory changes (a driver upgrade, a MIG
			// change).
			inv, err := nvml.Scan(e.lib, nvml.ScanOptions{})
			must(t, err)
			e.inv, e.layout = inv, telemetry.NewLayout(inv, 2)
			check("new inventory", true)
			if n := e.mpsCallsOf(tc.gpu); n != 1+len(keys) {
				t.Errorf("%d MPS list calls after the inventory changed, want %d", n, 1+len(keys))
			}
			if n := e.logs.Count("cannot list"); n != 0 {
				t.Errorf("NOT_SUPPORTED was logged as a failure:\n%s", e.logs)
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
