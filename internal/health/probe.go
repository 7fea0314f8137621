package health

// Probing every GPU, faults reported by the monitor and by other NVML users,
// and recovery after the quiet period.

import (
	"fmt"
	"slices"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

type fault struct {
	gpu     int    // position in m.gpus; -1 while the GPU is not identified
	gpuUUID string // the GPU behind the unit
	reason  string
	since   time.Time
	lastBad time.Time
	strikes int
	held    string // what the recovery gate holds it for, once the quiet period is over
}

type flap struct {
	recoveredAt time.Time
	strikes     int
}

// Rescan returns a channel closed when a GPU listed as lost or unidentified
// answers again, so the inventory should be re-scanned. Take a new channel
// after each wake-up; Status().RescanNeeded lists the GPUs.
func (m *Monitor) Rescan() <-chan struct{} { return m.rescan.C() }

// ReportError lets other NVML users (telemetry, allocation) report an error
// on a GPU or MIG device of the inventory, by UUID: GPU_IS_LOST makes the
// unit unhealthy at once, and the monitor then watches it for recovery like
// its own findings. Every report counts as a fresh fault, so a unit that a
// caller keeps finding lost stays out until the reports stop for the quiet
// period. Other errors and unknown units are ignored. Safe for concurrent
// use.
func (m *Monitor) ReportError(unit string, err error) {
	if unit == "" || !nvml.IsLost(err) || m.policy.Disabled() || !inventoryHas(m.opts.Inventory(), unit) {
		return
	}
	reason := "lost: " + err.Error()
	m.opts.State.SetUnhealthy(unit, reason)
	m.mu.Lock()
	m.reported[unit] = reason
	m.mu.Unlock()
}

func inventoryHas(inv *nvml.Inventory, unit string) bool {
	if inv == nil {
		return false
	}
	for _, g := range inv.GPUs {
		if g.UUID == unit {
			return true
		}
		for _, mig := range g.MIGDevices {
			if mig.UUID == unit {
				return true
			}
		}
	}
	return false
}

func (m *Monitor) adoptReported() {
	m.mu.Lock()
	if len(m.reported) == 0 {
		m.mu.Unlock()
		return
	}
	rep := m.reported
	m.reported = map[string]string{}
	m.mu.Unlock()
	for unit, reason := range rep {
		if idx, ok := m.gpuOfUnit(unit); ok {
			m.gpus[idx].answering = false
			m.fault(unit, idx, reason)
		}
	}
}

// fault records a fatal finding on a unit and marks it unhealthy. A repeat
// only refreshes its time: the State logs and notifies on transitions only.
func (m *Monitor) fault(unit string, i int, reason string) {
	now := m.opts.Now()
	f, ok := m.faults[unit]
	if !ok {
		f = &fault{gpu: i, gpuUUID: m.gpus[i].uuid, since: now}
		if h, seen := m.history[unit]; seen && now.Sub(h.recoveredAt) < flapWindow {
			f.strikes = min(h.strikes+1, maxStrikes)
		}
		m.faults[unit] = f
	}
	f.lastBad, f.reason, f.held = now, reason, ""
	m.opts.State.SetUnhealthy(unit, reason)
}

// gpuLost records that a GPU answered GPU_IS_LOST.
func (m *Monitor) gpuLost(i int, err error) {
	w := m.gpus[i]
	w.answering = false
	w.lastProbeErr = err.Error()
	if w.uuid != "" {
		m.fault(w.uuid, i, "lost: "+err.Error())
	}
}

// probeRound probes every GPU, re-arms the event set if the answering GPUs
// changed, and brings back what has recovered.
func (m *Monitor) probeRound() {
	for i := range m.gpus {
		m.probe(i)
	}
	m.sayGateNews()
	// Re-arm when the answering GPUs changed: an NVML event set cannot
	// drop a lost GPU, and a GPU that is back should deliver events again.
	wanted := m.wantedArmed()
	if (m.set != nil && !slices.Equal(wanted, m.armed)) ||
		(m.set == nil && m.armOnChange && !slices.Equal(wanted, m.triedFor)) {
		m.arm()
	}
	m.recoverUnits()
	m.mu.Lock()
	m.st.ProbeRounds++
	m.mu.Unlock()
	m.publish()
}

// probe asks one GPU a cheap question: the performance state. A GPU that
// the inventory could not identify is looked up by index instead.
func (m *Monitor) probe(i int) {
	w := m.gpus[i]
	lib := m.opts.Lib
	var err error
	if w.handle == nil {
		var h gonvml.Device
		h, err = nvml.Call(lib, "nvmlDeviceGetHandleByIndex", func() (gonvml.Device, gonvml.Return) {
			return lib.Interface().DeviceGetHandleByIndex(w.index)
		})
		if err == nil {
			_, err = nvml.Call(lib, "nvmlDeviceGetUUID", h.GetUUID)
		}
	} else {
		_, err = nvml.Call(lib, "nvmlDeviceGetPerformanceState", w.handle.GetPerformanceState)
		if nvml.IsNotSupported(err) {
			err = nil // it answered
		}
	}
	if err == nil && w.handle != nil && m.readGate(i) {
		return // lost while reading the recovery state
	}
	if err != nil {
		w.gate.read = false
	}
	switch {
	case err == nil:
		w.probeFails, w.lastProbeErr = 0, ""
		if !w.answering {
			w.answering, w.answeringSince = true, m.opts.Now()
			w.noEvents = "" // try events again
			if w.uuid != "" && m.faults[w.uuid] != nil {
				m.log.Info("GPU answers NVML again", "gpu", w.index, "uuid", w.uuid)
			}
		}
		if w.incomplete && !w.rescanRequested {
			w.rescanRequested = true
			m.log.Info("GPU listed as lost or unidentified answers NVML again: the inventory needs a re-scan to advertise it",
				"gpu", w.index)
			m.rescan.Notify()
			if m.opts.GPUReturned != nil {
				m.opts.GPUReturned(w.index)
			}
		}
	case nvml.IsLost(err):
		m.gpuLost(i, err)
	default:
		w.probeFails++
		w.lastProbeErr = err.Error()
		w.answering = false
		m.noteError("probe", err)
		if w.probeFails >= probeFailuresFatal && w.uuid != "" {
			m.fault(w.uuid, i, fmt.Sprintf("probe failing: %v (%d times in a row)", err, w.probeFails))
		}
	}
}

// recoverUnits brings back units whose GPU answers and has been clean for
// the (escalated) quiet period.
func (m *Monitor) recoverUnits() {
	if m.opts.Recovery != RecoverAfterQuietPeriod {
		return
	}
	now := m.opts.Now()
	for unit, f := range m.faults {
		if f.gpu < 0 {
			continue
		}
		w := m.gpus[f.gpu]
		if !w.answering || w.incomplete {
			continue
		}
		quiet := m.quiet(f)
		if now.Sub(m.cleanSince(f)) < quiet {
			continue
		}
		if hold := w.gate.hold(); hold != "" {
			// The quiet period is over but the driver wants something
			// done first: stay out, saying what, until it clears.
			m.opts.State.SetUnhealthy(unit, fmt.Sprintf("recovery held: %s (was: %s)", hold, f.reason))
			if f.held != hold {
				m.log.Info("quiet period over, device stays out until the driver's condition clears",
					"device", unit, "gpu", w.index, "held", hold, "fault", f.reason)
				f.held = hold
			}
			continue
		}
		m.opts.State.SetHealthy(unit, fmt.Sprintf("recovered: answers NVML with no fatal event for %s (was: %s)", quiet, f.reason))
		delete(m.faults, unit)
		m.history[unit] = flap{recoveredAt: now, strikes: f.strikes}
	}
}

func (m *Monitor) quiet(f *fault) time.Duration { return m.opts.QuietPeriod << f.strikes }

func (m *Monitor) cleanSince(f *fault) time.Time {
	if f.gpu < 0 {
		return f.lastBad
	}
	if w := m.gpus[f.gpu]; w.answeringSince.After(f.lastBad) {
		return w.answeringSince
	}
	return f.lastBad
}
