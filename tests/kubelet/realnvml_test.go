package kubelet

// The production NVML path end to end: the gpu-plugin binary without
// --simulate, loading the fake libnvidia-ml.so.1 through the dynamic linker
// (go-nvml's dlopen, event sets from the library, error codes from C),
// against the real kubelet device manager, on both of the library's
// profiles. NVIDIA's plugin v0.20.0 ran the same scenarios on the same
// library (nvidia-device-plugin-compat.md §11); each test names what it
// did there.

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

var (
	healthy8  = counts{Capacity: 8, Allocatable: 8}
	degraded8 = counts{Capacity: 8, Allocatable: 7}
)

// profileNUMA is each built-in profile's NUMA node per GPU, as fakenvml.c
// defines them (its README: GPUs 0-3 on node 0, 4-7 on node 1).
var profileNUMA = map[string][]int{
	"dgx1-v100": {0, 0, 0, 0, 1, 1, 1, 1},
	"dgx-h100":  {0, 0, 0, 0, 1, 1, 1, 1},
}

// forEachProfile runs f as a subtest per fake profile; without the fake
// library the test skips first, with one line.
func forEachProfile(t *testing.T, f func(t *testing.T, profile string)) {
	fakeNVMLDir(t)
	for _, p := range fakeProfiles {
		t.Run(p, func(t *testing.T) { f(t, p) })
	}
}

// Registration: every GPU of the profile reaches the kubelet with its UUID
// and NUMA node; a pod asking for 2 gets NVIDIA_VISIBLE_DEVICES with both
// UUIDs, and the manager's GetPreferredAllocation call picks two GPUs with
// the most NVLinks between them on one NUMA node.
func TestRealNVMLRegistersAndAllocates(t *testing.T) {
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile})
		k.waitCapacity(gpuResource, healthy8)

		uuids := d.uuids()
		devs := k.devices(gpuResource)
		for i, u := range uuids {
			dev, ok := devs[u]
			if !ok {
				t.Errorf("GPU %d (%s): not among the manager's devices", i, u)
				continue
			}
			if want := int64(profileNUMA[profile][i]); dev.Topology == nil || len(dev.Topology.Nodes) != 1 || dev.Topology.Nodes[0].ID != want {
				t.Errorf("GPU %d (%s): manager topology %v, want NUMA node %d", i, u, dev.Topology, want)
			}
		}
		if len(devs) != len(uuids) {
			t.Errorf("manager knows %d devices, the profile has %d GPUs", len(devs), len(uuids))
		}

		pod := gpuPod("two-gpus", gpuResource, 2)
		opts, err := k.admit(pod)
		if err != nil {
			t.Fatalf("admitting a pod asking for 2 GPUs: %v", err)
		}
		ids := k.allocated(pod, gpuResource)
		if got := sortedList(envMap(opts.Envs)["NVIDIA_VISIBLE_DEVICES"]); len(ids) != 2 || !slices.Equal(got, ids) {
			t.Errorf("NVIDIA_VISIBLE_DEVICES %v for allocated %v, want the 2 allocated UUIDs", got, ids)
		}
		for _, id := range ids {
			if !slices.Contains(uuids, id) {
				t.Errorf("allocated %s is not a GPU of the profile %v", id, uuids)
			}
		}
		checkBestPair(t, d, ids)
	})
}

// checkBestPair checks that two allocated GPUs have as many NVLinks between
// them as any pair of the node, and share a NUMA node, per the inventory.
func checkBestPair(t *testing.T, d *realDaemon, ids []string) {
	t.Helper()
	inv := d.debugDevices().Inventory
	if inv == nil || len(ids) != 2 {
		t.Fatalf("no inventory (%v) or not a pair: %v", inv == nil, ids)
	}
	index := map[string]int{}
	for _, g := range inv.GPUs {
		index[g.UUID] = g.Index
	}
	links := inv.Topology.Links
	best := 0
	for i := range links {
		for j := range links[i] {
			if i != j {
				best = max(best, links[i][j].NVLinks)
			}
		}
	}
	a, b := index[ids[0]], index[ids[1]]
	if got := links[a][b].NVLinks; got != best {
		t.Errorf("GetPreferredAllocation gave GPUs %d and %d with %d NVLinks between them; the node has pairs with %d", a, b, got, best)
	}
	if inv.GPUs[a].NUMANode != inv.GPUs[b].NUMANode {
		t.Errorf("GetPreferredAllocation gave GPUs %d and %d on NUMA nodes %d and %d", a, b, inv.GPUs[a].NUMANode, inv.GPUs[b].NUMANode)
	}
}

