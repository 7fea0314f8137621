// Package healthmetrics exports the health table and the health monitor's
// state as Prometheus metrics. It lives apart from package health so that
// health depends on neither the advertised resources (sharing) nor
// Prometheus.
package healthmetrics

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

var (
	deviceHealthyDesc = prometheus.NewDesc("gpu_plugin_device_healthy",
		"1 if the advertised device is healthy, 0 if not; reason says why not.",
		[]string{"resource", "device", "reason"}, nil)
	xidDesc = prometheus.NewDesc("gpu_plugin_xid_errors_total",
		"XID critical errors received from NVML, fatal or skipped (xid=\"other\" past 256 series).",
		[]string{"gpu", "uuid", "xid"}, nil)
	dbeDesc = prometheus.NewDesc("gpu_plugin_ecc_double_bit_events_total",
		"Double-bit ECC events received from NVML.",
		[]string{"gpu", "uuid"}, nil)
	modeDesc = prometheus.NewDesc("gpu_plugin_health_monitor_mode",
		"1 for the health monitor's current mode: events (NVML event set), probing (periodic probes only), disabled, starting, stopped.",
		[]string{"mode"}, nil)
	monitorErrorsDesc = prometheus.NewDesc("gpu_plugin_health_monitor_errors_total",
		"Failed NVML steps of the health monitor by kind (event_set_create, register_events, event_wait, probe, unknown_device_event, recovery_action, row_remap).",
		[]string{"kind"}, nil)
	probeRoundsDesc = prometheus.NewDesc("gpu_plugin_health_probe_rounds_total",
		"Rounds of probing every GPU.", nil, nil)
	eventsDesc = prometheus.NewDesc("gpu_plugin_health_events_total",
		"NVML events received by the health monitor.", nil, nil)
	recoveryActionDesc = prometheus.NewDesc("gpu_plugin_gpu_recovery_action",
		"NVML's recovery action for the GPU as a number (0 none, 1 gpu_reset, 2 node_reboot, 3 drain_p2p, 4 drain_and_reset, "+
			"5 recover_imex_domain, 6 bus_reset, 7 system_reboot); action names it. Absent where the driver lacks the field.",
		[]string{"gpu", "uuid", "action"}, nil)
	remapPendingDesc = prometheus.NewDesc("gpu_plugin_row_remap_pending",
		"1 while a row remap waits for a GPU reset. Absent where the GPU reports no row remapping (before Ampere, MIG on).",
		[]string{"gpu", "uuid"}, nil)
	remapFailureDesc = prometheus.NewDesc("gpu_plugin_row_remap_failure",
		"1 if row remapping failed on the GPU. Absent where the GPU reports no row remapping (before Ampere, MIG on).",
		[]string{"gpu", "uuid"}, nil)
	recoveryHeldDesc = prometheus.NewDesc("gpu_plugin_gpu_recovery_held",
		"1 if the driver wants something done before the GPU's unhealthy devices may return (reason says what), 0 if not.",
		[]string{"gpu", "uuid", "reason"}, nil)
)

// Collector exports device health and the monitor's state. It reads
// everything at scrape time, so no series outlives its device.
type Collector struct {
	state     *health.State
	monitor   *health.Monitor
	resources func() []*sharing.Resource
}

// NewCollector builds the collector. resources lists the advertised
// resources (the plugin manager's); monitor may be nil when NVML is not
// available.
func NewCollector(state *health.State, monitor *health.Monitor, resources func() []*sharing.Resource) *Collector {
	return &Collector{state: state, monitor: monitor, resources: resources}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{deviceHealthyDesc, xidDesc, dbeDesc, modeDesc, monitorErrorsDesc, probeRoundsDesc, eventsDesc,
		recoveryActionDesc, remapPendingDesc, remapFailureDesc, recoveryHeldDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	if c.resources != nil {
		for _, r := range c.resources() {
			for i := range r.Devices {
				d := &r.Devices[i]
				ok, reason := c.state.Check(d.HealthUnits()...)
				v := 0.0
				if ok {
					v = 1
				}
				ch <- prometheus.MustNewConstMetric(deviceHealthyDesc, prometheus.GaugeValue, v, r.Name, d.ID, reason)
			}
		}
	}
	if c.monitor == nil {
		return
	}
	k := c.monitor.Counters()
	for _, x := range k.XIDs {
		ch <- prometheus.MustNewConstMetric(xidDesc, prometheus.CounterValue, float64(x.Count), strconv.Itoa(x.GPU), x.UUID, x.Code)
	}
	for _, e := range k.DoubleBitECC {
		ch <- prometheus.MustNewConstMetric(dbeDesc, prometheus.CounterValue, float64(e.Count), strconv.Itoa(e.GPU), e.UUID)
	}
	for _, mode := range health.Modes {
		v := 0.0
		if mode == k.Mode {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(modeDesc, prometheus.GaugeValue, v, mode)
	}
	for kind, n := range k.Errors {
		ch <- prometheus.MustNewConstMetric(monitorErrorsDesc, prometheus.CounterValue, float64(n), kind)
	}
	ch <- prometheus.MustNewConstMetric(probeRoundsDesc, prometheus.CounterValue, float64(k.ProbeRounds))
	ch <- prometheus.MustNewConstMetric(eventsDesc, prometheus.CounterValue, float64(k.Events))
	collectRecovery(ch, c.monitor.Status().GPUs)
}

// collectRecovery exports what the recovery gate read on each GPU's last
// probe; GPUs not read (lost, unidentified) have no series.
func collectRecovery(ch chan<- prometheus.Metric, gpus []health.GPUStatus) {
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	for _, g := range gpus {
		if g.RowRemap == nil {
			continue
		}
		gpu := strconv.Itoa(g.Index)
		if code, ok := health.RecoveryActionCode(g.RecoveryAction); ok {
			ch <- prometheus.MustNewConstMetric(recoveryActionDesc, prometheus.GaugeValue, float64(code), gpu, g.UUID, g.RecoveryAction)
		}
		if g.RowRemap.Supported {
			ch <- prometheus.MustNewConstMetric(remapPendingDesc, prometheus.GaugeValue, b(g.RowRemap.Pending), gpu, g.UUID)
			ch <- prometheus.MustNewConstMetric(remapFailureDesc, prometheus.GaugeValue, b(g.RowRemap.Failure), gpu, g.UUID)
		}
		ch <- prometheus.MustNewConstMetric(recoveryHeldDesc, prometheus.GaugeValue, b(g.RecoveryHold != ""), gpu, g.UUID, g.RecoveryHold)
	}
}
