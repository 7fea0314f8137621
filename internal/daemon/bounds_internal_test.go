package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestReloadRefusesWhatAStartRefuses: configs past the bounds (a replica
// count of 10⁹ or 2⁶³−1, more devices than one resource may advertise,
// MPS) and config paths that are not regular files are rejected as live
// reloads, as at start: the daemon stays up, the previous config stays in
// force and the kubelet keeps its devices.
func TestReloadRefusesWhatAStartRefuses(t *testing.T) {
	e := startReloadEnv(t, "dgx-h100", tsConfig)
	e.waitCapacity("nvidia.com/gpu", 16, 16)
	failures := uint64(0)
	reject := func(what, want string) {
		t.Helper()
		// A change can reach the reloader twice (the file watch and
		// Reload); each rejection counts, so wait for at least one more.
		st := e.waitStatus(what, func(s ReloadStatus, _ uint64) bool { return s.Failures > failures })
		failures = st.Failures
		if st.LastReloadOK || !strings.Contains(st.LastError, want) {
			t.Errorf("%s: status %+v; want a rejection naming %q", what, st, want)
		}
		e.waitCapacity("nvidia.com/gpu", 16, 16)
	}
	for _, tc := range []struct{ replicas, want string }{
		{"1000000000", "sharing.timeSlicing.resources[0].replicas: 1000000000 is too many"},
		{"9223372036854775807", "replicas: 9223372036854775807 is too many"},
		{"12000", "12000 replicas × 8 nvidia.com/gpu devices = 96000 devices"},
	} {
		e.write(strings.Replace(tsConfig, "replicas: 2", "replicas: "+tc.replicas, 1))
		reject("replicas "+tc.replicas, tc.want)
	}
	e.write("version: v1\nsharing:\n  mps:\n    resources:\n    - {name: gpu, replicas: 2}\n")
	reject("mps without an MPS root", "sharing.mps: MPS needs an MPS root")

	// The config path replaced by a FIFO: refused at once, never blocking
	// the reloader (a blocked reloader would not report the failure).
	path := e.d.cfg.Daemon.ConfigFile
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Fatal(err)
	}
	e.d.Reload()
	reject("a FIFO", "is a FIFO (named pipe)")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/zero", path); err != nil {
		t.Fatal(err)
	}
	e.d.Reload()
	reject("/dev/zero", "is a character device")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(filepath.Dir(path), "next.yaml"), []byte(strings.Replace(tsConfig, "replicas: 2", "replicas: 3", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(filepath.Dir(path), "next.yaml"), path); err != nil {
		t.Fatal(err)
	}
	e.d.Reload()
	e.waitCapacity("nvidia.com/gpu", 24, 24)
}

// TestConfigWarningsCountedAndApplied: a config with warnings (an unknown
// key, an ignored rename) applies at start and as a live reload, like
// NVIDIA's plugin, and gpu_plugin_config_warnings counts the warnings of
// the config in force.
func TestConfigWarningsCountedAndApplied(t *testing.T) {
	warned := "version: v1\nfutureKey: 1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: gpu, rename: gpu-shared, replicas: 2}\n"
	e := startReloadEnv(t, "dgx-h100", warned)
	e.waitCapacity("nvidia.com/gpu", 16, 16)
	gauge := func(want float64) {
		t.Helper()
		if err := testutil.CollectAndCompare(e.d.rl, strings.NewReader(fmt.Sprintf(`
# HELP gpu_plugin_config_warnings Warnings the config in force gives: unknown keys, keys written twice, settings ignored as NVIDIA's plugin ignores them; each is logged and listed by `+"`gpu-plugin config check`"+`.
# TYPE gpu_plugin_config_warnings gauge
gpu_plugin_config_warnings %g
`, want)), "gpu_plugin_config_warnings"); err != nil {
			t.Error(err)
		}
	}
	gauge(2)
	e.write(tsConfig)
	e.waitStatus("a clean reload", func(s ReloadStatus, _ uint64) bool { return s.Successes >= 1 })
	gauge(0)
	e.write(strings.Replace(warned, "replicas: 2", "replicas: 3", 1))
	e.waitCapacity("nvidia.com/gpu", 24, 24)
	gauge(2)
}
