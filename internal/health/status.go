package health

// The monitor's published status and its counters, for /debug/devices and
// metrics.

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"time"
)

type xidKey struct {
	gpu  int
	code uint64
}

// MonitorStatus is the monitor's own state, for /debug/devices.
type MonitorStatus struct {
	Mode          string        `json:"mode"`
	ModeSince     time.Time     `json:"modeSince"`
	ModeReason    string        `json:"modeReason,omitempty"`
	Policy        string        `json:"policy"`
	Recovery      Recovery      `json:"recovery"`
	QuietPeriod   string        `json:"quietPeriod"`
	ProbeInterval string        `json:"probeInterval"`
	EventGPUs     []int         `json:"eventGPUs"`
	LastError     string        `json:"lastError,omitempty"`
	LastErrorAt   *time.Time    `json:"lastErrorAt,omitempty"`
	Events        uint64        `json:"events"`
	WaitErrors    uint64        `json:"waitErrors"`
	ProbeRounds   uint64        `json:"probeRounds"`
	GPUs          []GPUStatus   `json:"gpus"`
	Faults        []FaultStatus `json:"faults,omitempty"`
	RescanNeeded  []int         `json:"rescanNeeded,omitempty"`
}

// GPUStatus is what the monitor knows about one GPU.
type GPUStatus struct {
	Index          int    `json:"index"`
	UUID           string `json:"uuid,omitempty"`
	Answering      bool   `json:"answering"`
	Events         bool   `json:"events"`
	NoEvents       string `json:"noEvents,omitempty"`
	LastProbeError string `json:"lastProbeError,omitempty"`
	// RecoveryAction is NVML's recovery action for the GPU (none,
	// gpu_reset, node_reboot, drain_p2p, drain_and_reset, …; unsupported
	// when the driver lacks the field; empty until read) and RowRemap its
	// row remapper, both read on every probe (gate.go).
	RecoveryAction string          `json:"recoveryAction,omitempty"`
	RowRemap       *RowRemapStatus `json:"rowRemap,omitempty"`
	// RecoveryHold is what the driver wants before the GPU's unhealthy
	// units can return ("needs GPU reset", "row remap pending"); empty
	// when nothing.
	RecoveryHold string `json:"recoveryHold,omitempty"`
}

// FaultStatus is an unhealthy unit the monitor is watching for recovery.
type FaultStatus struct {
	Unit         string    `json:"unit"`
	GPU          int       `json:"gpu"` // -1 while the GPU is not identified
	Reason       string    `json:"reason"`
	Since        time.Time `json:"since"`
	LastBad      time.Time `json:"lastBad"`
	QuietPeriod  string    `json:"quietPeriod"`
	HealthyAfter time.Time `json:"healthyAfter,omitzero"` // earliest return, if the GPU answers
	Held         string    `json:"held,omitempty"`        // past the quiet period, held out by the recovery gate for this
}

func (m *Monitor) countXID(gpu int, code uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := xidKey{gpu, code}
	if _, ok := m.xids[k]; !ok && len(m.xids) >= maxXIDSeries {
		k.code = xidOther
	}
	m.xids[k]++
}

// noteError records a failed NVML step for Status and metrics; it does not
// log (callers log once per streak or transition).
func (m *Monitor) noteError(kind string, err error) {
	now := m.opts.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.errs[kind]++
	m.st.LastError = fmt.Sprintf("%s: %v", kind, err)
	m.st.LastErrorAt = &now
}

func (m *Monitor) mode() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st.Mode
}

func (m *Monitor) setMode(mode, reason string) {
	defer m.changed.Notify()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.st.Mode != mode {
		if m.st.Mode == ModeProbing && mode == ModeEvents {
			m.log.Info("health events available again")
		}
		m.st.Mode, m.st.ModeSince = mode, m.opts.Now()
	}
	m.st.ModeReason = reason
}

