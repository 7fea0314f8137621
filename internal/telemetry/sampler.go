package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Defaults for SamplerOptions.
const (
	DefaultInterval = time.Second
	minStaleAfter   = 5 * time.Second
	minRoundTimeout = 2 * time.Second
	minStuckAfter   = 30 * time.Second
)

// SamplerOptions configure a Sampler.
type SamplerOptions struct {
	// Inventory returns the current inventory; a new pointer (a re-scan)
	// rebuilds the list of devices. nil means no GPUs.
	Inventory func() *nvml.Inventory
	Backends  Selection
	Metrics   *MetricSet // default: DefaultMetricSet
	// Interval is the sampling period (default 1 s).
	Interval time.Duration
	// StaleAfter is how long a device's last good sample is served after
	// its sampling starts failing (default max(3 × Interval, 5 s)); then
	// its series disappear until it answers again.
	StaleAfter time.Duration
	// RoundTimeout bounds one round; a device that has not answered by
	// then counts as failed (default max(Interval, 2 s)).
	RoundTimeout time.Duration
	Logger       *slog.Logger
	Now          func() time.Time
	// OnDeviceError, if set, hears of every device whose round failed, by
	// the unit's UUID (the daemon hands GPU_IS_LOST to the health monitor).
	// It is called from the sampling loop: keep it quick.
	OnDeviceError func(key string, err error)
	// Attributor, if set, turns on per-pod accounting: every round also
	// lists each device's compute processes (through NVML, also while
	// DCGM serves the fields), and the Attributor's answer is published
	// with the round's snapshot. It runs in the sampling loop, never in a
	// scrape.
	Attributor Attributor
}

// Attributor attributes a round's processes to pods (package podusage).
type Attributor interface {
	// Attribute returns the per-pod use in snap, whose Devices carry the
	// processes. It is called from the sampling loop, one round at a
	// time, before snap is published; it must not keep snap.
	Attribute(snap *Snapshot) *Usage
}

// Sampler reads every device once per interval and publishes immutable
// snapshots. Run owns the loop; Snapshot is safe for concurrent use.
type Sampler struct {
	opts   SamplerOptions
	fields Mask
	log    *slog.Logger

	snap      atomic.Pointer[Snapshot]
	changed   notify.Signal // a round finished
	startedAt atomic.Int64  // unix ns when Run started; 0: not running
	lastRound atomic.Int64  // unix ns when the last round finished

	// roundMu serialises rounds (Run's loop, and tests calling SampleOnce);
	// the fields below it belong to whoever holds it.
	roundMu   sync.Mutex
	selected  bool
	primary   Connector // nil once given up
	primaryOK bool      // the primary has served since it was (re)connected
	active    Backend
	backoff   time.Duration
	retryAt   time.Time
	layout    *Layout
	out       []Result
	closed    bool

	stats struct {
		sync.Mutex
		rounds, fallbacks uint64
		buckets           []uint64 // per durationBuckets, not cumulative
		sum               float64
		backend           string
	}
}

// durationBuckets are the round duration histogram's upper bounds.
var durationBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}

// NewSampler builds a sampler; Run starts it.
func NewSampler(opts SamplerOptions) *Sampler {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Metrics == nil {
		opts.Metrics = DefaultMetricSet()
	}
	if opts.Interval <= 0 {
		opts.Interval = DefaultInterval
	}
	if opts.StaleAfter <= 0 {
		opts.StaleAfter = max(3*opts.Interval, minStaleAfter)
	}
	if opts.RoundTimeout <= 0 {
		opts.RoundTimeout = max(opts.Interval, minRoundTimeout)
	}
	if opts.Inventory == nil {
		opts.Inventory = func() *nvml.Inventory { return nil }
	}
	if opts.Backends.MinBackoff <= 0 {
		opts.Backends.MinBackoff = time.Second
	}
	if opts.Backends.MaxBackoff <= 0 {
		opts.Backends.MaxBackoff = time.Minute
	}
	s := &Sampler{opts: opts, fields: opts.Metrics.Fields(), log: opts.Logger}
	s.stats.buckets = make([]uint64, len(durationBuckets)+1)
	s.stats.backend = BackendNone
	return s
}