// XIDs through the library's event set: XID 13 (an application error) is
// skipped, XID 79 (fallen off the bus) takes only its GPU out, with the
// reason in /debug/devices and on /metrics. NVIDIA: the same.
func TestRealNVMLXIDs(t *testing.T) {
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile, Flags: []string{"--health-quiet-period=1h"}})
		k.waitCapacity(gpuResource, healthy8)
		uuids := d.uuids()

		for range 3 {
			d.xid(2, 13)
		}
		start := time.Now()
		d.xid(6, 79)
		// Events are handled in order: once XID 79 shows, the XID 13s have
		// been seen and skipped.
		k.waitUntil(gpuResource, "allocatable 7 (GPU 6 only)", func(c counts) bool {
			if c.Allocatable < 7 {
				t.Errorf("allocatable %d: XID 13 took a GPU out", c.Allocatable)
			}
			return c == degraded8
		})
		t.Logf("XID 79 → allocatable 7 in %s", time.Since(start))
		devs := k.devices(gpuResource)
		if _, ok := devs[uuids[2]]; !ok {
			t.Errorf("GPU 2 (%s) not allocatable after three XID 13s", uuids[2])
		}
		if _, ok := devs[uuids[6]]; ok {
			t.Errorf("GPU 6 (%s) allocatable after XID 79", uuids[6])
		}
		checkHealth(t, d, map[string]string{uuids[6]: "XID 79"})
		_, metrics := d.httpGet("/metrics")
		for _, want := range []string{
			fmt.Sprintf(`gpu_plugin_xid_errors_total{gpu="2",uuid="%s",xid="13"} 3`, uuids[2]),
			fmt.Sprintf(`gpu_plugin_xid_errors_total{gpu="6",uuid="%s",xid="79"} 1`, uuids[6]),
		} {
			if !strings.Contains(metrics, want) {
				t.Errorf("/metrics lacks %s", want)
			}
		}
	})
}

// checkHealth checks /debug/devices: exactly the units in want are
// unhealthy, each with a reason containing want[unit].
func checkHealth(t *testing.T, d *realDaemon, want map[string]string) daemon.DebugDevices {
	t.Helper()
	doc := d.debugDevices()
	for unit, st := range doc.Health {
		sub, bad := want[unit]
		switch {
		case bad && st.Healthy:
			t.Errorf("/debug/devices: %s healthy, want unhealthy with %q", unit, sub)
		case bad && !strings.Contains(st.Reason, sub):
			t.Errorf("/debug/devices: %s unhealthy with reason %q, want it to name %q", unit, st.Reason, sub)
		case !bad && !st.Healthy:
			t.Errorf("/debug/devices: %s unhealthy (%s); only %v should be", unit, st.Reason, slices.Sorted(maps.Keys(want)))
		}
	}
	for unit := range want {
		if _, ok := doc.Health[unit]; !ok {
			t.Errorf("/debug/devices: no health entry for %s", unit)
		}
	}
	return doc
}

// Recovery: a lost GPU the library recovers, and a GPU that had XID 79 and
// keeps answering, both return to allocatable after the quiet period, with
// no restart. NVIDIA: never comes back.
func TestRealNVMLRecovery(t *testing.T) {
	const quiet = 300 * time.Millisecond
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile, Flags: []string{
			"--health-probe-interval=20ms", "--health-quiet-period=" + quiet.String()}})
		k.waitCapacity(gpuResource, healthy8)
		uuids := d.uuids()

		d.mustCtl("lost 4")
		k.waitCapacity(gpuResource, degraded8)
		checkHealth(t, d, map[string]string{uuids[4]: "GPU_IS_LOST"})
		back := time.Now()
		d.mustCtl("recover 4")
		if took := k.waitCapacity(gpuResource, healthy8); took < quiet {
			t.Errorf("GPU 4 returned %s after the library recovered it, before the %s quiet period", took, quiet)
		}
		t.Logf("recovered GPU 4 → allocatable 8 after %s (quiet period %s)", time.Since(back), quiet)

		// From before the XID: the quiet period runs from the event, which
		// the kubelet sees some milliseconds later.
		back = time.Now()
		d.xid(1, 79)
		k.waitCapacity(gpuResource, degraded8)
		k.waitCapacity(gpuResource, healthy8)
		if took := time.Since(back); took < quiet {
			t.Errorf("GPU 1 returned %s after XID 79, before the %s quiet period", took, quiet)
		}
		checkHealth(t, d, nil)
		if st := d.debugDevices().Health[uuids[1]]; !strings.Contains(st.Reason, "recovered") {
			t.Errorf("GPU 1's health after returning: %+v, want a reason saying it recovered", st)
		}
		pod := gpuPod("after-recovery", gpuResource, 8)
		if _, err := k.admit(pod); err != nil {
			t.Fatalf("a pod asking for all 8 GPUs after both recovered: %v", err)
		}
	})
}

