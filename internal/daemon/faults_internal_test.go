package daemon

// Fault suite (issue 8), the parts that need the daemon's internals: the
// kubelet absent for a long time (registration backoff options), and the
// config file deleted or truncated under a running daemon (the reload
// debounce). The NVML and pod-resources faults are in faults_test.go.

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
)

// retryRecorder is a log handler that keeps the plugin manager's
// registration retries: when each was logged and the delay it announced.
type retryRecorder struct {
	mu      sync.Mutex
	at      []time.Time
	delays  []time.Duration
	changed notify.Signal
}

func (h *retryRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *retryRecorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *retryRecorder) WithGroup(string) slog.Handler            { return h }

func (h *retryRecorder) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "registration failed, retrying" {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "in" {
			h.mu.Lock()
			h.at = append(h.at, r.Time)
			h.delays = append(h.delays, a.Value.Duration())
			h.mu.Unlock()
			h.changed.Notify()
		}
		return true
	})
	return nil
}

func (h *retryRecorder) snapshot() ([]time.Time, []time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]time.Time(nil), h.at...), append([]time.Duration(nil), h.delays...)
}

// waitRetries waits until n retries have been logged.
func (h *retryRecorder) waitRetries(t *testing.T, n int, limit time.Duration) {
	t.Helper()
	deadline := time.After(limit)
	for {
		ch := h.changed.C()
		if _, d := h.snapshot(); len(d) >= n {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			_, d := h.snapshot()
			t.Fatalf("%d registration retries logged within %v, want %d: %v", len(d), limit, n, d)
		}
	}
}

