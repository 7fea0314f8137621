package kubelet

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Soak: the daemon on a simulated time-sliced dgx-a100 against the real
// device manager, through kubelet restarts, allocations with GPUs failing
// and recovering, a config reload at a steady pace, and XID storms. Each
// phase repeats its work; goroutines and open fds must come back to where
// they were half-way, the live heap must not grow, RSS must stay within a
// generous bound, every health transition the test causes must reach the
// kubelet, no allocation may land on a device the daemon holds unhealthy or
// fail while healthy devices are free, and no log line may mention a panic.
// The goroutine bounds allow for what the kubelet itself keeps after a
// Register call that failed on its side (kubeletConnLeak), counted from
// its own registration metric; the end of the run logs which goroutines
// stayed.
//
// SOAK=long runs the full figures (`make soak`); the default is a short
// form for CI.

// soakScale is how much of each phase a soak does.
type soakScale struct {
	name         string
	restarts     int           // kubelet restarts, each followed by one allocation
	allocations  int           // allocations in the allocation phase
	healthCycles int           // GPUs lost and recovered during it
	reloadEvery  time.Duration // config reload pace
	reloadFor    time.Duration
	storms       int // XID storms
	stormFor     time.Duration
	stormRate    int // XID events per second
}

var soakScales = map[string]soakScale{
	"short": {name: "short", restarts: 10, allocations: 100, healthCycles: 4,
		reloadEvery: 500 * time.Millisecond, reloadFor: 4 * time.Second, storms: 1, stormFor: 2 * time.Second, stormRate: 1000},
	"long": {name: "long", restarts: 100, allocations: 1000, healthCycles: 16,
		reloadEvery: time.Second, reloadFor: time.Minute, storms: 5, stormFor: 10 * time.Second, stormRate: 1000},
}

const (
	// soakQuiet is the health quiet period: short, so recoveries are quick,
	// but far longer than a health change takes to reach the kubelet.
	soakQuiet = 300 * time.Millisecond
	// soakWindow is how many pods hold devices at once in the allocation
	// phase; with at most 2 replicas each they never need more than half
	// the healthy devices.
	soakWindow = 4
	// soakSlack is how far goroutines and open fds may be above an earlier
	// settled reading of the same run (a kubelet endpoint being replaced,
	// a gRPC transport closing late). A leak of one per restart, reload or
	// health cycle in a phase's second half exceeds it, in either form.
	soakSlack = 3
	// soakHeapSlack bounds live-heap growth (after GC) from half-way
	// through a phase to its end, and from the baseline to the end of the
	// run.
	soakHeapSlack = 8 * mib
	// soakRSSHeadroom bounds RSS above the baseline: loose on purpose, as
	// RSS follows the heap's high-water mark (the runtime returns memory
	// lazily) and the race detector's shadow memory; the heap bound is the
	// tight one.
	soakRSSHeadroom = 512 * mib
)

// Storm XIDs: fatal under the default policy, and application errors the
// default policy skips.
var (
	stormFatalXIDs   = []uint64{48, 63, 64, 74, 92, 94, 95, 119}
	stormSkippedXIDs = []uint64{13, 31, 43, 45, 68, 109}
)

func soakConfig(replicas int) string {
	return fmt.Sprintf("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: %d\n", replicas)
}

// soakPhase is one phase's figures.
type soakPhase struct {
	name                      string
	took                      time.Duration
	start, mid, end           usage
	peak                      soakSample
	heapStart, heapMid, heapE uint64
	note                      string
}

// soakRun is a soak in progress: the node, the daemon, what watches them,
// and the counts the summary reports.
type soakRun struct {
	t       *testing.T
	sc      soakScale
	k       *kubelet
	p       *plugin
	gpus    []string // GPU UUIDs by index
	sampler *usageSampler
	dlog    *soakLog // the daemon's
	klog    *soakLog // the kubelet's
	watch   *healthWatch

	configPath  string
	regs0       int64    // kubelet-received minus daemon-counted registrations at the baseline
	dBase       [][2]int // the daemon's logged transitions per GPU when the watch began
	replicas    int
	allocations int
	phases      []soakPhase
	cur         *soakPhase
}

