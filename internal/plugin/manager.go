// Package plugin is the kubelet side of the daemon: one device-plugin gRPC
// server per resource on a unix socket, registration with the kubelet, and
// re-registration when the kubelet restarts or our socket disappears.
package plugin

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Options configure a Manager.
type Options struct {
	// SocketDir is the kubelet's device-plugin directory; kubelet.sock lives
	// there and our sockets are created there.
	SocketDir string
	Health    *health.State
	Respond   ResponseOptions
	// Preferrer answers GetPreferredAllocation; nil uses FirstFit.
	Preferrer Preferrer
	Events    Events
	Logger    *slog.Logger
	// PollInterval backs up fsnotify: sockets are checked this often
	// (default 1 s).
	PollInterval time.Duration
	// MinBackoff and MaxBackoff bound the registration retry delay
	// (defaults 10 ms and 5 s). A restarting kubelet creates kubelet.sock a
	// moment before it accepts connections, so the first retries are quick.
	MinBackoff, MaxBackoff time.Duration
	// StreamGrace is how long the kubelet's ListAndWatch stream may be gone
	// before the resource counts as unregistered and registers again, and
	// how long a new stream must be held after such a drop before it counts
	// as registered again (default 1 s). StreamOpenTimeout bounds the wait
	// for the first stream after Register (default 10 s).
	StreamGrace, StreamOpenTimeout time.Duration
	// KubeletSocket is the kubelet's registration socket (--kubelet-socket);
	// "" is kubelet.sock in SocketDir.
	KubeletSocket string
	// SkipRegistration serves the plugin sockets without registering them
	// with a kubelet: NVIDIA's --kubelet-socket given empty. Readiness then
	// needs only the servers to run.
	SkipRegistration bool
}

// Manager runs the plugin servers. Its Run loop is the only goroutine that
// starts, stops or registers them, so lifecycle steps never interleave.
type Manager struct {
	opts          Options
	log           *slog.Logger
	kubeletSocket string
	updates       chan update
	streamed      notify.Signal // a ListAndWatch stream opened or ended

	mu      sync.Mutex // guards servers for readers outside the loop
	servers map[string]*server
	started bool // Run has created the servers
}

type update struct {
	resources []*sharing.Resource
	respond   ResponseOptions
}

// NewManager prepares a manager; Run starts it.
func NewManager(opts Options) *Manager {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Preferrer == nil {
		opts.Preferrer = FirstFit{}
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = time.Second
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 10 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 5 * time.Second
	}
	if opts.StreamGrace <= 0 {
		opts.StreamGrace = time.Second
	}
	if opts.StreamOpenTimeout <= 0 {
		opts.StreamOpenTimeout = 10 * time.Second
	}
	return &Manager{
		opts:          opts,
		log:           opts.Logger,
		kubeletSocket: cmp.Or(opts.KubeletSocket, filepath.Join(opts.SocketDir, filepath.Base(pluginapi.KubeletSocket))),
		updates:       make(chan update, 1),
		servers:       map[string]*server{},
	}
}

// Update replaces the advertised resources and allocation options, e.g.
// after a config reload or a re-scan. Unchanged resources keep their
// streams; new ones register; removed ones stop and lose their sockets.
// Only the latest pending update is applied.
func (m *Manager) Update(resources []*sharing.Resource, respond ResponseOptions) {
	u := update{resources: resources, respond: respond}
	for {
		select {
		case m.updates <- u:
			return
		default:
			select { // drop a stale pending update
			case <-m.updates:
			default:
			}
		}
	}
}

