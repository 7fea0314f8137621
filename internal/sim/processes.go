package sim

// Compute processes on simulated GPUs, for per-pod accounting: what
// nvmlDeviceGetComputeRunningProcesses lists (on a GPU handle all of the
// GPU's processes, on a MIG handle that device's), what
// nvmlDeviceGetMPSComputeRunningProcesses lists (the MPS clients) and what
// nvmlDeviceGetProcessUtilization samples, set through the control API like
// fakenvml's `proc` command.
//
// MPS as the driver shows it: a client is on the MPS list only, and while
// a GPU has one the compute list has the MPS server instead, a process of
// PID MPSServerPID using no memory of its own here. MPS is simulated on
// whole GPUs only.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// MaxProcesses bounds one GPU's process list.
const MaxProcesses = 4096

// maxPID is Linux's PID_MAX_LIMIT: no PID is larger.
const maxPID = 1 << 22

// samplePeriod is the driver's utilization sampling period: a process's
// sample is stamped with the start of the current one (as fakenvml does).
const samplePeriod = time.Second / 6

// Process is a simulated compute process.
type Process struct {
	PID     uint32 `json:"pid"`
	UsedMiB uint64 `json:"used_mib"`
	SMUtil  uint32 `json:"sm_util"`  // %
	MemUtil uint32 `json:"mem_util"` // %
	// MIG is the MIG device the process runs on: its UUID, or its GPU
	// instance ID in decimal when setting; "" for a GPU without MIG. The
	// state always reports the UUID.
	MIG string `json:"mig,omitempty"`
	// MPS makes the process an MPS client (whole GPUs only).
	MPS bool `json:"mps,omitempty"`
}

// simProc is a process as the node keeps it.
type simProc struct {
	Process
	mig   *simMIG // nil: the whole GPU
	stamp uint64  // µs: when it was set; its first sample is no older
}

// ProcessFields names the fields of PUT /sim/gpus/{i}/processes entries.
const ProcessFields = "pid (required), used_mib, sm_util, mem_util, mig (a MIG device's UUID or GPU instance ID), mps (true: an MPS client, on a GPU without MIG)"

// SetProcesses replaces a GPU's compute processes. On a GPU in MIG mode each
// names its MIG device (UUID or GPU instance ID); on one without, none does.
// A process with SM or memory utilization above 0 gets a new utilization
// sample each sampling period, the first one newer than any the GPU gave
// before. A process with MPS set is an MPS client, on a GPU without MIG
// only. A MIG re-layout ends the GPU's processes.
func (n *Node) SetProcesses(gpu int, procs []Process) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	if len(procs) > MaxProcesses {
		return fmt.Errorf("%d processes: at most %d per GPU", len(procs), MaxProcesses)
	}
	g := n.spec.gpus[gpu]
	n.mu.Lock()
	defer n.mu.Unlock()
	s := &n.state[gpu]
	stamp := max(uint64(n.now().UnixMicro()), s.procStamp+1)
	out := make([]simProc, 0, len(procs))
	seen := make(map[uint32]int, len(procs))
	used := map[*simMIG]uint64{}
	mps := slices.ContainsFunc(procs, func(p Process) bool { return p.MPS })
	for k, p := range procs {
		at := fmt.Sprintf("processes[%d]", k)
		if p.PID == 0 || p.PID > maxPID {
			return fmt.Errorf("%s.pid %d: want 1..%d (a Linux PID)", at, p.PID, maxPID)
		}
		if mps && p.PID == n.mpsServer {
			return fmt.Errorf("%s.pid %d is the simulated MPS server's, listed while the GPU has an MPS client: use another", at, p.PID)
		}
		if j, dup := seen[p.PID]; dup {
			return fmt.Errorf("%s.pid %d is also processes[%d]: list a process once", at, p.PID, j)
		}
		seen[p.PID] = k
		if p.SMUtil > 100 || p.MemUtil > 100 {
			return fmt.Errorf("%s: sm_util %d, mem_util %d: want percentages 0..100", at, p.SMUtil, p.MemUtil)
		}
		if p.MPS && s.mig.enabled {
			return fmt.Errorf("%s.mps: GPU %d is in MIG mode: the simulator runs MPS clients on whole GPUs only", at, gpu)
		}
		m, err := s.mig.find(p.MIG)
		switch {
		case err != nil:
			return fmt.Errorf("%s.mig: %v", at, err)
		case s.mig.enabled && m == nil:
			return fmt.Errorf("%s.mig: GPU %d is in MIG mode: name the process's MIG device (one of %s)", at, gpu, s.mig.refs())
		}
		capMiB := g.memoryMiB
		if m != nil {
			capMiB = m.memoryMiB
		}
		if p.UsedMiB > capMiB-used[m] {
			return fmt.Errorf("%s.used_mib %d: the device has %d MiB, %d of them used by the processes listed before", at, p.UsedMiB, capMiB, used[m])
		}
		used[m] += p.UsedMiB
		p.MIG = ""
		if m != nil {
			p.MIG = m.uuid
		}
		out = append(out, simProc{Process: p, mig: m, stamp: stamp})
	}
	s.procs = out
	return nil
}

