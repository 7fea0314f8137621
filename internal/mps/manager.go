package mps

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Options configure the daemons.
type Options struct {
	// Binary is nvidia-cuda-mps-control.
	Binary string
	// Env is added to the daemons' environment (NVIDIA's daemon gets only
	// its pipe and log directories): e.g. PATH and LD_LIBRARY_PATH for a
	// driver root that is not this container's own.
	Env []string
	// InheritEnv starts the daemons with this process's environment under
	// theirs (a simulated node: the fake binary reads its test knobs there).
	InheritEnv bool
	// ComputeMode sets the GPUs' compute mode: EXCLUSIVE_PROCESS before a
	// daemon starts and DEFAULT after it quits, as NVIDIA's daemon does.
	// nil leaves it alone (a simulated node).
	ComputeMode func(ctx context.Context, uuids []string, mode string) error
	// Prepare runs before each start; its error fails the start (e.g. a
	// shared-memory directory the clients would not share). nil: none.
	Prepare func(s Spec) error
	// Health receives each daemon's readiness as its health unit.
	Health *health.State
	Logger *slog.Logger

	// ReadyTimeout bounds a start: -d and the first answer (default 30 s).
	ReadyTimeout time.Duration
	// CommandTimeout bounds one control command (default 10 s).
	CommandTimeout time.Duration
	// ProbeInterval is how often a ready daemon is asked a question, to
	// find one that is alive but no longer answers (default 10 s); a
	// daemon that exits is seen at once.
	ProbeInterval time.Duration
	// MinBackoff and MaxBackoff space restarts (defaults 1 s and 30 s).
	MinBackoff, MaxBackoff time.Duration
}

func (o *Options) defaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.ReadyTimeout, 30*time.Second)
	def(&o.CommandTimeout, 10*time.Second)
	def(&o.ProbeInterval, 10*time.Second)
	def(&o.MinBackoff, time.Second)
	def(&o.MaxBackoff, 30*time.Second)
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Health == nil {
		o.Health = health.NewState(nil, nil)
	}
}

// Daemon states.
const (
	StateStarting = "starting"
	StateReady    = "ready"
	StateFailed   = "failed" // exited or never started; restarted after a backoff
)

// Status is one daemon's state, for /debug/devices and the metrics.
type Status struct {
	Resource         string   `json:"resource"`
	State            string   `json:"state"`
	Reason           string   `json:"reason,omitempty"`
	Since            string   `json:"since"`
	PID              int      `json:"pid,omitempty"`
	Restarts         uint64   `json:"restarts"`
	GPUs             []string `json:"gpus"`
	Replicas         int      `json:"replicas"`
	ThreadPercentage int      `json:"activeThreadPercentage"`
	PinnedLimits     []Limit  `json:"pinnedMemoryLimits,omitempty"`
	PipeDirectory    string   `json:"pipeDirectory"`
	// Started: the resource's daemon has been ready since the resource
	// appeared, so the resource is advertised (with unhealthy replicas
	// while its daemon is down or restarting).
	Started bool `json:"started"`
}

// Manager keeps one supervised control daemon per Spec applied.
type Manager struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	want   map[string]Spec
	status map[string]*Status
	poke   chan struct{} // Apply: reconcile

	changed notify.Signal // a daemon's state changed
}

// New returns a manager with no daemons; Run starts what Apply asks for.
func New(opts Options) *Manager {
	opts.defaults()
	return &Manager{
		opts: opts, log: opts.Logger,
		want: map[string]Spec{}, status: map[string]*Status{}, poke: make(chan struct{}, 1),
	}
}

// Apply makes specs the daemons wanted: new ones start, removed ones quit,
// changed ones (replicas, GPUs) quit and start again. It does not wait.
func (m *Manager) Apply(specs []Spec) {
	want := make(map[string]Spec, len(specs))
	for _, s := range specs {
		want[s.Resource] = s
	}
	m.mu.Lock()
	m.want = want
	m.mu.Unlock()
	select {
	case m.poke <- struct{}{}:
	default:
	}
}

// Ready reports whether the resource's daemon answers with its limits set.
func (m *Manager) Ready(resource string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.status[resource]
	return s != nil && s.State == StateReady
}

// Advertisable reports whether the resource may be advertised: its daemon
// has been ready since the resource appeared. A resource is not offered
// before its daemon can serve it; once offered, a daemon that dies makes
// its replicas unhealthy rather than withdrawing them.
func (m *Manager) Advertisable(resource string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.status[resource]
	return s != nil && s.Started
}

// Statuses lists the daemons by resource.
func (m *Manager) Statuses() []Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Status, 0, len(m.status))
	for _, k := range slices.Sorted(maps.Keys(m.status)) {
		out = append(out, *m.status[k])
	}
	return out
}

// Changed returns a channel closed at the next change of a daemon's state.
func (m *Manager) Changed() <-chan struct{} { return m.changed.C() }

type running struct {
	spec   Spec
	cancel context.CancelFunc
	done   chan struct{}
}

