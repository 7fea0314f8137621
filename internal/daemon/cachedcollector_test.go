package daemon

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// countingCollector counts its Collect calls and exports the count.
type countingCollector struct {
	desc  *prometheus.Desc
	calls int
}

func (c *countingCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }
func (c *countingCollector) Collect(ch chan<- prometheus.Metric) {
	c.calls++
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(c.calls))
}

func TestCachedCollectorRefreshesOncePerMaxAge(t *testing.T) {
	inner := &countingCollector{desc: prometheus.NewDesc("calls", "Collect calls.", nil, nil)}
	now := time.Unix(1000, 0)
	c := newCachedCollector(inner, time.Second)
	c.now = func() time.Time { return now }

	for _, step := range []struct {
		advance time.Duration
		want    float64 // the value served: which collection it comes from
	}{
		{0, 1},                      // first scrape collects
		{300 * time.Millisecond, 1}, // within maxAge: cached
		{600 * time.Millisecond, 1}, // 0.9 s old: still cached
		{100 * time.Millisecond, 2}, // 1 s old: refreshed
		{5 * time.Second, 3},        // long idle: refreshed once
		{0, 3},
	} {
		now = now.Add(step.advance)
		if got := testutil.ToFloat64(c); got != step.want {
			t.Fatalf("after +%v: served %v, want %v (inner collected %d times)", step.advance, got, step.want, inner.calls)
		}
	}
	if inner.calls != 3 {
		t.Errorf("inner collector called %d times, want 3", inner.calls)
	}
}
