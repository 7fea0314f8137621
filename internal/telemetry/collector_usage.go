package telemetry

import (
	"bytes"
	"slices"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
)

// Per-pod accounting families (--per-pod-usage), in base units.
const (
	PodMemoryName          = "gpu_plugin_pod_gpu_memory_used_bytes"
	PodSMUtilName          = "gpu_plugin_pod_gpu_sm_utilization_ratio"
	PodProcessesName       = "gpu_plugin_pod_gpu_processes"
	UnattributedMemoryName = "gpu_plugin_gpu_unattributed_memory_used_bytes"
	UnattributedSMUtilName = "gpu_plugin_gpu_unattributed_sm_utilization_ratio"
	UnattributedProcsName  = "gpu_plugin_gpu_unattributed_processes"
	// MPSClientsName counts each device's MPS clients, with per-pod
	// accounting (the processes are read only then).
	MPSClientsName = "gpu_plugin_mps_clients"
	mpsClientsHelp = "MPS client processes on the GPU or MIG device, from NVML's MPS process list (nvmlDeviceGetMPSComputeRunningProcesses); absent for a device whose processes were not read this round, or whose NVML has no MPS list."
	// LabelPodUID is the pod's UID on per-pod series, as dcgm-exporter
	// names it.
	LabelPodUID = "pod_uid"
)

// usageFamily is one gpu_plugin_* family of per-pod or unattributed use.
type usageFamily struct {
	name   string
	header []byte
	desc   *prometheus.Desc
	value  func(*UnitUsage) (float64, bool)
}

func newUsageFamily(name, help string, value func(*UnitUsage) (float64, bool)) usageFamily {
	return usageFamily{name: name, header: header(name, help, "gauge"), desc: prometheus.NewDesc(name, help, nil, nil), value: value}
}

func memoryOf(u *UnitUsage) (float64, bool) { return float64(u.MemoryBytes), true }
func smOf(u *UnitUsage) (float64, bool)     { return u.SMUtil / 100, u.HasSMUtil }
func procsOf(u *UnitUsage) (float64, bool)  { return float64(u.Processes), true }

// The families, each list sorted by name as expositions are.
var (
	podFamilies = []usageFamily{
		newUsageFamily(PodMemoryName, "Framebuffer memory the container's processes use on the GPU or MIG device (per-pod accounting; 0 for an allocated container running nothing there).", memoryOf),
		newUsageFamily(PodProcessesName, "Compute processes the container runs on the GPU or MIG device.", procsOf),
		newUsageFamily(PodSMUtilName, "SM utilization of the container's processes on the GPU, 0-1, from their latest NVML samples (not on MIG devices: NVML has no per-process utilization there).", smOf),
	}
	unattributedFamilies = []usageFamily{
		newUsageFamily(UnattributedMemoryName, "Framebuffer memory used by processes on the device that belong to no pod allocated it (host processes, pods with NVIDIA_VISIBLE_DEVICES=all).", memoryOf),
		newUsageFamily(UnattributedProcsName, "Compute processes on the device that belong to no pod allocated it.", procsOf),
		newUsageFamily(UnattributedSMUtilName, "SM utilization, 0-1, of processes on the GPU that belong to no pod allocated it.", smOf),
	}
	mpsHeader = header(MPSClientsName, mpsClientsHelp, "gauge")
	mpsDesc   = prometheus.NewDesc(MPSClientsName, mpsClientsHelp, nil, nil)
)