// Run supervises the daemons until ctx ends, then quits them all and
// returns once they are gone.
func (m *Manager) Run(ctx context.Context) error {
	live := map[string]*running{}
	subreaper := false
	stop := func(r *running) {
		r.cancel()
		<-r.done
	}
	defer func() {
		for _, r := range live {
			r.cancel()
		}
		for _, r := range live {
			<-r.done
		}
	}()
	for {
		m.mu.Lock()
		want := maps.Clone(m.want)
		m.mu.Unlock()
		for name, r := range live {
			if s, ok := want[name]; !ok || !s.Equal(r.spec) {
				stop(r)
				delete(live, name)
				if !ok {
					m.forget(name)
				}
			}
		}
		for name, s := range want {
			if _, ok := live[name]; ok {
				continue
			}
			if !subreaper {
				// A daemon started with -d is re-parented when its
				// launcher exits: to this process as a subreaper, so
				// that its exit is seen (and it is reaped) at once
				// wherever the plugin runs, PID 1 in a container or not.
				subreaper = true
				if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
					m.log.Warn("cannot become a child subreaper; an MPS daemon's exit is seen by probing only", "err", err)
				}
			}
			rctx, cancel := context.WithCancel(ctx)
			r := &running{spec: s, cancel: cancel, done: make(chan struct{})}
			live[name] = r
			go func() {
				defer close(r.done)
				m.supervise(rctx, s)
			}()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-m.poke:
		}
	}
}

// supervise starts the daemon, watches it, and restarts it with backoff
// until ctx ends; then it quits it.
func (m *Manager) supervise(ctx context.Context, s Spec) {
	backoff := m.opts.MinBackoff
	var restarts uint64
	for {
		m.setState(s, StateStarting, "", 0, restarts)
		p, err := m.start(ctx, s)
		if err == nil {
			m.setState(s, StateReady, "", p.pid, restarts)
			backoff = m.opts.MinBackoff
			err = m.watch(ctx, s, p)
			if ctx.Err() != nil {
				m.stop(s, p)
				return
			}
			p.kill()
		}
		if ctx.Err() != nil {
			m.cleanup(s)
			return
		}
		m.setState(s, StateFailed, err.Error(), 0, restarts)
		m.log.Error("MPS control daemon failed; its replicas are unhealthy until it is ready again", "resource", s.Resource, "err", err, "retryIn", backoff)
		select {
		case <-ctx.Done():
			m.cleanup(s)
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, m.opts.MaxBackoff)
		restarts++
	}
}

// watch returns why the daemon stopped serving: it exited, or it stopped
// answering. It returns nil when ctx ends first.
func (m *Manager) watch(ctx context.Context, s Spec, p *process) error {
	tick := time.NewTicker(m.opts.ProbeInterval)
	defer tick.Stop()
	misses := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-p.exited:
			return p.exitErr
		case <-tick.C:
			if _, err := m.command(ctx, s, "get_default_active_thread_percentage"); err != nil && ctx.Err() == nil {
				misses++
				if misses >= 2 {
					return errors.Join(errors.New("the MPS control daemon stopped answering on its pipe"), err)
				}
				continue
			}
			misses = 0
		}
	}
}

func (m *Manager) setState(s Spec, state, reason string, pid int, restarts uint64) {
	now := time.Now()
	m.mu.Lock()
	st := m.status[s.Resource]
	if st == nil || st.State != state || st.Reason != reason || st.PID != pid {
		// Once offered, a resource stays offered while its daemon restarts,
		// for a crash or a changed spec alike; only removal forgets it.
		started := st != nil && st.Started
		st = &Status{
			Resource: s.Resource, State: state, Reason: reason, PID: pid, Restarts: restarts, Since: now.UTC().Format(time.RFC3339),
			Started:  started || state == StateReady,
			Replicas: s.Replicas, ThreadPercentage: s.ThreadPercentage(), PinnedLimits: s.PinnedLimits(), PipeDirectory: s.Dirs().Pipe,
		}
		for _, g := range s.GPUs {
			st.GPUs = append(st.GPUs, g.UUID)
		}
		m.status[s.Resource] = st
	}
	m.mu.Unlock()
	unit := sharing.MPSHealthUnit(s.Resource)
	switch state {
	case StateReady:
		m.opts.Health.SetHealthy(unit, "MPS control daemon ready")
		m.log.Info("MPS control daemon ready", "resource", s.Resource, "pid", pid, "gpus", len(s.GPUs), "replicas", s.Replicas,
			"activeThreadPercentage", s.ThreadPercentage(), "restarts", restarts)
	case StateFailed:
		m.opts.Health.SetUnhealthy(unit, "MPS control daemon not running: "+reason)
	case StateStarting:
		if restarts == 0 {
			m.opts.Health.SetUnhealthy(unit, "MPS control daemon starting")
		}
	}
	m.changed.Notify()
}

// forget drops a removed resource's daemon from the status and the health
// table.
func (m *Manager) forget(resource string) {
	m.mu.Lock()
	delete(m.status, resource)
	m.mu.Unlock()
	m.opts.Health.SetHealthy(sharing.MPSHealthUnit(resource), "MPS resource removed")
	m.changed.Notify()
}