// 20 kubelet restarts (KUBELET_RESTARTS overrides): each time the daemon
// registers again with its health table intact, and its threads and open
// fds stay flat. NVIDIA: every GPU comes back healthy; threads 10 → 28.
func TestRealNVMLKubeletRestarts(t *testing.T) {
	restarts := 20
	if s := os.Getenv("KUBELET_RESTARTS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("KUBELET_RESTARTS=%q: want a positive number", s)
		}
		restarts = n
	}
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile, Flags: []string{"--health-quiet-period=1h"}})
		k.waitCapacity(gpuResource, healthy8)
		sick := d.uuids()[3]
		d.xid(3, 79)
		k.waitCapacity(gpuResource, degraded8)

		// A few restarts first, so one-time allocations are not counted.
		regs, _ := d.registrations(gpuResource)
		restart := func() time.Duration {
			start := time.Now()
			k.restart()
			k.waitUntil(gpuResource, "capacity 8 with GPU 3 still out", func(c counts) bool {
				if c.Allocatable == 8 {
					t.Errorf("after a kubelet restart all 8 GPUs are allocatable: health was lost")
				}
				return c == degraded8
			})
			took := time.Since(start)
			if _, ok := k.devices(gpuResource)[sick]; ok {
				t.Errorf("after a kubelet restart GPU 3 (%s) is allocatable again", sick)
			}
			// Capacity shows before our Register call returns; a restart
			// in between would fail it.
			regs++
			d.waitRegistrations(gpuResource, regs)
			return took
		}
		for range 3 {
			restart()
		}
		before := d.usage()
		var took []time.Duration
		most := before
		for range restarts {
			took = append(took, restart())
			u := d.usage()
			most = procUsage{Threads: max(most.Threads, u.Threads), FDs: max(most.FDs, u.FDs)}
		}
		// Closed connections leave asynchronously. One thread of slack: the
		// Go runtime starts an OS thread when all of its threads are busy
		// (one sits in the NVML event wait) and keeps it; a leak per restart
		// would show as many.
		limit := procUsage{Threads: before.Threads + 1, FDs: before.FDs}
		after := d.settledUsage(limit, 10*time.Second)
		t.Logf("%d kubelet restarts: capacity back p50 %s, max %s; daemon %s before, %s after, at most %d threads and %d fds between",
			restarts, percentile(took, 0.5), slices.Max(took), before, after, most.Threads, most.FDs)
		if after.Threads > limit.Threads || after.FDs > limit.FDs {
			t.Errorf("%d kubelet restarts: daemon grew from %s to %s", restarts, before, after)
		}
		checkHealth(t, d, map[string]string{sick: "XID 79"})
		if n, _ := d.registrations(gpuResource); n != regs {
			t.Errorf("registrations: %d, want %d (once per kubelet start)", n, regs)
		}
	})
}

// settledUsage waits (bounded by within) until the daemon's threads and
// fds are no more than limit, then returns them; if they never get there
// it returns the last reading. Closed connections leave asynchronously.
func (d *realDaemon) settledUsage(limit procUsage, within time.Duration) procUsage {
	d.tb.Helper()
	var u procUsage
	_ = poll(within, func() bool {
		u = d.usage()
		return u.Threads <= limit.Threads && u.FDs <= limit.FDs
	})
	return u
}

// A GPU lost while running, whose calls fail with GPU_IS_LOST while the
// event wait keeps timing out, is found by probing and reported with its
// reason; events stay armed for the others. NVIDIA: not noticed.
func TestRealNVMLLostWhileRunning(t *testing.T) {
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile, Flags: []string{
			"--health-probe-interval=100ms", "--health-quiet-period=1h"}})
		k.waitCapacity(gpuResource, healthy8)
		uuids := d.uuids()

		start := time.Now()
		d.mustCtl("lost 5")
		k.waitCapacity(gpuResource, degraded8)
		t.Logf("lost GPU 5 → allocatable 7 in %s (probe interval 100ms)", time.Since(start))
		doc := checkHealth(t, d, map[string]string{uuids[5]: "GPU_IS_LOST"})
		if _, ok := k.devices(gpuResource)[uuids[5]]; ok {
			t.Errorf("lost GPU 5 still allocatable")
		}
		mon := doc.HealthMonitor
		if mon == nil {
			t.Fatal("/debug/devices has no healthMonitor")
		}
		if mon.WaitErrors != 0 {
			t.Errorf("the event wait failed %d times; in this scenario it only times out", mon.WaitErrors)
		}
		if mon.Mode != "events" || slices.Contains(mon.EventGPUs, 5) || len(mon.EventGPUs) != 7 {
			t.Errorf("monitor mode %q with events from GPUs %v, want events from the 7 others", mon.Mode, mon.EventGPUs)
		}
		if g := mon.GPUs[5]; g.Answering || !strings.Contains(g.LastProbeError, "GPU_IS_LOST") {
			t.Errorf("monitor's view of GPU 5: %+v, want not answering with GPU_IS_LOST", g)
		}
	})
}

