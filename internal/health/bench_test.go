package health_test

import (
	"slices"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
)

// BenchmarkEventToListAndWatch measures an XID event on a simulated
// dgx-h100 with 8 × 8 time-sliced replicas until the stand-in kubelet has
// received the ListAndWatch update with the GPU's 8 replicas unhealthy:
// simulated driver → event set → monitor → health table → plugin server →
// gRPC stream → kubelet. Reports p50, p99 and max in ms.
//
//	go test -run '^$' -bench EventToListAndWatch -benchtime 2000x ./internal/health
func BenchmarkEventToListAndWatch(b *testing.B) {
	s := startStack(b, "dgx-h100", timeSliced8, nil, health.MonitorOptions{ProbeInterval: 5 * time.Second})
	const res = "nvidia.com/gpu"
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		gpu := i % 8
		before := len(s.kubelet.Events())
		t0 := time.Now()
		if _, err := s.node.InjectXID(gpu, 48, -1, -1); err != nil {
			b.Fatal(err)
		}
		s.waitAllocatable(b, res, 64, 56)
		b.StopTimer()
		for _, e := range s.kubelet.Events()[before:] {
			if e.Kind == "devices" && e.Resource == res && e.Healthy == 56 {
				lat = append(lat, e.At.Sub(t0))
				break
			}
		}
		s.state.SetHealthy(s.inv.GPUs[gpu].UUID, "benchmark reset")
		s.waitAllocatable(b, res, 64, 64)
		b.StartTimer()
	}
	b.StopTimer()
	reportPercentiles(b, lat)
}

func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	at := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(at(0.50), "p50-ms")
	b.ReportMetric(at(0.99), "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
	b.ReportMetric(0, "ns/op") // the loop time includes the reset; the percentiles are the figure
}