// find resolves a process's MIG reference: "" (none), a MIG UUID, or a GPU
// instance ID.
func (l migLayout) find(ref string) (*simMIG, error) {
	if ref == "" {
		return nil, nil
	}
	gi, numErr := strconv.Atoi(ref)
	for _, m := range l.migs {
		if m.uuid == ref || (numErr == nil && m.giID == gi) {
			return m, nil
		}
	}
	if !l.enabled {
		return nil, fmt.Errorf("%q: the GPU is not in MIG mode: leave mig out", ref)
	}
	return nil, fmt.Errorf("%q: no such MIG device on this GPU: want one of %s", ref, l.refs())
}

// refs lists the layout's MIG devices as a process can name them.
func (l migLayout) refs() string {
	if len(l.migs) == 0 {
		return "none: MIG is on with no devices"
	}
	var out []string
	for _, m := range l.migs {
		out = append(out, fmt.Sprintf("%s (GPU instance %d, %s)", m.uuid, m.giID, m.profile))
	}
	return strings.Join(out, ", ")
}

// Processes reports a GPU's compute processes.
func (n *Node) Processes(gpu int) ([]Process, error) {
	if err := n.validGPU(gpu); err != nil {
		return nil, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.processesLocked(gpu), nil
}

func (n *Node) processesLocked(gpu int) []Process {
	out := make([]Process, 0, len(n.state[gpu].procs))
	for _, p := range n.state[gpu].procs {
		out = append(out, p.Process)
	}
	return out
}

// procsMiBLocked is the memory the processes on a MIG device (nil: on the
// whole GPU, all of them) use.
func (s *gpuState) procsMiBLocked(m *simMIG) uint64 {
	var sum uint64
	for _, p := range s.procs {
		if m == nil || p.mig == m {
			sum += p.UsedMiB
		}
	}
	return sum
}

// MPSServerPID is the PID the compute list gives the MPS server of a GPU
// with an MPS client: the simulator's own process (the daemon's, under
// --simulate), a real process that runs in no pod that holds a GPU, as
// the MPS control daemon's server does.
func (n *Node) MPSServerPID() uint32 { return n.mpsServer }

// addProcessFuncs gives a GPU's mock its process calls.
func (n *Node) addProcessFuncs(d *mock.Device, g *simGPU) {
	i := g.index
	d.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
		return read(n, i, "GetComputeRunningProcesses", func(s *gpuState) []gonvml.ProcessInfo {
			out := processInfos(s.procs, nil, false)
			if slices.ContainsFunc(s.procs, func(p simProc) bool { return p.MPS }) {
				out = append(out, gonvml.ProcessInfo{Pid: n.mpsServer, GpuInstanceId: noInstance, ComputeInstanceId: noInstance})
			}
			return out
		})
	}
	d.GetMPSComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
		return read(n, i, "GetMPSComputeRunningProcesses", func(s *gpuState) []gonvml.ProcessInfo {
			return processInfos(s.procs, nil, true)
		})
	}
	d.GetProcessUtilizationFunc = func(lastSeen uint64) ([]gonvml.ProcessUtilizationSample, gonvml.Return) {
		n.mu.Lock()
		defer n.mu.Unlock()
		if r := n.failureLocked(i, "GetProcessUtilization"); r != gonvml.SUCCESS {
			return nil, r
		}
		s := &n.state[i]
		if s.mig.enabled {
			// "On MIG-enabled GPUs, querying process utilization is not
			// currently supported."
			return nil, gonvml.ERROR_NOT_SUPPORTED
		}
		period := uint64(n.now().Truncate(samplePeriod).UnixMicro())
		out := make([]gonvml.ProcessUtilizationSample, 0, len(s.procs))
		for _, p := range s.procs {
			ts := max(period, p.stamp)
			if (p.SMUtil == 0 && p.MemUtil == 0) || ts <= lastSeen {
				continue // NVML samples only processes that used the GPU
			}
			s.procStamp = max(s.procStamp, ts)
			out = append(out, gonvml.ProcessUtilizationSample{Pid: p.PID, TimeStamp: ts, SmUtil: p.SMUtil, MemUtil: p.MemUtil})
		}
		if len(out) == 0 {
			return nil, gonvml.ERROR_NOT_FOUND
		}
		return out, gonvml.SUCCESS
	}
}