func TestSoak(t *testing.T) {
	mode := os.Getenv("SOAK")
	if mode == "" {
		mode = "short"
	}
	sc, ok := soakScales[mode]
	if !ok {
		t.Fatalf("SOAK=%q: want short (the default, as CI runs it) or long (make soak)", mode)
	}
	r := &soakRun{t: t, sc: sc, dlog: newSoakLog("daemon"), klog: newSoakLog("kubelet"), replicas: 2}
	r.k = startKubeletLogged(t, r.klog.klogger())
	cfgFlag := configFile(t, soakConfig(r.replicas))
	r.configPath = strings.TrimPrefix(cfgFlag, "--config=")
	r.p = startPluginLogged(t, r.dlog.slogger(), "--simulate=dgx-a100", cfgFlag,
		"--health-quiet-period="+soakQuiet.String(), "--health-probe-interval=50ms")
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(r.dlog.tail())
			t.Log(r.klog.tail())
		}
	})
	began := time.Now()
	r.gpus = r.p.gpuUUIDs()
	r.k.waitCapacity(gpuResource, r.full())
	r.p.waitRegistered("first registration")

	// Warm up every path once, so one-time allocations (gRPC, klog, the
	// race detector's) are not counted as growth; then take the baseline.
	r.k.restart()
	r.k.waitCapacity(gpuResource, r.full())
	r.p.waitRegistered("warm-up restart")
	r.k.deletePod(r.admitChecked("warm-up", 2))
	r.sampler = startSampler(t, 100*time.Millisecond)
	r.regs0 = r.unacknowledged()
	baseline := checkNoLeak(t, currentUsage(t), 0)
	baseStacks := goroutineStacks()
	baseHeap := heapAfterGC()
	baseRSS, err := vmRSS()
	if err != nil {
		t.Fatal(err)
	}

	r.phase("kubelet restarts", r.restarts)
	r.watch = watchHealth(t, r.k, gpuResource, r.gpus)
	for _, uuid := range r.gpus {
		down, up := r.dlog.transitions(uuid)
		r.dBase = append(r.dBase, [2]int{down, up})
	}
	r.phase("allocations", r.allocate)
	r.phase("config reloads", r.reload)
	r.phase("XID storms", r.storms)

	// The end: every device healthy and allocatable at once, nothing
	// retained, nothing panicked.
	all := r.admitChecked("everything", int64(8*r.replicas))
	r.k.deletePod(all)
	r.watch.stop()
	end := checkNoLeak(t, baseline, 2*soakSlack+r.kubeletLeak())
	if end.Goroutines > baseline.Goroutines {
		// Within the slack, but worth knowing which ones stayed.
		t.Logf("goroutines at the end that were not there at the baseline:\n%s", grownStacks(baseStacks, goroutineStacks()))
	}
	endHeap := heapAfterGC()
	peak, samples, sampleErr := r.sampler.result()
	if sampleErr != nil {
		t.Errorf("sampling usage: %v", sampleErr)
	}
	endRSS, err := vmRSS()
	if err != nil {
		t.Fatal(err)
	}
	if endHeap > baseHeap+soakHeapSlack {
		t.Errorf("live heap after GC grew from %.1f MiB to %.1f MiB over the soak (allowed %d MiB)",
			float64(baseHeap)/mib, float64(endHeap)/mib, soakHeapSlack/mib)
	}
	if peak.RSS > baseRSS+soakRSSHeadroom {
		t.Errorf("RSS peaked at %.0f MiB, more than %d MiB above the baseline %.0f MiB",
			float64(peak.RSS)/mib, soakRSSHeadroom/mib, float64(baseRSS)/mib)
	}
	for _, l := range []*soakLog{r.dlog, r.klog} {
		if _, _, panics, n := l.stats(); n > 0 {
			t.Errorf("%d %s log lines mention a panic, first: %q", n, l.name, panics)
		}
	}

	// The figures, in one block to quote.
	var b strings.Builder
	fmt.Fprintf(&b, "soak %s (race detector %v): %s on a simulated dgx-a100, time-sliced, quiet period %s\n",
		sc.name, raceEnabled, time.Since(began).Round(time.Millisecond), soakQuiet)
	for _, ph := range r.phases {
		fmt.Fprintf(&b, "  %-16s %8s  goroutines %d→%d→%d (peak %d)  fds %d→%d→%d (peak %d)  heap %.1f→%.1f→%.1f MiB  peak RSS %.0f MiB\n    %s\n",
			ph.name, ph.took.Round(time.Millisecond),
			ph.start.Goroutines, ph.mid.Goroutines, ph.end.Goroutines, ph.peak.Goroutines,
			ph.start.FDs, ph.mid.FDs, ph.end.FDs, ph.peak.FDs,
			float64(ph.heapStart)/mib, float64(ph.heapMid)/mib, float64(ph.heapE)/mib, float64(ph.peak.RSS)/mib, ph.note)
	}
	dLines, dErrs, _, dPanics := r.dlog.stats()
	kLines, kErrs, _, kPanics := r.klog.stats()
	fmt.Fprintf(&b, "  whole run: goroutines %d baseline, %d peak, %d end; fds %d / %d / %d; RSS %.0f / %.0f / %.0f MiB; heap after GC %.1f → %.1f MiB; %d usage samples\n",
		baseline.Goroutines, peak.Goroutines, end.Goroutines, baseline.FDs, peak.FDs, end.FDs,
		float64(baseRSS)/mib, float64(peak.RSS)/mib, float64(endRSS)/mib, float64(baseHeap)/mib, float64(endHeap)/mib, samples)
	fmt.Fprintf(&b, "  Register calls the kubelet received beyond those the daemon counted (cancelled or refused; the kubelet may keep up to %d goroutines for each): %d; goroutines allowed for them: %d\n",
		kubeletConnLeak, r.unacknowledged()-r.regs0, r.kubeletLeak())
	fmt.Fprintf(&b, "  allocations through the device manager: %d in all; logs: daemon %d lines (%d errors), kubelet %d lines (%d errors); lines mentioning a panic: %d",
		r.allocations, dLines, dErrs, kLines, kErrs, dPanics+kPanics)
	t.Log(b.String())
}

