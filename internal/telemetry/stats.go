package telemetry

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

var (
	backendInfoDesc = prometheus.NewDesc("gpu_plugin_telemetry_backend_info",
		"1 for the telemetry backend in use (backend: dcgm, nvml or none) and the one configured (auto, dcgm, nvml, none).",
		[]string{"backend", "configured"}, nil)
	fallbacksDesc = prometheus.NewDesc("gpu_plugin_telemetry_backend_fallbacks_total",
		"Times the DCGM connection was lost and sampling fell back to NVML (or to stale samples) while reconnecting.", nil, nil)
	roundDesc = prometheus.NewDesc("gpu_plugin_telemetry_sample_duration_seconds",
		"How long one sampling round of every GPU and MIG device took.", nil, nil)
	snapshotAgeDesc = prometheus.NewDesc("gpu_plugin_telemetry_snapshot_age_seconds",
		"Age of the snapshot scrapes are served from (the scrape cache); about the sampling interval when healthy.", nil, nil)
	devicesDesc = prometheus.NewDesc("gpu_plugin_telemetry_devices",
		"Sampled GPUs and MIG devices by state: fresh (last round answered), stale (failing, last values still served), expired (failing for longer than the stale limit, not served).",
		[]string{"state"}, nil)
	deviceFailuresDesc = prometheus.NewDesc("gpu_plugin_telemetry_device_sample_failures_total",
		"Sampling rounds in which a GPU or MIG device (uuid) could not be read.", []string{"gpu", "uuid"}, nil)
	deviceTimeDesc = prometheus.NewDesc("gpu_plugin_telemetry_device_last_sample_timestamp_seconds",
		"When a GPU or MIG device (uuid) was last read successfully; its DCGM_* series carry values from then.", []string{"gpu", "uuid"}, nil)
)

// StatsCollector exports the sampler's own metrics (gpu_plugin_telemetry_*).
type StatsCollector struct {
	s   *Sampler
	now func() time.Time
	// labels caches each device's {gpu, uuid} label pairs per layout, so a
	// scrape of a dense MIG node allocates little.
	labels atomic.Pointer[deviceLabels]
}

type deviceLabels struct {
	layout *Layout
	pairs  [][]*dto.LabelPair
}

func (c *StatsCollector) labelsFor(l *Layout) [][]*dto.LabelPair {
	if d := c.labels.Load(); d != nil && d.layout == l {
		return d.pairs
	}
	d := &deviceLabels{layout: l, pairs: make([][]*dto.LabelPair, len(l.Targets))}
	for i := range l.Targets {
		var lp labelSet
		lp.add("gpu", strconv.Itoa(l.Targets[i].GPU.Index))
		lp.add("uuid", l.Targets[i].Key)
		d.pairs[i] = lp.sorted()
	}
	c.labels.Store(d)
	return d.pairs
}

// deviceMetric is a per-device sample with cached label pairs.
type deviceMetric struct {
	desc   *prometheus.Desc
	labels []*dto.LabelPair
	vt     prometheus.ValueType
	value  float64
}

func (m *deviceMetric) Desc() *prometheus.Desc { return m.desc }

func (m *deviceMetric) Write(out *dto.Metric) error {
	out.Label = m.labels
	if m.vt == prometheus.CounterValue {
		out.Counter = &dto.Counter{Value: &m.value}
	} else {
		out.Gauge = &dto.Gauge{Value: &m.value}
	}
	return nil
}

// NewStatsCollector builds the sampler's own collector; now may be nil.
func NewStatsCollector(s *Sampler, now func() time.Time) *StatsCollector {
	if now == nil {
		now = time.Now
	}
	return &StatsCollector{s: s, now: now}
}

// Describe implements prometheus.Collector.
func (c *StatsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{backendInfoDesc, fallbacksDesc, roundDesc, snapshotAgeDesc, devicesDesc, deviceFailuresDesc, deviceTimeDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *StatsCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Stats()
	ch <- prometheus.MustNewConstMetric(backendInfoDesc, prometheus.GaugeValue, 1, st.Backend, st.Configured)
	ch <- prometheus.MustNewConstMetric(fallbacksDesc, prometheus.CounterValue, float64(st.Fallbacks))
	buckets := make(map[float64]uint64, len(durationBuckets))
	var cum uint64
	for i, b := range durationBuckets {
		cum += st.Buckets[i]
		buckets[b] = cum
	}
	ch <- prometheus.MustNewConstHistogram(roundDesc, st.Rounds, st.Sum, buckets)

	snap := c.s.Snapshot()
	if snap == nil {
		return
	}
	now := c.now()
	ch <- prometheus.MustNewConstMetric(snapshotAgeDesc, prometheus.GaugeValue, max(0, now.Sub(snap.Taken).Seconds()))
	var fresh, stale, expired int
	staleAfter := c.s.StaleAfter()
	labels := c.labelsFor(snap.Layout)
	buf := make([]deviceMetric, 0, 2*len(snap.Devices))
	send := func(m deviceMetric) {
		buf = append(buf, m)
		ch <- &buf[len(buf)-1]
	}
	for i := range snap.Devices {
		d := &snap.Devices[i]
		switch {
		case !d.Servable(now, staleAfter):
			expired++
		case d.Stale:
			stale++
		default:
			fresh++
		}
		send(deviceMetric{deviceFailuresDesc, labels[i], prometheus.CounterValue, float64(d.Failures)})
		if !d.At.IsZero() {
			send(deviceMetric{deviceTimeDesc, labels[i], prometheus.GaugeValue, float64(d.At.UnixNano()) / 1e9})
		}
	}
	ch <- prometheus.MustNewConstMetric(devicesDesc, prometheus.GaugeValue, float64(fresh), "fresh")
	ch <- prometheus.MustNewConstMetric(devicesDesc, prometheus.GaugeValue, float64(stale), "stale")
	ch <- prometheus.MustNewConstMetric(devicesDesc, prometheus.GaugeValue, float64(expired), "expired")
}
