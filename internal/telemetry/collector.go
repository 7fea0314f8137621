package telemetry

import (
	"bytes"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
)

// DCGM-compatible label names, in dcgm-exporter's template order.
const (
	LabelGPU       = "gpu"
	LabelUUID      = "UUID"
	LabelPCIBusID  = "pci_bus_id"
	LabelDevice    = "device"
	LabelModelName = "modelName"
	LabelGIProfile = "GPU_I_PROFILE"
	LabelGIID      = "GPU_I_ID"
	LabelHostname  = "Hostname"
	LabelPod       = "pod"
	LabelNamespace = "namespace"
	LabelContainer = "container"
	// LabelVGPU is the replica number of a shared device's ID on
	// VirtualGPUs series, as dcgm-exporter names it.
	LabelVGPU = "vgpu"
	// PodInfoName is the attribution info metric.
	PodInfoName = "gpu_plugin_pod_gpu_info"

	collectorDCGM    = "dcgm"
	collectorPodInfo = "pods"
	podInfoHelp      = "1 for every container holding a GPU or MIG device; join it to DCGM_* series on UUID and GPU_I_ID to attribute shared (time-sliced) devices to every pod that shares them."
	scrapeDurName    = "gpu_plugin_scrape_collector_duration_seconds"
	scrapeDurHelp    = "How long a telemetry collector took at this scrape."
	scrapeOKName     = "gpu_plugin_scrape_collector_success"
	scrapeOKHelp     = "1 if a telemetry collector served current data at this scrape, 0 if it had none (no sample yet, or the latest is stale)."
)

// CollectorOptions configure a Collector.
type CollectorOptions struct {
	Sampler *Sampler
	// Pods returns the current pod attribution; nil turns attribution off.
	Pods func() *podresources.Snapshot
	// Hostname is the Hostname label's value; empty omits the label
	// (dcgm-exporter's --no-hostname).
	Hostname string
	// ReplaceBlanksInModelName writes modelName with dashes for blanks.
	ReplaceBlanksInModelName bool
	// PerPodDCGM adds, with per-pod accounting, one DCGM_FI_DEV_FB_USED
	// and DCGM_FI_DEV_GPU_UTIL series per pod (labelled pod_uid) beside
	// each device series: the shape of dcgm-exporter's per-pod series
	// (--kubernetes-virtual-gpus). Off, the DCGM families keep one series
	// per device, so sums over them stay right.
	PerPodDCGM bool
	// VirtualGPUs serves dcgm-exporter's --kubernetes-virtual-gpus shape:
	// every DCGM series of a device containers hold is replaced by one
	// copy per holding container and device ID, labelled pod, namespace,
	// container and, for a replica ID "<uuid>::<n>", vgpu="<n>"; a device
	// nobody holds keeps its own series. DCGM_FI_DEV_FB_USED and
	// DCGM_FI_DEV_GPU_UTIL instead keep the device series (without pod
	// labels) and, with per-pod accounting, add one series per container
	// and replica with its own value, labelled pod_uid and vgpu too. It
	// supersedes PerPodDCGM.
	VirtualGPUs bool
	Now         func() time.Time
}

// Collector serves the latest snapshot under dcgm-exporter's names, plus
// gpu_plugin_pod_gpu_info, in the manner of node_exporter's collectors:
// metrics built from cached state at scrape time, with per-collector
// duration and success. It calls nothing outside the process.
//
// It is a prometheus.Collector, unchecked (Describe sends nothing):
// dcgm-exporter's families mix label sets (MIG series add GPU_I_PROFILE
// and GPU_I_ID, attributed series add pod labels), which a fixed Desc
// cannot describe. The daemon serves it through WriteText instead, which
// writes the same exposition from pre-rendered label sets, several times
// cheaper than the registry's gather-and-encode.
type Collector struct {
	opts    CollectorOptions
	metrics []dcgmMetric // sorted by name
	driver  string       // the DCGM_FI_DRIVER_VERSION label's name, or ""
	view    atomic.Pointer[view]
	uview   atomic.Pointer[usageView]
}

