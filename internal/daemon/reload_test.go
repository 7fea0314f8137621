package daemon

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// rlEnv is a daemon on a simulated node with a config file, serving a
// stand-in kubelet over real unix sockets.
type rlEnv struct {
	t       testing.TB
	d       *Daemon
	k       *fakekubelet.Kubelet
	dir     string // the device-plugin directory
	cfgPath string
	logs    *testkit.Buffer
	// debounce overrides the reload debounce (default 20 ms in tests).
	debounce time.Duration
}

const waitLimit = 15 * time.Second

// startReloadEnv starts a daemon for profile with configDoc as its config
// file. Re-scans and labels are off unless args turn them on.
func startReloadEnv(t testing.TB, profile, configDoc string, args ...string) *rlEnv {
	t.Helper()
	dir, err := os.MkdirTemp("", "gpr") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &rlEnv{t: t, dir: dir, cfgPath: filepath.Join(t.TempDir(), "config.yaml"), logs: &testkit.Buffer{}}
	e.write(configDoc)
	return e.start(profile, args...)
}

func (e *rlEnv) start(profile string, args ...string) *rlEnv {
	t := e.t
	t.Helper()
	k, err := fakekubelet.Start(e.dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	e.k = k
	base := []string{"--simulate=" + profile, "--config=" + e.cfgPath, "--kubelet-socket-dir=" + e.dir,
		"--metrics-address=", "--rescan-interval=0", "--node-labels=false", "--node-name=reload-test"}
	cfg, _, err := config.Load("gpu-plugin", append(base, args...), func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(cfg, slog.New(slog.NewTextHandler(e.logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	d.rl.debounce = 20 * time.Millisecond
	if e.debounce != 0 {
		d.rl.debounce = max(e.debounce, 0)
	}
	e.d = d
	runUntilCleanup(t, d)
	return e
}

// runUntilCleanup runs d until the test ends, then checks that it stopped
// cleanly and closes it.
func runUntilCleanup(t testing.TB, d *Daemon) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("daemon Run: %v", err)
			}
		case <-time.After(waitLimit):
			t.Errorf("daemon Run did not return within %v of cancel", waitLimit)
		}
		d.Close()
	})
}

// write replaces the config file the way editors and kubectl cp do: a new
// file renamed over the old one.
func (e *rlEnv) write(doc string) {
	e.t.Helper()
	tmp := e.cfgPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, e.cfgPath); err != nil {
		e.t.Fatal(err)
	}
}

// waitKubelet waits until cond holds for the stand-in kubelet.
func (e *rlEnv) waitKubelet(what string, cond func(k *fakekubelet.Kubelet) bool) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := e.k.WaitFor(ctx, cond); err != nil {
		e.t.Fatalf("waiting for %s: %v (events: %+v)", what, err, e.k.Events())
	}
}

func (e *rlEnv) waitCapacity(resource string, capacity, allocatable int) {
	e.t.Helper()
	e.waitKubelet(resource+" capacity", func(k *fakekubelet.Kubelet) bool {
		c, a := k.Capacity(resource)
		return c == capacity && a == allocatable
	})
}

// waitStatus waits until cond holds for the reload machinery's counters.
func (e *rlEnv) waitStatus(what string, cond func(s ReloadStatus, unchangedChecks uint64) bool) ReloadStatus {
	e.t.Helper()
	deadline := time.After(waitLimit)
	for {
		ch := e.d.ReloadChanged()
		e.d.rl.stats.mu.Lock()
		checks := e.d.rl.stats.unchangedChecks
		e.d.rl.stats.mu.Unlock()
		if s := e.d.ReloadStatus(); cond(s, checks) {
			return s
		}
		select {
		case <-ch:
		case <-deadline:
			e.t.Fatalf("waiting for %s: status %+v", what, e.d.ReloadStatus())
		}
	}
}