// A GPU lost at start-up: the daemon starts, advertises the 7 others, and
// reports GPU 3 with its reason; when the library recovers it, the daemon
// re-scans and advertises it. NVIDIA: exits 1, the node shows 0 GPUs.
func TestRealNVMLLostAtStart(t *testing.T) {
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile, Env: []string{"FAKE_NVML_LOST=3"}, Flags: []string{
			"--health-probe-interval=50ms", "--health-quiet-period=200ms"}})
		k.waitCapacity(gpuResource, counts{Capacity: 7, Allocatable: 7})
		uuids := d.uuids()
		if _, ok := k.devices(gpuResource)[uuids[3]]; ok {
			t.Errorf("GPU 3 (%s), lost at start, is advertised", uuids[3])
		}

		doc := d.debugDevices()
		if g := doc.Inventory.GPUs[3]; !g.Lost || !strings.Contains(g.Problem, "GPU_IS_LOST") {
			t.Errorf("/debug/devices inventory GPU 3: lost %v, problem %q; want lost with GPU_IS_LOST", g.Lost, g.Problem)
		}
		if g := doc.HealthMonitor.GPUs[3]; g.Answering || !strings.Contains(g.LastProbeError, "GPU_IS_LOST") {
			t.Errorf("/debug/devices monitor GPU 3: %+v, want not answering with GPU_IS_LOST", g)
		}
		if code, body := d.httpGet("/readyz"); code != http.StatusOK {
			t.Errorf("/readyz with 7 healthy GPUs registered: %d %s", code, body)
		}
		out := runInventory(t, profile, []string{"FAKE_NVML_LOST=3"}, "--from", "http://"+d.metrics)
		if !regexp.MustCompile(`(?m)^.*\b3\b.*GPU_IS_LOST`).MatchString(out) {
			t.Errorf("gpu-plugin inventory --from the daemon does not show GPU 3 with GPU_IS_LOST:\n%s", out)
		}

		d.mustCtl("recover 3")
		k.waitCapacity(gpuResource, healthy8)
		if _, ok := k.devices(gpuResource)[uuids[3]]; !ok {
			t.Errorf("GPU 3 (%s) not allocatable after the library recovered it", uuids[3])
		}
	})
}

// An event wait that itself returns GPU_IS_LOST takes out only the lost
// GPU; the monitor then idles under 1% of a core and the log stays quiet.
// NVIDIA: all 8 GPUs unhealthy, then a busy loop at 54% CPU and 0.9 MB/s
// of log.
func TestRealNVMLEventWaitLost(t *testing.T) {
	const window = 5 * time.Second
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		// Default probe interval (5 s): the failing wait, not a probe,
		// must find the GPU.
		d := startReal(t, realOptions{Profile: profile, Flags: []string{"--health-quiet-period=1h"}})
		k.waitCapacity(gpuResource, healthy8)
		uuids := d.uuids()

		d.mustCtl("waitlost on")
		start := time.Now()
		d.mustCtl("lost 5")
		k.waitCapacity(gpuResource, degraded8)
		took := time.Since(start)
		t.Logf("event wait GPU_IS_LOST → allocatable 7 in %s", took)
		if took > 4*time.Second {
			t.Errorf("GPU 5 taken out after %s: that was the 5 s probe, not the failing wait", took)
		}
		checkHealth(t, d, map[string]string{uuids[5]: "GPU_IS_LOST"})
		devs := k.devices(gpuResource)
		for i, u := range uuids {
			if _, ok := devs[u]; ok == (i == 5) {
				t.Errorf("GPU %d (%s) allocatable: %v", i, u, ok)
			}
		}

		// Let the one-time transitions (re-arming without GPU 5, telemetry
		// noticing) pass, then measure.
		time.Sleep(time.Second)
		share, logged := d.cpuShare(window)
		t.Logf("after the lost wait: %.2f%% of a core, %d log lines over %s (load %s)", 100*share, logged, window, loadAverage())
		if share >= 0.01 {
			t.Errorf("daemon used %.2f%% of a core over %s after the wait returned GPU_IS_LOST, want < 1%%", 100*share, window)
		}
		if logged > 1 {
			lines, _ := d.log.since(d.log.Len() - logged)
			t.Errorf("%d log lines over %s, want a quiet log:\n%s", logged, window, strings.Join(lines, "\n"))
		}
		mon := d.debugDevices().HealthMonitor
		if mon.Mode != "events" || slices.Contains(mon.EventGPUs, 5) {
			t.Errorf("monitor mode %q with events from GPUs %v, want events re-armed without GPU 5", mon.Mode, mon.EventGPUs)
		}
	})
}