// usageView is a snapshot's per-pod series, labelled: built once per
// snapshot, by the first scrape that sees it.
type usageView struct {
	snap *Snapshot
	v    *view
	// Per Usage.Pods entry: the gpu_plugin_pod_* labels, with their
	// rendering.
	own     [][]*dto.LabelPair
	ownText [][]byte
	// With PerPodDCGM or VirtualGPUs, the per-pod DCGM series: the
	// device's labels without single-holder pod labels, plus the pod's
	// (and with VirtualGPUs its replica's vgpu), each with its rendering
	// and its Usage.Pods entry. PerPodDCGM has one per entry; VirtualGPUs
	// one per entry and replica the container holds.
	dcgm      [][]*dto.LabelPair
	dcgmText  [][]byte
	dcgmEntry []int
	un        [][]*dto.LabelPair // per Usage.Unattributed entry
	unText    [][]byte
	// ownOrder and unOrder are the entries in exposition order.
	ownOrder, unOrder []int
	// dev and devText are each target's join labels, for the per-device
	// gpu_plugin_mps_clients; devOrder is the targets in exposition order.
	// They depend on the layout alone.
	dev      [][]*dto.LabelPair
	devText  [][]byte
	devOrder []int
	// mixed orders a DCGM family's device series and per-pod series
	// together, as a registry sorts them: >= 0 a device index, < 0 the
	// per-pod DCGM row -r-1.
	mixed []int
}

// usageViewFor returns snap's usage view, building it on first use.
func (c *Collector) usageViewFor(snap *Snapshot, v *view) *usageView {
	if snap.Usage == nil || v == nil {
		return nil
	}
	if u := c.uview.Load(); u != nil && u.snap == snap && u.v == v {
		return u
	}
	prev := c.uview.Load()
	var u *usageView
	if prev != nil && prev.v == v && sameShape(prev.snap, snap) {
		// The same pods on the same devices as the previous round (the
		// usual case): only the values changed, the labels and orders
		// hold.
		u = &usageView{}
		*u = *prev
		u.snap = snap
	} else {
		u = c.buildUsageView(snap, v, prev)
	}
	c.uview.Store(u)
	return u
}

// sameShape reports whether two rounds have the same per-pod and
// unattributed entries, by identity.
func sameShape(a, b *Snapshot) bool {
	if a.Layout != b.Layout || len(a.Usage.Pods) != len(b.Usage.Pods) || len(a.Usage.Unattributed) != len(b.Usage.Unattributed) {
		return false
	}
	for i := range a.Usage.Pods {
		x, y := &a.Usage.Pods[i], &b.Usage.Pods[i]
		if x.Target != y.Target || x.Namespace != y.Namespace || x.Pod != y.Pod || x.PodUID != y.PodUID || x.Container != y.Container {
			return false
		}
	}
	for i := range a.Usage.Unattributed {
		if a.Usage.Unattributed[i].Target != b.Usage.Unattributed[i].Target {
			return false
		}
	}
	return true
}

func (c *Collector) buildUsageView(snap *Snapshot, v *view, prev *usageView) *usageView {
	use := snap.Usage
	u := &usageView{snap: snap, v: v}
	targets := snap.Layout.Targets
	if prev != nil && prev.snap.Layout == snap.Layout {
		u.dev, u.devText, u.devOrder = prev.dev, prev.devText, prev.devOrder
	} else {
		for i := range targets {
			var lp labelSet
			c.addUnitLabels(&lp, &targets[i])
			u.dev = append(u.dev, lp.sorted())
			u.devText = append(u.devText, render(lp))
		}
		u.devOrder = sortedBy(u.dev)
	}
	for k := range use.Pods {
		p := &use.Pods[k]
		t := &targets[p.Target]
		var own labelSet
		own.add(LabelNamespace, p.Namespace)
		own.add(LabelPod, p.Pod)
		own.add(LabelPodUID, p.PodUID)
		own.add(LabelContainer, p.Container)
		c.addUnitLabels(&own, t)
		u.own = append(u.own, own.sorted())
		u.ownText = append(u.ownText, render(own))
		if !c.perPodDCGM() {
			continue
		}
		vgpus := []string{""}
		if c.opts.VirtualGPUs {
			vgpus = podVGPUs(v.pods.Holders(t.Key), p)
		}
		for _, vgpu := range vgpus {
			dcgm := slices.Clone(v.base[p.Target])
			dcgm.add(LabelNamespace, p.Namespace)
			dcgm.add(LabelPod, p.Pod)
			dcgm.add(LabelPodUID, p.PodUID)
			dcgm.add(LabelContainer, p.Container)
			if vgpu != "" {
				dcgm.add(LabelVGPU, vgpu)
			}
			u.dcgm = append(u.dcgm, dcgm.sorted())
			u.dcgmText = append(u.dcgmText, render(dcgm))
			u.dcgmEntry = append(u.dcgmEntry, k)
		}
	}
	for k := range use.Unattributed {
		var lp labelSet
		c.addUnitLabels(&lp, &targets[use.Unattributed[k].Target])
		u.un = append(u.un, lp.sorted())
		u.unText = append(u.unText, render(lp))
	}
	u.ownOrder, u.unOrder = sortedBy(u.own), sortedBy(u.un)
	if !c.perPodDCGM() {
		return u
	}
	// The device series: with VirtualGPUs without pod labels, as
	// dcgm-exporter keeps them beside the per-pod ones.
	devOrder, devLabels := v.order, v.labels
	if c.opts.VirtualGPUs {
		devOrder, devLabels = v.baseOrder, v.baseLabels
	}
	u.mixed = make([]int, 0, len(devOrder)+len(u.dcgm))
	u.mixed = append(u.mixed, devOrder...)
	for r := range u.dcgm {
		u.mixed = append(u.mixed, -r-1)
	}
	labels := func(i int) []*dto.LabelPair {
		if i >= 0 {
			return devLabels[i]
		}
		return u.dcgm[-i-1]
	}
	slices.SortStableFunc(u.mixed, func(a, b int) int { return compareLabels(labels(a), labels(b)) })
	return u
}