// phase runs one phase and records its figures: usage settled at the start,
// half-way (fn calls mid) and at the end, each within soakSlack of the one
// before, and the live heap, which must not grow in the second half.
func (r *soakRun) phase(name string, fn func(mid func())) {
	t := r.t
	t.Helper()
	ph := &soakPhase{name: name}
	r.cur = ph
	defer func() { // also on t.Fatal, so a failure names its phase
		if t.Failed() {
			t.Logf("the soak failed in phase %q", name)
		}
	}()
	r.sampler.phase()
	ph.start = checkNoLeak(t, currentUsage(t), 0)
	ph.heapStart = heapAfterGC()
	began := time.Now()
	midDone := false
	fn(func() {
		midDone = true
		ph.mid = checkNoLeak(t, ph.start, soakSlack+r.kubeletLeak())
		ph.heapMid = heapAfterGC()
	})
	ph.took = time.Since(began)
	if !midDone {
		t.Fatalf("phase %s: never reached half-way", name)
	}
	ph.end = checkNoLeak(t, ph.mid, soakSlack+r.kubeletLeak())
	ph.heapE = heapAfterGC()
	ph.peak = r.sampler.phase()
	for _, u := range []usage{ph.start, ph.mid, ph.end} {
		ph.peak.Goroutines, ph.peak.FDs = max(ph.peak.Goroutines, u.Goroutines), max(ph.peak.FDs, u.FDs)
	}
	if ph.heapE > ph.heapMid+soakHeapSlack {
		t.Errorf("phase %s: live heap after GC grew from %.1f MiB half-way to %.1f MiB at the end (allowed %d MiB)",
			name, float64(ph.heapMid)/mib, float64(ph.heapE)/mib, soakHeapSlack/mib)
	}
	r.phases = append(r.phases, *ph)
	r.cur = nil
}