// NVML init fails (DRIVER_NOT_LOADED): the daemon exits non-zero with an
// error naming the cause and the fix, and calls nothing after the failed
// init; with --fail-on-init-error=false it stays up unready, registers
// nothing, and still calls nothing but the init.
func TestRealNVMLInitError(t *testing.T) {
	forEachProfile(t, func(t *testing.T, profile string) {
		t.Run("fail", func(t *testing.T) {
			k := startKubelet(t)
			d := startReal(t, realOptions{Profile: profile, NoWait: true,
				Env: []string{"FAKE_NVML_INIT_ERROR=9", "FAKE_NVML_TRACE=1"}})
			if code := d.waitExit(); code == 0 {
				t.Errorf("exit code 0 after NVML init failed, want non-zero")
			}
			out := d.log.String()
			for _, want := range []string{"ERROR_DRIVER_NOT_LOADED", "kernel driver is not loaded", "--fail-on-init-error=false"} {
				if !strings.Contains(out, want) {
					t.Errorf("output does not name %q:\n%s", want, out)
				}
			}
			// FAKE_NVML_TRACE logs the first call of every function:
			// "fakenvml[<pid>]: first call: <function>".
			var called []string
			for _, line := range strings.Split(out, "\n") {
				if _, fn, ok := strings.Cut(line, "]: first call: "); ok && strings.HasPrefix(line, "fakenvml[") {
					called = append(called, fn)
				}
			}
			if len(called) == 0 || slices.ContainsFunc(called, func(fn string) bool { return !strings.HasPrefix(fn, "nvmlInit") }) {
				t.Errorf("NVML functions called: %v, want only nvmlInit*", called)
			}
			checkNothingRegistered(t, k)
		})
		t.Run("stay up", func(t *testing.T) {
			k := startKubelet(t)
			d := startReal(t, realOptions{Profile: profile, Env: []string{"FAKE_NVML_INIT_ERROR=9"},
				Flags: []string{"--fail-on-init-error=false"}})
			if code, body := d.httpGet("/healthz"); code != http.StatusOK {
				t.Errorf("/healthz: %d %s, want 200", code, body)
			}
			code, body := d.httpGet("/readyz")
			if code != http.StatusServiceUnavailable || !strings.Contains(body, "NVML unavailable") || !strings.Contains(body, "DRIVER_NOT_LOADED") {
				t.Errorf("/readyz: %d %q, want 503 naming NVML and DRIVER_NOT_LOADED", code, body)
			}
			if doc := d.debugDevices(); !strings.Contains(doc.NVMLError, "kernel driver is not loaded") || doc.Inventory != nil {
				t.Errorf("/debug/devices: nvmlError %q, inventory %v; want the cause and no inventory", doc.NVMLError, doc.Inventory != nil)
			}
			checkNothingRegistered(t, k)
			if calls := d.calls(); len(calls) != 1 || calls["nvmlInit_v2"] != 1 {
				t.Errorf("NVML calls: %s, want only nvmlInit_v2=1", calls)
			}
		})
	})
}

// checkNothingRegistered waits longer than the daemon's socket poll (1 s)
// and checks that the manager has no GPU resource and that only
// kubelet.sock is in the directory.
func checkNothingRegistered(t *testing.T, k *kubelet) {
	t.Helper()
	time.Sleep(1500 * time.Millisecond) // a negative: nothing may appear in this time
	if c, _, _ := k.manager().GetCapacity(k.logger); len(c) != 0 {
		t.Errorf("the manager has resources %v; want none registered", c)
	}
	checkOnlyKubeletSocket(t)
}

func checkOnlyKubeletSocket(t *testing.T) {
	t.Helper()
	entries, err := os.ReadDir(pluginapi.DevicePluginPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 && e.Name() != "kubelet.sock" {
			t.Errorf("socket %s in the device-plugin directory", e.Name())
		}
	}
}

// SIGTERM: the process exits 0, removes its socket, and the manager sees
// the endpoint stop. NVIDIA: the same.
func TestRealNVMLSIGTERM(t *testing.T) {
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile})
		k.waitCapacity(gpuResource, healthy8)
		socket := filepath.Join(pluginapi.DevicePluginPath, sharing.SocketName(gpuResource))
		if _, err := os.Stat(socket); err != nil {
			t.Fatalf("our socket while running: %v", err)
		}
		code, took := d.terminate()
		t.Logf("SIGTERM → exit %d in %s", code, took)
		if code != 0 {
			t.Errorf("exit code %d after SIGTERM, want 0", code)
		}
		if _, err := os.Lstat(socket); !os.IsNotExist(err) {
			t.Errorf("our socket after SIGTERM: %v, want it removed", err)
		}
		checkOnlyKubeletSocket(t)
		k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 0})
	})
}