type dcgmMetric struct {
	field  Field
	name   string
	desc   *prometheus.Desc
	vt     prometheus.ValueType
	header []byte // "# HELP …\n# TYPE …\n"
}

// view is what a scrape needs besides the values, built once per device
// layout and attribution and reused by every scrape until either changes.
type view struct {
	layout *Layout
	pods   *podresources.Snapshot
	labels [][]*dto.LabelPair // per target, sorted by name
	// base are the per-target labels without a single holder's pod
	// labels: per-pod series add their own.
	base  []labelSet
	text  [][]byte // per target: `{name="value",…}`
	order []int    // targets in exposition order
	info  []prometheus.Metric
	// infoText is the whole gpu_plugin_pod_gpu_info family, rendered.
	infoText []byte
	// With VirtualGPUs: vrows are the series of each DCGM family but
	// FB_USED and GPU_UTIL, in exposition order; baseLabels and baseText
	// are each target's labels without pod labels (FB_USED's and
	// GPU_UTIL's device series), baseOrder their exposition order.
	vrows      []vrow
	baseLabels [][]*dto.LabelPair
	baseText   [][]byte
	baseOrder  []int
}

// vrow is one VirtualGPUs series of a target: a holding container and
// replica, or the target itself when nobody holds it.
type vrow struct {
	target int
	labels []*dto.LabelPair
	text   []byte
}

var (
	scrapeDurationDesc = prometheus.NewDesc(scrapeDurName, scrapeDurHelp, []string{"collector"}, nil)
	scrapeSuccessDesc  = prometheus.NewDesc(scrapeOKName, scrapeOKHelp, []string{"collector"}, nil)
)

// NewCollector builds the collector for the sampler's metric set.
func NewCollector(opts CollectorOptions) *Collector {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	c := &Collector{opts: opts}
	for _, m := range opts.Sampler.Metrics().Metrics {
		vt, typ := prometheus.GaugeValue, "gauge"
		switch m.Kind {
		case KindLabel:
			c.driver = m.Name
			continue
		case KindCounter:
			vt, typ = prometheus.CounterValue, "counter"
		}
		c.metrics = append(c.metrics, dcgmMetric{field: m.Field, name: m.Name, desc: prometheus.NewDesc(m.Name, m.Help, nil, nil), vt: vt,
			header: header(m.Name, m.Help, typ)})
	}
	slices.SortFunc(c.metrics, func(a, b dcgmMetric) int { return strings.Compare(a.name, b.name) })
	return c
}

func header(name, help, typ string) []byte {
	return []byte("# HELP " + name + " " + helpEscaper.Replace(help) + "\n# TYPE " + name + " " + typ + "\n")
}

// Escaping as the text exposition format wants it.
var (
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
	valueEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
)

// Describe implements prometheus.Collector; it sends nothing (unchecked).
func (c *Collector) Describe(chan<- *prometheus.Desc) {}

// state is what one scrape serves.
func (c *Collector) state() (snap *Snapshot, v *view, fresh bool, now time.Time) {
	now = c.opts.Now()
	snap = c.opts.Sampler.Snapshot()
	if snap == nil {
		return nil, nil, false, now
	}
	var pods *podresources.Snapshot
	if c.opts.Pods != nil {
		pods = c.opts.Pods()
	}
	return snap, c.viewFor(snap.Layout, pods), c.opts.Sampler.Fresh(now) == nil, now
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	snap, v, ok, start := c.state()
	if snap != nil {
		c.collectFields(ch, snap, v, start)
		if u := c.usageViewFor(snap, v); u != nil {
			u.collectUsage(ch)
		}
	}
	mid := c.opts.Now()
	c.report(ch, collectorDCGM, mid.Sub(start), ok)
	if c.opts.Pods == nil {
		return
	}
	if v != nil {
		for _, m := range v.info {
			ch <- m
		}
	}
	c.report(ch, collectorPodInfo, c.opts.Now().Sub(mid), v != nil)
}

