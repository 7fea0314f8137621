package nvmlbackend

import (
	"math"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// Interconnect throughput without DCGM: NVLink bandwidth from NVML's
// NVLink byte counters, PCIe rates from nvmlDeviceGetPcieThroughput where
// GPM does not supply them.

// DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL (449). DCGM (DcgmCacheManager's
// ReadAndCacheNvLinkBandwidth, unchanged from 2.x to 4.6) does not export a
// counter, despite dcgm-exporter's "counter" type and its help text: it
// asks nvmlDeviceGetFieldValues for NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
// and _DATA_TX with scopeId UINT_MAX (nvml.h: the sum over all links), both
// cumulative KiB of payload, adds them, and publishes the rate since its
// previous reading, (Δ KiB) / (Δ s of the values' own timestamps) / 1000,
// truncated to an integer, in the unit DCGM names MB/s
// (DCGM_FIELD_UNIT_BW_MBPS; its code comment says MiB/s; by the arithmetic
// it is KiB/s ÷ 1000, which is neither exactly). We do the same arithmetic
// so that dashboards built on DCGM read the same numbers.
//
// Differences, chosen: DCGM publishes 0 for its first reading; we publish
// nothing until a second reading gives a rate (as for GPM), and nothing for
// a round whose counters went backwards (a driver reload) or did not
// advance in time. The deprecated NVML_FI_DEV_NVLINK_BANDWIDTH_C0_TOTAL
// (per-lane counter sets, units set by nvmlDeviceSetNvLinkUtilizationControl)
// and GPM's NVLINK_TOTAL_RX/TX_PER_SEC (Hopper only, MiB/s) are not DCGM's
// source for this field and are not used.
//
// A GPU without NVLink is expected to answer NOT_SUPPORTED for the
// throughput fields (fakenvml and the simulator do) or to report
// NVML_FI_DEV_NVLINK_LINK_COUNT 0: either leaves the field out, never 0.
// INVALID_ARGUMENT for a counter (a driver that does not know the fields or
// the all-links scope; DCGM asks only from r450 on) leaves it out too; any
// other failure of one counter only for that round. A GPU with NVLink whose
// links carry nothing reads 0, as in DCGM.
//
// Unverified without hardware: that the driver's scopeId UINT_MAX sum and
// the values' timestamps behave as nvml.h says, and what a PCIe-only GPU
// answers (assumed NOT_SUPPORTED or a link count of 0).

// nvlinkScopeAll is nvml.h's scopeId for "summed over all links".
const nvlinkScopeAll = math.MaxUint32

// nvlinkState is a GPU's previous NVLink reading.
type nvlinkState struct {
	have   bool
	sumKiB float64 // DATA_TX + DATA_RX, all links, KiB
	atUS   int64   // the reading's timestamp, µs since the epoch
}

type nvlinkReading struct {
	sumKiB float64
	atUS   int64
	ret    gonvml.Return // the first counter's own failure, if any
}

// readNVLink reads the NVLink counters and stores the bandwidth since the
// previous round.
func readNVLink(r *reader, st *gpuState, h gonvml.Device, v *telemetry.Values, fields telemetry.Mask) {
	f := telemetry.NVLinkBandwidthTotal
	if !fields.Has(f) || r.skip.Has(f) || r.err != nil {
		return
	}
	x, err := nvml.Call(r.lib, "nvmlDeviceGetFieldValues", func() (nvlinkReading, gonvml.Return) {
		fv := []gonvml.FieldValue{
			{FieldId: gonvml.FI_DEV_NVLINK_THROUGHPUT_DATA_TX, ScopeId: nvlinkScopeAll},
			{FieldId: gonvml.FI_DEV_NVLINK_THROUGHPUT_DATA_RX, ScopeId: nvlinkScopeAll},
			{FieldId: gonvml.FI_DEV_NVLINK_LINK_COUNT},
		}
		if ret := h.GetFieldValues(fv); ret != gonvml.SUCCESS {
			return nvlinkReading{}, ret
		}
		if links, ret := nvml.DecodeFieldValue(&fv[2]); ret == gonvml.SUCCESS && links == 0 {
			return nvlinkReading{ret: gonvml.ERROR_NOT_SUPPORTED}, gonvml.SUCCESS // no NVLink on this GPU
		}
		var out nvlinkReading
		for k := range fv[:2] {
			kib, ret := nvml.DecodeFieldValue(&fv[k])
			if ret != gonvml.SUCCESS {
				return nvlinkReading{ret: ret}, gonvml.SUCCESS
			}
			out.sumKiB += kib
			out.atUS = max(out.atUS, fv[k].Timestamp)
		}
		return out, gonvml.SUCCESS
	})
	switch {
	case err == nil && x.ret == gonvml.SUCCESS:
	case nvml.IsNotSupported(err), x.ret == gonvml.ERROR_NOT_SUPPORTED, x.ret == gonvml.ERROR_INVALID_ARGUMENT:
		// No NVLink, or a driver that does not know the fields or the
		// all-links scope (DCGM reads them only from r450 on).
		r.unsup = r.unsup.With(f)
		return
	case err != nil:
		r.err = err // the call failed: the GPU's round fails, as for any field
		return
	default:
		return // a counter's own failure: left out this round, the GPU's other fields stand
	}
	if x.atUS == 0 {
		x.atUS = time.Now().UnixMicro() // no timestamp from the driver: DCGM takes the clock too
	}
	prev := &st.nvlink
	switch {
	case !prev.have || x.sumKiB < prev.sumKiB:
		// The first reading, or the counters restarted: a rate from the next.
	case x.atUS <= prev.atUS:
		return // no time passed: keep the older reading to measure from
	default:
		secs := float64(x.atUS-prev.atUS) / 1e6
		v.Set(f, math.Trunc((x.sumKiB-prev.sumKiB)/secs/1000))
	}
	*prev = nvlinkState{have: true, sumKiB: x.sumKiB, atUS: x.atUS}
}

// DCGM_FI_PROF_PCIE_TX_BYTES / _RX_BYTES (1009/1010), bytes per second.
// On Hopper and later GPM supplies them (gpm.go: GPM_METRIC_PCIE_TX/RX_PER_SEC
// in MiB/s × 2²⁰, as DCGM's GPM path converts them), per GPU and per MIG
// device. Where GPM is not available (before Hopper, or GPM failing), a
// whole GPU's rates come from nvmlDeviceGetPcieThroughput(TX_BYTES/RX_BYTES),
// which nvml.h documents as "throughput in KB/s" measured over 20 ms with
// "1KB granularity": × 1024 → B/s (KB taken as KiB, as NVML's other byte
// counters are; 1000 is possible and unverified without hardware). DCGM
// takes these fields from its profiling module there, which counts over
// the whole interval; NVML's 20 ms window is a sample, noisier. MIG
// devices get no value from it: the counter is the whole GPU's, and
// giving it to each MIG device would count the traffic several times.
var pcieCounters = []struct {
	f   telemetry.Field
	ctr gonvml.PcieUtilCounter
}{
	{telemetry.ProfPCIeTxBytes, gonvml.PCIE_UTIL_TX_BYTES},
	{telemetry.ProfPCIeRxBytes, gonvml.PCIE_UTIL_RX_BYTES},
}

// readPCIe reads a whole GPU's PCIe rates without GPM.
func readPCIe(r *reader, h gonvml.Device, v *telemetry.Values, fields telemetry.Mask) {
	for _, c := range pcieCounters {
		if fields.Has(c.f) {
			r.read(v, c.f, "nvmlDeviceGetPcieThroughput", func() (float64, gonvml.Return) {
				kb, ret := h.GetPcieThroughput(c.ctr)
				return float64(kb) * 1024, ret // KB/s → B/s
			})
		}
	}
}
