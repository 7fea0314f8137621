package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
)

// TestHealthCommand asks a running daemon (real HTTP) for GPU health as
// NPD's custom-plugin monitor would: exit 1 with the quarantined GPU's line
// first, 0 once it is released, 2 when nothing answers.
func TestHealthCommand(t *testing.T) {
	dir, err := os.MkdirTemp("", "gphc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	kubelet, err := fakekubelet.Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer kubelet.Stop()
	cfg, _, err := config.Load(name, []string{"--simulate=dgx-h100", "--kubelet-socket-dir=" + dir, "--metrics-address=127.0.0.1:0",
		"--rescan-interval=0", "--node-labels=false", "--health-quarantine=3"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := daemon.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon Run: %v", err)
		}
		d.Close()
	}()
	wctx, wcancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer wcancel()
	if err := kubelet.WaitForAllocatable(wctx, "nvidia.com/gpu", 8, 7); err != nil {
		t.Fatal(err)
	}
	check := func(wantCode int, wantFirst string, wantLines int, args ...string) {
		t.Helper()
		var out, errOut bytes.Buffer
		code := run(context.Background(), append([]string{"health"}, args...), func(string) string { return "" }, &out, &errOut)
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		if code != wantCode || !strings.HasPrefix(lines[0], wantFirst) || len(lines) != wantLines {
			t.Errorf("health %v: exit %d, %d lines, output:\n%s%s\nwant exit %d, %d lines, first starting %q",
				args, code, len(lines), out.String(), errOut.String(), wantCode, wantLines, wantFirst)
		}
	}
	uuid3 := d.Inventory().GPUs[3].UUID
	from := "--from=" + d.Addr()
	check(healthNotOK, "GPU 3 "+uuid3+" unhealthy: quarantined by operator", 8, from)
	d.Health().Quarantine(nil)
	check(healthOK, "GPU 0 "+d.Inventory().GPUs[0].UUID+" healthy", 8, from)
	check(healthUnknown, "unknown: asking the daemon at http://127.0.0.1:1", 1, "--from=127.0.0.1:1")
	check(healthUnknown, "", 1, "extra")
}