// Interval is the sampling period.
func (s *Sampler) Interval() time.Duration { return s.opts.Interval }

// StaleAfter is how long a failing device's last values are served.
func (s *Sampler) StaleAfter() time.Duration { return s.opts.StaleAfter }

// Metrics is the metric set being served.
func (s *Sampler) Metrics() *MetricSet { return s.opts.Metrics }

// Snapshot is the latest snapshot, or nil before the first round.
func (s *Sampler) Snapshot() *Snapshot { return s.snap.Load() }

// WaitFor blocks until cond holds for the latest snapshot (possibly nil),
// checking after every round, or until ctx ends.
func (s *Sampler) WaitFor(ctx context.Context, cond func(*Snapshot) bool) error {
	for {
		ch := s.changed.C()
		if cond(s.snap.Load()) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for a telemetry sample: %w", context.Cause(ctx))
		}
	}
}

// Run samples every interval until ctx ends, then closes the backends. It
// never fails: a backend that breaks degrades the data, not the process.
func (s *Sampler) Run(ctx context.Context) error {
	s.startedAt.Store(s.opts.Now().UnixNano())
	defer s.startedAt.Store(0)
	defer s.close()
	t := time.NewTicker(s.opts.Interval)
	defer t.Stop()
	for {
		s.SampleOnce(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Alive reports whether the loop is turning: nil unless Run has been
// started and no round has finished for max(10 × Interval, 30 s) (a
// backend call that hangs past every timeout). Liveness.
func (s *Sampler) Alive(now time.Time) error {
	started := s.startedAt.Load()
	if started == 0 {
		return nil
	}
	last := max(s.lastRound.Load(), started)
	limit := max(10*s.opts.Interval, minStuckAfter)
	if age := now.Sub(time.Unix(0, last)); age > limit {
		return fmt.Errorf("telemetry sampler stuck: no sampling round finished for %s (limit %s)", age.Round(time.Second), limit)
	}
	return nil
}

// Fresh reports whether the latest snapshot is recent enough to serve:
// taken within StaleAfter. Readiness.
func (s *Sampler) Fresh(now time.Time) error {
	snap := s.snap.Load()
	if snap == nil {
		return errors.New("telemetry: no sample taken yet")
	}
	if age := now.Sub(snap.Taken); age > s.opts.StaleAfter {
		return fmt.Errorf("telemetry: the latest sample is %s old (limit %s)", age.Round(time.Millisecond), s.opts.StaleAfter)
	}
	return nil
}

// SampleOnce runs one sampling round and publishes its snapshot.
func (s *Sampler) SampleOnce(ctx context.Context) {
	s.roundMu.Lock()
	defer s.roundMu.Unlock()
	if s.closed {
		return
	}
	start := s.opts.Now()
	s.selectBackend(ctx, start)
	inv := s.opts.Inventory()
	layout := s.layoutFor(inv)
	n := len(layout.Targets)
	if cap(s.out) < n {
		s.out = make([]Result, n)
	}
	out := s.out[:n]
	clear(out)
	err := s.sample(ctx, inv, layout, out)
	if ctx.Err() != nil {
		// Cut short by shutdown (a failed start among others): the
		// devices did not fail, so nothing is published or logged.
		return
	}
	if err != nil {
		for i := range out {
			out[i] = Result{Err: err}
		}
	}
	end := s.opts.Now()
	s.publish(layout, out, start, end)
}

// sample asks the active backend, falling back once if it is lost.
func (s *Sampler) sample(ctx context.Context, inv *nvml.Inventory, layout *Layout, out []Result) error {
	if s.active == nil {
		return errNoBackend
	}
	if len(out) == 0 {
		return nil
	}
	procs := s.opts.Attributor != nil
	req := &Request{Inventory: inv, Targets: layout.Targets, Fields: s.fields, Processes: procs, Out: out}
	rctx, cancel := context.WithTimeout(ctx, s.opts.RoundTimeout)
	defer cancel()
	err := s.active.Sample(rctx, req)
	if s.primary == nil || s.active != Backend(s.primary) {
		return err
	}
	if err == nil {
		s.primaryOK = true
		if procs && s.opts.Backends.Fallback != nil {
			s.sampleProcesses(rctx, req)
		}
		return nil
	}
	// DCGM failed as a whole (connection lost, or a call that keeps
	// failing): this round and the next ones go through the fallback
	// while DCGM is retried.
	s.lose(err)
	if s.active == nil {
		return errNoBackend
	}
	clear(out)
	return s.active.Sample(rctx, req)
}

// sampleProcesses lists the processes through the fallback (NVML) while
// the primary (DCGM, which has no per-process list we use) serves the
// fields, and adds them to req.Out.
func (s *Sampler) sampleProcesses(ctx context.Context, req *Request) {
	out := make([]Result, len(req.Out))
	preq := &Request{Inventory: req.Inventory, Targets: req.Targets, Processes: true, Out: out}
	if err := s.opts.Backends.Fallback.Sample(ctx, preq); err != nil {
		return
	}
	for i := range out {
		if out[i].Err == nil && out[i].ProcsRead {
			req.Out[i].Procs, req.Out[i].ProcsRead, req.Out[i].ProcUtil, req.Out[i].MPSRead = out[i].Procs, true, out[i].ProcUtil, out[i].MPSRead
		}
	}
}

var errNoBackend = errors.New("no telemetry backend available (DCGM not connected and NVML not available)")

// selectBackend makes the first choice, and reconnects the primary when
// its backoff has passed.
func (s *Sampler) selectBackend(ctx context.Context, now time.Time) {
	b := &s.opts.Backends
	if !s.selected {
		s.selected = true
		s.primary = b.Primary
		s.active = b.Fallback
		if s.primary != nil {
			if err := s.primary.Connect(ctx); err != nil {
				if b.RetryPrimary {
					s.log.Error("DCGM unavailable; sampling through NVML meanwhile, retrying with backoff",
						"err", err, "configured", b.Configured, "fallback", nameOf(s.active))
					s.backoff = b.MinBackoff
					s.retryAt = now.Add(s.backoff)
				} else {
					s.log.Info("DCGM unavailable; telemetry through NVML", "reason", err.Error(), "configured", b.Configured)
					s.primary = nil
				}
			} else {
				s.active = s.primary
			}
		}
		s.log.Info("telemetry backend selected", "backend", nameOf(s.active), "configured", b.Configured,
			"interval", s.opts.Interval, "fields", len(s.opts.Metrics.Metrics))
		s.setBackendStat()
		return
	}
	if s.primary == nil || s.active == Backend(s.primary) || now.Before(s.retryAt) {
		return
	}
	if err := s.primary.Connect(ctx); err != nil {
		s.backoff = min(2*s.backoff, b.MaxBackoff)
		s.retryAt = now.Add(s.backoff)
		s.log.Debug("DCGM reconnect failed", "err", err, "next", s.backoff)
		return
	}
	s.active = s.primary
	s.log.Info("DCGM connected; telemetry through DCGM again", "backend", s.primary.Name())
	s.setBackendStat()
}

// lose switches from the failed primary to the fallback and schedules a
// reconnect. The backoff starts over after a primary that served, and
// grows while it fails again right after each reconnect.
func (s *Sampler) lose(err error) {
	b := &s.opts.Backends
	s.active = b.Fallback
	if s.primaryOK || s.backoff == 0 {
		s.backoff = b.MinBackoff
	} else {
		s.backoff = min(2*s.backoff, b.MaxBackoff)
	}
	s.primaryOK = false
	s.retryAt = s.opts.Now().Add(s.backoff)
	if errors.Is(err, ErrBackendLost) {
		s.log.Error("DCGM connection lost; reconnecting with backoff", "err", err, "fallback", nameOf(s.active), "retryIn", s.backoff)
	} else {
		s.log.Error("DCGM sampling failed; retrying with backoff", "err", err, "fallback", nameOf(s.active), "retryIn", s.backoff)
	}
	s.stats.Lock()
	s.stats.fallbacks++
	s.stats.Unlock()
	s.setBackendStat()
}

func (s *Sampler) setBackendStat() {
	s.stats.Lock()
	s.stats.backend = nameOf(s.active)
	s.stats.Unlock()
}

func nameOf(b Backend) string {
	if b == nil {
		return BackendNone
	}
	return b.Name()
}

// close releases the backends once Run ends.
func (s *Sampler) close() {
	s.roundMu.Lock()
	defer s.roundMu.Unlock()
	s.closed = true
	var errs []error
	if p := s.opts.Backends.Primary; p != nil {
		errs = append(errs, p.Close())
	}
	if f := s.opts.Backends.Fallback; f != nil {
		errs = append(errs, f.Close())
	}
	if err := errors.Join(errs...); err != nil {
		s.log.Warn("closing telemetry backends", "err", err)
	}
}

// publish builds and stores the round's snapshot; a failing device keeps
// its last good values and their time.
func (s *Sampler) publish(layout *Layout, out []Result, start, end time.Time) {
	prev := s.snap.Load()
	snap := &Snapshot{Layout: layout, Devices: make([]DeviceSample, len(out)), Taken: end, Backend: nameOf(s.active)}
	if prev != nil {
		snap.Round = prev.Round + 1
	}
	for i, r := range out {
		t := &layout.Targets[i]
		var old *DeviceSample
		if prev != nil {
			if k, ok := prev.Layout.index[t.Key]; ok {
				old = &prev.Devices[k]
			}
		}
		d := &snap.Devices[i]
		if old != nil {
			d.Failures = old.Failures
		}
		if r.Err == nil {
			d.Values, d.At = r.Values, end
			d.Procs, d.ProcsRead, d.ProcUtil = r.Procs, r.ProcsRead, r.ProcUtil
			if r.ProcsRead && r.MPSRead {
				d.MPSRead, d.MPSClients = true, mpsClients(r.Procs)
			}
			if old != nil && old.Stale {
				s.log.Info("telemetry sampling recovered", "gpu", t.GPU.Index, "uuid", t.Key)
			}
			continue
		}
		d.Stale, d.Err = true, r.Err.Error()
		d.Failures++
		if s.opts.OnDeviceError != nil {
			s.opts.OnDeviceError(t.Key, r.Err)
		}
		if old != nil {
			d.Values, d.At = old.Values, old.At
		}
		if old == nil || !old.Stale {
			s.log.Warn("telemetry sampling failing; last values are served for a while, then dropped",
				"gpu", t.GPU.Index, "uuid", t.Key, "err", r.Err, "servedFor", s.opts.StaleAfter)
		}
	}
	if s.opts.Attributor != nil {
		snap.Usage = s.opts.Attributor.Attribute(snap)
	}
	s.snap.Store(snap)
	s.lastRound.Store(end.UnixNano())
	defer s.changed.Notify()

	took := end.Sub(start).Seconds()
	s.stats.Lock()
	s.stats.rounds++
	s.stats.sum += took
	k := 0
	for k < len(durationBuckets) && took > durationBuckets[k] {
		k++
	}
	s.stats.buckets[k]++
	s.stats.Unlock()
}

// layoutFor returns the device list for inv, reusing the last one while the
// inventory is the same.
func (s *Sampler) layoutFor(inv *nvml.Inventory) *Layout {
	if s.layout != nil && s.layout.Inventory == inv {
		return s.layout
	}
	var gen uint64
	if s.layout != nil {
		gen = s.layout.Gen + 1
	}
	s.layout = NewLayout(inv, gen)
	return s.layout
}

// SamplerStats are the sampler's counters, for metrics.
type SamplerStats struct {
	Configured string // auto, nvml, dcgm
	Backend    string // the backend in use: nvml, dcgm, none
	Rounds     uint64
	Fallbacks  uint64 // DCGM connections lost
	// Buckets are round durations per DurationBuckets (last: +Inf), not
	// cumulative; Sum their total in seconds.
	Buckets []uint64
	Sum     float64
}

// DurationBuckets are the upper bounds of SamplerStats.Buckets.
func DurationBuckets() []float64 { return durationBuckets }

// Stats copies the counters. Safe for concurrent use.
func (s *Sampler) Stats() SamplerStats {
	s.stats.Lock()
	defer s.stats.Unlock()
	return SamplerStats{
		Configured: s.opts.Backends.Configured, Backend: s.stats.backend,
		Rounds: s.stats.rounds, Fallbacks: s.stats.fallbacks,
		Buckets: append([]uint64(nil), s.stats.buckets...), Sum: s.stats.sum,
	}
}

// Layout is the list of devices sampled from one inventory.
type Layout struct {
	Inventory *nvml.Inventory
	Targets   []Target
	Gen       uint64 // changes whenever the list may have changed
	index     map[string]int
}

// NewLayout lists inv's devices the way dcgm-exporter's default "flex"
// mode does: a GPU with MIG devices is reported per MIG device, any other
// GPU as a whole. GPUs that were never identified are left out.
func NewLayout(inv *nvml.Inventory, gen uint64) *Layout {
	l := &Layout{Inventory: inv, Gen: gen, index: map[string]int{}}
	if inv == nil {
		return l
	}
	for i := range inv.GPUs {
		g := &inv.GPUs[i]
		if !g.Usable() {
			continue
		}
		if g.MIGEnabled && len(g.MIGDevices) > 0 {
			for k := range g.MIGDevices {
				m := &g.MIGDevices[k]
				l.index[m.UUID] = len(l.Targets)
				l.Targets = append(l.Targets, Target{Key: m.UUID, GPU: g, MIG: m})
			}
			continue
		}
		l.index[g.UUID] = len(l.Targets)
		l.Targets = append(l.Targets, Target{Key: g.UUID, GPU: g})
	}
	return l
}

// Index finds a device by key.
func (l *Layout) Index(key string) (int, bool) {
	i, ok := l.index[key]
	return i, ok
}

// Snapshot is one sampling round's result. It is immutable once published.
type Snapshot struct {
	Layout  *Layout
	Devices []DeviceSample // one per Layout.Targets entry
	Backend string         // which backend took it
	Taken   time.Time      // when the round finished
	Round   uint64
	// Usage is the per-pod accounting of this round; nil when it is off.
	Usage *Usage
}

// DeviceSample is a device's latest values.
type DeviceSample struct {
	Values
	// At is when Values were read; zero if the device never answered.
	At time.Time
	// Stale is set while the device's sampling fails; Values are then
	// the last good ones, from At.
	Stale bool
	Err   string // why the latest round failed
	// Failures counts failed rounds since the sampler started.
	Failures uint64
	// Procs, ProcsRead and ProcUtil are this round's processes (see
	// Result); a device that failed this round has none.
	Procs     []Process
	ProcsRead bool
	ProcUtil  bool
	// MPSClients counts the Procs that are MPS clients, with MPSRead (the
	// MPS list was read this round): counted here, once per round, so
	// that a scrape only reads it.
	MPSClients int
	MPSRead    bool
}

func mpsClients(procs []Process) int {
	n := 0
	for i := range procs {
		if procs[i].MPSClient {
			n++
		}
	}
	return n
}

// Servable reports whether the device's values may be served at now: it
// has answered, and not longer ago than staleAfter.
func (d *DeviceSample) Servable(now time.Time, staleAfter time.Duration) bool {
	return !d.At.IsZero() && now.Sub(d.At) <= staleAfter
}

// gpuLabel is the decimal GPU index, as the gpu label shows it.
func gpuLabel(g *nvml.GPU) string { return strconv.Itoa(g.Index) }
