package daemon

// Telemetry wiring: the sampler (NVML or DCGM backend), the pod-resources
// cache, the DCGM_* collector and the daemon's own gpu_plugin_* metrics.

import (
	"context"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/dra"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podusage"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/dcgmbackend"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
)

// telemetryParts are the telemetry components; any may be nil.
type telemetryParts struct {
	sampler   *telemetry.Sampler
	collector *telemetry.Collector
	pods      *podresources.Cache
	// podDir is the node's pods, for per-pod accounting (nil when off).
	podDir *podusage.Directory
}

// newTelemetry builds the sampler and the pod-resources cache. Without NVML
// there is no inventory, hence no devices and no sampler.
func (d *Daemon) newTelemetry() error {
	s := d.cfg.TelemetrySettings()
	d.tel = &telemetryParts{}
	if s.Backend == config.TelemetryNone || d.lib == nil {
		if d.lib == nil && s.Backend != config.TelemetryNone {
			d.log.Warn("telemetry off: NVML is unavailable, so there are no GPUs to sample")
		}
		return nil
	}
	metrics, err := telemetry.LoadCounters(s.Collectors)
	if err != nil {
		return err
	}
	for _, skipped := range metrics.Skipped {
		d.log.Warn("counters file line not served", "line", skipped)
	}
	log := d.log.With("component", "telemetry")
	nvmlOpts := nvmlbackend.Options{Lib: d.lib, Logger: log}
	if d.monitor != nil {
		nvmlOpts.XIDs = newXIDTracker(d.monitor).lastXIDs
	}
	sel := telemetry.Selection{Configured: s.Backend, Fallback: nvmlbackend.New(nvmlOpts)}
	useDCGM := s.Backend == config.TelemetryDCGM || s.Backend == config.TelemetryAuto && d.node == nil
	if s.Backend == config.TelemetryAuto && d.node != nil {
		log.Info("simulated node: telemetry through the simulated NVML (DCGM would see the host's GPUs, not these)")
	}
	if useDCGM {
		sel.Primary = dcgmbackend.New(dcgmbackend.Options{
			Client: dcgmbackend.NewClient(s.DCGMAddress), Interval: s.CollectInterval, Logger: log,
		})
		// An explicit choice, or a hostengine that may start after us,
		// is retried; an absent embedded library is not.
		sel.RetryPrimary = s.Backend == config.TelemetryDCGM || s.DCGMAddress != ""
	}
	samplerOpts := telemetry.SamplerOptions{
		Inventory: d.inv.Load, Backends: sel, Metrics: metrics, Interval: s.CollectInterval, Logger: log,
	}
	if d.monitor != nil {
		// GPU_IS_LOST from any call makes the GPU unhealthy, not only the
		// health monitor's own calls.
		samplerOpts.OnDeviceError = d.monitor.ReportError
	}
	if s.PodResourcesSocket != "" {
		d.tel.pods = podresources.New(podresources.Options{
			Socket: s.PodResourcesSocket, Interval: s.PodResourcesInterval, Resolver: d.podResolver,
			Logger: d.log.With("component", "pod-resources"),
		})
	}
	if s.PerPodUsage && d.tel.pods != nil && d.kube != nil {
		d.tel.podDir = podusage.NewDirectory()
		samplerOpts.Attributor = podusage.NewAccountant(podusage.Options{
			Resolver: podusage.NewResolver(s.ProcRoot), Holders: d.tel.pods.Snapshot, Directory: d.tel.podDir,
			Logger: d.log.With("component", "per-pod-usage"),
		})
		log.Info("per-pod accounting on: GPU processes are attributed to pods through their cgroups", "procRoot", s.ProcRoot)
	}
	d.tel.sampler = telemetry.NewSampler(samplerOpts)
	opts := telemetry.CollectorOptions{Sampler: d.tel.sampler, ReplaceBlanksInModelName: s.ReplaceBlanksInModelName,
		PerPodDCGM:  s.PerPodDCGMSeries && !s.KubernetesVirtualGPUs && samplerOpts.Attributor != nil,
		VirtualGPUs: s.KubernetesVirtualGPUs && d.tel.pods != nil}
	if opts.VirtualGPUs {
		log.Info("DCGM_* series in dcgm-exporter's --kubernetes-virtual-gpus shape: one copy per container and replica holding a device (vgpu label), FB_USED and GPU_UTIL also per pod")
		if s.PerPodDCGMSeries {
			log.Info("--per-pod-dcgm-series is superseded by --kubernetes-virtual-gpus, whose per-pod FB_USED and GPU_UTIL series carry vgpu too")
		}
		if samplerOpts.Attributor == nil {
			log.Warn("--kubernetes-virtual-gpus without per-pod accounting (no API server client): DCGM_FI_DEV_FB_USED and DCGM_FI_DEV_GPU_UTIL have no per-pod series")
		}
	}
	if !s.NoHostname {
		opts.Hostname = d.hostname()
	}
	if d.tel.pods != nil {
		opts.Pods = d.tel.pods.Snapshot
	}
	d.tel.collector = telemetry.NewCollector(opts)
	return nil
}

