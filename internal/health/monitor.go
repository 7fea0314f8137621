package health

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Recovery is the policy for bringing unhealthy devices back.
type Recovery string

// Recovery policies; the spellings are the config values.
const (
	// RecoverNever keeps a device unhealthy until the daemon restarts.
	RecoverNever Recovery = "never"
	// RecoverAfterQuietPeriod brings a device back once its GPU answers
	// NVML again and has had no fatal event for the quiet period.
	RecoverAfterQuietPeriod Recovery = "after-quiet-period"
)

// Monitor modes, as exposed in MonitorStatus and metrics.
const (
	ModeStarting = "starting"
	ModeEvents   = "events"   // NVML event set armed; probes run alongside
	ModeProbing  = "probing"  // no usable event set: periodic probes only
	ModeDisabled = "disabled" // DP_DISABLE_HEALTHCHECKS=all
	ModeStopped  = "stopped"
)

// Modes lists every mode, for metrics.
var Modes = []string{ModeStarting, ModeEvents, ModeProbing, ModeDisabled, ModeStopped}

const (
	// noInstance is NVML's "whole GPU" GPU/compute instance ID in events.
	noInstance = math.MaxUint32
	// maxWaitFailures consecutive failed event waits switch to probing.
	maxWaitFailures = 3
	// probeFailuresFatal consecutive failed probes (other than
	// GPU_IS_LOST, which is fatal at once) make a GPU unhealthy.
	probeFailuresFatal = 3
	// flapWindow: a device failing again within this time of recovering
	// waits twice as long as the last time before it comes back.
	flapWindow = time.Hour
	// maxStrikes caps that doubling at 16× the quiet period.
	maxStrikes = 4
	// maxXIDSeries bounds the XID counters; an event storm of random codes
	// lands in xid="other".
	maxXIDSeries = 256
	// xidOther is the counter key for codes beyond maxXIDSeries.
	xidOther = math.MaxUint64
)

// MonitorOptions configure a Monitor.
type MonitorOptions struct {
	Lib *nvml.Library
	// Inventory returns the current inventory. It is read on every turn of
	// the loop, so a re-scan is picked up (and the event set re-armed).
	Inventory func() *nvml.Inventory
	State     *State
	Policy    *Policy // nil: DefaultPolicy()
	Recovery  Recovery
	// QuietPeriod is how long a GPU must answer NVML and stay free of fatal
	// events before its devices are healthy again (0: at the next good
	// probe).
	QuietPeriod time.Duration
	// ProbeInterval is how often every GPU is probed (default 5 s).
	ProbeInterval time.Duration
	// WaitTimeout bounds one event wait, and so how long Run (and with it
	// the daemon's SIGTERM) takes to stop (default 200 ms: 5 cheap waits a
	// second when idle).
	WaitTimeout time.Duration
	// ArmRetry is how often probing mode tries to create the event set
	// again (default 30 s).
	ArmRetry time.Duration
	// GPUReturned is called when a GPU that the inventory lists as lost or
	// unidentified answers NVML again: the inventory should be re-scanned
	// to advertise it (or to complete its description). It runs on the
	// monitor's goroutine and must not block. Rescan() and
	// MonitorStatus.RescanNeeded say the same.
	GPUReturned func(index int)
	// Now is the clock for fault and quiet-period times (default time.Now).
	// Scheduling uses real time.
	Now    func() time.Time
	Logger *slog.Logger
}

// Monitor is the node's one health watcher: one NVML event set for every
// GPU (XID critical errors, double-bit ECC) plus a cheap periodic probe of
// every GPU, which finds lost GPUs, drives recovery and replaces events when
// they fail. It writes the State; the plugin servers read it, so an event on
// a GPU reaches every resource, replica and MIG device it backs.
//
// Everything except Status, Rescan and ReportError runs on the goroutine
// that calls Run.
type Monitor struct {
	opts   MonitorOptions
	log    *slog.Logger
	policy *Policy

	// Owned by the Run goroutine.
	inv      *nvml.Inventory
	gpus     []*gpuWatch
	byHandle map[gonvml.Device]int
	set      gonvml.EventSet
	armed    []int
	triedFor []int // the GPUs wanted at the last arm attempt
	// armOnChange: events failed for want of a GPU to register, so a
	// change in the answering GPUs is worth another try.
	armOnChange bool
	waitFails   int
	nextArm     time.Time
	faults      map[string]*fault
	history     map[string]flap

	rescan  notify.Signal
	changed notify.Signal // the status was published

	mu sync.Mutex // guards st and the counters
	st MonitorStatus
	// counters for metrics
	xids     map[xidKey]uint64
	dbe      map[int]uint64
	errs     map[string]uint64
	reported map[string]string // ReportError: unit → reason, adopted by Run
}