// unacknowledged is how many more Register calls the kubelet has received
// than the daemon has counted as successful.
func (r *soakRun) unacknowledged() int64 {
	return int64(kubeletRegistrations(r.t, gpuResource)) - int64(r.p.registrations(gpuResource))
}

// kubeletLeak is the goroutines the kubelet may have kept since the
// baseline for Register calls that failed after it dialled us back (see
// kubeletConnLeak): not ours, so allowed for.
func (r *soakRun) kubeletLeak() int {
	return kubeletConnLeak * int(max(0, r.unacknowledged()-r.regs0))
}

// full is the node's capacity under the config in force, all healthy.
func (r *soakRun) full() counts {
	n := int64(len(r.gpus) * r.replicas)
	return counts{Capacity: n, Allocatable: n}
}

// daemonSeen is the daemon's logged transitions for a GPU since the watch
// began.
func (r *soakRun) daemonSeen(gpu int) (down, up int) {
	down, up = r.dlog.transitions(r.gpus[gpu])
	return down - r.dBase[gpu][0], up - r.dBase[gpu][1]
}

// admitChecked admits a pod asking for n devices through the manager and
// checks what it got: n devices, none on the GPUs avoid (which the kubelet
// has seen unhealthy),
// every one on a GPU the daemon holds healthy, and the container's
// NVIDIA_VISIBLE_DEVICES naming exactly their GPUs. A refusal fails the
// test: the soak only asks when healthy devices are free.
func (r *soakRun) admitChecked(name string, n int64, avoid ...int) *v1.Pod {
	t := r.t
	t.Helper()
	pod := gpuPod(name, gpuResource, n)
	opts, err := r.k.admit(pod)
	if err != nil {
		t.Fatalf("allocation %d (%s, %d devices, %d healthy free): %v", r.allocations+1, name, n, r.k.capacity(gpuResource).Allocatable, err)
	}
	r.allocations++
	ids := r.k.allocated(pod, gpuResource)
	if int64(len(ids)) != n {
		t.Fatalf("allocation %s: the manager allocated %v, want %d devices", name, ids, n)
	}
	var gpus []string
	for _, id := range ids {
		gpu, replica, err := sharing.SplitReplicaID(id)
		if err != nil || replica < 0 || replica >= r.replicas {
			t.Errorf("allocation %s: device %q is not a replica <uuid>::<0..%d> (%v)", name, id, r.replicas-1, err)
		}
		if i := slices.Index(r.gpus, gpu); slices.Contains(avoid, i) {
			t.Errorf("allocation %s: device %s is on GPU %d, which the kubelet had seen unhealthy", name, id, i)
		}
		if ok, reason := r.p.d.Health().Check(gpu); !ok {
			t.Errorf("allocation %s: device %s is on a GPU the daemon holds unhealthy (%s)", name, id, reason)
		}
		if !slices.Contains(gpus, gpu) {
			gpus = append(gpus, gpu)
		}
	}
	slices.Sort(gpus)
	if env := sortedList(envMap(opts.Envs)["NVIDIA_VISIBLE_DEVICES"]); !slices.Equal(env, gpus) {
		t.Errorf("allocation %s: NVIDIA_VISIBLE_DEVICES=%v, want the allocated GPUs %v", name, env, gpus)
	}
	return pod
}