// hostname is the Hostname label: NODE_NAME (--node-name), else the host's
// name, as dcgm-exporter takes it.
func (d *Daemon) hostname() string {
	if d.cfg.Daemon.NodeName != "" {
		return d.cfg.Daemon.NodeName
	}
	h, err := os.Hostname()
	if err != nil {
		d.log.Warn("no host name for the Hostname label; set NODE_NAME", "err", err)
		return ""
	}
	return h
}

// runTelemetry starts the sampler and the pod-resources cache.
func (d *Daemon) runTelemetry(run func(string, func(context.Context) error)) {
	if d.tel.sampler != nil {
		run("telemetry sampler", d.tel.sampler.Run)
	}
	if d.tel.pods != nil {
		run("pod attribution", d.tel.pods.Run)
	}
	if d.tel.podDir != nil {
		run("pod directory", d.watchPods)
	}
}

// watchPods keeps the per-pod accounting's directory of the node's pods.
func (d *Daemon) watchPods(ctx context.Context) error {
	dir := d.tel.podDir
	d.kube.WatchPods(ctx, d.hostname(), d.log.With("component", "pod-directory"), kube.PodHandler{
		Set: func(p *kube.Pod) {
			pod := podusage.Pod{UID: p.UID, Namespace: p.Namespace, Name: p.Name, Containers: map[string]string{},
				Finished: p.Status.Phase == kube.PodSucceeded || p.Status.Phase == kube.PodFailed}
			for _, c := range slices.Concat(p.Status.InitContainerStatuses, p.Status.ContainerStatuses) {
				if c.ContainerID != "" {
					pod.Containers[podusage.ContainerID(c.ContainerID)] = c.Name
				}
			}
			dir.Set(pod)
		},
		Delete: dir.Delete,
		Synced: dir.MarkSynced,
	})
	return nil
}

// pluginEvents are the plugin hooks telemetry needs: a fresh attribution
// right after an Allocate.
func (d *Daemon) pluginEvents() plugin.Events {
	return plugin.Events{Allocated: func(string, []string) {
		if d.tel != nil && d.tel.pods != nil {
			d.tel.pods.Refresh()
		}
	}}
}

// podResolver maps a kubelet device to the GPU or MIG device behind it
// through the resources we advertise (so renamed, shared, MIG and replica
// IDs resolve as we named them), falling back to UUID-shaped IDs of GPUs
// in the inventory (devices advertised before a reload).
func (d *Daemon) podResolver() podresources.Resolver {
	byName := map[string]*sharing.Resource{}
	if d.plugins != nil {
		for _, r := range d.plugins.Resources() {
			byName[r.Name] = r
		}
	}
	known := map[string]bool{}
	if inv := d.inv.Load(); inv != nil {
		for _, g := range inv.GPUs {
			if g.Usable() {
				known[g.UUID] = true
			}
			for _, m := range g.MIGDevices {
				known[m.UUID] = true
			}
		}
	}
	fallback := podresources.ResolveUUIDs(func(uuid string) bool { return known[uuid] })
	return func(resource, id string) (string, bool) {
		if r := byName[resource]; r != nil {
			if dev, ok := r.Lookup(id); ok {
				return dev.Physical, true
			}
		}
		if resource == dra.DriverName && d.dra != nil {
			// A device of a DRA claim, by its name in the slice.
			return d.dra.UUIDOf(id)
		}
		return fallback(resource, id)
	}
}