type gpuWatch struct {
	index  int
	uuid   string        // "" when the inventory could not identify it
	handle gonvml.Device // nil likewise
	migs   []nvml.MIGDevice
	// incomplete: the inventory lists the GPU as lost or unidentified, so
	// its return calls for a re-scan.
	incomplete      bool
	rescanRequested bool

	answering      bool
	answeringSince time.Time
	probeFails     int
	lastProbeErr   string
	registered     bool
	noEvents       string // why the GPU is not in the event set
}

type fault struct {
	gpu     int    // position in m.gpus; -1 while the GPU is not identified
	gpuUUID string // the GPU behind the unit
	reason  string
	since   time.Time
	lastBad time.Time
	strikes int
}

type flap struct {
	recoveredAt time.Time
	strikes     int
}

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
}

// NewMonitor prepares a monitor; Run starts it.
func NewMonitor(opts MonitorOptions) *Monitor {
	if opts.Policy == nil {
		opts.Policy = DefaultPolicy()
	}
	if opts.Recovery == "" {
		opts.Recovery = RecoverAfterQuietPeriod
	}
	if opts.ProbeInterval <= 0 {
		opts.ProbeInterval = 5 * time.Second
	}
	if opts.WaitTimeout <= 0 {
		opts.WaitTimeout = 200 * time.Millisecond
	}
	if opts.ArmRetry <= 0 {
		opts.ArmRetry = 30 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Monitor{
		opts: opts, log: opts.Logger, policy: opts.Policy,
		faults: map[string]*fault{}, history: map[string]flap{},
		xids: map[xidKey]uint64{}, dbe: map[int]uint64{}, errs: map[string]uint64{}, reported: map[string]string{},
	}
	m.st = MonitorStatus{
		Mode: ModeStarting, ModeSince: opts.Now(), Policy: opts.Policy.String(), Recovery: opts.Recovery,
		QuietPeriod: opts.QuietPeriod.String(), ProbeInterval: opts.ProbeInterval.String(),
	}
	return m
}

// Run watches until ctx ends. It returns nil then; it has no failure of its
// own: whatever NVML does, it degrades to probing and says so.
func (m *Monitor) Run(ctx context.Context) error {
	defer m.setMode(ModeStopped, "")
	if m.policy.Disabled() {
		m.setMode(ModeDisabled, "DP_DISABLE_HEALTHCHECKS=all: no health checks")
		m.log.Warn("health checks disabled by DP_DISABLE_HEALTHCHECKS=all: devices are never marked unhealthy")
		<-ctx.Done()
		return nil
	}
	defer m.disarm()
	m.refresh(m.opts.Inventory())
	m.arm()
	m.probeRound()
	nextProbe := time.Now().Add(m.opts.ProbeInterval)
	for ctx.Err() == nil {
		if inv := m.opts.Inventory(); inv != m.inv && m.refresh(inv) {
			m.arm()
		}
		m.adoptReported()
		untilProbe := time.Until(nextProbe)
		if untilProbe <= 0 {
			m.probeRound()
			nextProbe = time.Now().Add(m.opts.ProbeInterval)
			continue
		}
		if m.set != nil {
			m.waitOnce(ctx, min(untilProbe, m.opts.WaitTimeout))
			continue
		}
		if m.wantEvents() && !m.nextArm.IsZero() {
			untilArm := time.Until(m.nextArm)
			if untilArm <= 0 {
				m.arm()
				continue
			}
			untilProbe = min(untilProbe, untilArm)
		}
		sleep(ctx, min(untilProbe, m.opts.WaitTimeout))
	}
	return nil
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
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

// refresh adopts a new inventory: it rebuilds the GPU table, keeps the
// probe state of GPUs that are still there, and re-homes faults. It reports
// whether the GPUs (by index, UUID and handle) changed; only then is the
// event set dropped, to be armed again by the caller, so a periodic re-scan
// of an unchanged node loses no event.
func (m *Monitor) refresh(inv *nvml.Inventory) (changed bool) {
	now := m.opts.Now()
	old := m.gpus
	m.inv = inv
	m.gpus = nil
	m.byHandle = map[gonvml.Device]int{}
	if inv != nil {
		for i, g := range inv.GPUs {
			w := &gpuWatch{index: g.Index, uuid: g.UUID, migs: g.MIGDevices, incomplete: g.Lost || !g.Usable(),
				answering: !g.Lost && g.Usable(), answeringSince: now}
			if g.Usable() {
				if h, ok := inv.Handle(g.UUID); ok {
					w.handle = h
					m.byHandle[h] = i
				}
			}
			if w.handle == nil {
				w.answering = false
			}
			for _, o := range old {
				if o.index == w.index && o.uuid == w.uuid {
					if w.handle != nil && !w.incomplete {
						w.answering, w.answeringSince = o.answering, o.answeringSince
					}
					w.probeFails, w.lastProbeErr = o.probeFails, o.lastProbeErr
					w.rescanRequested = o.rescanRequested && w.incomplete
				}
			}
			if i < len(old) && old[i].index == w.index && old[i].uuid == w.uuid && old[i].handle == w.handle {
				w.registered, w.noEvents = old[i].registered, old[i].noEvents
			} else {
				changed = true
			}
			m.gpus = append(m.gpus, w)
		}
	}
	changed = changed || len(m.gpus) != len(old)
	if changed {
		m.disarm()
	}
	for unit, f := range m.faults {
		switch idx, ok := m.gpuOfUnit(unit); {
		case ok:
			f.gpu = idx
		case f.gpuUUID != unit && m.hasGPU(f.gpuUUID):
			delete(m.faults, unit) // its GPU is there, the MIG device is gone (re-layout)
		default:
			// The GPU was scanned while lost and could not be identified:
			// keep the fault until a later scan finds the GPU again, so it
			// comes back through the quiet period, not by being forgotten.
			f.gpu = -1
		}
	}
	for i, w := range m.gpus {
		if w.incomplete && w.uuid != "" {
			m.fault(w.uuid, i, "lost: GPU_IS_LOST during discovery")
		}
	}
	m.publish()
	return changed
}

func (m *Monitor) hasGPU(uuid string) bool {
	_, ok := m.gpuOfUnit(uuid)
	return ok && uuid != ""
}

// gpuOfUnit finds the position in m.gpus of the GPU behind a GPU or MIG
// UUID.
func (m *Monitor) gpuOfUnit(unit string) (int, bool) {
	for i, w := range m.gpus {
		if w.uuid == unit && unit != "" {
			return i, true
		}
		for _, mig := range w.migs {
			if mig.UUID == unit {
				return i, true
			}
		}
	}
	return 0, false
}

// wantEvents reports whether any event can be fatal.
func (m *Monitor) wantEvents() bool { return m.eventMask() != 0 }

// eventMask is what the event set listens to: XIDs and double-bit ECC
// errors, both counted even when not fatal, as long as some event can be
// fatal at all.
func (m *Monitor) eventMask() uint64 {
	if !m.policy.anyXIDFatal() && !m.policy.ECCFatal() {
		return 0
	}
	return gonvml.EventTypeXidCriticalError | gonvml.EventTypeDoubleBitEccError
}

// arm creates the event set and registers every answering GPU on it; on
// failure the monitor probes instead and tries again after ArmRetry.
func (m *Monitor) arm() {
	m.disarm()
	mask := m.eventMask()
	defer func() { m.triedFor = m.wantedArmed() }()
	if mask == 0 {
		m.nextArm = time.Time{}
		m.setMode(ModeProbing, "no event type is fatal under the XID policy")
		return
	}
	lib := m.opts.Lib
	set, err := nvml.Call(lib, "nvmlEventSetCreate", lib.Interface().EventSetCreate)
	if err != nil {
		m.noteError("event_set_create", err)
		m.fallback(fmt.Sprintf("cannot create the NVML event set: %v", err))
		return
	}
	var registered []int
	var problems []string
	for i, w := range m.gpus {
		w.registered = false
		if w.handle == nil || !w.answering || w.noEvents != "" {
			continue
		}
		if err := m.register(w, set, mask); err != nil {
			if nvml.IsLost(err) {
				m.gpuLost(i, err)
				continue
			}
			if nvml.IsNotSupported(err) {
				w.noEvents = "events not supported: " + err.Error()
				continue
			}
			m.noteError("register_events", err)
			w.noEvents = err.Error()
			problems = append(problems, fmt.Sprintf("GPU %d: %v", w.index, err))
			continue
		}
		w.registered = true
		registered = append(registered, i)
	}
	if len(problems) > 0 {
		m.log.Warn("some GPUs cannot deliver health events; they are probed instead", "problems", problems)
	}
	if len(registered) == 0 {
		_ = nvml.Do(lib, "nvmlEventSetFree", set.Free)
		m.fallback("no GPU could be registered for events")
		m.armOnChange = true // try again as soon as a GPU answers
		return
	}
	m.set, m.armed, m.waitFails, m.nextArm, m.armOnChange = set, registered, 0, time.Time{}, false
	m.publish()
	m.setMode(ModeEvents, "")
}

func (m *Monitor) register(w *gpuWatch, set gonvml.EventSet, mask uint64) error {
	supported, err := nvml.Call(m.opts.Lib, "nvmlDeviceGetSupportedEventTypes", w.handle.GetSupportedEventTypes)
	if err != nil {
		return err
	}
	if mask&supported == 0 {
		return &nvml.Error{Op: "nvmlDeviceGetSupportedEventTypes", Return: gonvml.ERROR_NOT_SUPPORTED}
	}
	return nvml.Do(m.opts.Lib, "nvmlDeviceRegisterEvents", func() gonvml.Return {
		return w.handle.RegisterEvents(mask&supported, set)
	})
}

// disarm frees the event set.
func (m *Monitor) disarm() {
	if m.set == nil {
		return
	}
	_ = nvml.Do(m.opts.Lib, "nvmlEventSetFree", m.set.Free)
	m.set, m.armed = nil, nil
	for _, w := range m.gpus {
		w.registered = false
	}
}

// fallback switches to probing and schedules another try at events.
func (m *Monitor) fallback(reason string) {
	m.disarm()
	m.publish()
	m.nextArm = time.Now().Add(m.opts.ArmRetry)
	if m.mode() != ModeProbing {
		m.log.Warn("health events unavailable: probing every GPU instead", "reason", reason,
			"probeInterval", m.opts.ProbeInterval, "retryEventsIn", m.opts.ArmRetry)
	}
	m.setMode(ModeProbing, reason)
}

// waitOnce waits for one event. A timeout is the normal idle answer.
func (m *Monitor) waitOnce(ctx context.Context, timeout time.Duration) {
	type result struct {
		ev      gonvml.EventData
		timeout bool
	}
	set := m.set
	ms := uint32(max(timeout.Milliseconds(), 1))
	r, err := nvml.Call(m.opts.Lib, "nvmlEventSetWait", func() (result, gonvml.Return) {
		ev, ret := set.Wait(ms)
		if ret == gonvml.ERROR_TIMEOUT {
			return result{timeout: true}, gonvml.SUCCESS
		}
		return result{ev: ev}, ret
	})
	switch {
	case err == nil && r.timeout:
		m.waitFails = 0
	case err == nil:
		m.waitFails = 0
		m.handle(r.ev)
	default:
		m.waitFailed(ctx, err)
	}
}

// waitFailed handles a failed wait: find the GPU at fault by probing, and
// after maxWaitFailures in a row give up on events for a while. It never
// spins: every failure that does not re-arm backs off.
func (m *Monitor) waitFailed(ctx context.Context, err error) {
	m.waitFails++
	m.noteError("event_wait", err)
	m.mu.Lock()
	m.st.WaitErrors++
	m.mu.Unlock()
	if m.waitFails == 1 {
		m.log.Warn("health event wait failed", "err", err)
	}
	armed := m.set
	if nvml.IsLost(err) {
		m.probeRound() // names the lost GPU and re-arms without it
	}
	if m.set != armed {
		return
	}
	if m.waitFails >= maxWaitFailures {
		m.fallback(fmt.Sprintf("event wait failed %d times in a row: %v", m.waitFails, err))
		return
	}
	sleep(ctx, min(50*time.Millisecond<<m.waitFails, m.opts.ProbeInterval))
}

// handle applies one event.
func (m *Monitor) handle(ev gonvml.EventData) {
	m.mu.Lock()
	m.st.Events++
	m.mu.Unlock()
	i, ok := m.byHandle[ev.Device]
	if !ok {
		i, ok = m.lookupDevice(ev.Device)
	}
	if !ok {
		m.noteError("unknown_device_event", fmt.Errorf("event type %#x data %d for a device not in the inventory", ev.EventType, ev.EventData))
		return
	}
	w := m.gpus[i]
	switch {
	case ev.EventType&gonvml.EventTypeXidCriticalError != 0:
		code := ev.EventData
		m.countXID(w.index, code)
		if !m.policy.XIDFatal(code) {
			return
		}
		if code == XIDLost {
			w.answering = false
			if w.uuid != "" {
				m.fault(w.uuid, i, XIDReason(code))
			}
			return
		}
		m.faultUnits(i, ev, XIDReason(code))
	case ev.EventType&gonvml.EventTypeDoubleBitEccError != 0:
		m.mu.Lock()
		m.dbe[w.index]++
		m.mu.Unlock()
		if m.policy.ECCFatal() {
			m.faultUnits(i, ev, "double-bit ECC error (uncorrectable memory error)")
		}
	}
}

// lookupDevice maps an event's device that is not a known handle (a MIG
// handle, a handle NVML re-created) to a GPU by UUID.
func (m *Monitor) lookupDevice(d gonvml.Device) (int, bool) {
	if d == nil {
		return 0, false
	}
	uuid, err := nvml.Call(m.opts.Lib, "nvmlDeviceGetUUID", d.GetUUID)
	if err != nil {
		return 0, false
	}
	return m.gpuOfUnit(uuid)
}

// faultUnits marks what an event hits: the MIG devices whose GPU and
// compute instance IDs match, or the whole GPU (which covers every replica
// and MIG device on it) when the event names no instance or none matches.
func (m *Monitor) faultUnits(i int, ev gonvml.EventData, reason string) {
	w := m.gpus[i]
	if ev.GpuInstanceId != noInstance {
		hit := false
		for _, mig := range w.migs {
			if uint32(mig.GPUInstanceID) == ev.GpuInstanceId &&
				(ev.ComputeInstanceId == noInstance || uint32(mig.ComputeInstanceID) == ev.ComputeInstanceId) {
				m.fault(mig.UUID, i, fmt.Sprintf("%s on MIG GI %d CI %d", reason, mig.GPUInstanceID, mig.ComputeInstanceID))
				hit = true
			}
		}
		if hit {
			return
		}
	}
	if w.uuid != "" {
		m.fault(w.uuid, i, reason)
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
	f.lastBad, f.reason = now, reason
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

func (m *Monitor) wantedArmed() []int {
	var out []int
	for i, w := range m.gpus {
		if w.handle != nil && w.answering && w.noEvents == "" {
			out = append(out, i)
		}
	}
	return out
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
			NoEvents: w.noEvents, LastProbeError: w.lastProbeErr}
		if w.rescanRequested {
			rescan = append(rescan, w.index)
		}
	}
	faults := make([]FaultStatus, 0, len(m.faults))
	for unit, f := range m.faults {
		fs := FaultStatus{Unit: unit, GPU: -1, Reason: f.reason, Since: f.since, LastBad: f.lastBad,
			QuietPeriod: m.quiet(f).String()}
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
	// register_events, event_wait, probe, unknown_device_event.
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