// Telemetry from the library: values set with `tel` are on /metrics under
// dcgm-exporter's names, for the right GPU, within one sampling interval
// (plus a margin for a busy machine).
func TestRealNVMLTelemetry(t *testing.T) {
	const interval = time.Second
	forEachProfile(t, func(t *testing.T, profile string) {
		d := startReal(t, realOptions{Profile: profile, Flags: append(noKubeletFlags(t), "--collect-interval="+interval.String())})
		g := d.profileGPUs()[1]
		util := regexp.MustCompile(`(?m)^DCGM_FI_DEV_GPU_UTIL\{[^}]*\bgpu="1"[^}]*\} 77$`)
		fb := regexp.MustCompile(`(?m)^DCGM_FI_DEV_FB_USED\{[^}]*\bgpu="1"[^}]*\} 12345$`)
		// Wait for a first sample, so the interval is running.
		if err := pollHTTP(func() bool {
			_, body := d.httpGet("/metrics")
			return strings.Contains(body, "DCGM_FI_DEV_GPU_UTIL{")
		}); err != nil {
			t.Fatal("no DCGM_FI_DEV_GPU_UTIL on /metrics")
		}
		start := time.Now()
		d.mustCtl("tel 1 util=77 fb=12345")
		var body string
		if err := pollHTTP(func() bool {
			_, body = d.httpGet("/metrics")
			return util.MatchString(body) && fb.MatchString(body)
		}); err != nil {
			t.Fatalf("GPU 1's util 77 and fb 12345 never showed on /metrics:\n%s", grepLines(body, "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"))
		}
		took := time.Since(start)
		t.Logf("tel → /metrics in %s (interval %s, load %s)", took, interval, loadAverage())
		if took > 2*interval {
			t.Errorf("the values took %s to show, more than one %s interval plus %s margin", took, interval, interval)
		}
		line := util.FindString(body)
		for _, want := range []string{`UUID="` + g.UUID + `"`, `pci_bus_id="` + g.BusID + `"`, `device="nvidia1"`} {
			if !strings.Contains(line, want) {
				t.Errorf("GPU 1's series %s lacks %s", line, want)
			}
		}
		if kv := keyValues(d.mustCtl("get 1")); kv["util"] != "77" || kv["fb"] != "12345" {
			t.Errorf("the library's own view of GPU 1: %v", kv)
		}
	})
}

// noKubeletFlags keep a daemon that runs without the device manager (and
// outside nsexec.sh's namespace) away from the host's kubelet: its plugin
// sockets go to a temporary directory and pod attribution is off.
func noKubeletFlags(t *testing.T) []string {
	return []string{"--kubelet-socket-dir=" + t.TempDir(), "--pod-resources-socket="}
}

