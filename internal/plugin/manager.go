// Package plugin is the kubelet side of the daemon: one device-plugin gRPC
// server per resource on a unix socket, registration with the kubelet, and
// re-registration when the kubelet restarts or our socket disappears.
package plugin

import (
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
}

// Manager runs the plugin servers. Its Run loop is the only goroutine that
// starts, stops or registers them, so lifecycle steps never interleave.
type Manager struct {
	opts          Options
	log           *slog.Logger
	kubeletSocket string
	updates       chan update

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
	return &Manager{
		opts:          opts,
		log:           opts.Logger,
		kubeletSocket: filepath.Join(opts.SocketDir, filepath.Base(pluginapi.KubeletSocket)),
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
// the sockets. It fails only if the socket directory cannot be watched.
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
	backoff := m.opts.MinBackoff
	retry := time.NewTimer(0)
	defer retry.Stop()
	var attempt context.CancelFunc // nil when none is in flight
	var attemptTo os.FileInfo      // kubelet.sock when the attempt began; nil if missing
	attemptDone := make(chan error, 1)
	again := false // retry as soon as the attempt in flight ends
	defer func() {
		if attempt != nil {
			attempt()
			<-attemptDone
		}
	}()
	retryNow := func() {
		backoff = m.opts.MinBackoff
		if attempt != nil {
			again = true
			return
		}
		retry.Reset(0)
	}

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
				retryNow()
			} else if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
				if m.restartMissing() {
					retryNow()
				}
			}
		case err, ok := <-watcher.Errors:
			if ok {
				m.log.Warn("socket directory watch error", "err", err)
			}
		case <-ticker.C:
			if m.restartMissing() {
				retryNow()
			}
		case u := <-m.updates:
			m.apply(u.resources, u.respond)
			retryNow()
		case <-retry.C:
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
			switch {
			case again:
				again = false
				retry.Reset(0)
			case err != nil:
				m.log.Debug("registration failed, retrying", "in", backoff, "err", err)
				retry.Reset(backoff)
				backoff = min(backoff*2, m.opts.MaxBackoff)
			default:
				backoff = m.opts.MinBackoff
			}
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
			if !sameResource(s.res.Load(), r) {
				m.log.Info("resource changed", "resource", r.Name, "devices", len(r.Devices))
				s.setResource(r)
			}
			continue
		}
		s := newServer(r, m.opts.SocketDir, m.opts.Health, respond, m.opts.Preferrer, m.opts.Events, m.log)
		m.servers[r.Name] = s
		if err := s.start(); err != nil {
			m.log.Error("cannot start plugin server; retrying", "resource", r.Name, "err", err)
		}
		m.log.Info("serving resource", "resource", r.Name, "devices", len(r.Devices), "socket", s.socket)
	}
}

func sameResource(a, b *sharing.Resource) bool {
	return a.Replicas == b.Replicas && a.FailRequestsGreaterThanOne == b.FailRequestsGreaterThanOne &&
		a.AllocationPolicy == b.AllocationPolicy && a.Base == b.Base &&
		slices.EqualFunc(a.Devices, b.Devices, sameDevice)
}

// sameDevice compares everything Allocate, ListAndWatch and health read.
func sameDevice(x, y sharing.Device) bool {
	sameMIG := (x.MIG == nil) == (y.MIG == nil) && (x.MIG == nil || *x.MIG == *y.MIG)
	return x.ID == y.ID && x.Physical == y.Physical && x.GPUIndex == y.GPUIndex && x.GPUUUID == y.GPUUUID &&
		x.Replica == y.Replica && x.NUMANode == y.NUMANode && x.Minor == y.Minor && sameMIG &&
		slices.Equal(x.MIGChildren, y.MIGChildren)
}

// restartMissing restarts every server whose socket is gone (the kubelet
// deletes all sockets when it starts) or that is not running. It reports
// whether any was restarted.
func (m *Manager) restartMissing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	restarted := false
	for _, s := range m.servers {
		if _, err := os.Lstat(s.socket); err == nil && s.running() {
			continue
		}
		m.log.Info("plugin socket missing: restarting the plugin server", "resource", s.name, "socket", s.socket)
		s.stop()
		if err := s.start(); err != nil {
			m.log.Error("cannot restart plugin server", "resource", s.name, "err", err)
			continue
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
			s.stats.registered.Store(false)
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
		if s.running() && !s.stats.registered.Load() {
			pending = append(pending, s)
		}
	}
	m.mu.Unlock()
	var errs []error
	for _, s := range pending {
		if err := s.register(ctx, m.kubeletSocket); err != nil {
			errs = append(errs, err)
			continue
		}
		m.log.Info("registered with the kubelet", "resource", s.name)
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