// Run serves resources until ctx ends, then stops every server and removes
// the sockets. It fails only if the socket directory cannot be watched when
// it starts; should the directory vanish later, the manager waits for it to
// come back and watches it again.
func (m *Manager) Run(ctx context.Context, resources []*sharing.Resource) error {
	watcher, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching the kubelet socket directory: %w", err)
	}
	defer watcher.Close()
	if err := watcher.Add(m.opts.SocketDir); err != nil {
		return fmt.Errorf("watching %s (the kubelet device-plugin directory; set --kubelet-socket-dir): %w", m.opts.SocketDir, err)
	}
	defer m.stopAll()

	m.apply(resources, m.opts.Respond)
	m.mu.Lock()
	m.started = true
	m.mu.Unlock()
	if m.opts.SkipRegistration {
		m.log.Info("not registering with a kubelet (--kubelet-socket is empty); serving the plugin sockets only", "dir", m.opts.SocketDir)
	}
	ticker := time.NewTicker(m.opts.PollInterval)
	defer ticker.Stop()

	// Registration runs in its own goroutine, one attempt at a time: the
	// kubelet dials our socket back inside Register, and a kubelet that
	// is itself restarting can make that take until the 5 s deadline. The
	// loop meanwhile keeps restarting vanished sockets, and a new
	// kubelet.sock cancels an attempt made to the previous kubelet and
	// starts a fresh one. An attempt made to the new kubelet already goes
	// on: cancelling it after the kubelet dialled back leaks that
	// connection in the kubelet (v1.37 closes it on no error path).
	r := newRetrier(m.opts.MinBackoff, m.opts.MaxBackoff)
	defer r.timer.Stop()
	var attempt context.CancelFunc // nil when none is in flight
	var attemptTo os.FileInfo      // kubelet.sock when the attempt began; nil if missing
	attemptDone := make(chan error, 1)
	defer func() {
		if attempt != nil {
			attempt()
			<-attemptDone
		}
	}()
	// Stream liveness: a wake-up when a ListAndWatch stream opens or ends,
	// and a timer for the next grace window to run out.
	streamCheck := time.NewTimer(time.Hour)
	streamCheck.Stop()
	defer streamCheck.Stop()
	// The wake-up channel is taken again just before each check reads the
	// streams, whichever case ran it: a stream that ends after that read
	// closes the new channel. Taking it only at the top of the loop lost
	// such an end when the check ran from another case (attemptDone) after
	// an earlier notify had already closed the channel held.
	streamed := m.streamed.C()
	checkStreams := func() {
		streamed = m.streamed.C()
		if next := m.checkStreams(time.Now(), r); !next.IsZero() {
			streamCheck.Reset(time.Until(next))
		}
		if r.due && attempt == nil {
			r.arm()
		}
	}
	watching := true
	watchedDir := filepath.Clean(m.opts.SocketDir) // as fsnotify lists it
	var regCause string                            // the registration failure last logged

	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-watcher.Events:
			if !ok {
				return errors.New("the kubelet socket directory watch ended")
			}
			if ev.Name == m.kubeletSocket && ev.Has(fsnotify.Create) {
				m.log.Info("kubelet socket created: the kubelet restarted, registering again")
				if attempt != nil && !sameSocket(attemptTo, m.kubeletSocket) {
					attempt() // it was talking to the previous kubelet
				}
				m.restartMissing()
				m.markUnregistered(m.kubeletSocketCreated())
				r.now(attempt != nil)
			} else if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
				if m.restartMissing() {
					r.now(attempt != nil)
				}
			}
		case err, ok := <-watcher.Errors:
			if ok {
				m.log.Warn("socket directory watch error", "err", err)
			}
		case <-ticker.C:
			if !watching || !slices.Contains(watcher.WatchList(), watchedDir) {
				// inotify drops the watch of a deleted directory: add it
				// again once the directory is back.
				watching = watcher.Add(m.opts.SocketDir) == nil
				if watching {
					m.log.Info("kubelet device-plugin directory present again: watching it", "dir", watchedDir)
				}
			}
			if m.restartMissing() {
				r.now(attempt != nil)
			}
		case <-streamed:
			checkStreams()
		case <-streamCheck.C:
			checkStreams()
		case u := <-m.updates:
			m.apply(u.resources, u.respond)
			r.now(attempt != nil)
		case <-r.timer.C:
			r.fired()
			if m.opts.SkipRegistration {
				continue
			}
			// A restarting kubelet deletes our socket; never send it to a
			// missing one.
			m.restartMissing()
			actx, cancel := context.WithCancel(ctx)
			attempt = cancel
			attemptTo, _ = os.Stat(m.kubeletSocket)
			go func() { attemptDone <- m.registerPending(actx) }()
		case err := <-attemptDone:
			attempt()
			attempt = nil
			if err != nil {
				cause := kubeletCause(m.opts.SocketDir, m.kubeletSocket, err)
				m.setRegisterCause(cause)
				if cause != regCause {
					m.log.Warn("cannot register with the kubelet; retrying quietly until the cause changes", "cause", cause)
					regCause = cause
				}
				m.log.Debug("registration failed, retrying", "in", r.backoff, "err", err)
			} else {
				regCause = ""
			}
			r.attemptEnded(err != nil)
			checkStreams() // a new registration's stream must open in time
		}
	}
}

