package plugin_test

import (
	"context"
	"sort"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
)

// BenchmarkAllocate measures one Allocate of 2 GPUs over the plugin's unix
// socket, as the kubelet calls it.
func BenchmarkAllocate(b *testing.B) {
	e := startEnv(b, "dgx-h100", defaultRespond(), true)
	e.waitAllocatable(b, 8, 8)
	u := e.uuids()
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := e.kubelet.Allocate(ctx, gpuResource, u[i%8], u[(i+1)%8]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkListAndWatchUpdate measures a health change until the kubelet
// side of the stream has received the new device list; it reports p50 and
// p99 besides the mean.
func BenchmarkListAndWatchUpdate(b *testing.B) {
	e := startEnv(b, "dgx-h100", defaultRespond(), true)
	e.waitAllocatable(b, 8, 8)
	gpu := e.uuids()[3]
	lat := make([]time.Duration, 0, b.N)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		want := 7
		start := time.Now()
		if i%2 == 0 {
			e.health.SetUnhealthy(gpu, "bench")
		} else {
			e.health.SetHealthy(gpu, "bench")
			want = 8
		}
		if err := e.kubelet.WaitFor(ctx, func(k *fakekubelet.Kubelet) bool {
			_, a := k.Capacity(gpuResource)
			return a == want
		}); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	reportPercentiles(b, lat)
}

func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}