func (c *Collector) report(ch chan<- prometheus.Metric, name string, took time.Duration, ok bool) {
	ch <- prometheus.MustNewConstMetric(scrapeDurationDesc, prometheus.GaugeValue, took.Seconds(), name)
	ch <- prometheus.MustNewConstMetric(scrapeSuccessDesc, prometheus.GaugeValue, b2f(ok), name)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// collectFields sends one series per servable device and present field.
// The series share their device's label pairs and come from one
// allocation per scrape.
func (c *Collector) collectFields(ch chan<- prometheus.Metric, snap *Snapshot, v *view, now time.Time) {
	stale := c.opts.Sampler.StaleAfter()
	if c.opts.VirtualGPUs {
		c.collectVirtual(ch, snap, v, now)
		return
	}
	n := 0
	for i := range snap.Devices {
		if snap.Devices[i].Servable(now, stale) {
			n += len(c.metrics)
		}
	}
	buf := make([]series, 0, n)
	for i := range snap.Devices {
		d := &snap.Devices[i]
		if !d.Servable(now, stale) {
			continue
		}
		for k := range c.metrics {
			m := &c.metrics[k]
			x, ok := d.Get(m.field)
			if !ok {
				continue
			}
			buf = append(buf, series{m: m, labels: v.labels[i], value: x})
			ch <- &buf[len(buf)-1]
		}
	}
	u := c.usageViewFor(snap, v)
	if u == nil {
		return
	}
	for k := range c.metrics {
		m := &c.metrics[k]
		if !c.hasPodSeries(m.field) {
			continue
		}
		u.collectPodSeries(ch, m, now, stale)
	}
}

// collectVirtual is collectFields' VirtualGPUs shape.
func (c *Collector) collectVirtual(ch chan<- prometheus.Metric, snap *Snapshot, v *view, now time.Time) {
	stale := c.opts.Sampler.StaleAfter()
	u := c.usageViewFor(snap, v)
	for k := range c.metrics {
		m := &c.metrics[k]
		if !isPerProcess(m.field) {
			for r := range v.vrows {
				row := &v.vrows[r]
				if d := &snap.Devices[row.target]; d.Servable(now, stale) {
					if x, ok := d.Get(m.field); ok {
						ch <- &series{m: m, labels: row.labels, value: x}
					}
				}
			}
			continue
		}
		for i := range snap.Devices {
			if d := &snap.Devices[i]; d.Servable(now, stale) {
				if x, ok := d.Get(m.field); ok {
					ch <- &series{m: m, labels: v.baseLabels[i], value: x}
				}
			}
		}
		if u != nil {
			u.collectPodSeries(ch, m, now, stale)
		}
	}
}

// WriteText appends the collector's families to buf in the text exposition
// format (0.0.4): the same lines Collect yields once a registry has
// gathered and encoded them, families sorted by name and series by label
// values, but written from label sets rendered once per view.
func (c *Collector) WriteText(buf *bytes.Buffer) {
	snap, v, ok, start := c.state()
	var u *usageView
	if snap != nil {
		u = c.usageViewFor(snap, v)
		stale := c.opts.Sampler.StaleAfter()
		servable := make([]bool, len(snap.Devices))
		for i := range snap.Devices {
			servable[i] = snap.Devices[i].Servable(start, stale)
		}
		var num [32]byte
		for k := range c.metrics {
			m := &c.metrics[k]
			if c.opts.VirtualGPUs {
				c.writeVirtual(buf, m, snap, v, u, servable)
				continue
			}
			wrote := false
			order := v.order
			if u != nil && c.hasPodSeries(m.field) {
				order = u.mixed
			}
			for _, i := range order {
				if i < 0 {
					c.writePodSeries(buf, m, snap, u, -i-1, servable, &wrote)
					continue
				}
				if !servable[i] {
					continue
				}
				x, has := snap.Devices[i].Get(m.field)
				if !has {
					continue
				}
				if !wrote {
					buf.Write(m.header)
					wrote = true
				}
				buf.WriteString(m.name)
				buf.Write(v.text[i])
				buf.WriteByte(' ')
				buf.Write(appendFloat(num[:0], x))
				buf.WriteByte('\n')
			}
		}
	}
	took := c.opts.Now().Sub(start)
	if u != nil {
		u.writeUnattributed(buf)
		u.writeMPS(buf) // gpu_plugin_mps_… sorts between …_gpu_unattributed_… and …_pod_…
	}
	if c.opts.Pods != nil && v != nil {
		buf.Write(v.infoText)
	}
	if u != nil {
		u.writePods(buf)
	}
	var num [32]byte
	line := func(name, collector string, x float64) {
		buf.WriteString(name)
		buf.WriteString(`{collector="`)
		buf.WriteString(collector)
		buf.WriteString(`"} `)
		buf.Write(appendFloat(num[:0], x))
		buf.WriteByte('\n')
	}
	buf.Write(scrapeHeaders[0])
	line(scrapeDurName, collectorDCGM, took.Seconds())
	if c.opts.Pods != nil {
		line(scrapeDurName, collectorPodInfo, 0) // pre-rendered: nothing to do at scrape time
	}
	buf.Write(scrapeHeaders[1])
	line(scrapeOKName, collectorDCGM, b2f(ok))
	if c.opts.Pods != nil {
		line(scrapeOKName, collectorPodInfo, b2f(v != nil))
	}
}

// writeVirtual writes one DCGM family in the VirtualGPUs shape.
func (c *Collector) writeVirtual(buf *bytes.Buffer, m *dcgmMetric, snap *Snapshot, v *view, u *usageView, servable []bool) {
	wrote := false
	var num [32]byte
	line := func(text []byte, x float64) {
		if !wrote {
			buf.Write(m.header)
			wrote = true
		}
		buf.WriteString(m.name)
		buf.Write(text)
		buf.WriteByte(' ')
		buf.Write(appendFloat(num[:0], x))
		buf.WriteByte('\n')
	}
	if !isPerProcess(m.field) {
		for r := range v.vrows {
			row := &v.vrows[r]
			if !servable[row.target] {
				continue
			}
			if x, has := snap.Devices[row.target].Get(m.field); has {
				line(row.text, x)
			}
		}
		return
	}
	order := v.baseOrder
	if u != nil {
		order = u.mixed
	}
	for _, i := range order {
		if i < 0 {
			c.writePodSeries(buf, m, snap, u, -i-1, servable, &wrote)
			continue
		}
		if !servable[i] {
			continue
		}
		if x, has := snap.Devices[i].Get(m.field); has {
			line(v.baseText[i], x)
		}
	}
}

// writePodSeries writes per-pod row r of a DCGM family (FB_USED,
// GPU_UTIL), if its device is servable and the value exists.
func (c *Collector) writePodSeries(buf *bytes.Buffer, m *dcgmMetric, snap *Snapshot, u *usageView, r int, servable []bool, wrote *bool) {
	p := &snap.Usage.Pods[u.dcgmEntry[r]]
	if !servable[p.Target] {
		return
	}
	x, ok := podValue(m.field, p)
	if !ok {
		return
	}
	if !*wrote {
		buf.Write(m.header)
		*wrote = true
	}
	var num [32]byte
	buf.WriteString(m.name)
	buf.Write(u.dcgmText[r])
	buf.WriteByte(' ')
	buf.Write(appendFloat(num[:0], x))
	buf.WriteByte('\n')
}

var scrapeHeaders = [2][]byte{header(scrapeDurName, scrapeDurHelp, "gauge"), header(scrapeOKName, scrapeOKHelp, "gauge")}

// appendFloat formats a sample value as the text format does.
func appendFloat(b []byte, f float64) []byte {
	switch {
	case f == 1:
		return append(b, '1')
	case f == 0:
		return append(b, '0')
	case f == -1:
		return append(b, "-1"...)
	case math.IsNaN(f):
		return append(b, "NaN"...)
	case math.IsInf(f, +1):
		return append(b, "+Inf"...)
	case math.IsInf(f, -1):
		return append(b, "-Inf"...)
	}
	return strconv.AppendFloat(b, f, 'g', -1, 64)
}

// series is one DCGM sample: a prometheus.Metric whose label pairs are
// shared with the other series of its device.
type series struct {
	m      *dcgmMetric
	labels []*dto.LabelPair
	value  float64
}

func (s *series) Desc() *prometheus.Desc { return s.m.desc }

func (s *series) Write(out *dto.Metric) error {
	out.Label = s.labels
	if s.m.vt == prometheus.CounterValue {
		out.Counter = &dto.Counter{Value: &s.value}
	} else {
		out.Gauge = &dto.Gauge{Value: &s.value}
	}
	return nil
}

// viewFor returns the cached view, rebuilding it when the layout or the
// attribution changed.
func (c *Collector) viewFor(layout *Layout, pods *podresources.Snapshot) *view {
	if v := c.view.Load(); v != nil && v.layout == layout && v.pods == pods {
		return v
	}
	v := c.buildView(layout, pods)
	c.view.Store(v)
	return v
}

func (c *Collector) buildView(layout *Layout, pods *podresources.Snapshot) *view {
	n := len(layout.Targets)
	v := &view{layout: layout, pods: pods, labels: make([][]*dto.LabelPair, n), base: make([]labelSet, n), text: make([][]byte, n), order: make([]int, n)}
	if c.opts.VirtualGPUs {
		v.baseLabels, v.baseText = make([][]*dto.LabelPair, n), make([][]byte, n)
	}
	driver := ""
	if layout.Inventory != nil {
		driver = layout.Inventory.DriverVersion
	}
	var infos [][]*dto.LabelPair
	for i := range layout.Targets {
		t := &layout.Targets[i]
		model := t.GPU.Name
		if c.opts.ReplaceBlanksInModelName {
			model = strings.ReplaceAll(model, " ", "-")
		}
		var lp labelSet
		// dcgm-exporter's template order; expositions list label pairs
		// sorted by name, which Prometheus ignores anyway.
		lp.add(LabelGPU, gpuLabel(t.GPU))
		lp.add(LabelUUID, t.GPU.UUID)
		lp.add(LabelPCIBusID, t.GPU.PCIBusID)
		lp.add(LabelDevice, "nvidia"+gpuLabel(t.GPU))
		lp.add(LabelModelName, model)
		if t.MIG != nil {
			lp.add(LabelGIProfile, t.MIG.Profile)
			lp.add(LabelGIID, strconv.Itoa(t.MIG.GPUInstanceID))
		}
		if c.opts.Hostname != "" {
			lp.add(LabelHostname, c.opts.Hostname)
		}
		if c.driver != "" {
			lp.add(c.driver, driver)
		}
		v.base[i] = slices.Clone(lp)
		holders := pods.Holders(t.Key)
		if c.opts.VirtualGPUs {
			v.baseLabels[i] = labelSet(slices.Clone(lp)).sorted()
			v.baseText[i] = render(v.baseLabels[i])
			v.addVirtualRows(i, holders)
		}
		// A device one container holds carries its pod, as dcgm-exporter
		// labels it; a shared one carries none (its values belong to the
		// device, not to any one pod) and is joined through
		// gpu_plugin_pod_gpu_info.
		if len(holders) == 1 {
			lp.add(LabelPod, holders[0].Pod)
			lp.add(LabelNamespace, holders[0].Namespace)
			lp.add(LabelContainer, holders[0].Container)
		}
		v.labels[i] = lp.sorted()
		v.text[i] = render(v.labels[i])
		v.order[i] = i
		for _, h := range holders {
			info := c.podInfo(t, h)
			v.info = append(v.info, constInfo{labels: info})
			infos = append(infos, info)
		}
	}
	slices.SortStableFunc(v.order, func(a, b int) int { return compareLabels(v.labels[a], v.labels[b]) })
	if c.opts.VirtualGPUs {
		slices.SortStableFunc(v.vrows, func(a, b vrow) int { return compareLabels(a.labels, b.labels) })
		v.baseOrder = sortedBy(v.baseLabels)
	}
	if len(infos) > 0 {
		slices.SortStableFunc(infos, compareLabels)
		var b bytes.Buffer
		b.Write(header(PodInfoName, podInfoHelp, "gauge"))
		for _, lp := range infos {
			b.WriteString(PodInfoName)
			b.Write(render(lp))
			b.WriteString(" 1\n")
		}
		v.infoText = b.Bytes()
	}
	return v
}

// addVirtualRows adds target i's VirtualGPUs series: one per holding
// container and device ID, as dcgm-exporter copies them (the vgpu label
// only for a replica ID, pod_uid never: dcgm-exporter adds it only with
// --kubernetes-enable-pod-uid, which this exporter does not have), or the
// target's own labels when nobody holds it.
func (v *view) addVirtualRows(i int, holders []podresources.Holder) {
	if len(holders) == 0 {
		v.vrows = append(v.vrows, vrow{target: i, labels: v.baseLabels[i], text: v.baseText[i]})
		return
	}
	first := len(v.vrows)
	for _, h := range holders {
		for _, vgpu := range vgpusOf(h, nil) {
			lp := slices.Clone(v.base[i])
			lp.add(LabelPod, h.Pod)
			lp.add(LabelNamespace, h.Namespace)
			lp.add(LabelContainer, h.Container)
			if vgpu != "" {
				lp.add(LabelVGPU, vgpu)
			}
			text := render(lp.sorted())
			// One container holding the device through two resources
			// would repeat a series.
			if slices.ContainsFunc(v.vrows[first:], func(r vrow) bool { return bytes.Equal(r.text, text) }) {
				continue
			}
			v.vrows = append(v.vrows, vrow{target: i, labels: lp, text: text})
		}
	}
}

// vgpusOf appends the vgpu label values of h's device IDs to dst, each
// once: the replica number, or "" (no label) for a whole device or a
// holder without IDs.
func vgpusOf(h podresources.Holder, dst []string) []string {
	if len(h.DeviceIDs) == 0 && !slices.Contains(dst, "") {
		return append(dst, "")
	}
	for _, id := range h.DeviceIDs {
		n, _ := podresources.Replica(id)
		if !slices.Contains(dst, n) {
			dst = append(dst, n)
		}
	}
	return dst
}

// compareLabels orders series as client_golang's registry does: fewer
// labels first, then by label values in label-name order.
func compareLabels(a, b []*dto.LabelPair) int {
	if len(a) != len(b) {
		return len(a) - len(b)
	}
	for k := range a {
		if c := strings.Compare(a[k].GetValue(), b[k].GetValue()); c != 0 {
			return c
		}
	}
	return 0
}

type labelSet []*dto.LabelPair

func (l *labelSet) add(name, value string) {
	*l = append(*l, &dto.LabelPair{Name: &name, Value: &value})
}

func (l labelSet) sorted() []*dto.LabelPair {
	slices.SortFunc(l, func(a, b *dto.LabelPair) int { return strings.Compare(a.GetName(), b.GetName()) })
	return l
}

// render writes a label set as `{name="value",…}`.
func render(lp []*dto.LabelPair) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for k, p := range lp {
		if k > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p.GetName())
		b.WriteString(`="`)
		b.WriteString(valueEscaper.Replace(p.GetValue()))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.Bytes()
}

// podInfo is the label set of one gpu_plugin_pod_gpu_info series: a
// container holding a device, with the device's join labels.
func (c *Collector) podInfo(t *Target, h podresources.Holder) []*dto.LabelPair {
	var lp labelSet
	lp.add(LabelNamespace, h.Namespace)
	lp.add(LabelPod, h.Pod)
	lp.add(LabelContainer, h.Container)
	lp.add("resource", h.Resource)
	c.addUnitLabels(&lp, t)
	return lp.sorted()
}

// constInfo is one gpu_plugin_pod_gpu_info series.
type constInfo struct{ labels []*dto.LabelPair }

var podInfoDesc = prometheus.NewDesc(PodInfoName, podInfoHelp, nil, nil)

func (m constInfo) Desc() *prometheus.Desc { return podInfoDesc }

func (m constInfo) Write(out *dto.Metric) error {
	one := 1.0
	out.Label = m.labels
	out.Gauge = &dto.Gauge{Value: &one}
	return nil
}
