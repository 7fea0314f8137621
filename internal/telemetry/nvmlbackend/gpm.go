package nvmlbackend

import (
	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// GPM (GPU Performance Monitoring, Hopper and newer) supplies the
// DCGM_FI_PROF_* fields. A metric is computed from two samples, so each
// target keeps its previous sample: the first round after start has no
// profiling values, later rounds measure over one interval.

// gpmMetric maps a profiling field to its GPM metric and the factor that
// converts GPM's unit to DCGM's.
type gpmMetric struct {
	field  telemetry.Field
	id     gonvml.GpmMetricId
	factor float64
}

var gpmMetrics = []gpmMetric{
	{telemetry.ProfGREngineActive, gonvml.GPM_METRIC_GRAPHICS_UTIL, 0.01}, // % → ratio
	{telemetry.ProfSMActive, gonvml.GPM_METRIC_SM_UTIL, 0.01},
	{telemetry.ProfSMOccupancy, gonvml.GPM_METRIC_SM_OCCUPANCY, 0.01},
	{telemetry.ProfPipeTensorActive, gonvml.GPM_METRIC_ANY_TENSOR_UTIL, 0.01},
	{telemetry.ProfDRAMActive, gonvml.GPM_METRIC_DRAM_BW_UTIL, 0.01},
	{telemetry.ProfPipeFP64Active, gonvml.GPM_METRIC_FP64_UTIL, 0.01},
	{telemetry.ProfPipeFP32Active, gonvml.GPM_METRIC_FP32_UTIL, 0.01},
	{telemetry.ProfPipeFP16Active, gonvml.GPM_METRIC_FP16_UTIL, 0.01},
	{telemetry.ProfPCIeTxBytes, gonvml.GPM_METRIC_PCIE_TX_PER_SEC, 1 << 20}, // MiB/s → B/s
	{telemetry.ProfPCIeRxBytes, gonvml.GPM_METRIC_PCIE_RX_PER_SEC, 1 << 20},
}

// gpmState is one target's pair of GPM samples.
type gpmState struct {
	prev, cur gonvml.GpmSample
	havePrev  bool
	req       gonvml.GpmMetricsGetType // reused: it is large
}

func profFields(fields telemetry.Mask) telemetry.Mask {
	var m telemetry.Mask
	for _, g := range gpmMetrics {
		if fields.Has(g.field) {
			m = m.With(g.field)
		}
	}
	return m
}

// checkGPM finds out once per GPU whether GPM works, and allocates samples
// for targets that need them. It runs in the GPU's worker.
func (b *Backend) checkGPM(st *gpuState, h gonvml.Device, targets []telemetry.Target, fields telemetry.Mask) {
	if profFields(fields) == 0 {
		return
	}
	if !st.gpmChecked {
		st.gpmChecked = true
		sup, err := nvml.Call(b.lib, "nvmlGpmQueryDeviceSupport", h.GpmQueryDeviceSupport)
		if err != nil || sup.IsSupportedDevice == 0 {
			return // pre-Hopper, or not available: no DCGM_FI_PROF_* from NVML
		}
		st.gpm = map[string]*gpmState{}
	}
	if st.gpm == nil {
		return
	}
	lib := b.lib.Interface()
	for _, t := range targets {
		if _, ok := st.gpm[t.Key]; ok {
			continue
		}
		s1, err1 := nvml.Call(b.lib, "nvmlGpmSampleAlloc", lib.GpmSampleAlloc)
		s2, err2 := nvml.Call(b.lib, "nvmlGpmSampleAlloc", lib.GpmSampleAlloc)
		if err1 != nil || err2 != nil {
			freeSample(b.lib, s1, err1)
			freeSample(b.lib, s2, err2)
			b.log.Debug("GPM sample allocation failed; no profiling fields for this device", "device", t.Key, "err", firstErr(err1, err2))
			continue
		}
		st.gpm[t.Key] = &gpmState{prev: s1, cur: s2}
	}
}

// readGPMInto takes a GPM sample of the target and, from the second round
// on, stores its profiling fields. A failure drops this round's profiling
// values only; the rest of the sample stands.
func (b *Backend) readGPMInto(st *gpuState, h gonvml.Device, t *telemetry.Target, v *telemetry.Values, fields telemetry.Mask) {
	want := profFields(fields)
	if want == 0 || st.gpm == nil {
		return
	}
	g := st.gpm[t.Key]
	if g == nil {
		return
	}
	var err error
	if t.MIG != nil {
		err = nvml.Do(b.lib, "nvmlGpmMigSampleGet", func() gonvml.Return { return h.GpmMigSampleGet(t.MIG.GPUInstanceID, g.cur) })
	} else {
		err = nvml.Do(b.lib, "nvmlGpmSampleGet", func() gonvml.Return { return h.GpmSampleGet(g.cur) })
	}
	if err != nil {
		g.havePrev = false
		return
	}
	if g.havePrev {
		g.req.Version = gonvml.GPM_METRICS_GET_VERSION
		g.req.Sample1, g.req.Sample2 = g.prev, g.cur
		n := 0
		for _, m := range gpmMetrics {
			if want.Has(m.field) {
				g.req.Metrics[n] = gonvml.GpmMetric{MetricId: uint32(m.id)}
				n++
			}
		}
		g.req.NumMetrics = uint32(n)
		lib := b.lib.Interface()
		if err := nvml.Do(b.lib, "nvmlGpmMetricsGet", func() gonvml.Return { return lib.GpmMetricsGet(&g.req) }); err == nil {
			for k := 0; k < n; k++ {
				res := &g.req.Metrics[k]
				if gonvml.Return(res.NvmlReturn) != gonvml.SUCCESS {
					continue
				}
				for _, m := range gpmMetrics {
					if uint32(m.id) == res.MetricId {
						v.Set(m.field, res.Value*m.factor)
					}
				}
			}
		}
	}
	g.prev, g.cur = g.cur, g.prev
	g.havePrev = true
}

// freeGPM frees the samples of targets not in keep (all when keep is nil).
func (b *Backend) freeGPM(st *gpuState, keep map[string]bool) {
	for k, g := range st.gpm {
		if keep != nil && keep[k] {
			continue
		}
		freeSample(b.lib, g.prev, nil)
		freeSample(b.lib, g.cur, nil)
		delete(st.gpm, k)
	}
}

func freeSample(lib *nvml.Library, s gonvml.GpmSample, allocErr error) {
	if s == nil || allocErr != nil {
		return
	}
	_ = nvml.Do(lib, "nvmlGpmSampleFree", s.Free)
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}
