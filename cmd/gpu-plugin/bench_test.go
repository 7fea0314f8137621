package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
)

// TestMain lets benchmarks start this test binary as the real daemon
// process (GPU_PLUGIN_TEST_MAIN=1), so "process start" includes exec,
// runtime start-up and flag parsing.
func TestMain(m *testing.M) {
	if os.Getenv("GPU_PLUGIN_TEST_MAIN") == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// BenchmarkStartToRegistered measures from exec of the daemon process on a
// simulated dgx-h100 to its 8 GPUs being listed by the (stand-in) kubelet.
func BenchmarkStartToRegistered(b *testing.B) {
	dir, err := os.MkdirTemp("", "gpb")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	k, err := fakekubelet.Start(dir, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer k.Stop()
	var lat []time.Duration
	for i := 0; i < b.N; i++ {
		if err := k.Restart(); err != nil { // forget the previous registration
			b.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "--simulate=dgx-h100", "--kubelet-socket-dir="+dir, "--metrics-address=")
		cmd.Env = append(os.Environ(), "GPU_PLUGIN_TEST_MAIN=1")
		start := time.Now()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := k.WaitForAllocatable(ctx, "nvidia.com/gpu", 8, 8)
		cancel()
		lat = append(lat, time.Since(start))
		_ = cmd.Process.Signal(os.Interrupt)
		if werr := cmd.Wait(); werr != nil && err == nil {
			err = fmt.Errorf("daemon exit: %w", werr)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
}