// telemetryCollectors are what the metrics registry serves besides health
// and reloads. The DCGM_* collector is not among them: metricsHandler
// writes it after the registry's families.
func (d *Daemon) telemetryCollectors() []prometheus.Collector {
	cs := []prometheus.Collector{&daemonCollector{d: d}}
	if d.tel.sampler != nil {
		cs = append(cs, telemetry.NewStatsCollector(d.tel.sampler, nil))
	}
	if d.tel.pods != nil {
		cs = append(cs, d.tel.pods)
	}
	return cs
}

// metricsHandler serves /metrics: the registry, then the DCGM_* families
// (text format 0.0.4, as dcgm-exporter); without telemetry, plain.
func (d *Daemon) metricsHandler(reg prometheus.Gatherer, plain http.Handler) http.Handler {
	if d.tel == nil || d.tel.collector == nil {
		return plain
	}
	return telemetry.Handler(reg, d.tel.collector, d.log.With("component", "http"))
}

// telemetryAlive is nil unless the sampler's loop is stuck (liveness).
func (d *Daemon) telemetryAlive() error {
	if d.tel == nil || d.tel.sampler == nil {
		return nil
	}
	return d.tel.sampler.Alive(time.Now())
}

// telemetryProblems say why samples are not fresh (readiness).
func (d *Daemon) telemetryProblems() []string {
	if d.tel == nil || d.tel.sampler == nil {
		return nil
	}
	if err := d.tel.sampler.Fresh(time.Now()); err != nil {
		return []string{err.Error()}
	}
	return nil
}

// Telemetry is the sampler, or nil when telemetry is off.
func (d *Daemon) Telemetry() *telemetry.Sampler {
	if d.tel == nil {
		return nil
	}
	return d.tel.sampler
}

// PodAttribution is the pod-resources cache, or nil when attribution is off.
func (d *Daemon) PodAttribution() *podresources.Cache {
	if d.tel == nil {
		return nil
	}
	return d.tel.pods
}

// xidTracker turns the health monitor's XID counters into "the last XID
// per GPU", the value of DCGM_FI_DEV_XID_ERRORS. It sees counts once per
// sampling round, so when several different XIDs hit one GPU within a
// round it keeps the one that occurred most often (then the higher code).
type xidTracker struct {
	mon  *health.Monitor
	mu   sync.Mutex
	prev map[xidSeen]uint64
	last map[int]uint64
}

type xidSeen struct {
	gpu  int
	code string
}

func newXIDTracker(m *health.Monitor) *xidTracker {
	return &xidTracker{mon: m, prev: map[xidSeen]uint64{}, last: map[int]uint64{}}
}

// lastXIDs implements nvmlbackend.Options.XIDs. It returns nil (the
// field is left out) while the monitor is not receiving XID events
// (starting, probing only, health checks disabled): "no XID" would then be
// a guess.
func (x *xidTracker) lastXIDs() map[int]uint64 {
	x.mu.Lock()
	defer x.mu.Unlock()
	type best struct{ delta, code uint64 }
	round := map[int]best{}
	counters := x.mon.Counters()
	for _, c := range counters.XIDs {
		k := xidSeen{c.GPU, c.Code}
		delta := c.Count - x.prev[k]
		x.prev[k] = c.Count
		code, err := strconv.ParseUint(c.Code, 10, 64)
		if delta == 0 || err != nil { // "other": past the series limit
			continue
		}
		if b := round[c.GPU]; delta > b.delta || delta == b.delta && code > b.code {
			round[c.GPU] = best{delta, code}
		}
	}
	for gpu, b := range round {
		x.last[gpu] = b.code
	}
	if counters.Mode != health.ModeEvents {
		return nil
	}
	out := make(map[int]uint64, len(x.last))
	for k, v := range x.last {
		out[k] = v
	}
	return out
}

