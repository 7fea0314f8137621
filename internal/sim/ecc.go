package sim

// ECC error totals (nvmlDeviceGetTotalEccErrors) and ECC mode
// (nvmlDeviceGetEccMode), settable through the control API like
// fakenvml's `ecc` command. Setting counts delivers no event: ECC events
// are injected on their own (POST /sim/gpus/{index}/ecc).

import (
	"errors"
	"net/http"
	"strconv"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// ECCCounts are a GPU's ECC mode and error totals, volatile (since the
// driver loaded) and aggregate (the GPU's lifetime), as
// nvmlDeviceGetTotalEccErrors reports them: single-bit errors are the
// corrected ones, double-bit the uncorrected.
type ECCCounts struct {
	// Disabled turns ECC off: the totals then answer NOT_SUPPORTED (nvml.h:
	// "Requires ECC Mode to be enabled"). Every simulated model has ECC,
	// on by default, as data-centre GPUs ship.
	Disabled     bool   `json:"disabled,omitempty"`
	SBEVolatile  uint64 `json:"sbe_volatile"`
	DBEVolatile  uint64 `json:"dbe_volatile"`
	SBEAggregate uint64 `json:"sbe_aggregate"`
	DBEAggregate uint64 `json:"dbe_aggregate"`
}

// addECCFuncs gives a GPU's mock its ECC mode and totals.
func (n *Node) addECCFuncs(d *mock.Device, g *simGPU) {
	i := g.index
	d.GetEccModeFunc = func() (gonvml.EnableState, gonvml.EnableState, gonvml.Return) {
		mode, r := read(n, i, "GetEccMode", func(s *gpuState) gonvml.EnableState {
			if s.ecc.Disabled {
				return gonvml.FEATURE_DISABLED
			}
			return gonvml.FEATURE_ENABLED
		})
		return mode, mode, r
	}
	d.GetTotalEccErrorsFunc = func(typ gonvml.MemoryErrorType, ctr gonvml.EccCounterType) (uint64, gonvml.Return) {
		if typ >= gonvml.MEMORY_ERROR_TYPE_COUNT || ctr >= gonvml.ECC_COUNTER_TYPE_COUNT {
			return 0, gonvml.ERROR_INVALID_ARGUMENT
		}
		var off bool
		count, r := read(n, i, "GetTotalEccErrors", func(s *gpuState) uint64 {
			e := &s.ecc
			off = e.Disabled
			return [2][2]uint64{
				gonvml.VOLATILE_ECC:  {gonvml.MEMORY_ERROR_TYPE_CORRECTED: e.SBEVolatile, gonvml.MEMORY_ERROR_TYPE_UNCORRECTED: e.DBEVolatile},
				gonvml.AGGREGATE_ECC: {gonvml.MEMORY_ERROR_TYPE_CORRECTED: e.SBEAggregate, gonvml.MEMORY_ERROR_TYPE_UNCORRECTED: e.DBEAggregate},
			}[ctr][typ]
		})
		if r == gonvml.SUCCESS && off {
			return 0, gonvml.ERROR_NOT_SUPPORTED
		}
		return count, r
	}
}

// SetECC sets a GPU's ECC mode and error totals.
func (n *Node) SetECC(gpu int, e ECCCounts) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.state[gpu].ecc = e
	return nil
}

// addECCHandlers serves
//
//	POST /sim/gpus/{index}/ecc-errors?sbe=N&dbe=N[&agg_sbe=N&agg_dbe=N][&enabled=false]
//	    the volatile totals (aggregate = volatile unless given, as fakenvml's
//	    `ecc`); enabled=false turns ECC off (the totals become NOT_SUPPORTED)
func (n *Node) addECCHandlers(mux *http.ServeMux) {
	mux.HandleFunc("POST /sim/gpus/{index}/ecc-errors", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		q := r.URL.Query()
		count := func(key string, def uint64) (uint64, error) {
			s := q.Get(key)
			if s == "" {
				return def, nil
			}
			return strconv.ParseUint(s, 10, 64)
		}
		var e ECCCounts
		var errs [4]error
		e.SBEVolatile, errs[0] = count("sbe", 0)
		e.DBEVolatile, errs[1] = count("dbe", 0)
		e.SBEAggregate, errs[2] = count("agg_sbe", e.SBEVolatile)
		e.DBEAggregate, errs[3] = count("agg_dbe", e.DBEVolatile)
		enabled, err := true, errors.Join(errs[:]...)
		if s := q.Get("enabled"); s != "" && err == nil {
			enabled, err = strconv.ParseBool(s)
		}
		if err != nil {
			return nil, badRequest("ecc-errors takes ?sbe=N&dbe=N[&agg_sbe=N&agg_dbe=N][&enabled=true|false] (%v)", err)
		}
		e.Disabled = !enabled
		if err := n.SetECC(gpu, e); err != nil {
			return nil, badRequest("%v", err)
		}
		return map[string]any{"gpu": gpu, "ecc": e}, nil
	}))
}
