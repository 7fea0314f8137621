package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
)

// TestSIGHUPReloads sends the process a real SIGHUP, as NVIDIA's
// config-manager sidecar does after swapping the config, and checks the
// running daemon applies the new file (the file watch is off, so only the
// signal can have done it).
func TestSIGHUPReloads(t *testing.T) {
	// Keep SIGHUP from killing the test binary whatever happens below.
	guard := make(chan os.Signal, 1)
	signal.Notify(guard, syscall.SIGHUP)
	defer signal.Stop(guard)

	dir, err := os.MkdirTemp("", "gph")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	kubelet, err := fakekubelet.Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer kubelet.Stop()
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cfg, []byte("version: v1\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--simulate=dgx-h100", "--kubelet-socket-dir=" + dir, "--config=" + cfg,
			"--metrics-address=", "--watch-config=false", "--rescan-interval=0", "--node-labels=false"},
			func(string) string { return "" }, io.Discard, io.Discard)
	}()
	wctx, wcancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer wcancel()
	if err := kubelet.WaitForAllocatable(wctx, "nvidia.com/gpu", 8, 8); err != nil {
		t.Fatal(err)
	}
	doc := "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 3\n"
	if err := os.WriteFile(cfg, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := kubelet.WaitForAllocatable(wctx, "nvidia.com/gpu", 24, 24); err != nil {
		t.Fatalf("after SIGHUP: %v", err)
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("daemon exit code %d", code)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the daemon did not stop")
	}
}

func TestConfigCheckSimulated(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	doc := `version: v1
flags:
  migStrategy: mixed
  gfd: {oneshot: true}
sharing:
  timeSlicing:
    failRequestsGreaterThanOne: true
    resources:
    - {name: nvidia.com/gpu, replicas: 4}
    - {name: nvidia.com/mig-1g.5gb, rename: nvidia.com/mig-1g.5gb.shared, devices: ["0:0", "0:1"], replicas: 2}
`
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	// rename and devices apply only with the opt-in (NVIDIA ignores them).
	code, out, errOut := runCmd(t, nil, "config", "check", path, "--simulate=dgx-a100-mig", "--resource-customization")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{
		"# resources on simulated node dgx-a100-mig:",
		"#   nvidia.com/gpu: 12 (3 devices × 4 replicas, at most 1 per container)",
		"#   nvidia.com/mig-1g.5gb: 7",
		"#   nvidia.com/mig-1g.5gb.shared: 4 (2 devices × 2 replicas, at most 1 per container, renamed from nvidia.com/mig-1g.5gb)",
		"rescanInterval: 30s",
		"labelsFile: /etc/kubernetes/node-feature-discovery/features.d/gpu-plugin",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("config check output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(errOut, "warning: flags.gfd.oneshot") {
		t.Errorf("the ignored GFD setting is not named on stderr: %q", errOut)
	}

	doc = strings.Replace(doc, `devices: ["0:0", "0:1"]`, `devices: ["0:0", "9:1"]`, 1)
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = runCmd(t, map[string]string{"GPU_PLUGIN_RESOURCE_CUSTOMIZATION": "true"}, "config", "check", path, "--simulate=dgx-a100-mig")
	if code == 0 || !strings.Contains(errOut, "sharing.timeSlicing.resources[1].devices[1]") || !strings.Contains(errOut, "allowed: 0:0, 0:1") {
		t.Errorf("a devices entry matching nothing: exit %d, %q", code, errOut)
	}
}

// TestConfigCheckDRA: config check shows what a split node offers through
// each API, and names a devices entry that matches nothing.
func TestConfigCheckDRA(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	doc := "version: v1\nflags:\n  migStrategy: mixed\ndra:\n  mode: split\n  devices: [0, 5, GPU-nope]\n"
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCmd(t, nil, "config", "check", path, "--simulate=dgx-a100-mig")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{
		"#   DRA (driver gpu.nvidia.com, --allocation-mode=split): 8 devices (MIG 1g.5gb on GPU 0, " +
			"MIG 1g.5gb on GPU 0, MIG 1g.5gb on GPU 0, MIG 1g.5gb on GPU 0, MIG 1g.5gb on GPU 0, MIG 1g.5gb on GPU 0, MIG 1g.5gb on GPU 0, GPU 5)",
		"#   nvidia.com/gpu: 2",
		"#   nvidia.com/mig-1g.5gb: 2",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("config check output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(errOut, `warning: dra.devices / --dra-devices entry "GPU-nope" matches no GPU or MIG device on this node`) {
		t.Errorf("the entry matching nothing is not named: %q", errOut)
	}
	code, _, errOut = runCmd(t, nil, "config", "check", path, "--allocation-mode=dra")
	if code == 0 || !strings.Contains(errOut, "dra.devices") || !strings.Contains(errOut, "only in split mode") {
		t.Errorf("devices outside split mode: exit %d, %q", code, errOut)
	}
}
