package daemon_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/mps"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// reportLatencies reports the median, the 99th percentile and the maximum.
func reportLatencies(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
	b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
}

// BenchmarkMPS measures, on a simulated pcie-l4x4 node (4 GPUs) with the
// fake nvidia-cuda-mps-control and the stand-in kubelet over real gRPC:
//   - apply: an unshared config replaced by sharing.mps (2 replicas) and
//     reloaded → the 8 replicas allocatable at the kubelet: the control
//     daemon's start, its limits, and the re-advertisement;
//   - death: the control daemon killed (the fake's `die`) → the kubelet
//     sees every replica unhealthy.
func BenchmarkMPS(b *testing.B) {
	root := mpsRoot(b)
	bin := testkit.FakeMPSControl(b)
	b.Cleanup(func() { _ = testkit.KillFakeMPS(mps.DirsOf(root, "nvidia.com/gpu").Pipe) })
	cfgPath := filepath.Join(b.TempDir(), "config.yaml")
	unshared := func() {
		if err := os.WriteFile(cfgPath, []byte("version: v1\n"), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	unshared()
	r := start(b, true, "--simulate=pcie-l4x4", "--config="+cfgPath, "--mps-root="+root, "--mps-control-binary="+bin,
		"--rescan-interval=0", "--watch-config=false")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	wait := func(capacity, allocatable int) {
		if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", capacity, allocatable); err != nil {
			b.Fatal(err)
		}
	}
	wait(4, 4)

	b.Run("apply", func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		for i := 0; i < b.N; i++ {
			start := time.Now()
			mpsConfig(b, cfgPath, 2)
			r.d.Reload()
			wait(8, 8)
			lat = append(lat, time.Since(start))
			b.StopTimer()
			unshared()
			r.d.Reload()
			wait(4, 4)
			eventually(b, "the MPS daemon gone", func() (bool, string) { // so that the next round starts one
				return len(r.d.MPS().Statuses()) == 0, ""
			})
			b.StartTimer()
		}
		reportLatencies(b, lat)
	})

	b.Run("death", func(b *testing.B) {
		mpsConfig(b, cfgPath, 2)
		r.d.Reload()
		wait(8, 8)
		lat := make([]time.Duration, 0, b.N)
		for i := 0; i < b.N; i++ {
			start := time.Now()
			if _, err := askMPS(bin, root, "nvidia.com/gpu", "die"); err != nil {
				b.Logf("die: %v", err)
			}
			wait(8, 0)
			lat = append(lat, time.Since(start))
			b.StopTimer()
			wait(8, 8) // restarted after the 1 s backoff
			b.StartTimer()
		}
		reportLatencies(b, lat)
	})
}
