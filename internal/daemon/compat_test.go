package daemon_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/config/nvidiacorpus"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// TestCompatCorpusDaemon starts the daemon on every case of the NVIDIA
// compatibility corpus (internal/config/testdata/nvidia/cases.yaml), on the
// case's simulated node, with a stand-in kubelet, and compares what the
// kubelet receives, resource by resource and device count by device count,
// with what NVIDIA's plugin v0.20 advertises (or the recorded deliberate
// difference), by default and with --resource-customization. A refused
// case must fail the start naming the field.
func TestCompatCorpusDaemon(t *testing.T) {
	cases, err := nvidiacorpus.Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		for _, optIn := range []bool{false, true} {
			want := tc.Want()
			args := []string{"--simulate=" + tc.Profile, "--config=" + tc.Path()}
			if optIn {
				want, args = tc.WantOptIn(), append(args, "--resource-customization")
			}
			if optIn && tc.OptIn == nil {
				continue // same as the default, already run
			}
			if tc.Env["MPS_ROOT"] != "" {
				// MPS on a simulated node: the fake control daemon, in a
				// root of the test's own.
				args = append(args, "--mps-root="+mpsRoot(t), "--mps-control-binary="+testkit.FakeMPSControl(t))
			}
			t.Run(fmt.Sprintf("%s/optIn=%t", tc.File, optIn), func(t *testing.T) {
				dir := socketDir(t)
				k, err := fakekubelet.Start(dir, nil)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(k.Stop)
				base := []string{"--kubelet-socket-dir=" + dir, "--metrics-address=", "--node-name=test-node", "--node-labels=false"}
				cfg, _, err := config.Load("gpu-plugin", append(base, args...), tc.Getenv, io.Discard)
				var d *daemon.Daemon
				if err == nil {
					d, err = daemon.New(cfg, slog.New(slog.DiscardHandler))
				}
				if !want.Accepted() {
					if err == nil {
						// Refusals that depend on the node come from Run,
						// before anything registers.
						ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
						err = d.Run(ctx)
						cancel()
						d.Close()
						if err == nil || len(k.Resources()) > 0 {
							t.Fatalf("the daemon ran (%v, registered %v); want a refusal naming %q (NVIDIA: %s)", err, k.Resources(), want.Error, tc.NVIDIA.Outcome)
						}
					}
					if !strings.Contains(err.Error(), want.Error) {
						t.Fatalf("refused with %q; want it to name %q", err, want.Error)
					}
					return
				}
				if err != nil {
					t.Fatalf("refused (%v); want accepted (NVIDIA: %s)", err, tc.NVIDIA.Outcome)
				}
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- d.Run(ctx) }()
				t.Cleanup(func() {
					cancel()
					select {
					case <-done:
					case <-time.After(10 * time.Second):
						t.Error("the daemon did not stop")
					}
					d.Close()
				})
				advertised := func(k *fakekubelet.Kubelet) map[string]int {
					got := map[string]int{}
					for _, r := range k.Resources() {
						got[r], _ = k.Capacity(r)
					}
					return got
				}
				wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
				defer wcancel()
				if err := k.WaitFor(wctx, func(k *fakekubelet.Kubelet) bool { return maps.Equal(advertised(k), want.Resources) }); err != nil {
					t.Fatalf("the kubelet has %v on %s; want %v: %v", advertised(k), tc.Profile, want.Resources, err)
				}
			})
		}
	}
}

// mpsRoot is a short MPS root (the pipe's socket path must fit in 108
// bytes), removed at the end of the test.
func mpsRoot(t testing.TB) string {
	t.Helper()
	root, err := os.MkdirTemp("/tmp", "mps")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	return root
}
