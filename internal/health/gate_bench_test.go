package health

import (
	"testing"
	"time"
)

// BenchmarkProbeRound measures one probe round of a simulated dgx-h100
// (8 GPUs): the probe, the recovery gate's reads (recovery action field,
// remapped rows) and publishing the status. Reports NVML calls per round.
//
//	go test -run '^$' -bench ProbeRound -benchmem ./internal/health
func BenchmarkProbeRound(b *testing.B) {
	_, lib, inv := simNode(b, "dgx-h100")
	m := NewMonitor(MonitorOptions{Lib: lib, Inventory: fixed(inv), State: NewState(nil, nil), QuietPeriod: time.Minute})
	m.refresh(inv)
	m.probeRound()
	calls0, _ := lib.Stats()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		m.probeRound()
	}
	b.StopTimer()
	calls1, _ := lib.Stats()
	b.ReportMetric(float64(calls1-calls0)/float64(b.N), "nvml-calls/round")
}