func grepLines(body string, prefixes ...string) string {
	var out []string
	for _, l := range strings.Split(body, "\n") {
		for _, p := range prefixes {
			if strings.HasPrefix(l, p) {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}

// runInventory runs `gpu-plugin inventory ARGS` on the fake library with
// profile and returns its output.
func runInventory(t *testing.T, profile string, env []string, args ...string) string {
	t.Helper()
	tmp := t.TempDir()
	cmd := exec.Command(gpuPluginBinary(t), append([]string{"inventory", "--sys-root=" + tmp}, args...)...)
	// No control socket: this process only reads.
	cmd.Env = realEnv(fakeNVMLDir(t), profile, "", env)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	return string(out)
}

// The mapping: `gpu-plugin inventory -o json` lists the GPUs, UUIDs, PCI
// bus IDs, NUMA nodes and topology the profile defines: the built-in
// profiles, and a profile file whose values could not come from anywhere
// else (NUMA nodes out of order; sysfs is pointed at an empty directory).
func TestRealNVMLInventoryMapping(t *testing.T) {
	fakeNVMLDir(t)
	custom := filepath.Join(t.TempDir(), "mapping.profile")
	if err := os.WriteFile(custom, []byte(mappingProfile), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, profile string
		numa          []int
		topo          []string // rows of NV<n> or PCIe words, as the profile's topo/pcie lines combine
	}{
		{"dgx1-v100", "dgx1-v100", profileNUMA["dgx1-v100"], dgx1V100Topology},
		{"dgx-h100", "dgx-h100", profileNUMA["dgx-h100"], dgxH100Topology},
		{"profile file", custom, []int{1, 0, 1, 0}, mappingTopology},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// A daemon process holds the library that answers `get`; it
			// needs no kubelet.
			d := startReal(t, realOptions{Profile: tc.profile, Flags: noKubeletFlags(t)})
			want := d.profileGPUs()
			var doc daemon.DebugDevices
			out := runInventory(t, tc.profile, nil, "-o", "json")
			if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.Inventory == nil {
				t.Fatalf("inventory -o json: %v\n%s", err, out)
			}
			inv := doc.Inventory
			if doc.Simulated {
				t.Error("inventory says simulated")
			}
			if len(inv.GPUs) != len(want) {
				t.Fatalf("inventory lists %d GPUs, the profile has %d", len(inv.GPUs), len(want))
			}
			for i, g := range inv.GPUs {
				if g.Index != i || g.UUID != want[i].UUID || g.PCIBusID != want[i].BusID || g.NUMANode != tc.numa[i] {
					t.Errorf("GPU %d: inventory index %d, UUID %s, bus %s, NUMA %d; profile UUID %s, bus %s, NUMA %d",
						i, g.Index, g.UUID, g.PCIBusID, g.NUMANode, want[i].UUID, want[i].BusID, tc.numa[i])
				}
			}
			for i, row := range tc.topo {
				cells := strings.Fields(row)
				for j, cell := range cells {
					l := inv.Topology.Links[i][j]
					got := l.PCIe.String()
					if l.NVLinks > 0 {
						got = fmt.Sprintf("NV%d/%s", l.NVLinks, l.PCIe)
					}
					if got != cell {
						t.Errorf("topology GPU%d-GPU%d: inventory %s, profile %s", i, j, got, cell)
					}
				}
			}
		})
	}
}

// The built-in profiles' topology as fakenvml.c defines it: NV<n>/<PCIe>
// where GPUs have NVLinks (the PCIe relation under them), else the PCIe
// word.
var (
	dgx1V100Topology = []string{
		"X      NV1/PIX  NV1/NODE NV2/NODE NV2/SYS  SYS      SYS      SYS",
		"NV1/PIX  X      NV2/NODE NV1/NODE SYS      NV2/SYS  SYS      SYS",
		"NV1/NODE NV2/NODE X      NV2/PIX  SYS      SYS      NV1/SYS  SYS",
		"NV2/NODE NV1/NODE NV2/PIX  X      SYS      SYS      SYS      NV1/SYS",
		"NV2/SYS  SYS      SYS      SYS      X      NV1/PIX  NV1/NODE NV2/NODE",
		"SYS      NV2/SYS  SYS      SYS      NV1/PIX  X      NV2/NODE NV1/NODE",
		"SYS      SYS      NV1/SYS  SYS      NV1/NODE NV2/NODE X      NV2/PIX",
		"SYS      SYS      SYS      NV1/SYS  NV2/NODE NV1/NODE NV2/PIX  X",
	}
	dgxH100Topology = func() []string {
		var rows []string
		for i := range 8 {
			var cells []string
			for j := range 8 {
				switch {
				case i == j:
					cells = append(cells, "X")
				case i/4 == j/4:
					cells = append(cells, "NV18/NODE")
				default:
					cells = append(cells, "NV18/SYS")
				}
			}
			rows = append(rows, strings.Join(cells, " "))
		}
		return rows
	}()
)

// mappingProfile is a profile file for the fake library: NUMA nodes out of
// order, bus IDs no built-in profile uses, one NVLink pair and PCIe
// relations of every kind.
const mappingProfile = `name mapping-check
driver 560.35.03
cuda 12060
gpu GPU-0a0b0c0d-0000-4000-8000-00000000a001 00000000:1B:00.0 24576 1 8.9 Nvidia Ada 0x27b810de NVIDIA L4
gpu GPU-0a0b0c0d-0000-4000-8000-00000000a002 00000000:3E:00.0 24576 0 8.9 Nvidia Ada 0x27b810de NVIDIA L4
gpu GPU-0a0b0c0d-0000-4000-8000-00000000a003 00000000:88:00.0 24576 1 8.9 Nvidia Ada 0x27b810de NVIDIA L4
gpu GPU-0a0b0c0d-0000-4000-8000-00000000a004 00000000:C1:00.0 24576 0 8.9 Nvidia Ada 0x27b810de NVIDIA L4
topo X    SYS  NV4  SYS
topo SYS  X    SYS  PXB
topo NV4  SYS  X    SYS
topo SYS  PXB  SYS  X
pcie X    SYS  PHB  SYS
pcie SYS  X    SYS  PXB
pcie PHB  SYS  X    SYS
pcie SYS  PXB  SYS  X
`

var mappingTopology = []string{
	"X       SYS  NV4/PHB SYS",
	"SYS     X    SYS     PXB",
	"NV4/PHB SYS  X       SYS",
	"SYS     PXB  SYS     X",
}

// The hot paths make no NVML call: Allocate, GetPreferredAllocation (over
// the plugin socket, as the kubelet calls them) and a /metrics scrape,
// counted by the library itself. NVIDIA: about 2,000 NVML calls per
// GetPreferredAllocation.
func TestRealNVMLHotPathsMakeNoNVMLCalls(t *testing.T) {
	forEachProfile(t, func(t *testing.T, profile string) {
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile, Flags: quietBackgroundFlags})
		k.waitCapacity(gpuResource, healthy8)
		for _, p := range measureHotPathCalls(t, d, 1000, 1000, 100) {
			t.Logf("%s", p)
			if len(p.hot) > 0 {
				t.Errorf("%d × %s made NVML calls: %s", p.n, p.name, p.hot)
			}
		}
	})
}