// restarts restarts the kubelet again and again with one GPU lost: every
// new manager must see it unhealthy from its first device list, we must
// register exactly once per restart, and an allocation must work through
// the new connection.
func (r *soakRun) restarts(mid func()) {
	t, k, p, node := r.t, r.k, r.p, r.p.d.SimNode()
	const lost = 7
	regs := p.registrations(gpuResource)
	if err := node.SetLost(lost, true); err != nil {
		t.Fatal(err)
	}
	full := r.full()
	degraded := counts{Capacity: full.Capacity, Allocatable: full.Allocatable - int64(r.replicas)}
	k.waitCapacity(gpuResource, degraded)
	began := time.Now()
	for i := range r.sc.restarts {
		if i == r.sc.restarts/2 {
			mid()
		}
		k.restart()
		k.waitUntil(gpuResource, "degraded "+degraded.String(), func(c counts) bool {
			if c.Allocatable > degraded.Allocatable {
				t.Errorf("restart %d: the new manager saw %s: the lost GPU's health was lost", i+1, c)
			}
			return c == degraded
		})
		p.waitRegistered(fmt.Sprintf("restart %d", i+1))
		k.deletePod(r.admitChecked(fmt.Sprintf("after-restart-%d", i+1), 1, lost))
	}
	took := time.Since(began)
	if err := node.SetLost(lost, false); err != nil {
		t.Fatal(err)
	}
	k.waitCapacity(gpuResource, full)
	if got := p.registrations(gpuResource); got != regs+uint64(r.sc.restarts) {
		t.Errorf("registrations: %d before %d restarts, %d after; want one per restart", regs, r.sc.restarts, got)
	}
	r.cur.note = fmt.Sprintf("%d restarts with GPU %d lost throughout (%.0f ms each on average), %d registrations, one allocation after each",
		r.sc.restarts, lost, float64(took.Milliseconds())/float64(r.sc.restarts), p.registrations(gpuResource)-regs)
}

// allocate admits and releases pods through the manager, in blocks; during
// each block one GPU is lost (probes find it), and between blocks it comes
// back after the quiet period. The kubelet must see every loss and every
// return, and no allocation may use the lost GPU or fail.
func (r *soakRun) allocate(mid func()) {
	t, k, node, w := r.t, r.k, r.p.d.SimNode(), r.watch
	cycles := r.sc.healthCycles
	var active []*v1.Pod
	began := time.Now()
	done := 0
	for b := range cycles {
		if b == cycles/2 {
			mid()
		}
		gpu := 4 + b%4 // the storms' first targets are GPUs 0-3
		down0, up0 := w.seen(gpu)
		if err := node.SetLost(gpu, true); err != nil {
			t.Fatal(err)
		}
		w.wait(t, fmt.Sprintf("block %d: GPU %d lost", b+1, gpu), func(h []bool, downs, _ []int) bool {
			return !h[gpu] && downs[gpu] == down0+1
		})
		perBlock := r.sc.allocations / cycles
		if b < r.sc.allocations%cycles {
			perBlock++
		}
		for j := range perBlock {
			pod := r.admitChecked(fmt.Sprintf("alloc-%d", done+j+1), int64(1+j%2), gpu)
			active = append(active, pod)
			if len(active) > soakWindow {
				k.deletePod(active[0])
				active = active[1:]
			}
		}
		done += perBlock
		if err := node.SetLost(gpu, false); err != nil {
			t.Fatal(err)
		}
		w.wait(t, fmt.Sprintf("block %d: GPU %d back after the quiet period", b+1, gpu), func(h []bool, _, ups []int) bool {
			return h[gpu] && ups[gpu] == up0+1
		})
	}
	for _, pod := range active {
		k.deletePod(pod)
	}
	took := time.Since(began)
	// Every transition the kubelet saw is one the daemon logged, and the
	// other way round.
	var kubeDown, daemonDown int
	for i := range r.gpus {
		down, up := w.seen(i)
		dDown, dUp := r.daemonSeen(i)
		kubeDown += down
		daemonDown += dDown
		if down != dDown || up != dUp {
			t.Errorf("GPU %d: the daemon logged %d unhealthy / %d healthy transitions, the kubelet saw %d / %d", i, dDown, dUp, down, up)
		}
	}
	if want := cycles; daemonDown != want {
		t.Errorf("the daemon logged %d unhealthy transitions, want %d (one per GPU lost)", daemonDown, want)
	}
	r.cur.note = fmt.Sprintf("%d allocations of 1-2 replicas (at most %d pods holding devices) in %s, %d GPU losses and returns, all seen by the kubelet (%d unhealthy transitions in all)",
		done, soakWindow, took.Round(time.Millisecond), cycles, kubeDown)
}