// addMIGProcessFuncs gives a MIG device's mock its process calls.
func (n *Node) addMIGProcessFuncs(d *mock.Device, g *simGPU, m *simMIG) {
	i := g.index
	d.GetComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
		return read(n, i, "GetComputeRunningProcesses", func(s *gpuState) []gonvml.ProcessInfo {
			return processInfos(s.procs, m, false)
		})
	}
	// No MPS on MIG devices here (SetProcesses refuses it): an empty list,
	// as the driver gives where no MPS server runs.
	d.GetMPSComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) {
		return read(n, i, "GetMPSComputeRunningProcesses", func(s *gpuState) []gonvml.ProcessInfo {
			return processInfos(s.procs, m, true)
		})
	}
	d.GetProcessUtilizationFunc = func(uint64) ([]gonvml.ProcessUtilizationSample, gonvml.Return) {
		if r := n.check(i, "GetProcessUtilization"); r != gonvml.SUCCESS {
			return nil, r
		}
		return nil, gonvml.ERROR_NOT_SUPPORTED
	}
}

// processInfos lists the MPS clients (mps) or the other processes on a
// MIG device, or on the whole GPU (nil), with their instance IDs
// (0xFFFFFFFF without MIG), as NVML does.
func processInfos(procs []simProc, on *simMIG, mps bool) []gonvml.ProcessInfo {
	out := make([]gonvml.ProcessInfo, 0, len(procs))
	for _, p := range procs {
		if (on != nil && p.mig != on) || p.MPS != mps {
			continue
		}
		info := gonvml.ProcessInfo{Pid: p.PID, UsedGpuMemory: p.UsedMiB << 20, GpuInstanceId: noInstance, ComputeInstanceId: noInstance}
		if p.mig != nil {
			info.GpuInstanceId, info.ComputeInstanceId = uint32(p.mig.giID), uint32(p.mig.ciID)
		}
		out = append(out, info)
	}
	return out
}

// processBody is one entry of PUT /sim/gpus/{i}/processes, in wide types
// so that a negative or huge number gets a message naming its field.
type processBody struct {
	PID     *int64          `json:"pid"`
	UsedMiB int64           `json:"used_mib"`
	SMUtil  int64           `json:"sm_util"`
	MemUtil int64           `json:"mem_util"`
	MIG     json.RawMessage `json:"mig"` // a string (UUID or GPU instance ID) or a number (GPU instance ID)
	MPS     json.RawMessage `json:"mps"` // true, false or null
}

