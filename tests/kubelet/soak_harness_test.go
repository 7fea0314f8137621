package kubelet

// Soak harness: what TestSoak measures and watches over a long run —
// process usage sampled throughout, bounded logs scanned for panics and
// health transitions, the real device manager's view of each GPU's health,
// and a paced XID injector.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"k8s.io/component-base/metrics/legacyregistry"
	kubeletmetrics "k8s.io/kubernetes/pkg/kubelet/metrics"

	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

// soakSample is one reading of what a long-running process must not
// accumulate.
type soakSample struct {
	Goroutines, FDs int
	RSS             uint64 // VmRSS, bytes
}

const mib = 1 << 20

// readSample reads goroutines, open fds and RSS of this process, or an
// error naming what could not be read.
func readSample() (soakSample, error) {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return soakSample{}, fmt.Errorf("counting open file descriptors: %w", err)
	}
	rss, err := vmRSS()
	if err != nil {
		return soakSample{}, err
	}
	return soakSample{Goroutines: runtime.NumGoroutine(), FDs: len(fds), RSS: rss}, nil
}

// vmRSS is the resident set size from /proc/self/status.
func vmRSS() (uint64, error) {
	raw, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, fmt.Errorf("reading RSS: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parsing VmRSS %q: %w", v, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS line in /proc/self/status")
}

// heapAfterGC is the live heap once a collection has run: unlike RSS it
// does not keep the high-water mark, so growth in it is retained memory.
func heapAfterGC() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// usageSampler reads soakSamples every interval until stopped and keeps the
// peaks, overall and for the phase under way.
type usageSampler struct {
	mu        sync.Mutex
	peak      soakSample // whole run
	phasePeak soakSample // since the last phase call
	n         int
	err       error

	cancel context.CancelFunc
	done   chan struct{}
}

func startSampler(tb testing.TB, interval time.Duration) *usageSampler {
	ctx, cancel := context.WithCancel(context.Background())
	s := &usageSampler{cancel: cancel, done: make(chan struct{})}
	s.sample()
	go func() {
		defer close(s.done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				s.sample()
			}
		}
	}()
	tb.Cleanup(s.stop)
	return s
}

func (s *usageSampler) sample() {
	cur, err := readSample()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		if s.err == nil {
			s.err = err
		}
		return
	}
	s.n++
	s.peak = maxSample(s.peak, cur)
	s.phasePeak = maxSample(s.phasePeak, cur)
}

func maxSample(a, b soakSample) soakSample {
	return soakSample{Goroutines: max(a.Goroutines, b.Goroutines), FDs: max(a.FDs, b.FDs), RSS: max(a.RSS, b.RSS)}
}

// phase returns the peak since the previous call and starts a new phase.
func (s *usageSampler) phase() soakSample {
	s.sample()
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.phasePeak
	s.phasePeak = soakSample{}
	return p
}

// result returns the peak of the whole run, the number of samples and the
// first read error.
func (s *usageSampler) result() (soakSample, int, error) {
	s.sample()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak, s.n, s.err
}

func (s *usageSampler) stop() {
	s.cancel()
	<-s.done
}

// soakLogKeep is how many recent lines a soakLog keeps for a failure
// message; everything else is counted, not kept, so a long run's logs cost
// no memory (t.Log keeps every line until the test ends).
const soakLogKeep = 200

// soakLog receives the daemon's or the kubelet's log lines: it keeps the
// last few, counts them, remembers any that mention a panic, and counts the
// daemon's health transitions per device.
type soakLog struct {
	name string

	mu       sync.Mutex
	recent   []string // ring of the last soakLogKeep lines
	next     int
	lines    int
	errors   int      // lines at error level
	panics   []string // the first few lines mentioning a panic
	panicsN  int
	unhealth map[string]int // device → "device unhealthy" transitions logged
	health   map[string]int // device → "device healthy again" transitions logged
}

func newSoakLog(name string) *soakLog {
	return &soakLog{name: name, unhealth: map[string]int{}, health: map[string]int{}}
}

func (l *soakLog) add(line string, isError bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines++
	if isError {
		l.errors++
	}
	if strings.Contains(strings.ToLower(line), "panic") {
		l.panicsN++
		if len(l.panics) < 5 {
			l.panics = append(l.panics, line)
		}
	}
	if len(l.recent) < soakLogKeep {
		l.recent = append(l.recent, line)
	} else {
		l.recent[l.next] = line
		l.next = (l.next + 1) % soakLogKeep
	}
}

// transitions returns the health transitions the daemon logged for a
// device: to unhealthy, and back to healthy.
func (l *soakLog) transitions(device string) (down, up int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.unhealth[device], l.health[device]
}

// stats returns lines and error lines logged, and the panic lines.
func (l *soakLog) stats() (lines, errors int, panics []string, panicsN int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lines, l.errors, append([]string(nil), l.panics...), l.panicsN
}