// reload rewrites the config file at a steady pace, switching replicas
// between 2 and 4: the kubelet must see each new capacity, the daemon must
// count each reload a success without re-registering, and an allocation
// after each must get a replica of the new config.
func (r *soakRun) reload(mid func()) {
	t, k, p := r.t, r.k, r.p
	path := r.configPath
	n := int(r.sc.reloadFor / r.sc.reloadEvery)
	regs := p.registrations(gpuResource)
	st0 := p.d.ReloadStatus()
	var took []time.Duration
	tick := time.NewTicker(r.sc.reloadEvery)
	defer tick.Stop()
	began := time.Now()
	for i := range n {
		if i == n/2 {
			mid()
		}
		<-tick.C
		r.replicas = 6 - r.replicas // 2 ↔ 4
		if err := os.WriteFile(path+".new", []byte(soakConfig(r.replicas)), 0o600); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := os.Rename(path+".new", path); err != nil {
			t.Fatal(err)
		}
		k.waitCapacity(gpuResource, r.full())
		took = append(took, time.Since(start))
		waitReloads(t, p, st0.Successes+uint64(i+1))
		k.deletePod(r.admitChecked(fmt.Sprintf("after-reload-%d", i+1), 1))
	}
	total := time.Since(began)
	st := p.d.ReloadStatus()
	if st.Failures != st0.Failures {
		t.Errorf("reloads: %d failures (last: %s), want none", st.Failures-st0.Failures, st.LastError)
	}
	if got := p.registrations(gpuResource); got != regs {
		t.Errorf("reloads re-registered %s: %d registrations before, %d after", gpuResource, regs, got)
	}
	slices.Sort(took)
	r.cur.note = fmt.Sprintf("%d reloads (replicas 2↔4) every %s for %s, %d applied; file rename → kubelet capacity p50 %s, max %s",
		n, r.sc.reloadEvery, total.Round(time.Millisecond), st.Successes-st0.Successes,
		took[len(took)/2].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond))
}

// waitReloads waits (bounded) until the daemon counts want successful
// reloads.
func waitReloads(t *testing.T, p *plugin, want uint64) {
	t.Helper()
	deadline := time.After(waitTimeout)
	for {
		ch := p.d.ReloadChanged()
		st := p.d.ReloadStatus()
		if st.Successes >= want {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("the daemon counted %d successful reloads within %v, want %d (last error %q)", st.Successes, waitTimeout, want, st.LastError)
		}
	}
}

