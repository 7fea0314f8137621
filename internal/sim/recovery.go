package sim

// The driver's view of what a GPU needs before it can serve again: NVML's
// recovery action field (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) and the row
// remapper's state (nvmlDeviceGetRemappedRows), settable through the
// control API like fakenvml's `recovery` and `remap` commands.

import (
	"encoding/binary"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// RowRemap is a GPU's row-remapper state as nvmlDeviceGetRemappedRows
// reports it.
type RowRemap struct {
	Correctable   int  `json:"correctable"`
	Uncorrectable int  `json:"uncorrectable"`
	Pending       bool `json:"pending"`
	Failure       bool `json:"failure"`
}

// recoveryState is a GPU's recovery action and row-remapper state.
type recoveryState struct {
	action gonvml.DeviceGpuRecoveryAction
	remap  RowRemap
}

// RecoveryActions maps the control API's action names (fakenvml's
// spellings) onto go-nvml's GPU_RECOVERY_ACTION_* values.
var RecoveryActions = map[string]gonvml.DeviceGpuRecoveryAction{
	"none":                gonvml.GPU_RECOVERY_ACTION_NONE,
	"gpu_reset":           gonvml.GPU_RECOVERY_ACTION_GPU_RESET,
	"node_reboot":         gonvml.GPU_RECOVERY_ACTION_NODE_REBOOT,
	"drain_p2p":           gonvml.GPU_RECOVERY_ACTION_DRAIN_P2P,
	"drain_and_reset":     gonvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET,
	"recover_imex_domain": gonvml.GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN,
	"bus_reset":           gonvml.GPU_RECOVERY_ACTION_BUS_RESET,
	"system_reboot":       gonvml.GPU_RECOVERY_ACTION_SYSTEM_REBOOT,
}

// ParseRecoveryAction reads an action name (none, gpu_reset, node_reboot,
// drain_p2p, drain_and_reset, recover_imex_domain, bus_reset,
// system_reboot) or a number.
func ParseRecoveryAction(s string) (gonvml.DeviceGpuRecoveryAction, error) {
	if a, ok := RecoveryActions[strings.ToLower(s)]; ok {
		return a, nil
	}
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		return 0, fmt.Errorf("recovery action %q: want none, gpu_reset, node_reboot, drain_p2p, drain_and_reset, "+
			"recover_imex_domain, bus_reset, system_reboot or a number", s)
	}
	return gonvml.DeviceGpuRecoveryAction(v), nil
}

// remapSupported: the row remapper exists on Ampere and later, and NVML
// does not report it while MIG is on (as fakenvml and the driver do).
func remapSupported(arch gonvml.DeviceArchitecture, s *gpuState) bool {
	return arch >= gonvml.DEVICE_ARCH_AMPERE && arch != gonvml.DEVICE_ARCH_UNKNOWN && !s.mig.enabled
}

// addRecoveryFuncs gives a GPU's mock GetRemappedRows.
func (n *Node) addRecoveryFuncs(d *mock.Device, g *simGPU) {
	i := g.index
	arch := g.model.config.Architecture
	d.GetRemappedRowsFunc = func() (int, int, bool, bool, gonvml.Return) {
		n.mu.Lock()
		defer n.mu.Unlock()
		if r := n.failureLocked(i, "GetRemappedRows"); r != gonvml.SUCCESS {
			return 0, 0, false, false, r
		}
		s := &n.state[i]
		if !remapSupported(arch, s) {
			return 0, 0, false, false, gonvml.ERROR_NOT_SUPPORTED
		}
		m := s.rec.remap
		return m.Correctable, m.Uncorrectable, m.Pending, m.Failure, gonvml.SUCCESS
	}
}

// recoveryField answers the recovery action field value; called with the
// node's mutex held.
func (n *Node) recoveryFieldLocked(gpu int, v *gonvml.FieldValue) {
	v.NvmlReturn = uint32(gonvml.SUCCESS)
	v.ValueType = uint32(gonvml.VALUE_TYPE_UNSIGNED_INT)
	v.Value = [8]byte{}
	binary.NativeEndian.PutUint32(v.Value[:], uint32(n.state[gpu].rec.action))
}

// SetRecoveryAction sets what NVML's recovery action field reports.
func (n *Node) SetRecoveryAction(gpu int, a gonvml.DeviceGpuRecoveryAction) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.state[gpu].rec.action = a
	return nil
}

// SetRowRemap sets the row-remapper state GetRemappedRows reports (where
// the GPU has one).
func (n *Node) SetRowRemap(gpu int, r RowRemap) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	if r.Correctable < 0 || r.Uncorrectable < 0 {
		return fmt.Errorf("row remap counts must not be negative (correctable %d, uncorrectable %d)", r.Correctable, r.Uncorrectable)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.state[gpu].rec.remap = r
	return nil
}

// Recovery reports a GPU's recovery action and row-remapper state.
func (n *Node) Recovery(gpu int) (gonvml.DeviceGpuRecoveryAction, RowRemap, error) {
	if err := n.validGPU(gpu); err != nil {
		return 0, RowRemap{}, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state[gpu].rec.action, n.state[gpu].rec.remap, nil
}

// addRecoveryHandlers serves
//
//	POST /sim/gpus/{index}/recovery?action=gpu_reset   NVML's recovery action (a name or a number)
//	POST /sim/gpus/{index}/remap?corr=0&uncorr=1&pending=true&failure=false
//	                                                   the row-remapper state (omitted: 0/false)
func (n *Node) addRecoveryHandlers(mux *http.ServeMux) {
	mux.HandleFunc("POST /sim/gpus/{index}/recovery", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		a, err := ParseRecoveryAction(r.URL.Query().Get("action"))
		if err != nil {
			return nil, badRequest("%v", err)
		}
		return map[string]any{"gpu": gpu, "recoveryAction": uint32(a)}, n.SetRecoveryAction(gpu, a)
	}))
	mux.HandleFunc("POST /sim/gpus/{index}/remap", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		corr, err1 := queryInt(r, "corr", 0)
		uncorr, err2 := queryInt(r, "uncorr", 0)
		pending, err3 := queryBool(r, "pending")
		failure, err4 := queryBool(r, "failure")
		if err1 != nil || err2 != nil || err3 != nil || err4 != nil {
			return nil, badRequest("remap takes ?corr=N&uncorr=N&pending=true|false&failure=true|false")
		}
		m := RowRemap{Correctable: corr, Uncorrectable: uncorr, Pending: pending, Failure: failure}
		if err := n.SetRowRemap(gpu, m); err != nil {
			return nil, badRequest("%v", err)
		}
		return map[string]any{"gpu": gpu, "remap": m}, nil
	}))
}

func queryBool(r *http.Request, key string) (bool, error) {
	s := r.URL.Query().Get(key)
	if s == "" {
		return false, nil
	}
	return strconv.ParseBool(s)
}