// tail is the kept lines, oldest first, for a failure message.
func (l *soakLog) tail() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := append(append([]string(nil), l.recent[l.next:]...), l.recent[:l.next]...)
	return fmt.Sprintf("last %d of %d %s log lines:\n%s", len(out), l.lines, l.name, strings.Join(out, "\n"))
}

// slogger is a daemon logger (Info and above) writing into l. It counts
// the health table's transition lines ("device unhealthy", "device healthy
// again"), which it logs once per transition.
func (l *soakLog) slogger() *slog.Logger {
	return slog.New(&soakHandler{log: l, inner: slog.NewTextHandler(soakLineWriter{l}, &slog.HandlerOptions{Level: slog.LevelInfo})})
}

type soakLineWriter struct{ l *soakLog }

func (w soakLineWriter) Write(p []byte) (int, error) {
	line := strings.TrimSuffix(string(p), "\n")
	w.l.add(line, strings.Contains(line, "level=ERROR"))
	return len(p), nil
}

// soakHandler counts transitions and hands the record on.
type soakHandler struct {
	log   *soakLog
	inner slog.Handler
}

func (h *soakHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.inner.Enabled(ctx, level)
}

func (h *soakHandler) Handle(ctx context.Context, r slog.Record) error {
	var counter map[string]int
	switch r.Message {
	case "device unhealthy":
		counter = h.log.unhealth
	case "device healthy again":
		counter = h.log.health
	}
	if counter != nil {
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "device" {
				h.log.mu.Lock()
				counter[a.Value.String()]++
				h.log.mu.Unlock()
				return false
			}
			return true
		})
	}
	return h.inner.Handle(ctx, r)
}

func (h *soakHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &soakHandler{log: h.log, inner: h.inner.WithAttrs(as)}
}

func (h *soakHandler) WithGroup(name string) slog.Handler {
	return &soakHandler{log: h.log, inner: h.inner.WithGroup(name)}
}

// klogger is a kubelet logger (verbosity 2: plugin connections and device
// updates) writing into l. It does not replace klog's global logger, which
// the manager's registration server and its plugin clients use: those
// outlive a manager's Stop, so restoring the global afterwards would race
// with them; at klog's default verbosity they log little, to stderr.
func (l *soakLog) klogger() logr.Logger {
	return funcr.New(func(prefix, args string) {
		l.add(prefix+" "+args, strings.Contains(args, `"error"=`))
	}, funcr.Options{Verbosity: 2})
}

// healthWatch follows, from the real device manager, whether each GPU of
// the node has any allocatable device of resource, and counts the changes:
// the kubelet's side of every health transition. The manager has no change
// notification, so it is polled (GetAllocatableDevices, a map copy under
// its mutex); waiters are woken through a channel.
type healthWatch struct {
	k        *kubelet
	resource string
	index    map[string]int // GPU UUID → index

	mu      sync.Mutex
	healthy []bool // as last seen
	downs   []int  // healthy → unhealthy seen
	ups     []int  // unhealthy → healthy seen
	polls   int
	changed notify.Signal

	cancel context.CancelFunc
	done   chan struct{}
}

