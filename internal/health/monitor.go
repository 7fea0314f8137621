package health

import (
	"context"
	"log/slog"
	"math"
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
	// NVML again and has had no fatal event for the quiet period, and the
	// driver wants nothing done first (recovery action none, no row remap
	// pending or failed: gate.go).
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
	gateNews    gateNews // gate.go

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
	noEvents       string   // why the GPU is not in the event set
	gate           gateView // recovery action and row remapping (gate.go)
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
					w.probeFails, w.lastProbeErr, w.gate = o.probeFails, o.lastProbeErr, o.gate
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
