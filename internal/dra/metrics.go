package dra

import "github.com/prometheus/client_golang/prometheus"

var (
	descRegistered = prometheus.NewDesc("gpu_plugin_dra_registered",
		"1 while the kubelet has accepted the DRA plugin's registration (driver gpu.nvidia.com).", nil, nil)
	descDevices = prometheus.NewDesc("gpu_plugin_dra_devices",
		"Devices offered through DRA in the node's ResourceSlice, by health (unhealthy ones carry a device taint, or are left out where the API server drops taints).",
		[]string{"health"}, nil)
	descPrepared = prometheus.NewDesc("gpu_plugin_dra_prepared_claims",
		"ResourceClaims prepared on this node (in the checkpoint).", nil, nil)
	descPublishes = prometheus.NewDesc("gpu_plugin_dra_slice_writes_total",
		"Writes of the node's ResourceSlice (create, update, delete) since start.", nil, nil)
	descPublishOK = prometheus.NewDesc("gpu_plugin_dra_slice_published",
		"1 when the last attempt to publish the node's ResourceSlice succeeded; 0 while it fails (the reason is in /debug/devices and the log).", nil, nil)
)

// Describe implements prometheus.Collector.
func (d *Driver) Describe(ch chan<- *prometheus.Desc) {
	for _, desc := range []*prometheus.Desc{descRegistered, descDevices, descPrepared, descPublishes, descPublishOK} {
		ch <- desc
	}
}

// Collect implements prometheus.Collector.
func (d *Driver) Collect(ch chan<- prometheus.Metric) {
	st := d.Status()
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	healthy := 0
	for _, dev := range st.Devices {
		if dev.Healthy {
			healthy++
		}
	}
	ch <- prometheus.MustNewConstMetric(descRegistered, prometheus.GaugeValue, b(st.Registered))
	ch <- prometheus.MustNewConstMetric(descDevices, prometheus.GaugeValue, float64(healthy), "healthy")
	ch <- prometheus.MustNewConstMetric(descDevices, prometheus.GaugeValue, float64(len(st.Devices)-healthy), "unhealthy")
	ch <- prometheus.MustNewConstMetric(descPrepared, prometheus.GaugeValue, float64(len(st.Prepared)))
	ch <- prometheus.MustNewConstMetric(descPublishes, prometheus.CounterValue, float64(st.Publishes))
	ch <- prometheus.MustNewConstMetric(descPublishOK, prometheus.GaugeValue, b(st.PublishErr == ""))
}