// watchHealth starts watching; every GPU must show as healthy first (the
// test starts watching a healthy node). Stop it before restarting the
// kubelet: a new manager starts empty.
func watchHealth(tb testing.TB, k *kubelet, resource string, gpus []string) *healthWatch {
	tb.Helper()
	w := &healthWatch{
		k: k, resource: resource, index: map[string]int{},
		healthy: make([]bool, len(gpus)), downs: make([]int, len(gpus)), ups: make([]int, len(gpus)),
		done: make(chan struct{}),
	}
	for i, u := range gpus {
		w.index[u] = i
		w.healthy[i] = true
	}
	if got := w.look(); got != nil {
		for i, h := range got {
			if !h {
				tb.Fatalf("watching health: GPU %d (%s) has no allocatable %s device at the start", i, gpus[i], resource)
			}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	go w.run(ctx)
	tb.Cleanup(w.stop)
	return w
}

// look reads which GPUs have an allocatable device; nil while the manager
// is stopped.
func (w *healthWatch) look() []bool {
	w.k.mu.Lock()
	m := w.k.m
	w.k.mu.Unlock()
	if m == nil {
		return nil
	}
	out := make([]bool, len(w.healthy))
	for id := range m.GetAllocatableDevices(w.k.logger)[w.resource] {
		gpu, _, err := sharing.SplitReplicaID(id)
		if i, ok := w.index[gpu]; ok && err == nil {
			out[i] = true
		}
	}
	return out
}

func (w *healthWatch) run(ctx context.Context) {
	defer close(w.done)
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		if now := w.look(); now != nil {
			w.record(now)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (w *healthWatch) record(now []bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.polls++
	changed := false
	for i, h := range now {
		if h == w.healthy[i] {
			continue
		}
		changed = true
		w.healthy[i] = h
		if h {
			w.ups[i]++
		} else {
			w.downs[i]++
		}
	}
	if changed {
		w.changed.Notify()
	}
}

func (w *healthWatch) stop() {
	w.cancel()
	<-w.done
}

// seen returns the transitions the kubelet showed for a GPU so far.
func (w *healthWatch) seen(gpu int) (down, up int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.downs[gpu], w.ups[gpu]
}

// wait waits (bounded by waitTimeout) until cond holds for the state seen;
// what describes it in the failure message.
func (w *healthWatch) wait(tb testing.TB, what string, cond func(healthy []bool, downs, ups []int) bool) {
	tb.Helper()
	deadline := time.After(waitTimeout)
	for {
		ch := w.changed.C()
		w.mu.Lock()
		ok := cond(w.healthy, w.downs, w.ups)
		state := fmt.Sprintf("healthy %v, downs %v, ups %v", w.healthy, w.downs, w.ups)
		w.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			tb.Fatalf("kubelet device manager: %s never seen within %v (seen: %s)", what, waitTimeout, state)
		}
	}
}

// stormStats is what one XID storm injected.
type stormStats struct {
	Injected  int // InjectXID calls
	Delivered int // events queued on an event set
	Fatal     int // of them, fatal under the default policy
	Took      time.Duration
}

// xidStorm injects XIDs at rate per second for d, paced by a ticker (so a
// slow machine lowers the rate achieved, which Took shows, but never bursts
// more than one tick's worth). pick chooses the GPU and code of the n-th
// event and says whether it is fatal.
func xidStorm(node *sim.Node, rate int, d time.Duration, pick func(n int) (gpu int, code uint64, fatal bool)) (stormStats, error) {
	var st stormStats
	start := time.Now()
	total := int(float64(rate) * d.Seconds())
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for st.Injected < total {
		due := min(total, int(float64(rate)*time.Since(start).Seconds())+1)
		for ; st.Injected < due; st.Injected++ {
			gpu, code, fatal := pick(st.Injected)
			n, err := node.InjectXID(gpu, code, -1, -1)
			if err != nil {
				return st, fmt.Errorf("XID %d on GPU %d: %w", code, gpu, err)
			}
			st.Delivered += n
			if fatal {
				st.Fatal++
			}
		}
		<-tick.C
	}
	st.Took = time.Since(start)
	return st, nil
}

// goroutineStacks counts live goroutines by stack and creator (argument
// values, offsets and goroutine IDs left out), for telling which ones a
// phase left behind.
func goroutineStacks() map[string]int {
	var buf bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 2)
	out := map[string]int{}
	for _, g := range strings.Split(buf.String(), "\n\n") {
		lines := strings.Split(strings.TrimSpace(g), "\n")
		if len(lines) < 2 || !strings.HasPrefix(lines[0], "goroutine ") {
			continue
		}
		for i, l := range lines[1:] {
			switch {
			case strings.HasPrefix(l, "\t"):
				l, _, _ = strings.Cut(l, " +0x")
			case strings.HasPrefix(l, "created by "):
				l, _, _ = strings.Cut(l, " in goroutine ")
			case strings.HasSuffix(l, ")"):
				if j := strings.LastIndex(l, "("); j > 0 {
					l = l[:j]
				}
			}
			lines[i+1] = l
		}
		out[strings.Join(lines[1:], "\n")]++
	}
	return out
}

// grownStacks describes the stacks with more goroutines now than in
// before.
func grownStacks(before, now map[string]int) string {
	var b strings.Builder
	for stack, n := range now {
		if n > before[stack] {
			fmt.Fprintf(&b, "%d more:\n%s\n\n", n-before[stack], stack)
		}
	}
	return b.String()
}

// kubeletConnLeak is what the device manager (v1.37) may leave behind for
// a Register call that fails after it has dialled the plugin back: Connect
// does not close its new gRPC connection when PluginConnected fails (the
// plugin's Register context cancelled, or "device plugin already
// connected"), and on failure it deregisters every client of that socket,
// so the one already streaming is never closed either. Two idle
// connections keep 3 goroutines each.
const kubeletConnLeak = 6

// kubeletRegistrations is how many Register calls the device managers of
// this process have received for resource (the kubelet's own counter,
// kubelet_device_plugin_registration_total; its metrics are registered on
// first use).
func kubeletRegistrations(tb testing.TB, resource string) uint64 {
	tb.Helper()
	kubeletmetrics.Register()
	kubeletmetrics.DevicePluginRegistrationCount.WithLabelValues(resource).Add(0) // present before the first call
	families, err := legacyregistry.DefaultGatherer.Gather()
	if err != nil {
		tb.Fatalf("gathering the kubelet's metrics: %v", err)
	}
	for _, f := range families {
		if f.GetName() != "kubelet_device_plugin_registration_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "resource_name" && l.GetValue() == resource {
					return uint64(m.GetCounter().GetValue())
				}
			}
		}
	}
	tb.Fatalf("the kubelet's metrics have no kubelet_device_plugin_registration_total{resource_name=%q}", resource)
	return 0
}
