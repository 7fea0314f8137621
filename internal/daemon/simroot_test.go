package daemon_test

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
)

// TestSimulatedNodeWithoutWritableTmp: a simulated node whose temporary
// directory cannot be written (the chart's pod: read-only root file system,
// no /tmp volume) has nowhere to lay out its driver root. With the envvar
// strategy, which needs none, it starts without one; a cdi-* strategy,
// which does, is refused with an error that says how to fix it.
func TestSimulatedNodeWithoutWritableTmp(t *testing.T) {
	dir := socketDir(t)
	notDir := filepath.Join(t.TempDir(), "a-file")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TMPDIR", notDir) // MkdirTemp fails with ENOTDIR, for root too

	d, err := daemon.New(loadConfig(t, dir, "--simulate=pcie-l4x4", "--node-labels=false", "--pod-resources-socket="),
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("a simulated node with the envvar strategy and an unwritable TMPDIR: %v, want it to start", err)
	}
	defer d.Close()
	if root := d.SimDriverRoot(); root != "" {
		t.Errorf("SimDriverRoot() = %q with an unwritable TMPDIR, want none", root)
	}

	d2, err := daemon.New(loadConfig(t, dir, "--simulate=pcie-l4x4", "--node-labels=false", "--pod-resources-socket=",
		"--device-list-strategy=cdi-cri", "--cdi-spec-dir="+t.TempDir()), slog.New(slog.DiscardHandler))
	if err == nil {
		d2.Close()
		t.Fatal("a simulated node with a cdi-* strategy and an unwritable TMPDIR started, want it refused")
	}
	for _, want := range []string{notDir, "TMPDIR", "--device-list-strategy=envvar"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
}