// retrier schedules registration attempts: at once after an event that
// may have fixed things (a new kubelet, an update), else with a backoff
// that doubles from min to max while attempts fail. Dropped streams have
// their own backoff (drop): a registration that the kubelet accepts and
// then drops at once counts as a failure too.
type retrier struct {
	min, max time.Duration
	backoff  time.Duration
	drop     time.Duration
	lastDrop time.Time
	timer    *time.Timer
	armed    bool      // timer set to fire
	armedAt  time.Time // when it fires
	due      bool      // an attempt is wanted (armed when none is in flight)
	dueIn    time.Duration
}

func newRetrier(minB, maxB time.Duration) *retrier {
	return &retrier{min: minB, max: maxB, backoff: minB, drop: minB, timer: time.NewTimer(0), armed: true, armedAt: time.Now()}
}

// now wants an attempt at once and resets the backoffs.
func (r *retrier) now(inFlight bool) {
	r.backoff, r.drop = r.min, r.min
	r.after(0, inFlight)
}

// after wants an attempt within d (sooner if one is already due sooner).
func (r *retrier) after(d time.Duration, inFlight bool) {
	if r.due && r.dueIn <= d {
		return
	}
	r.due, r.dueIn = true, d
	if !inFlight {
		r.arm()
	}
}

// arm sets the timer for the wanted attempt, unless it fires sooner
// anyway.
func (r *retrier) arm() {
	if !r.due {
		return
	}
	r.due = false
	at := time.Now().Add(r.dueIn)
	if r.armed && !at.Before(r.armedAt) {
		return
	}
	r.timer.Stop()
	r.timer.Reset(r.dueIn)
	r.armed, r.armedAt = true, at
}

func (r *retrier) fired() { r.armed = false }

// attemptEnded schedules what follows an attempt: what became due while it
// ran, else a retry with backoff after a failure.
func (r *retrier) attemptEnded(failed bool) {
	switch {
	case r.due:
		r.arm()
	case failed:
		r.due, r.dueIn = true, r.backoff
		r.arm()
		r.backoff = min(r.backoff*2, r.max)
	default:
		r.backoff = r.min
	}
}

// dropped schedules the re-registration after a dropped stream. The drop
// backoff restarts from min when the last drop is long past.
func (r *retrier) dropped(now time.Time, inFlight bool) {
	if now.Sub(r.lastDrop) > time.Minute {
		r.drop = r.min
	}
	r.lastDrop = now
	r.after(r.drop, inFlight)
	r.drop = min(r.drop*2, r.max)
}