// storms injects XID storms: every GPU gets events, half the GPUs (a
// different half each storm) get fatal ones among them. The kubelet must
// see each target go unhealthy and, once the storm is over and the quiet
// period has passed, healthy again; the other GPUs must never go
// unhealthy; and every event delivered must be handled or counted dropped.
func (r *soakRun) storms(mid func()) {
	t, node, w, mon := r.t, r.p.d.SimNode(), r.watch, r.p.d.HealthMonitor()
	var injected, delivered, fatal, handled, dropped, stormAllocs int
	var worstRate float64
	var recoveries []time.Duration
	for s := range r.sc.storms {
		if s == r.sc.storms/2 {
			mid()
		}
		targets := []int{0, 1, 2, 3}
		if s%2 == 1 {
			targets = []int{4, 5, 6, 7}
		}
		downs0, ups0 := make([]int, len(r.gpus)), make([]int, len(r.gpus))
		dDowns0 := make([]int, len(r.gpus))
		for i := range r.gpus {
			downs0[i], ups0[i] = w.seen(i)
			dDowns0[i], _ = r.daemonSeen(i)
		}
		events0 := mon.Status().Events
		_, dropped0 := node.EventStats()

		type result struct {
			st  stormStats
			err error
		}
		res := make(chan result, 1)
		go func() {
			st, err := xidStorm(node, r.sc.stormRate, r.sc.stormFor, func(n int) (int, uint64, bool) {
				gpu, round := n%len(r.gpus), n/len(r.gpus)
				if slices.Contains(targets, gpu) && round%2 == 0 {
					return gpu, stormFatalXIDs[(round/2)%len(stormFatalXIDs)], true
				}
				return gpu, stormSkippedXIDs[round%len(stormSkippedXIDs)], false
			})
			res <- result{st, err}
		}()
		w.wait(t, fmt.Sprintf("storm %d: GPUs %v unhealthy", s+1, targets), func(_ []bool, downs, _ []int) bool {
			for _, g := range targets {
				if downs[g] == downs0[g] {
					return false
				}
			}
			return true
		})
		// While the storm lasts, pods keep being admitted: only the other
		// GPUs' devices may be handed out, and none may be refused.
		var out result
	allocating:
		for {
			select {
			case out = <-res:
				break allocating
			default:
			}
			stormAllocs++
			r.k.deletePod(r.admitChecked(fmt.Sprintf("storm-%d-%d", s+1, stormAllocs), 1, targets...))
		}
		st, err := out.st, out.err
		if err != nil {
			t.Fatalf("storm %d: %v", s+1, err)
		}
		ended := time.Now()
		injected += st.Injected
		delivered += st.Delivered
		fatal += st.Fatal
		rate := float64(st.Injected) / st.Took.Seconds()
		if s == 0 || rate < worstRate {
			worstRate = rate
		}
		w.wait(t, fmt.Sprintf("storm %d: every GPU healthy again after the quiet period", s+1), func(h []bool, downs, ups []int) bool {
			for i := range h {
				if !h[i] || ups[i] != downs[i] {
					return false
				}
			}
			return true
		})
		recoveries = append(recoveries, time.Since(ended))

		// Every event delivered to the monitor's event set was handled or
		// dropped on a full queue; none vanished.
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		var st1 health.MonitorStatus
		err = mon.WaitFor(ctx, func(ms health.MonitorStatus) bool {
			st1 = ms
			_, d := node.EventStats()
			return int(ms.Events-events0)+d-dropped0 >= st.Delivered
		})
		cancel()
		_, dropped1 := node.EventStats()
		h, d := int(st1.Events-events0), dropped1-dropped0
		handled += h
		dropped += d
		if err != nil || h+d != st.Delivered {
			t.Errorf("storm %d: %d events delivered, the monitor handled %d and %d were dropped (%v)", s+1, st.Delivered, h, d, err)
		}
		for i := range r.gpus {
			down, up := w.seen(i)
			dDown, dUp := r.daemonSeen(i)
			if down > dDown || up > dUp {
				t.Errorf("storm %d: GPU %d: the kubelet saw %d unhealthy / %d healthy transitions, more than the daemon logged (%d / %d)",
					s+1, i, down, up, dDown, dUp)
			}
			if slices.Contains(targets, i) {
				if dDown == dDowns0[i] {
					t.Errorf("storm %d: GPU %d got fatal XIDs but the daemon logged no unhealthy transition", s+1, i)
				}
				continue
			}
			if down != downs0[i] || dDown != dDowns0[i] {
				t.Errorf("storm %d: GPU %d got only application XIDs but went unhealthy (kubelet saw %d, daemon logged %d)",
					s+1, i, down-downs0[i], dDown-dDowns0[i])
			}
		}
		if ok, reason := r.p.d.Health().Check(r.gpus...); !ok {
			t.Errorf("storm %d: after recovery the daemon still holds a GPU unhealthy: %s", s+1, reason)
		}
	}
	var kDown, kUp, dDown, dUp int
	for i := range r.gpus {
		down, up := w.seen(i)
		dd, du := r.daemonSeen(i)
		kDown, kUp, dDown, dUp = kDown+down, kUp+up, dDown+dd, dUp+du
	}
	slices.Sort(recoveries)
	r.cur.note = fmt.Sprintf("%d storm(s) of %s at %d/s (slowest achieved %.0f/s): %d XIDs injected (%d fatal), %d delivered, %d handled by the monitor, %d dropped; "+
		"%d allocations during the storms; healthy again %s-%s after a storm; transitions since the allocation phase: kubelet saw %d unhealthy / %d healthy, daemon logged %d / %d",
		r.sc.storms, r.sc.stormFor, r.sc.stormRate, worstRate, injected, fatal, delivered, handled, dropped, stormAllocs,
		recoveries[0].Round(time.Millisecond), recoveries[len(recoveries)-1].Round(time.Millisecond), kDown, kUp, dDown, dUp)
}