// parseProcesses reads a PUT /sim/gpus/{i}/processes body: a JSON array
// of processes.
func parseProcesses(r io.Reader) ([]Process, error) {
	const limit = 1 << 20
	raw, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if len(raw) > limit {
		return nil, fmt.Errorf("body over %d bytes (at most %d processes)", limit, MaxProcesses)
	}
	var list []json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&list); err != nil {
		return nil, fmt.Errorf("want a JSON array of processes: %v", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("want one JSON array, found more after it")
	}
	if len(list) > MaxProcesses {
		return nil, fmt.Errorf("%d processes: at most %d per GPU", len(list), MaxProcesses)
	}
	out := make([]Process, 0, len(list))
	for k, item := range list {
		at := fmt.Sprintf("processes[%d]", k)
		var b processBody
		dec := json.NewDecoder(bytes.NewReader(item))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&b); err != nil {
			return nil, fmt.Errorf("%s: %v", at, err)
		}
		in := func(name string, v, most int64) error {
			if v < 0 || v > most {
				return fmt.Errorf("%s.%s %d: want 0..%d", at, name, v, most)
			}
			return nil
		}
		switch {
		case b.PID == nil:
			return nil, fmt.Errorf("%s.pid is required", at)
		case *b.PID < 1 || *b.PID > maxPID:
			return nil, fmt.Errorf("%s.pid %d: want 1..%d (a Linux PID)", at, *b.PID, maxPID)
		}
		if err := firstErr(in("used_mib", b.UsedMiB, 1<<30), in("sm_util", b.SMUtil, 100), in("mem_util", b.MemUtil, 100)); err != nil {
			return nil, err
		}
		mig, err := migRef(b.MIG)
		if err != nil {
			return nil, fmt.Errorf("%s.mig: %v", at, err)
		}
		mps, err := flag(b.MPS)
		if err != nil {
			return nil, fmt.Errorf("%s.mps: %v", at, err)
		}
		out = append(out, Process{PID: uint32(*b.PID), UsedMiB: uint64(b.UsedMiB), SMUtil: uint32(b.SMUtil), MemUtil: uint32(b.MemUtil), MIG: mig, MPS: mps})
	}
	return out, nil
}

// migRef reads "mig": absent or null, a string, or a GPU instance ID.
func migRef(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return strings.TrimSpace(s), nil
	}
	var gi uint32
	if json.Unmarshal(raw, &gi) == nil {
		return strconv.FormatUint(uint64(gi), 10), nil
	}
	return "", fmt.Errorf("%s: want a MIG device's UUID or GPU instance ID", raw)
}

// flag reads a JSON boolean: absent or null is false.
func flag(raw json.RawMessage) (bool, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return false, nil
	}
	var v bool
	if json.Unmarshal(raw, &v) != nil {
		return false, fmt.Errorf("%s: want true or false", raw)
	}
	return v, nil
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// addProcessHandlers serves
//
//	PUT /sim/gpus/{index}/processes   JSON [{"pid": 4242, "used_mib": 2048, "sm_util": 40, "mem_util": 5, "mig": "MIG-…", "mps": false}]:
//	                                  replace the GPU's compute processes and MPS clients
//	GET /sim/gpus/{index}/processes   the GPU's compute processes and MPS clients (not the MPS server)
func (n *Node) addProcessHandlers(mux *http.ServeMux) {
	mux.HandleFunc("PUT /sim/gpus/{index}/processes", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		procs, err := parseProcesses(r.Body)
		if err != nil {
			return nil, badRequest("processes body: %v (entries: %s)", err, ProcessFields)
		}
		if err := n.SetProcesses(gpu, procs); err != nil {
			return nil, badRequest("%v", err)
		}
		return n.Processes(gpu)
	}))
	mux.HandleFunc("GET /sim/gpus/{index}/processes", n.gpuHandler(func(gpu int, _ *http.Request) (any, error) {
		return n.Processes(gpu)
	}))
}