// TestFaultsKubeletAbsent: the daemon starts with no kubelet.sock and
// keeps trying with a backoff that doubles up to its cap and stays there
// (the test caps at 200 ms to pack many cycles of a minutes-long absence
// into seconds; the daemon's own cap is 5 s); when the kubelet appears, it
// registers at once, well within one capped interval.
func TestFaultsKubeletAbsent(t *testing.T) {
	const minBackoff, maxBackoff = 10 * time.Millisecond, 200 * time.Millisecond
	dir, err := os.MkdirTemp("", "gpk") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg, _, err := config.Load("gpu-plugin", []string{"--simulate=pcie-l4x4", "--kubelet-socket-dir=" + dir,
		"--metrics-address=127.0.0.1:0", "--pod-resources-socket=", "--rescan-interval=0", "--node-labels=false"},
		func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	rec := &retryRecorder{}
	d, err := New(cfg, slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	opts := d.pluginOptions()
	opts.MinBackoff, opts.MaxBackoff = minBackoff, maxBackoff
	d.plugins = plugin.NewManager(opts)
	runUntilCleanup(t, d)

	// 10, 20, 40, 80, 160 ms, then 200 ms for good: 20 retries are about
	// 15 capped cycles.
	const retries = 20
	rec.waitRetries(t, retries, 60*time.Second)
	at, delays := rec.snapshot()
	for i, dl := range delays {
		if dl > maxBackoff {
			t.Errorf("retry %d announced a %v delay, beyond the %v cap", i, dl, maxBackoff)
		}
		if i > 0 && dl < delays[i-1] {
			t.Errorf("retry %d: delay fell from %v to %v while the kubelet stayed absent", i, delays[i-1], dl)
		}
	}
	if capped := delays[retries-1]; capped != maxBackoff {
		t.Errorf("delay after %d retries: %v, want the cap %v", retries, capped, maxBackoff)
	}
	// The real spacing follows the announced delays: it does not keep
	// growing. (Loose: a loaded machine only adds to it.)
	var gaps []time.Duration
	for i := 10; i < len(at); i++ {
		gaps = append(gaps, at[i].Sub(at[i-1]))
	}
	if last, first := gaps[len(gaps)-1], gaps[0]; last > first+2*time.Second {
		t.Errorf("retry spacing grew from %v to %v under a capped backoff", first, last)
	}
	t.Logf("%d retries in %v without a kubelet; announced delays %v; spacing of the capped ones %v",
		len(delays), at[len(at)-1].Sub(at[0]).Round(time.Millisecond), delays, gaps)
	if d.plugins.Registered() {
		t.Fatal("registered without a kubelet")
	}
	base := "http://" + d.Addr()
	if code, body := httpGet(t, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not registered with the kubelet") {
		t.Errorf("/readyz without a kubelet: %d %q", code, body)
	}
	if _, body := httpGet(t, base+"/metrics"); !strings.Contains(body, `gpu_plugin_resource_registered{resource="nvidia.com/gpu"} 0`) {
		t.Error(`/metrics lacks gpu_plugin_resource_registered{resource="nvidia.com/gpu"} 0`)
	}

	// The kubelet appears.
	appeared := time.Now()
	k, err := fakekubelet.Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	wctx, wcancel := context.WithTimeout(context.Background(), waitLimit)
	defer wcancel()
	if err := k.WaitForAllocatable(wctx, "nvidia.com/gpu", 4, 4); err != nil {
		t.Fatalf("not registered after the kubelet appeared: %v", err)
	}
	// The kubelet lists the devices inside Register; the daemon counts
	// itself registered once Register returns. Nothing signals that, so
	// look on a short tick, bounded.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !d.plugins.Registered() {
		select {
		case <-tick.C:
		case <-wctx.Done():
			t.Fatalf("the kubelet lists the devices but the daemon does not count itself registered: %+v", d.plugins.Status())
		}
	}
	took := time.Since(appeared)
	t.Logf("registered and listed %v after the kubelet appeared", took.Round(time.Millisecond))
	// Generous: the socket's creation triggers an attempt at once; the
	// capped backoff alone would bound it by maxBackoff plus an attempt.
	if took > maxBackoff+5*time.Second {
		t.Errorf("registration took %v after the kubelet appeared; want within the %v cap plus slack", took, maxBackoff)
	}
	if code, body := httpGet(t, base+"/metrics"); code != 200 || !strings.Contains(body, `gpu_plugin_resource_registered{resource="nvidia.com/gpu"} 1`) {
		t.Error(`/metrics lacks gpu_plugin_resource_registered{resource="nvidia.com/gpu"} 1 after registration`)
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// faultConfig time-slices every GPU in two; the name is quoted so that a
// file cut inside it is broken YAML.
const faultConfig = `version: v1
sharing:
  timeSlicing:
    resources:
    - name: "nvidia.com/gpu"
      replicas: 2
`

// TestFaultsConfigFile: the config file is deleted, truncated to 0 bytes,
// or replaced by half of itself while the daemon runs. Each time the last
// good config stays in force (the kubelet sees nothing change, not even on
// an explicit reload), the failure is logged and counted, and the next
// valid file applies.
func TestFaultsConfigFile(t *testing.T) {
	cut := func(at string) string { return faultConfig[:strings.Index(faultConfig, at)+len(at)] }
	for _, tc := range []struct {
		name    string
		breakIt func(path string) error
		wantErr string // in the reload status' last error
	}{
		{"deleted", os.Remove, "no such file or directory"},
		{"truncated to 0 bytes", func(p string) error { return os.Truncate(p, 0) }, "empty"},
		{"cut inside a quoted string", func(p string) error { return os.WriteFile(p, []byte(cut(`"nvidia.com/`)), 0o644) }, "not valid YAML"},
		{"cut inside a key", func(p string) error { return os.WriteFile(p, []byte(cut("    resour")), 0o644) }, "sharing.timeSlicing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startReloadEnv(t, "pcie-l4x4", faultConfig)
			e.waitCapacity("nvidia.com/gpu", 8, 8)
			before := e.eventsFor("nvidia.com/gpu")

			if err := tc.breakIt(e.cfgPath); err != nil {
				t.Fatal(err)
			}
			st := e.waitStatus("the broken file's reload", func(s ReloadStatus, _ uint64) bool { return s.Failures == 1 })
			if st.LastReloadOK || st.Successes != 0 || !strings.Contains(st.LastError, tc.wantErr) {
				t.Errorf("reload status after the file broke: %+v; want a failure saying %q", st, tc.wantErr)
			}
			// An explicit reload (SIGHUP) of the broken file is refused too.
			e.d.Reload()
			e.waitStatus("the refused SIGHUP", func(s ReloadStatus, _ uint64) bool { return s.Failures == 2 })
			if c, a := e.k.Capacity("nvidia.com/gpu"); c != 8 || a != 8 {
				t.Errorf("capacity %d/%d after the file broke, want 8/8 (2 replicas of 4 GPUs, the last good config)", c, a)
			}
			if got := e.eventsFor("nvidia.com/gpu"); !equalCounts(got, before) {
				t.Errorf("the kubelet saw changes after the file broke: events %v, were %v", got, before)
			}
			if r := e.d.rl.config().Sharing.TimeSlicing.Resources; len(r) != 1 || r[0].Replicas != 2 {
				t.Errorf("config in force after the file broke: time-slicing %+v, want 2 replicas", r)
			}
			if n := e.logs.Count("config reload rejected; the previous configuration stays in force"); n != 2 {
				t.Errorf("rejections logged %d times, want 2 (the change and the SIGHUP)", n)
			}
			if err := testutil.CollectAndCompare(e.d.rl, strings.NewReader(`
# HELP gpu_plugin_config_reloads_total Config reloads (file change, ConfigMap update, SIGHUP) by result; a failure leaves the previous config in force.
# TYPE gpu_plugin_config_reloads_total counter
gpu_plugin_config_reloads_total{result="failure"} 2
gpu_plugin_config_reloads_total{result="success"} 0
# HELP gpu_plugin_config_last_reload_successful 1 if the last config reload was applied (or none was tried), 0 if it was rejected.
# TYPE gpu_plugin_config_last_reload_successful gauge
gpu_plugin_config_last_reload_successful 0
`), "gpu_plugin_config_reloads_total", "gpu_plugin_config_last_reload_successful"); err != nil {
				t.Error(err)
			}

			// A valid file applies again.
			e.write(strings.Replace(faultConfig, "replicas: 2", "replicas: 3", 1))
			e.waitCapacity("nvidia.com/gpu", 12, 12)
			if st := e.waitStatus("the valid reload", func(s ReloadStatus, _ uint64) bool { return s.Successes == 1 }); !st.LastReloadOK {
				t.Errorf("status after the valid file: %+v", st)
			}
		})
	}
}
