package sim

import (
	"encoding/binary"
	"fmt"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// ExtraTelemetry is the rest of a simulated GPU's telemetry: what NVML
// reports through field values, encoder/decoder utilization, PCIe replays
// and throughput, NVLink byte counters, and GPM (the profiling metrics of
// Hopper and newer, in percent as GPM reports them; the exporter divides
// by 100).
type ExtraTelemetry struct {
	MemoryTempC    uint32  `json:"memory_temp_c"` // FI_DEV_MEMORY_TEMP; not on GDDR (Ada) parts
	EncUtil        uint32  `json:"enc_util"`      // %
	DecUtil        uint32  `json:"dec_util"`      // %
	PCIeReplays    uint64  `json:"pcie_replays"`
	GREngineActive float64 `json:"gr_engine_active"` // GPM, %
	SMActive       float64 `json:"sm_active"`        // GPM, %
	SMOccupancy    float64 `json:"sm_occupancy"`     // GPM, %
	TensorActive   float64 `json:"tensor_active"`    // GPM, %
	DRAMActive     float64 `json:"dram_active"`      // GPM, %
	// PCIe throughput in KB/s (NVML's unit; taken as KiB): what
	// nvmlDeviceGetPcieThroughput reports and, on Hopper and newer, GPM's
	// PCIE_TX/RX_PER_SEC (÷ 1024, MiB/s) for a whole GPU (GPM samples of a
	// MIG device have none). Unset (nil) until set: the GPU then answers
	// NOT_SUPPORTED, as one in a vGPU guest does, so a profile reports no
	// PCIe rates unless a test or the control API gives some.
	PCIeTxKBps *uint32 `json:"pcie_tx_kbps,omitempty"`
	PCIeRxKBps *uint32 `json:"pcie_rx_kbps,omitempty"`
	// NVLink payload counters in KiB, all links summed: the field values
	// NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX (RAW = DATA, as fakenvml),
	// NOT_SUPPORTED on a GPU without NVLinks. Counters, set as absolute
	// values (like fakenvml's tel nvl_tx/nvl_rx); setting a lower value
	// models a reset.
	NVLinkTxKiB uint64 `json:"nvlink_tx_kib"`
	NVLinkRxKiB uint64 `json:"nvlink_rx_kib"`
}

// clone is t with its own copies of what its pointers point at.
func (t ExtraTelemetry) clone() ExtraTelemetry {
	cp := func(p *uint32) *uint32 {
		if p == nil {
			return nil
		}
		x := *p
		return &x
	}
	t.PCIeTxKBps, t.PCIeRxKBps = cp(t.PCIeTxKBps), cp(t.PCIeRxKBps)
	return t
}

// ExtraTelemetryPatch changes some ExtraTelemetry fields.
type ExtraTelemetryPatch struct {
	MemoryTempC    *uint32  `json:"memory_temp_c"`
	EncUtil        *uint32  `json:"enc_util"`
	DecUtil        *uint32  `json:"dec_util"`
	PCIeReplays    *uint64  `json:"pcie_replays"`
	GREngineActive *float64 `json:"gr_engine_active"`
	SMActive       *float64 `json:"sm_active"`
	SMOccupancy    *float64 `json:"sm_occupancy"`
	TensorActive   *float64 `json:"tensor_active"`
	DRAMActive     *float64 `json:"dram_active"`
	PCIeTxKBps     *uint32  `json:"pcie_tx_kbps"`
	PCIeRxKBps     *uint32  `json:"pcie_rx_kbps"`
	NVLinkTxKiB    *uint64  `json:"nvlink_tx_kib"`
	NVLinkRxKiB    *uint64  `json:"nvlink_rx_kib"`
}

// TelemetryFields names every field PUT /sim/gpus/{i}/telemetry accepts.
const TelemetryFields = "gpu_util, mem_copy_util, fb_used_mib, temperature_c, power_w, sm_clock_mhz, " +
	"memory_temp_c, enc_util, dec_util, pcie_replays, " +
	"gr_engine_active, sm_active, sm_occupancy, tensor_active, dram_active, " +
	"pcie_tx_kbps, pcie_rx_kbps, nvlink_tx_kib, nvlink_rx_kib"

func defaultExtraTelemetry() ExtraTelemetry {
	return ExtraTelemetry{MemoryTempC: 35}
}

func (p *ExtraTelemetryPatch) problems() []string {
	var out []string
	pct := func(name string, v *uint32) {
		if v != nil && *v > 100 {
			out = append(out, fmt.Sprintf("%s %d is over 100", name, *v))
		}
	}
	pctf := func(name string, v *float64) {
		if v != nil && (*v < 0 || *v > 100) {
			out = append(out, fmt.Sprintf("%s %g is out of range 0..100 (percent)", name, *v))
		}
	}
	pct("enc_util", p.EncUtil)
	pct("dec_util", p.DecUtil)
	pctf("gr_engine_active", p.GREngineActive)
	pctf("sm_active", p.SMActive)
	pctf("sm_occupancy", p.SMOccupancy)
	pctf("tensor_active", p.TensorActive)
	pctf("dram_active", p.DRAMActive)
	if p.MemoryTempC != nil && *p.MemoryTempC > 200 {
		out = append(out, fmt.Sprintf("memory_temp_c %d is out of range 0..200", *p.MemoryTempC))
	}
	return out
}

// apply stores the patch; called with the node's mutex held.
func (p *ExtraTelemetryPatch) apply(t *ExtraTelemetry) {
	setU := func(dst *uint32, v *uint32) {
		if v != nil {
			*dst = *v
		}
	}
	setF := func(dst *float64, v *float64) {
		if v != nil {
			*dst = *v
		}
	}
	setU(&t.MemoryTempC, p.MemoryTempC)
	setU(&t.EncUtil, p.EncUtil)
	setU(&t.DecUtil, p.DecUtil)
	setU64 := func(dst *uint64, v *uint64) {
		if v != nil {
			*dst = *v
		}
	}
	setU64(&t.PCIeReplays, p.PCIeReplays)
	setU64(&t.NVLinkTxKiB, p.NVLinkTxKiB)
	setU64(&t.NVLinkRxKiB, p.NVLinkRxKiB)
	// A copy: the state never shares the caller's pointer.
	setP := func(dst **uint32, v *uint32) {
		if v != nil {
			x := *v
			*dst = &x
		}
	}
	setP(&t.PCIeTxKBps, p.PCIeTxKBps)
	setP(&t.PCIeRxKBps, p.PCIeRxKBps)
	setF(&t.GREngineActive, p.GREngineActive)
	setF(&t.SMActive, p.SMActive)
	setF(&t.SMOccupancy, p.SMOccupancy)
	setF(&t.TensorActive, p.TensorActive)
	setF(&t.DRAMActive, p.DRAMActive)
}

// gpmRecord is what a GPM sample captured.
type gpmRecord struct {
	gpu, gi int // gi is -1 for a whole-GPU sample
	tel     ExtraTelemetry
}

// addTelemetryFuncs gives a GPU's mock its telemetry beyond the basics:
// field values (memory temperature, NVLink counters), encoder/decoder
// utilization, PCIe replays and throughput, and GPM on Hopper and newer.
func (n *Node) addTelemetryFuncs(d *mock.Device, g *simGPU) {
	i := g.index
	arch := g.model.config.Architecture
	hbm := arch != gonvml.DEVICE_ARCH_ADA
	gpm := arch >= gonvml.DEVICE_ARCH_HOPPER && arch != gonvml.DEVICE_ARCH_UNKNOWN
	links := uint32(len(n.nvlinkEnds(i)))
	d.GetEncoderUtilizationFunc = func() (uint32, uint32, gonvml.Return) {
		u, r := read(n, i, "GetEncoderUtilization", func(s *gpuState) uint32 { return s.tel.EncUtil })
		return u, 167000, r
	}
	d.GetDecoderUtilizationFunc = func() (uint32, uint32, gonvml.Return) {
		u, r := read(n, i, "GetDecoderUtilization", func(s *gpuState) uint32 { return s.tel.DecUtil })
		return u, 167000, r
	}
	d.GetPcieReplayCounterFunc = func() (int, gonvml.Return) {
		return read(n, i, "GetPcieReplayCounter", func(s *gpuState) int { return int(s.tel.PCIeReplays) })
	}
	d.GetPcieThroughputFunc = func(c gonvml.PcieUtilCounter) (uint32, gonvml.Return) {
		kbps, r := read(n, i, "GetPcieThroughput", func(s *gpuState) *uint32 {
			if c == gonvml.PCIE_UTIL_TX_BYTES {
				return s.tel.PCIeTxKBps
			}
			return s.tel.PCIeRxKBps
		})
		switch {
		case r != gonvml.SUCCESS:
			return 0, r
		case c != gonvml.PCIE_UTIL_TX_BYTES && c != gonvml.PCIE_UTIL_RX_BYTES:
			return 0, gonvml.ERROR_INVALID_ARGUMENT
		case kbps == nil:
			return 0, gonvml.ERROR_NOT_SUPPORTED
		}
		return *kbps, gonvml.SUCCESS
	}
	d.GetFieldValuesFunc = func(values []gonvml.FieldValue) gonvml.Return {
		if len(values) == 0 {
			return gonvml.ERROR_INVALID_ARGUMENT
		}
		tel, r := read(n, i, "GetFieldValues", func(s *gpuState) ExtraTelemetry {
			for k := range values {
				if values[k].FieldId == gonvml.FI_DEV_GET_GPU_RECOVERY_ACTION {
					n.recoveryFieldLocked(i, &values[k]) // recovery.go
				}
			}
			return s.tel.ExtraTelemetry
		})
		if r != gonvml.SUCCESS {
			return r
		}
		now := n.now().UnixMicro()
		for k := range values {
			v := &values[k]
			v.Timestamp = now
			// The NVLink counters sum every link whatever the scopeId (as
			// fakenvml does): NVML's scopeId UINT_MAX, what DCGM asks for.
			switch {
			case v.FieldId == gonvml.FI_DEV_GET_GPU_RECOVERY_ACTION:
				// answered above
			case v.FieldId == gonvml.FI_DEV_MEMORY_TEMP && hbm:
				setFieldUint(v, tel.MemoryTempC)
			case v.FieldId == gonvml.FI_DEV_NVLINK_LINK_COUNT:
				setFieldUint(v, links)
			case (v.FieldId == gonvml.FI_DEV_NVLINK_THROUGHPUT_DATA_TX || v.FieldId == gonvml.FI_DEV_NVLINK_THROUGHPUT_RAW_TX) && links > 0:
				setFieldUint64(v, tel.NVLinkTxKiB)
			case (v.FieldId == gonvml.FI_DEV_NVLINK_THROUGHPUT_DATA_RX || v.FieldId == gonvml.FI_DEV_NVLINK_THROUGHPUT_RAW_RX) && links > 0:
				setFieldUint64(v, tel.NVLinkRxKiB)
			default:
				v.NvmlReturn = uint32(gonvml.ERROR_NOT_SUPPORTED)
			}
		}
		return gonvml.SUCCESS
	}
	d.GpmQueryDeviceSupportFunc = func() (gonvml.GpmSupport, gonvml.Return) {
		sup := uint32(0)
		if gpm {
			sup = 1
		}
		return value(n, i, "GpmQueryDeviceSupport", gonvml.GpmSupport{Version: gonvml.GPM_SUPPORT_VERSION, IsSupportedDevice: sup})
	}
	d.GpmSampleGetFunc = func(s gonvml.GpmSample) gonvml.Return {
		if !gpm {
			return gonvml.ERROR_NOT_SUPPORTED
		}
		return n.recordGPM(s, i, -1, "GpmSampleGet")
	}
	d.GpmMigSampleGetFunc = func(gi int, s gonvml.GpmSample) gonvml.Return {
		if !gpm {
			return gonvml.ERROR_NOT_SUPPORTED
		}
		found := false
		for _, m := range n.migLayoutOf(i).migs {
			found = found || m.giID == gi
		}
		if !found {
			return gonvml.ERROR_NOT_FOUND
		}
		return n.recordGPM(s, i, gi, "GpmMigSampleGet")
	}
}

func setFieldUint(v *gonvml.FieldValue, x uint32) {
	v.NvmlReturn = uint32(gonvml.SUCCESS)
	v.ValueType = uint32(gonvml.VALUE_TYPE_UNSIGNED_INT)
	v.Value = [8]byte{}
	binary.NativeEndian.PutUint32(v.Value[:], x)
}

func setFieldUint64(v *gonvml.FieldValue, x uint64) {
	v.NvmlReturn = uint32(gonvml.SUCCESS)
	v.ValueType = uint32(gonvml.VALUE_TYPE_UNSIGNED_LONG_LONG)
	v.Value = [8]byte{}
	binary.NativeEndian.PutUint64(v.Value[:], x)
}

// recordGPM stores what a GPM sample sees.
func (n *Node) recordGPM(s gonvml.GpmSample, gpu, gi int, op string) gonvml.Return {
	ms, ok := s.(*mock.GpmSample)
	n.mu.Lock()
	defer n.mu.Unlock()
	if r := n.failureLocked(gpu, op); r != gonvml.SUCCESS {
		return r
	}
	if _, known := n.gpm[ms]; !ok || !known {
		return gonvml.ERROR_INVALID_ARGUMENT
	}
	n.gpm[ms] = &gpmRecord{gpu: gpu, gi: gi, tel: n.state[gpu].tel.ExtraTelemetry}
	return gonvml.SUCCESS
}

// addGPMLibrary gives the library mock GPM sample allocation and metric
// computation: a metric's value is what the later sample saw.
func (n *Node) addGPMLibrary(l *mock.Interface) {
	l.GpmSampleAllocFunc = func() (gonvml.GpmSample, gonvml.Return) {
		ms := &mock.GpmSample{}
		ms.FreeFunc = func() gonvml.Return { return n.freeGPM(ms) }
		n.mu.Lock()
		defer n.mu.Unlock()
		if n.gpm == nil {
			n.gpm = map[*mock.GpmSample]*gpmRecord{}
		}
		n.gpm[ms] = nil
		return ms, gonvml.SUCCESS
	}
	l.GpmSampleFreeFunc = func(s gonvml.GpmSample) gonvml.Return {
		ms, ok := s.(*mock.GpmSample)
		if !ok {
			return gonvml.ERROR_INVALID_ARGUMENT
		}
		return n.freeGPM(ms)
	}
	l.GpmMetricsGetFunc = func(m *gonvml.GpmMetricsGetType) gonvml.Return {
		s1, ok1 := m.Sample1.(*mock.GpmSample)
		s2, ok2 := m.Sample2.(*mock.GpmSample)
		if m.Version != gonvml.GPM_METRICS_GET_VERSION || !ok1 || !ok2 || m.NumMetrics > uint32(len(m.Metrics)) {
			return gonvml.ERROR_INVALID_ARGUMENT
		}
		n.mu.Lock()
		r1, r2 := n.gpm[s1], n.gpm[s2]
		n.mu.Unlock()
		if r1 == nil || r2 == nil || r1.gpu != r2.gpu || r1.gi != r2.gi {
			return gonvml.ERROR_INVALID_ARGUMENT
		}
		for k := range m.Metrics[:m.NumMetrics] {
			x := &m.Metrics[k]
			v, ok := gpmValue(gonvml.GpmMetricId(x.MetricId), &r2.tel, r2.gi >= 0)
			x.Value = v
			x.NvmlReturn = uint32(gonvml.SUCCESS)
			if !ok {
				x.NvmlReturn = uint32(gonvml.ERROR_NOT_SUPPORTED)
			}
		}
		return gonvml.SUCCESS
	}
}

func (n *Node) freeGPM(ms *mock.GpmSample) gonvml.Return {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.gpm[ms]; !ok {
		return gonvml.ERROR_INVALID_ARGUMENT
	}
	delete(n.gpm, ms)
	return gonvml.SUCCESS
}

// GPMSamples is how many GPM samples are allocated (to check that the
// exporter frees them).
func (n *Node) GPMSamples() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.gpm)
}

