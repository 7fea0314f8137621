package nvmlbackend

import (
	"cmp"
	"slices"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// Compute processes, for per-pod accounting (Request.Processes): each
// target's processes from its own handle, a GPU's or a MIG device's, with
// per-process SM utilization on whole GPUs. Under MPS NVML's compute list
// has only the MPS server; the clients (the pods' programs) come from its
// MPS list, and are marked. They are read in the GPU's worker after its
// fields, so a hanging call is handled as a field read is; a failure
// leaves the target's processes unread (or, when only the utilization
// call fails, without utilization), never its fields.

// procState is a GPU's process-reading state, owned by its worker.
type procState struct {
	// lastSeen is the newest utilization sample's timestamp (µs, CPU
	// clock): a round asks only for samples newer than it, so each one is
	// counted once. 0 until the first sample.
	lastSeen uint64
	// utilOff: NVML answered NOT_SUPPORTED for process utilization on this
	// GPU; it is not asked again until the inventory changes.
	utilOff bool
	// mpsOff: NVML answered NOT_SUPPORTED for the MPS client list on this
	// GPU (older drivers, vGPU hosts); not asked again until the inventory
	// changes, and the targets' MPS clients are not told apart meanwhile.
	mpsOff bool
	// failing: a process call failed and was logged; quiet until a round
	// lists the GPU's processes without a failure.
	failing bool
}

// procRound is what one round's process reads on a GPU came to.
type procRound struct {
	read int    // targets whose processes were read
	err  error  // the first failure
	key  string // the target it failed on
}

func (pr *procRound) fail(key string, err error) {
	if pr.err == nil {
		pr.err, pr.key = err, key
	}
}

// readProcs lists a target's compute processes and MPS clients on its
// handle h (the GPU's for a whole GPU, the MIG device's for a MIG device)
// and, on a whole GPU not in MIG mode, their SM utilization since the
// previous round.
func (b *Backend) readProcs(st *gpuState, h gonvml.Device, t *telemetry.Target, res *telemetry.Result, pr *procRound) {
	infos, err := nvml.ComputeProcesses(b.lib, h)
	if err != nil {
		pr.fail(t.Key, err)
		return
	}
	var clients []nvml.ProcessInfo
	mps := !st.procs.mpsOff
	if mps {
		clients, err = nvml.MPSComputeProcesses(b.lib, h)
		switch {
		case err == nil:
		case nvml.IsNotSupported(err):
			st.procs.mpsOff, mps = true, false
			b.log.Debug("no MPS client list on this GPU; MPS clients are not told apart", "gpu", t.GPU.Index, "uuid", t.GPU.UUID, "err", err)
		default:
			// Without the clients the list would credit no pod with
			// them: unread, as when the compute list fails.
			pr.fail(t.Key, err)
			return
		}
	}
	procs := mergeProcs(infos, clients)

	// NVML has no process utilization on MIG devices nor on MIG-enabled
	// GPUs; there the processes carry memory only.
	util := t.MIG == nil && !t.GPU.MIGEnabled && !st.procs.utilOff
	if util {
		samples, err := nvml.ProcessUtilization(b.lib, h, st.procs.lastSeen)
		switch {
		case err == nil:
			st.procs.apply(procs, samples)
		case nvml.IsNotSupported(err):
			st.procs.utilOff = true
			util = false
			b.log.Debug("no per-process utilization on this GPU; processes carry memory only", "gpu", t.GPU.Index, "uuid", t.GPU.UUID, "err", err)
		default:
			// The list is good: serve memory this round, without
			// utilization, rather than nothing.
			pr.fail(t.Key, err)
			util = false
		}
	}
	res.Procs, res.ProcsRead, res.ProcUtil, res.MPSRead = procs, true, util, mps
	pr.read++
}

// mergeProcs makes one list, by PID, of a target's compute processes and
// its MPS clients. A PID on both lists is one process, an MPS client; its
// memory is the larger reading (a list that cannot tell reads 0).
func mergeProcs(infos, clients []nvml.ProcessInfo) []telemetry.Process {
	procs := make([]telemetry.Process, 0, len(infos)+len(clients))
	for _, p := range infos {
		procs = append(procs, telemetry.Process{PID: p.PID, MemoryBytes: p.UsedMemory})
	}
	for _, p := range clients {
		procs = append(procs, telemetry.Process{PID: p.PID, MemoryBytes: p.UsedMemory, MPSClient: true})
	}
	// By PID: a stable order, and samples are matched by binary search.
	slices.SortFunc(procs, func(a, b telemetry.Process) int { return cmp.Compare(a.PID, b.PID) })
	out := procs[:0]
	for _, p := range procs {
		if n := len(out); n > 0 && out[n-1].PID == p.PID {
			last := &out[n-1]
			last.MemoryBytes, last.MPSClient = max(last.MemoryBytes, p.MemoryBytes), last.MPSClient || p.MPSClient
			continue
		}
		out = append(out, p)
	}
	return out
}

// apply gives each process the SM utilization of its newest sample and
// advances lastSeen. A process without a new sample keeps 0: NVML samples
// only processes that used the GPU.
func (ps *procState) apply(procs []telemetry.Process, samples []nvml.ProcessSample) {
	// Oldest first within a PID, so the newest is applied last.
	slices.SortFunc(samples, func(a, b nvml.ProcessSample) int {
		return cmp.Or(cmp.Compare(a.PID, b.PID), cmp.Compare(a.Timestamp, b.Timestamp))
	})
	for _, s := range samples {
		ps.lastSeen = max(ps.lastSeen, s.Timestamp)
		i, ok := slices.BinarySearchFunc(procs, s.PID, func(p telemetry.Process, pid uint32) int { return cmp.Compare(p.PID, pid) })
		if ok {
			procs[i].SMUtil = float64(s.SMUtil)
		}
	}
}

// endProcRound logs a GPU's first process failure, and its recovery, once.
func (b *Backend) endProcRound(st *gpuState, g *nvml.GPU, pr *procRound) {
	switch {
	case pr.err != nil && !st.procs.failing:
		st.procs.failing = true
		b.log.Warn("cannot list the compute processes of a GPU; its per-process figures are missing until this works again "+
			"(its other telemetry is unaffected)", "gpu", g.Index, "uuid", g.UUID, "device", pr.key, "err", pr.err)
	case pr.err == nil && pr.read > 0 && st.procs.failing:
		st.procs.failing = false
		b.log.Info("compute processes of a GPU listed again", "gpu", g.Index, "uuid", g.UUID)
	}
}