// addUnitLabels adds a device's join labels (gpu, UUID, the MIG ones,
// Hostname) to a series about the device's users.
func (c *Collector) addUnitLabels(lp *labelSet, t *Target) {
	lp.add(LabelGPU, gpuLabel(t.GPU))
	lp.add(LabelUUID, t.GPU.UUID)
	if t.MIG != nil {
		lp.add(LabelGIProfile, t.MIG.Profile)
		lp.add(LabelGIID, strconv.Itoa(t.MIG.GPUInstanceID))
	}
	if c.opts.Hostname != "" {
		lp.add(LabelHostname, c.opts.Hostname)
	}
}

// podValue is a DCGM family's per-pod value, in the family's unit:
// DCGM_FI_DEV_FB_USED in MiB, DCGM_FI_DEV_GPU_UTIL in percent, as
// dcgm-exporter's per-pod series (--kubernetes-virtual-gpus) are.
func podValue(f Field, p *PodUsage) (float64, bool) {
	switch f {
	case FBUsed:
		return float64(p.MemoryBytes) / (1 << 20), true
	case GPUUtil:
		return p.SMUtil, p.HasSMUtil
	}
	return 0, false
}

// hasPodSeries reports whether a DCGM field gets per-pod series.
func (c *Collector) hasPodSeries(f Field) bool {
	return c.perPodDCGM() && isPerProcess(f)
}

// perPodDCGM reports whether FB_USED and GPU_UTIL get per-pod series.
func (c *Collector) perPodDCGM() bool { return c.opts.PerPodDCGM || c.opts.VirtualGPUs }

// isPerProcess reports whether per-pod accounting gives a DCGM field a
// per-pod value (dcgm-exporter's isPerProcessMetric: FB_USED and
// GPU_UTIL).
func isPerProcess(f Field) bool { return f == FBUsed || f == GPUUtil }

// podVGPUs are the vgpu label values of a per-pod entry's series: the
// replicas its container holds of the device, or, for a process in
// another container of a pod holding it, the pod's; "" (no label) for a
// whole device.
func podVGPUs(holders []podresources.Holder, p *PodUsage) []string {
	var out []string
	for _, h := range holders {
		if h.Namespace == p.Namespace && h.Pod == p.Pod && h.Container == p.Container {
			out = vgpusOf(h, out)
		}
	}
	if out != nil {
		return out
	}
	for _, h := range holders {
		if h.Namespace == p.Namespace && h.Pod == p.Pod {
			out = vgpusOf(h, out)
		}
	}
	if out == nil {
		return []string{""}
	}
	return out
}