// gpmValue is a GPM metric as the later sample saw it; mig says the
// samples are a MIG device's, which have no PCIe rates here.
func gpmValue(id gonvml.GpmMetricId, t *ExtraTelemetry, mig bool) (float64, bool) {
	mibps := func(kbps *uint32) (float64, bool) {
		if kbps == nil || mig {
			return 0, false
		}
		return float64(*kbps) / 1024, true // KiB/s → MiB/s, GPM's unit
	}
	switch id {
	case gonvml.GPM_METRIC_PCIE_TX_PER_SEC:
		return mibps(t.PCIeTxKBps)
	case gonvml.GPM_METRIC_PCIE_RX_PER_SEC:
		return mibps(t.PCIeRxKBps)
	case gonvml.GPM_METRIC_GRAPHICS_UTIL:
		return t.GREngineActive, true
	case gonvml.GPM_METRIC_SM_UTIL:
		return t.SMActive, true
	case gonvml.GPM_METRIC_SM_OCCUPANCY:
		return t.SMOccupancy, true
	case gonvml.GPM_METRIC_ANY_TENSOR_UTIL:
		return t.TensorActive, true
	case gonvml.GPM_METRIC_DRAM_BW_UTIL:
		return t.DRAMActive, true
	}
	return 0, false
}