func (e *rlEnv) sockets() []string {
	e.t.Helper()
	entries, err := os.ReadDir(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, en := range entries {
		if en.Type()&os.ModeSocket != 0 {
			out = append(out, en.Name())
		}
	}
	return out
}

// waitListed waits until exactly these resources are registered and each
// has sent its device list.
func (e *rlEnv) waitListed(resources []string) {
	e.t.Helper()
	e.waitKubelet("every resource's device list", func(k *fakekubelet.Kubelet) bool {
		for _, r := range resources {
			if c, _ := k.Capacity(r); c == 0 {
				return false
			}
		}
		return slices.Equal(k.Resources(), resources)
	})
}

// eventsFor counts the kubelet's observations of one resource by kind.
func (e *rlEnv) eventsFor(resource string) map[string]int {
	out := map[string]int{}
	for _, ev := range e.k.Events() {
		if ev.Resource == resource {
			out[ev.Kind]++
		}
	}
	return out
}

func healthOf(devs []*pluginapi.Device, id string) string {
	for _, d := range devs {
		if d.ID == id {
			return d.Health
		}
	}
	return "absent"
}

const tsConfig = `version: v1
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: 2
`

// TestReloadValidInvalidValid walks a config through valid, invalid and
// valid again, checking sockets, what each stream sent, health and metrics.
func TestReloadValidInvalidValid(t *testing.T) {
	e := startReloadEnv(t, "dgx-h100", tsConfig)
	e.waitCapacity("nvidia.com/gpu", 16, 16)
	gpu5 := e.d.Inventory().GPUs[5].UUID
	e.d.Health().SetUnhealthy(gpu5, "test: XID 79")
	e.waitCapacity("nvidia.com/gpu", 16, 14)
	if got := e.sockets(); !slices.Equal(got, []string{"kubelet.sock", "nvidia-gpu.sock"}) {
		t.Fatalf("sockets at start: %v", got)
	}
	before := e.eventsFor("nvidia.com/gpu")

	// Invalid: rejected, counted, logged once; nothing re-advertised.
	bad := strings.Replace(tsConfig, "replicas: 2", "replicas: 1", 1)
	e.write(bad)
	st := e.waitStatus("the rejected reload", func(s ReloadStatus, _ uint64) bool { return s.Failures == 1 })
	if st.LastReloadOK || !strings.Contains(st.LastError, "sharing.timeSlicing.resources[0].replicas: 1 is not allowed") {
		t.Errorf("status after an invalid config: %+v", st)
	}
	e.d.rl.stats.mu.Lock()
	checked := e.d.rl.stats.unchangedChecks
	e.d.rl.stats.mu.Unlock()
	e.write(bad) // the same content again: not re-evaluated, not re-logged
	e.waitStatus("the unchanged check", func(_ ReloadStatus, checks uint64) bool { return checks > checked })
	if st := e.d.ReloadStatus(); st.Failures != 1 || e.logs.Count("config reload rejected") != 1 {
		t.Errorf("the same invalid file was counted %d times and logged %d times; want once each", st.Failures, e.logs.Count("config reload rejected"))
	}
	if c, a := e.k.Capacity("nvidia.com/gpu"); c != 16 || a != 14 {
		t.Errorf("after an invalid config the old one must stay: capacity %d/%d, want 16/14", c, a)
	}
	if got := e.eventsFor("nvidia.com/gpu"); !equalCounts(got, before) {
		t.Errorf("an invalid config changed the stream: events %v, were %v", got, before)
	}

	// Valid: GPUs 0-3 shared ×4 under a new name, 4-7 stay whole.
	e.write(`version: v1
extensions: {resourceCustomization: true}
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      rename: nvidia.com/gpu.shared
      devices: [0, 1, 2, 3]
      replicas: 4
`)
	e.waitCapacity("nvidia.com/gpu.shared", 16, 16)
	e.waitCapacity("nvidia.com/gpu", 4, 3)
	if got := e.sockets(); !slices.Equal(got, []string{"kubelet.sock", "nvidia-gpu.shared.sock", "nvidia-gpu.sock"}) {
		t.Errorf("sockets after the valid reload: %v", got)
	}
	if h := healthOf(e.k.Devices("nvidia.com/gpu"), gpu5); h != pluginapi.Unhealthy {
		t.Errorf("GPU 5's health did not survive the reload: %s", h)
	}
	after := e.eventsFor("nvidia.com/gpu")
	if after["registered"] != before["registered"] || after["stream-ended"] != 0 || after["devices"] <= before["devices"] {
		t.Errorf("nvidia.com/gpu must keep its stream and send the new list on it: events %v, were %v", after, before)
	}

	// Valid: sharing removed; the shared resource's stream and socket go.
	e.write("version: v1\n")
	e.waitCapacity("nvidia.com/gpu", 8, 7)
	e.waitKubelet("the shared stream to end", func(k *fakekubelet.Kubelet) bool {
		return e.eventsFor("nvidia.com/gpu.shared")["stream-ended"] == 1
	})
	if got := e.sockets(); !slices.Equal(got, []string{"kubelet.sock", "nvidia-gpu.sock"}) {
		t.Errorf("sockets after removing sharing: %v", got)
	}
	st = e.waitStatus("the reloads", func(s ReloadStatus, _ uint64) bool { return s.Successes == 2 })
	if !st.LastReloadOK || st.Failures != 1 {
		t.Errorf("final status: %+v", st)
	}
	if err := testutil.CollectAndCompare(e.d.rl, strings.NewReader(`
# HELP gpu_plugin_config_reloads_total Config reloads (file change, ConfigMap update, SIGHUP) by result; a failure leaves the previous config in force.
# TYPE gpu_plugin_config_reloads_total counter
gpu_plugin_config_reloads_total{result="failure"} 1
gpu_plugin_config_reloads_total{result="success"} 2
# HELP gpu_plugin_config_last_reload_successful 1 if the last config reload was applied (or none was tried), 0 if it was rejected.
# TYPE gpu_plugin_config_last_reload_successful gauge
gpu_plugin_config_last_reload_successful 1
`), "gpu_plugin_config_reloads_total", "gpu_plugin_config_last_reload_successful"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(e.d.rl); err != nil || len(problems) > 0 {
		t.Errorf("metric lint: %v %v", problems, err)
	}
}

func equalCounts(a, b map[string]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}

// TestReloadKeepsUnchangedStreams shares one MIG resource by reload: only
// that resource's list changes; no resource re-registers.
func TestReloadKeepsUnchangedStreams(t *testing.T) {
	e := startReloadEnv(t, "dgx-a100-mig", "version: v1\nflags:\n  migStrategy: mixed\n")
	resources := []string{"nvidia.com/gpu", "nvidia.com/mig-1g.5gb", "nvidia.com/mig-1g.5gb.me", "nvidia.com/mig-2g.10gb",
		"nvidia.com/mig-3g.20gb", "nvidia.com/mig-4g.20gb", "nvidia.com/mig-7g.40gb"}
	e.waitListed(resources)
	before := map[string]map[string]int{}
	for _, r := range resources {
		before[r] = e.eventsFor(r)
	}
	e.write("version: v1\nflags:\n  migStrategy: mixed\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/mig-1g.5gb, replicas: 2}\n")
	e.waitCapacity("nvidia.com/mig-1g.5gb", 18, 18)
	e.waitStatus("the reload", func(s ReloadStatus, _ uint64) bool { return s.Successes == 1 })
	for _, r := range resources {
		got := e.eventsFor(r)
		if r == "nvidia.com/mig-1g.5gb" {
			if got["registered"] != 1 || got["stream-ended"] != 0 {
				t.Errorf("%s must change on its open stream: %v", r, got)
			}
			continue
		}
		if !equalCounts(got, before[r]) {
			t.Errorf("%s did not change but its stream did: %v, were %v", r, got, before[r])
		}
	}
}

// TestReloadConfigMapSymlinkSwap updates a config mounted the way the
// kubelet mounts a ConfigMap: config.yaml → ..data/config.yaml, with
// ..data swapped atomically to a new timestamped directory.
func TestReloadConfigMapSymlinkSwap(t *testing.T) {
	mount := t.TempDir()
	generation := 0
	publish := func(doc string) {
		generation++
		ts := filepath.Join(mount, "..2026_01_01_00_00_0"+string(rune('0'+generation)))
		if err := os.Mkdir(ts, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ts, "config.yaml"), []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
		old, _ := os.Readlink(filepath.Join(mount, "..data"))
		if err := os.Symlink(filepath.Base(ts), filepath.Join(mount, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(mount, "..data_tmp"), filepath.Join(mount, "..data")); err != nil {
			t.Fatal(err)
		}
		if old != "" {
			if err := os.RemoveAll(filepath.Join(mount, old)); err != nil {
				t.Fatal(err)
			}
		}
	}
	publish(tsConfig)
	if err := os.Symlink("..data/config.yaml", filepath.Join(mount, "config.yaml")); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "gpr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := (&rlEnv{t: t, dir: dir, cfgPath: filepath.Join(mount, "config.yaml"), logs: &testkit.Buffer{}}).start("dgx-h100")
	e.waitCapacity("nvidia.com/gpu", 16, 16)
	for i, replicas := range []string{"3", "5", "2"} {
		publish(strings.Replace(tsConfig, "replicas: 2", "replicas: "+replicas, 1))
		n := 8 * int(replicas[0]-'0')
		e.waitCapacity("nvidia.com/gpu", n, n)
		e.waitStatus("the reload", func(s ReloadStatus, _ uint64) bool { return s.Successes == uint64(i+1) })
	}
	if st := e.d.ReloadStatus(); st.Failures != 0 {
		t.Errorf("a ConfigMap swap must never be seen half done: %+v", st)
	}
}

// TestReloadOnRequest is what SIGHUP does (cmd/gpu-plugin routes the signal
// to Daemon.Reload): with the file watch off, the change applies only when
// asked.
func TestReloadOnRequest(t *testing.T) {
	e := startReloadEnv(t, "dgx-h100", "version: v1\n", "--watch-config=false")
	e.waitCapacity("nvidia.com/gpu", 8, 8)
	e.write(tsConfig)
	e.d.Reload()
	e.waitCapacity("nvidia.com/gpu", 16, 16)
	st := e.waitStatus("the requested reload", func(s ReloadStatus, _ uint64) bool { return s.Successes == 1 && s.Rescans["unchanged"] == 1 })
	if st.Failures != 0 {
		t.Errorf("status: %+v", st)
	}
	e.d.Reload() // same content: forced, so counted again
	e.waitStatus("the second request", func(s ReloadStatus, _ uint64) bool { return s.Successes == 2 && s.Rescans["unchanged"] == 2 })
}

// TestRescanMIGLayout re-partitions GPUs under a running daemon: the
// periodic re-scan re-advertises the MIG resources that changed, and
// nothing else moves; a device allocated before stays allocatable.
func TestRescanMIGLayout(t *testing.T) {
	labelsDir := t.TempDir()
	labelsFile := filepath.Join(labelsDir, "gpu-plugin")
	e := startReloadEnv(t, "dgx-a100-mig", "version: v1\nflags:\n  migStrategy: mixed\n",
		"--rescan-interval=100ms", "--node-labels=true", "--labels-file="+labelsFile)
	e.waitListed([]string{"nvidia.com/gpu", "nvidia.com/mig-1g.5gb", "nvidia.com/mig-1g.5gb.me", "nvidia.com/mig-2g.10gb",
		"nvidia.com/mig-3g.20gb", "nvidia.com/mig-4g.20gb", "nvidia.com/mig-7g.40gb"})
	held := e.d.Inventory().GPUs[2].MIGDevices[0].UUID // a 3g.20gb a pod holds
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if _, err := e.k.Allocate(ctx, "nvidia.com/mig-3g.20gb", held); err != nil {
		t.Fatal(err)
	}
	untouched := []string{"nvidia.com/gpu", "nvidia.com/mig-1g.5gb", "nvidia.com/mig-1g.5gb.me", "nvidia.com/mig-2g.10gb", "nvidia.com/mig-4g.20gb"}
	before := map[string]map[string]int{}
	for _, r := range append(untouched, "nvidia.com/mig-3g.20gb") {
		before[r] = e.eventsFor(r)
	}

	// mig-parted turns GPU 3's 7g.40gb into two 3g.20gb.
	if err := e.d.SimNode().SetMIGLayout(3, true, []string{"3g.20gb", "3g.20gb"}); err != nil {
		t.Fatal(err)
	}
	e.waitCapacity("nvidia.com/mig-3g.20gb", 5, 5)
	e.waitKubelet("mig-7g.40gb's stream to end", func(k *fakekubelet.Kubelet) bool {
		return e.eventsFor("nvidia.com/mig-7g.40gb")["stream-ended"] == 1
	})
	if slices.Contains(e.sockets(), "nvidia-mig-7g.40gb.sock") {
		t.Errorf("the socket of a resource that no longer exists remains: %v", e.sockets())
	}
	for _, r := range untouched {
		if got := e.eventsFor(r); !equalCounts(got, before[r]) {
			t.Errorf("%s was not re-partitioned but its stream changed: %v, were %v", r, got, before[r])
		}
	}
	if got := e.eventsFor("nvidia.com/mig-3g.20gb"); got["registered"] != before["nvidia.com/mig-3g.20gb"]["registered"] {
		t.Errorf("mig-3g.20gb re-registered instead of updating its stream: %v", got)
	}
	if h := healthOf(e.k.Devices("nvidia.com/mig-3g.20gb"), held); h != pluginapi.Healthy {
		t.Errorf("the held MIG device is %s after the re-scan; want it still advertised and healthy", h)
	}
	if _, err := e.k.Allocate(ctx, "nvidia.com/mig-3g.20gb", held); err != nil {
		t.Errorf("the held device is no longer allocatable: %v", err)
	}
	if g := e.d.Inventory().GPUs[3]; len(g.MIGDevices) != 2 {
		t.Errorf("the daemon's inventory did not follow: %+v", g.MIGDevices)
	}
	e.waitLabels(labelsFile, "nvidia.com/mig-3g.20gb.count=5", "nvidia.com/mig-7g.40gb.count")

	// A whole GPU is partitioned: nvidia.com/gpu shrinks, 1g.5gb grows.
	if err := e.d.SimNode().SetMIGLayout(6, true, []string{"1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb"}); err != nil {
		t.Fatal(err)
	}
	e.waitCapacity("nvidia.com/gpu", 2, 2)
	e.waitCapacity("nvidia.com/mig-1g.5gb", 16, 16)
	e.waitLabels(labelsFile, "nvidia.com/mig-1g.5gb.count=16", "")
	if st := e.d.ReloadStatus(); st.Rescans["changed"] != 2 || st.Rescans["failure"] != 0 {
		t.Errorf("re-scans: %+v", st.Rescans)
	}
}

// waitLabels waits until the labels file holds want and lacks absent.
func (e *rlEnv) waitLabels(path, want, absent string) {
	e.t.Helper()
	deadline := time.After(waitLimit)
	for {
		ch := e.d.ReloadChanged()
		raw, _ := os.ReadFile(path)
		if strings.Contains(string(raw), want+"\n") && (absent == "" || !strings.Contains(string(raw), absent)) {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			e.t.Fatalf("labels file lacks %q (or still has %q):\n%s", want, absent, raw)
		}
	}
}

// TestRescanKeepsWhatTheStrategyCannotAdvertise: under mig-strategy
// single, a re-partition into mixed profiles is refused once (logged once,
// counted), the advertised devices stay, and a fixed layout is taken.
func TestRescanKeepsWhatTheStrategyCannotAdvertise(t *testing.T) {
	profile := filepath.Join(t.TempDir(), "uniform.yaml")
	if err := os.WriteFile(profile, []byte("name: uniform\ngpus:\n  - {model: A100-SXM4-40GB, count: 2, migEnabled: true, migDevices: [3g.20gb, 3g.20gb]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e := startReloadEnv(t, profile, "version: v1\nflags:\n  migStrategy: single\n", "--rescan-interval=100ms")
	e.waitCapacity("nvidia.com/gpu", 4, 4)
	if err := e.d.SimNode().SetMIGLayout(1, true, []string{"3g.20gb", "2g.10gb", "1g.5gb"}); err != nil {
		t.Fatal(err)
	}
	e.waitStatus("two refused re-scans", func(s ReloadStatus, _ uint64) bool { return s.Rescans["failure"] >= 2 })
	if n := e.logs.Count("cannot be advertised under the current config"); n != 1 {
		t.Errorf("the refused layout was logged %d times; want once", n)
	}
	if c, a := e.k.Capacity("nvidia.com/gpu"); c != 4 || a != 4 {
		t.Errorf("refused layout changed the advertisement: %d/%d", c, a)
	}
	if logs := e.logs.String(); !strings.Contains(logs, "GPU 1 (GPU-") {
		t.Errorf("the refusal does not name the GPU:\n%s", logs)
	}
	if err := e.d.SimNode().SetMIGLayout(1, true, []string{"3g.20gb"}); err != nil {
		t.Fatal(err)
	}
	e.waitCapacity("nvidia.com/gpu", 3, 3)
}

// TestFailRequestsGreaterThanOne: a request of 2 replicas is refused with
// InvalidArgument and a message a user understands; without the setting, 2
// replicas of one GPU reach the container as that GPU once.
func TestFailRequestsGreaterThanOne(t *testing.T) {
	e := startReloadEnv(t, "dgx-h100", strings.Replace(tsConfig, "  timeSlicing:\n", "  timeSlicing:\n    failRequestsGreaterThanOne: true\n", 1))
	e.waitCapacity("nvidia.com/gpu", 16, 16)
	gpu0 := e.d.Inventory().GPUs[0].UUID
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	_, err := e.k.Allocate(ctx, "nvidia.com/gpu", gpu0+"::0", gpu0+"::1")
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "at most 1") || !strings.Contains(err.Error(), "requested 2") {
		t.Errorf("a request of 2 under failRequestsGreaterThanOne: %v; want InvalidArgument saying at most 1", err)
	}
	if _, err := e.k.Allocate(ctx, "nvidia.com/gpu", gpu0+"::1"); err != nil {
		t.Errorf("a request of 1: %v", err)
	}

	e.write(tsConfig) // live: the setting goes away
	e.waitStatus("the reload", func(s ReloadStatus, _ uint64) bool { return s.Successes == 1 })
	// The plugin manager applies the new allocate options on its own
	// goroutine after the reload counts, with nothing the kubelet sees:
	// ask again until the deadline.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := e.k.Allocate(ctx, "nvidia.com/gpu", gpu0+"::0", gpu0+"::1")
		if err == nil && resp.Envs["NVIDIA_VISIBLE_DEVICES"] == gpu0 {
			break
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("a request of 2 after the setting went away: %v", err)
		}
	}
}

// TestStartRefusesDevicesMatchingNothing: a bad devices entry stops the
// start with the field's path.
func TestStartRefusesDevicesMatchingNothing(t *testing.T) {
	dir, err := os.MkdirTemp("", "gpr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(t.TempDir(), "config.yaml")
	doc := "version: v1\nextensions: {resourceCustomization: true}\nsharing:\n  timeSlicing:\n    resources:\n    - {name: gpu, rename: gpu.s, devices: [0, 8], replicas: 2}\n"
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, _, err := config.Load("gpu-plugin", []string{"--simulate=dgx-h100", "--config=" + path, "--kubelet-socket-dir=" + dir, "--metrics-address="},
		func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// The advertisement is built in New, so the start fails there, before
	// anything is served.
	d, err := New(cfg, slog.New(slog.DiscardHandler))
	if err == nil {
		d.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "sharing.timeSlicing.resources[0].devices[1]") || !strings.Contains(err.Error(), `"8" matches no nvidia.com/gpu device`) {
		t.Errorf("New: %v; want the field and the reason", err)
	}
}

// TestReloadMetricsEndpoint reads the reload counters where Prometheus does.
func TestReloadMetricsEndpoint(t *testing.T) {
	e := startReloadEnv(t, "pcie-l4x4", "version: v1\n", "--metrics-address=127.0.0.1:0")
	e.waitCapacity("nvidia.com/gpu", 4, 4)
	e.write("version: v1\nflags:\n  migStrategy: diagonal\n")
	e.waitStatus("the rejected reload", func(s ReloadStatus, _ uint64) bool { return s.Failures == 1 })
	resp, err := http.Get("http://" + e.d.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`gpu_plugin_config_reloads_total{result="failure"} 1`,
		`gpu_plugin_config_reloads_total{result="success"} 0`,
		`gpu_plugin_config_last_reload_successful 0`,
		`gpu_plugin_inventory_rescans_total{result="changed"} 0`,
		`gpu_plugin_node_labels_writes_total{result="failure"} 0`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// TestRescanKeepsUnreadableGPU: a GPU that cannot be read during a re-scan
// (lost) keeps its advertised devices, while a change elsewhere is taken.
func TestRescanKeepsUnreadableGPU(t *testing.T) {
	e := startReloadEnv(t, "dgx-a100-mig", "version: v1\nflags:\n  migStrategy: mixed\n", "--rescan-interval=100ms")
	e.waitCapacity("nvidia.com/gpu", 3, 3)
	node := e.d.SimNode()
	if err := node.SetLost(6, true); err != nil {
		t.Fatal(err)
	}
	if err := node.SetMIGLayout(3, true, []string{"3g.20gb", "3g.20gb"}); err != nil {
		t.Fatal(err)
	}
	e.waitCapacity("nvidia.com/mig-3g.20gb", 5, 5)
	if c, _ := e.k.Capacity("nvidia.com/gpu"); c != 3 {
		t.Errorf("nvidia.com/gpu capacity %d after a re-scan with GPU 6 lost; want 3 (the lost GPU stays, marked by health)", c)
	}
}

// TestChangeBeforeWatchStarts: a file changed after the daemon read it but
// before its watch began raised no event; the first check still applies it.
func TestChangeBeforeWatchStarts(t *testing.T) {
	dir, err := os.MkdirTemp("", "gpr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &rlEnv{t: t, dir: dir, cfgPath: filepath.Join(t.TempDir(), "config.yaml"), logs: &testkit.Buffer{}}
	e.write("version: v1\n")
	k, err := fakekubelet.Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	e.k = k
	cfg, _, err := config.Load("gpu-plugin", []string{"--simulate=pcie-l4x4", "--config=" + e.cfgPath, "--kubelet-socket-dir=" + dir,
		"--metrics-address=", "--rescan-interval=0", "--node-labels=false"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	e.d = d
	e.write(tsConfig) // between New and Run: no watch yet
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() {
		cancel()
		<-done
		d.Close()
	}()
	e.waitCapacity("nvidia.com/gpu", 8, 8)
}

// TestRescanRewritesCDISpec: a MIG re-layout rewrites the CDI spec from the
// same inventory the resources come from, so a new MIG device's CDI name
// resolves and a removed one's no longer does; a reload that changes
// nothing in the spec does not rewrite it.
func TestRescanRewritesCDISpec(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a simulated node's CDI spec needs device nodes in its driver root: mknod needs root")
	}
	specDir := t.TempDir()
	specPath := filepath.Join(specDir, "k8s.device-plugin.nvidia.com-gpu.json")
	e := startReloadEnv(t, "dgx-a100-mig", "version: v1\nflags:\n  migStrategy: mixed\n",
		"--rescan-interval=100ms", "--device-list-strategy=cdi-cri", "--cdi-spec-dir="+specDir)
	e.waitCapacity("nvidia.com/mig-7g.40gb", 1, 1)
	old := e.d.Inventory().GPUs[3].MIGDevices[0].UUID // the 7g.40gb
	raw, err := os.ReadFile(specPath)
	if err != nil || !strings.Contains(string(raw), `"name":"`+old+`"`) {
		t.Fatalf("the spec lacks GPU 3's 7g.40gb %s (%v)", old, err)
	}
	written, _ := os.Stat(specPath)

	e.write("version: v1\nflags:\n  migStrategy: mixed\n# a comment changes nothing the spec holds\n")
	e.waitStatus("the reload", func(s ReloadStatus, _ uint64) bool { return s.Successes == 1 })
	if st, _ := os.Stat(specPath); !st.ModTime().Equal(written.ModTime()) {
		t.Errorf("a reload that changed nothing in the spec rewrote it")
	}

	if err := e.d.SimNode().SetMIGLayout(3, true, []string{"3g.20gb", "3g.20gb"}); err != nil {
		t.Fatal(err)
	}
	e.waitCapacity("nvidia.com/mig-3g.20gb", 5, 5)
	raw, err = os.ReadFile(specPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range e.d.Inventory().GPUs[3].MIGDevices {
		if !strings.Contains(string(raw), `"name":"`+m.UUID+`"`) {
			t.Errorf("the rewritten spec lacks the new MIG device %s", m.UUID)
		}
	}
	if strings.Contains(string(raw), old) {
		t.Errorf("the rewritten spec still names the removed MIG device %s", old)
	}
}

// TestReloadIntoDRANeedsARestart: a daemon started in device-plugin mode
// has no API access, so a reload that turns DRA on is refused, naming the
// fix, and every GPU stays with the device plugin (rather than leaving it
// for a DRA side that cannot publish them).
func TestReloadIntoDRANeedsARestart(t *testing.T) {
	e := startReloadEnv(t, "dgx-h100", "version: v1\n", "--watch-config=false")
	e.waitCapacity("nvidia.com/gpu", 8, 8)
	e.write("version: v1\ndra:\n  mode: split\n  devices: [0]\n")
	e.d.Reload()
	st := e.waitStatus("the refused reload", func(s ReloadStatus, _ uint64) bool { return s.Failures == 1 })
	if !strings.Contains(st.LastError, "started in device-plugin mode") || !strings.Contains(st.LastError, "restart") {
		t.Errorf("last error %q, want it to say a restart is needed", st.LastError)
	}
	e.waitCapacity("nvidia.com/gpu", 8, 8)
}