// publish copies the loop's view into the status.
func (m *Monitor) publish() {
	gpus := make([]GPUStatus, len(m.gpus))
	var rescan []int
	for i, w := range m.gpus {
		gpus[i] = GPUStatus{Index: w.index, UUID: w.uuid, Answering: w.answering, Events: w.registered,
			NoEvents: w.noEvents, LastProbeError: w.lastProbeErr, RecoveryAction: w.gate.actionName()}
		if w.gate.read {
			rr := w.gate.remap
			gpus[i].RowRemap = &rr
			gpus[i].RecoveryHold = w.gate.hold()
		}
		if w.rescanRequested {
			rescan = append(rescan, w.index)
		}
	}
	faults := make([]FaultStatus, 0, len(m.faults))
	for unit, f := range m.faults {
		fs := FaultStatus{Unit: unit, GPU: -1, Reason: f.reason, Since: f.since, LastBad: f.lastBad,
			QuietPeriod: m.quiet(f).String(), Held: f.held}
		if f.gpu >= 0 {
			fs.GPU = m.gpus[f.gpu].index
		}
		if m.opts.Recovery == RecoverAfterQuietPeriod && f.gpu >= 0 {
			fs.HealthyAfter = m.cleanSince(f).Add(m.quiet(f))
		}
		faults = append(faults, fs)
	}
	sort.Slice(faults, func(a, b int) bool { return faults[a].Unit < faults[b].Unit })
	armed := make([]int, len(m.armed))
	for k, i := range m.armed {
		armed[k] = m.gpus[i].index
	}
	m.mu.Lock()
	m.st.GPUs, m.st.Faults, m.st.RescanNeeded, m.st.EventGPUs = gpus, faults, rescan, armed
	m.mu.Unlock()
	m.changed.Notify()
}

// WaitFor blocks until cond holds for the status or ctx ends; cond is
// evaluated again after every mode change and probe round.
func (m *Monitor) WaitFor(ctx context.Context, cond func(MonitorStatus) bool) error {
	for {
		ch := m.changed.C()
		if cond(m.Status()) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the health monitor: %w", context.Cause(ctx))
		}
	}
}

// Status reports the monitor's state. Safe for concurrent use.
func (m *Monitor) Status() MonitorStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.st
	st.GPUs = slices.Clone(st.GPUs)
	st.Faults = slices.Clone(st.Faults)
	st.RescanNeeded = slices.Clone(st.RescanNeeded)
	st.EventGPUs = slices.Clone(st.EventGPUs)
	return st
}

// Counters are the monitor's event and error counts, for metrics.
type Counters struct {
	Mode string
	// XIDs counts every XID received by GPU index and code (fatal or
	// not); Code is "other" past the series limit.
	XIDs []XIDCount
	// DoubleBitECC counts double-bit ECC events by GPU.
	DoubleBitECC []GPUCount
	// Errors counts failed NVML steps by kind: event_set_create,
	// register_events, event_wait, probe, unknown_device_event,
	// recovery_action, row_remap.
	Errors      map[string]uint64
	ProbeRounds uint64
	Events      uint64
}

// GPUCount is a per-GPU counter.
type GPUCount struct {
	GPU   int
	UUID  string
	Count uint64
}

// XIDCount is one XID counter.
type XIDCount struct {
	GPU   int
	UUID  string
	Code  string
	Count uint64
}

// Counters copies the counters. Safe for concurrent use.
func (m *Monitor) Counters() Counters {
	m.mu.Lock()
	defer m.mu.Unlock()
	uuids := map[int]string{}
	for _, g := range m.st.GPUs {
		uuids[g.Index] = g.UUID
	}
	c := Counters{Mode: m.st.Mode, Errors: map[string]uint64{},
		ProbeRounds: m.st.ProbeRounds, Events: m.st.Events}
	for k, n := range m.xids {
		code := strconv.FormatUint(k.code, 10)
		if k.code == xidOther {
			code = "other"
		}
		c.XIDs = append(c.XIDs, XIDCount{GPU: k.gpu, UUID: uuids[k.gpu], Code: code, Count: n})
	}
	sort.Slice(c.XIDs, func(a, b int) bool {
		if c.XIDs[a].GPU != c.XIDs[b].GPU {
			return c.XIDs[a].GPU < c.XIDs[b].GPU
		}
		return c.XIDs[a].Code < c.XIDs[b].Code
	})
	for gpu, n := range m.dbe {
		c.DoubleBitECC = append(c.DoubleBitECC, GPUCount{GPU: gpu, UUID: uuids[gpu], Count: n})
	}
	sort.Slice(c.DoubleBitECC, func(a, b int) bool { return c.DoubleBitECC[a].GPU < c.DoubleBitECC[b].GPU })
	for k, n := range m.errs {
		c.Errors[k] = n
	}
	return c
}