// collectPodSeries sends a DCGM family's per-pod series to a registry.
func (u *usageView) collectPodSeries(ch chan<- prometheus.Metric, m *dcgmMetric, now time.Time, stale time.Duration) {
	for r, j := range u.dcgmEntry {
		p := &u.snap.Usage.Pods[j]
		if !u.snap.Devices[p.Target].Servable(now, stale) {
			continue
		}
		if x, ok := podValue(m.field, p); ok {
			ch <- &series{m: m, labels: u.dcgm[r], value: x}
		}
	}
}

// writeUnattributed and writePods append the gpu_plugin_gpu_unattributed_*
// and gpu_plugin_pod_gpu_* families (which sort apart in an exposition).
func (u *usageView) writeUnattributed(buf *bytes.Buffer) {
	un := u.snap.Usage.Unattributed
	writeFamilies(buf, unattributedFamilies, func(k int) *UnitUsage { return &un[k] }, u.unText, u.unOrder)
}

// writeMPS appends gpu_plugin_mps_clients: one series per device whose
// MPS list was read this round, counted when the round was published.
func (u *usageView) writeMPS(buf *bytes.Buffer) {
	var num [32]byte
	wrote := false
	for _, i := range u.devOrder {
		d := &u.snap.Devices[i]
		if !d.MPSRead {
			continue
		}
		if !wrote {
			buf.Write(mpsHeader)
			wrote = true
		}
		buf.WriteString(MPSClientsName)
		buf.Write(u.devText[i])
		buf.WriteByte(' ')
		buf.Write(appendFloat(num[:0], float64(d.MPSClients)))
		buf.WriteByte('\n')
	}
}

func (u *usageView) writePods(buf *bytes.Buffer) {
	pods := u.snap.Usage.Pods
	writeFamilies(buf, podFamilies, func(k int) *UnitUsage { return &pods[k].UnitUsage }, u.ownText, u.ownOrder)
}

func writeFamilies(buf *bytes.Buffer, fams []usageFamily, unit func(k int) *UnitUsage, text [][]byte, order []int) {
	var num [32]byte
	for _, f := range fams {
		wrote := false
		for _, k := range order {
			x, ok := f.value(unit(k))
			if !ok {
				continue
			}
			if !wrote {
				buf.Write(f.header)
				wrote = true
			}
			buf.WriteString(f.name)
			buf.Write(text[k])
			buf.WriteByte(' ')
			buf.Write(appendFloat(num[:0], x))
			buf.WriteByte('\n')
		}
	}
}

// sortedBy is the indices of label sets in a registry's series order.
func sortedBy(sets [][]*dto.LabelPair) []int {
	order := make([]int, len(sets))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return compareLabels(sets[a], sets[b]) })
	return order
}

// collectUsage sends the per-pod families to a registry.
func (u *usageView) collectUsage(ch chan<- prometheus.Metric) {
	use := u.snap.Usage
	for _, f := range podFamilies {
		for k := range use.Pods {
			if x, ok := f.value(&use.Pods[k].UnitUsage); ok {
				ch <- &usageSeries{desc: f.desc, labels: u.own[k], value: x}
			}
		}
	}
	for _, f := range unattributedFamilies {
		for k := range use.Unattributed {
			if x, ok := f.value(&use.Unattributed[k]); ok {
				ch <- &usageSeries{desc: f.desc, labels: u.un[k], value: x}
			}
		}
	}
	for i := range u.snap.Devices {
		if d := &u.snap.Devices[i]; d.MPSRead {
			ch <- &usageSeries{desc: mpsDesc, labels: u.dev[i], value: float64(d.MPSClients)}
		}
	}
}

// usageSeries is one gauge sample with pre-built labels.
type usageSeries struct {
	desc   *prometheus.Desc
	labels []*dto.LabelPair
	value  float64
}

func (s *usageSeries) Desc() *prometheus.Desc { return s.desc }

func (s *usageSeries) Write(out *dto.Metric) error {
	out.Label = s.labels
	out.Gauge = &dto.Gauge{Value: &s.value}
	return nil
}