// checkStreams applies stream liveness to every registered server: one
// whose kubelet stream is gone for longer than the grace window (or never
// opened within streamOpenTimeout of Register) no longer counts as
// registered and is registered again; one registered again after a drop
// counts once the kubelet has held its new stream for the grace window.
// It returns when to check next (zero: nothing pending).
func (m *Manager) checkStreams(now time.Time, r *retrier) time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	var next time.Time
	later := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	for _, s := range m.servers {
		if !s.stats.linked.Load() {
			continue
		}
		open, opened, ended, ok := s.streamInfo()
		if !ok {
			continue
		}
		if open > 0 {
			if !s.stats.confirm.Load() {
				continue
			}
			// Held: the kubelet has kept the stream for the grace window
			// since the last list went out, and that list is one it can
			// receive (a bigger one ends the stream as soon as it arrives,
			// however long sending it takes).
			l := s.stats.lastList.Load()
			if l == nil || !l.deliverable() || l.sent.IsZero() {
				continue
			}
			if held := later2(opened, l.sent).Add(m.opts.StreamGrace); now.Before(held) {
				later(held)
				continue
			}
			s.stats.confirm.Store(false)
			s.stats.registered.Store(true)
			s.setCause("")
			r.drop = m.opts.MinBackoff
			m.log.Info("registered with the kubelet again: it holds the ListAndWatch stream", "resource", s.name)
			continue
		}
		// The kubelet opens the stream while Register returns: a stream
		// of this registration may end before registeredAt is set.
		since, window := time.Unix(0, s.stats.registeredAt.Load()), m.opts.StreamOpenTimeout
		streamedSince := ended.After(time.Unix(0, s.stats.attemptAt.Load()))
		if streamedSince {
			since, window = later2(since, ended), m.opts.StreamGrace
		}
		if deadline := since.Add(window); now.Before(deadline) {
			later(deadline)
			continue
		}
		cause := s.dropCause()
		if !streamedSince {
			cause = fmt.Sprintf("the kubelet accepted the registration but opened no ListAndWatch stream within %v", window)
		}
		wasCounted := s.stats.registered.Load()
		s.unlink()
		s.stats.confirm.Store(true)
		if old := s.stats.lastRegisterErr.Load(); wasCounted || old == nil || *old != cause {
			m.log.Warn("resource unregistered: registering again with backoff", "resource", s.name, "cause", cause)
		} else {
			m.log.Debug("kubelet stream dropped again", "resource", s.name, "cause", cause)
		}
		s.setCause(cause)
		r.dropped(now, true) // armed by the caller unless an attempt is in flight
	}
	return next
}

