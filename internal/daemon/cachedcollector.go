package daemon

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// cachedCollector serves another collector's metrics, collected at most
// once per maxAge. The process collector reads half a dozen /proc files
// (net/netstat among them) on every call: a third of a whole scrape's CPU,
// for values that a scrape every few seconds cannot tell apart from ones a
// second old. Telemetry itself is served from the sampler's snapshot in the
// same spirit.
type cachedCollector struct {
	inner  prometheus.Collector
	maxAge time.Duration
	now    func() time.Time

	mu      sync.Mutex
	at      time.Time
	metrics []prometheus.Metric
}

func newCachedCollector(inner prometheus.Collector, maxAge time.Duration) *cachedCollector {
	return &cachedCollector{inner: inner, maxAge: maxAge, now: time.Now}
}

func (c *cachedCollector) Describe(ch chan<- *prometheus.Desc) { c.inner.Describe(ch) }

// Collect sends the cached metrics, refreshing them first when they are
// older than maxAge. Collected metrics are immutable, so one set serves
// many scrapes.
func (c *cachedCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	if now := c.now(); c.metrics == nil || now.Sub(c.at) >= c.maxAge {
		fresh := make(chan prometheus.Metric, 64)
		go func() {
			c.inner.Collect(fresh)
			close(fresh)
		}()
		c.metrics = c.metrics[:0]
		for m := range fresh {
			c.metrics = append(c.metrics, m)
		}
		c.at = now
	}
	metrics := c.metrics
	c.mu.Unlock()
	for _, m := range metrics {
		ch <- m
	}
}
