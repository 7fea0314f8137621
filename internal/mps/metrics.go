package mps

import "github.com/prometheus/client_golang/prometheus"

var (
	descReady = prometheus.NewDesc("gpu_plugin_mps_daemon_ready",
		"1 while the resource's MPS control daemon answers with its limits set, 0 while it starts or is down (its replicas are then unhealthy).",
		[]string{"resource", "state"}, nil)
	descRestarts = prometheus.NewDesc("gpu_plugin_mps_daemon_restarts_total",
		"Restarts of the resource's MPS control daemon after it exited, stopped answering or failed to start.",
		[]string{"resource"}, nil)
)

// Describe implements prometheus.Collector.
func (m *Manager) Describe(ch chan<- *prometheus.Desc) {
	ch <- descReady
	ch <- descRestarts
}

// Collect implements prometheus.Collector.
func (m *Manager) Collect(ch chan<- prometheus.Metric) {
	for _, s := range m.Statuses() {
		v := 0.0
		if s.State == StateReady {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, v, s.Resource, s.State)
		ch <- prometheus.MustNewConstMetric(descRestarts, prometheus.CounterValue, float64(s.Restarts), s.Resource)
	}
}