// quietBackgroundFlags confine the daemon's own NVML activity to one known
// function during a measurement: telemetry samples once at start and then
// hourly (its snapshot stays fresh, so scrapes serve it as always), probes
// run hourly and re-scans never, which leaves the health monitor's
// nvmlEventSetWait, one call per 200 ms wait.
var quietBackgroundFlags = []string{"--collect-interval=1h", "--health-probe-interval=1h", "--rescan-interval=0"}

// backgroundWait is the one NVML function the daemon calls by itself under
// quietBackgroundFlags, and its period (health.MonitorOptions.WaitTimeout's
// default).
const (
	backgroundWait       = "nvmlEventSetWait_v2"
	backgroundWaitPeriod = 200 * time.Millisecond
)

// hotPathCalls is one hot path's NVML calls over n operations: hot is
// every call not attributable to the background wait (must be empty),
// waits the background waits counted in the same window.
type hotPathCalls struct {
	name    string
	n       int
	took    time.Duration
	hot     nvmlCalls
	waits   uint64
	allowed uint64 // most waits the window can hold
}

func (p hotPathCalls) String() string {
	return fmt.Sprintf("%d × %s in %s: NVML calls %s (background %s: %d, at most %d in the window)",
		p.n, p.name, p.took.Round(time.Millisecond), p.hot, backgroundWait, p.waits, p.allowed)
}

// measureHotPathCalls runs allocs Allocate calls, prefs
// GetPreferredAllocation calls (both over the plugin socket) and scrapes
// scrapes of /metrics against a daemon started with quietBackgroundFlags,
// snapshotting the library's call counts around each. Any call other than
// the monitor's event wait lands in hot; the waits are checked against the
// window's length, so a hot path calling nvmlEventSetWait would show too.
func measureHotPathCalls(t *testing.T, d *realDaemon, allocs, prefs, scrapes int) []hotPathCalls {
	t.Helper()
	// The one-time work must be done: a first telemetry sample on /metrics,
	// the first probe round and the event set armed.
	if err := pollHTTP(func() bool {
		_, body := d.httpGet("/metrics")
		mon := d.debugDevices().HealthMonitor
		return strings.Contains(body, "DCGM_FI_DEV_GPU_UTIL{") && mon != nil && mon.Mode == "events" && mon.ProbeRounds > 0
	}); err != nil {
		t.Fatal("the daemon never finished its first sample and probe round")
	}
	uuids := d.uuids()
	client := d.pluginClient(gpuResource)
	ctx := context.Background()
	phases := []struct {
		name string
		n    int
		op   func(i int) error
	}{
		{"Allocate (2 GPUs)", allocs, func(i int) error {
			_, err := client.Allocate(ctx, &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{
				{DevicesIds: []string{uuids[i%8], uuids[(i+1)%8]}}}})
			return err
		}},
		{"GetPreferredAllocation (2 of 8)", prefs, func(i int) error {
			_, err := client.GetPreferredAllocation(ctx, &pluginapi.PreferredAllocationRequest{ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{
				{AvailableDeviceIDs: uuids, AllocationSize: int32(2 + i%3*2)}}}) // sizes 2, 4, 6
			return err
		}},
		{"scrape of /metrics", scrapes, func(int) error {
			code, body := d.httpGet("/metrics")
			if code != http.StatusOK || !strings.Contains(body, "DCGM_FI_DEV_GPU_UTIL{") {
				return fmt.Errorf("/metrics: %d without DCGM_FI_DEV_GPU_UTIL", code)
			}
			return nil
		}},
	}
	var out []hotPathCalls
	for _, ph := range phases {
		before, start := d.calls(), time.Now()
		for i := range ph.n {
			if err := ph.op(i); err != nil {
				t.Fatalf("%s %d: %v", ph.name, i, err)
			}
		}
		took := time.Since(start)
		diff := d.calls().minus(before)
		p := hotPathCalls{name: ph.name, n: ph.n, took: took, waits: diff[backgroundWait],
			allowed: uint64(took/backgroundWaitPeriod) + 2}
		delete(diff, backgroundWait)
		p.hot = diff
		if p.waits > p.allowed {
			t.Errorf("%s: %d × %s in %s; the monitor alone makes at most %d", ph.name, p.waits, backgroundWait, took, p.allowed)
		}
		out = append(out, p)
	}
	return out
}