var (
	resourceRegisteredDesc = prometheus.NewDesc("gpu_plugin_resource_registered",
		"1 if the resource is registered with the kubelet and the kubelet holds its ListAndWatch stream, 0 if not (/readyz says why).", []string{"resource"}, nil)
	resourceDevicesDesc = prometheus.NewDesc("gpu_plugin_resource_devices",
		"Devices advertised for the resource (replicas count one each).", []string{"resource"}, nil)
	resourceStreamsDesc = prometheus.NewDesc("gpu_plugin_resource_list_and_watch_streams",
		"Open ListAndWatch streams from the kubelet for the resource (1 when the kubelet is connected).", []string{"resource"}, nil)
	registrationsDesc = prometheus.NewDesc("gpu_plugin_registrations_total",
		"Successful registrations of the resource with the kubelet (a kubelet restart causes one).", []string{"resource"}, nil)
	allocationsDesc = prometheus.NewDesc("gpu_plugin_allocations_total",
		"Allocate calls the resource answered successfully.", []string{"resource"}, nil)
	allocationErrorsDesc = prometheus.NewDesc("gpu_plugin_allocation_errors_total",
		"Allocate calls the resource refused (unknown or unhealthy device, bad request).", []string{"resource"}, nil)
	nvmlUpDesc = prometheus.NewDesc("gpu_plugin_nvml_up",
		"1 if NVML initialised, 0 if the daemon runs without it (--fail-on-init-error=false).", nil, nil)
	nvmlCallsDesc = prometheus.NewDesc("gpu_plugin_nvml_calls_total",
		"NVML calls made by the daemon (health probes, inventory scans, telemetry).", nil, nil)
	nvmlErrorsDesc = prometheus.NewDesc("gpu_plugin_nvml_call_errors_total",
		"NVML calls that failed, not counting expected answers such as NOT_SUPPORTED.", nil, nil)
	nvmlFunctionErrorsDesc = prometheus.NewDesc("gpu_plugin_nvml_function_errors_total",
		"NVML calls that failed by NVML function (e.g. nvmlDeviceGetTemperature), expected answers excluded.", []string{"function"}, nil)
)

// daemonCollector exports the kubelet side's and NVML's counters.
type daemonCollector struct{ d *Daemon }

func (c *daemonCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{resourceRegisteredDesc, resourceDevicesDesc, resourceStreamsDesc, registrationsDesc,
		allocationsDesc, allocationErrorsDesc, nvmlUpDesc, nvmlCallsDesc, nvmlErrorsDesc, nvmlFunctionErrorsDesc} {
		ch <- d
	}
}

func (c *daemonCollector) Collect(ch chan<- prometheus.Metric) {
	if c.d.plugins != nil {
		for _, st := range c.d.plugins.Status() {
			reg := 0.0
			if st.Registered {
				reg = 1
			}
			ch <- prometheus.MustNewConstMetric(resourceRegisteredDesc, prometheus.GaugeValue, reg, st.Resource)
			ch <- prometheus.MustNewConstMetric(resourceDevicesDesc, prometheus.GaugeValue, float64(st.Devices), st.Resource)
			ch <- prometheus.MustNewConstMetric(resourceStreamsDesc, prometheus.GaugeValue, float64(st.Streams), st.Resource)
			ch <- prometheus.MustNewConstMetric(registrationsDesc, prometheus.CounterValue, float64(st.Registrations), st.Resource)
			ch <- prometheus.MustNewConstMetric(allocationsDesc, prometheus.CounterValue, float64(st.Allocations), st.Resource)
			ch <- prometheus.MustNewConstMetric(allocationErrorsDesc, prometheus.CounterValue, float64(st.AllocationErrors), st.Resource)
		}
	}
	up := 0.0
	if c.d.lib != nil {
		up = 1
		calls, failed := c.d.lib.Stats()
		ch <- prometheus.MustNewConstMetric(nvmlCallsDesc, prometheus.CounterValue, float64(calls))
		ch <- prometheus.MustNewConstMetric(nvmlErrorsDesc, prometheus.CounterValue, float64(failed))
		for fn, n := range c.d.lib.FailedCalls() {
			ch <- prometheus.MustNewConstMetric(nvmlFunctionErrorsDesc, prometheus.CounterValue, float64(n), fn)
		}
	}
	ch <- prometheus.MustNewConstMetric(nvmlUpDesc, prometheus.GaugeValue, up)
}