func later2(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// setRegisterCause records a registration failure on every server that
// waits for registration.
func (m *Manager) setRegisterCause(cause string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.servers {
		if s.running() && !s.stats.linked.Load() {
			s.setCause(cause)
		}
	}
}

// apply reconciles the servers with the wanted resources.
func (m *Manager) apply(resources []*sharing.Resource, respond ResponseOptions) {
	wanted := map[string]*sharing.Resource{}
	for _, r := range resources {
		wanted[r.Name] = r
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, s := range m.servers {
		if _, ok := wanted[name]; !ok {
			m.log.Info("resource removed", "resource", name)
			s.stop()
			delete(m.servers, name)
		}
	}
	for _, r := range resources {
		if s, ok := m.servers[r.Name]; ok {
			s.respond.Store(&respond)
			if !s.res.Load().Equal(r) {
				m.log.Info("resource changed", "resource", r.Name, "devices", len(r.Devices))
				s.setResource(r)
			}
			continue
		}
		s := newServer(r, m.opts.SocketDir, m.opts.Health, respond, m.opts.Preferrer, m.opts.Events, m.log)
		s.streamed = &m.streamed
		m.servers[r.Name] = s
		if err := s.start(); err != nil {
			s.startCause = dirCause(m.opts.SocketDir, err)
			s.setCause(s.startCause)
			m.log.Error("cannot serve the plugin socket; retrying quietly until the cause changes", "resource", r.Name, "cause", s.startCause)
		}
		m.log.Info("serving resource", "resource", r.Name, "devices", len(r.Devices), "socket", s.socket)
	}
}

// restartMissing restarts every server whose socket is gone (the kubelet
// deletes all sockets when it starts) or that is not running. It reports
// whether any was restarted. A server that keeps failing to start logs
// once per distinct cause.
func (m *Manager) restartMissing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	restarted := false
	for _, s := range m.servers {
		if _, err := os.Lstat(s.socket); err == nil && s.running() {
			continue
		}
		if s.startCause == "" {
			m.log.Info("plugin socket missing: restarting the plugin server", "resource", s.name, "socket", s.socket)
		}
		s.stop()
		if err := s.start(); err != nil {
			cause := dirCause(m.opts.SocketDir, err)
			if cause != s.startCause {
				m.log.Error("cannot serve the plugin socket; retrying quietly until the cause changes", "resource", s.name, "cause", cause)
				s.startCause = cause
			} else {
				m.log.Debug("plugin server still cannot start", "resource", s.name)
			}
			s.setCause(cause)
			continue
		}
		if s.startCause != "" {
			m.log.Info("plugin server serving again", "resource", s.name, "socket", s.socket)
			s.startCause = ""
			s.setCause("")
		}
		restarted = true
	}
	return restarted
}

// markUnregistered forgets the registrations made before the kubelet
// socket was created: those were with the previous kubelet. A server that
// registered after it (the new kubelet deleted its socket, so it restarted
// and registered before this event was handled) is registered with this
// kubelet already: a second Register is refused as "already connected",
// which would leave it unregistered for good and orphan the kubelet's first
// connection (the real-kubelet suite in tests/kubelet catches this).
func (m *Manager) markUnregistered(created time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.servers {
		if s.stats.registeredAt.Load() <= created.UnixNano() {
			s.unlink()
		}
	}
}

// kubeletSocketCreated is when the current kubelet socket was created, or
// now if it is gone again.
func (m *Manager) kubeletSocketCreated() time.Time {
	fi, err := os.Stat(m.kubeletSocket)
	if err != nil {
		return time.Now()
	}
	return fi.ModTime()
}

// sameSocket reports whether path is still the file before was: the same
// inode, created at the same time (an inode number may be reused).
func sameSocket(before os.FileInfo, path string) bool {
	if before == nil {
		return false
	}
	now, err := os.Stat(path)
	return err == nil && os.SameFile(before, now) && before.ModTime().Equal(now.ModTime())
}

// registerPending registers every running server not yet registered.
func (m *Manager) registerPending(ctx context.Context) error {
	m.mu.Lock()
	var pending []*server
	for _, s := range m.servers {
		if s.running() && !s.stats.linked.Load() {
			pending = append(pending, s)
		}
	}
	m.mu.Unlock()
	var errs []error
	for _, s := range pending {
		counted, err := s.register(ctx, m.kubeletSocket)
		switch {
		case err != nil:
			errs = append(errs, err)
		case counted:
			m.log.Info("registered with the kubelet", "resource", s.name)
		default:
			m.log.Debug("registered again; counted once the kubelet holds the stream", "resource", s.name)
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) stopAll() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.servers {
		s.stop()
	}
	m.log.Info("plugin servers stopped and sockets removed")
}

// ResourceStatus describes one served resource, for metrics and /debug.
type ResourceStatus struct {
	Resource          string `json:"resource"`
	Socket            string `json:"socket"`
	Devices           int    `json:"devices"`
	Registered        bool   `json:"registered"`
	Registrations     uint64 `json:"registrations"`
	Allocations       uint64 `json:"allocations"`
	AllocationErrors  uint64 `json:"allocationErrors"`
	Streams           int64  `json:"streams"`
	LastRegisterError string `json:"lastRegisterError,omitempty"`
}

// Status reports every served resource, sorted by name.
func (m *Manager) Status() []ResourceStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]ResourceStatus, 0, len(m.servers))
	for _, s := range m.servers {
		st := ResourceStatus{
			Resource: s.name, Socket: s.socket, Devices: len(s.res.Load().Devices),
			Registered: s.stats.registered.Load(), Registrations: s.stats.registrations.Load(),
			Allocations: s.stats.allocations.Load(), AllocationErrors: s.stats.allocationErrors.Load(),
			Streams: s.stats.streams.Load(),
		}
		if e := s.stats.lastRegisterErr.Load(); e != nil {
			st.LastRegisterError = *e
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Resource < out[j].Resource })
	return out
}

// Registered reports whether every served resource is registered with the
// kubelet (readiness).
func (m *Manager) Registered() bool {
	m.mu.Lock()
	started := m.started
	m.mu.Unlock()
	if !started {
		return false
	}
	if m.opts.SkipRegistration {
		return true
	}
	for _, st := range m.Status() {
		if !st.Registered {
			return false
		}
	}
	return true
}

// Resources returns the resources currently served.
func (m *Manager) Resources() []*sharing.Resource {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*sharing.Resource, 0, len(m.servers))
	for _, s := range m.servers {
		out = append(out, s.res.Load())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
