package health

// The recovery gate: after the quiet period a GPU's units return only if the
// driver agrees. NVML says what a GPU needs through the recovery action field
// (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) and the row remapper's state
// (nvmlDeviceGetRemappedRows: a remap pending until the next reset, or
// failed). Both are read on every probe, for the gate, /debug/devices and
// metrics. A driver or GPU without one of them (NOT_SUPPORTED: older
// drivers lack the field; Volta and MIG-enabled GPUs report no row
// remapping) leaves the gate with what it has, said once per GPU.

import (
	"fmt"
	"strconv"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Recovery action names, as GPUStatus.RecoveryAction and the metrics spell
// them; ActionUnsupported when the driver lacks the field.
const (
	ActionNone        = "none"
	ActionUnsupported = "unsupported"
)

// recoveryActions names go-nvml's GPU_RECOVERY_ACTION_* values and what
// each asks of the operator (the gate's reason).
var recoveryActions = map[gonvml.DeviceGpuRecoveryAction]struct{ name, wants string }{
	gonvml.GPU_RECOVERY_ACTION_NONE:                {ActionNone, ""},
	gonvml.GPU_RECOVERY_ACTION_GPU_RESET:           {"gpu_reset", "needs GPU reset"},
	gonvml.GPU_RECOVERY_ACTION_NODE_REBOOT:         {"node_reboot", "needs node reboot"},
	gonvml.GPU_RECOVERY_ACTION_DRAIN_P2P:           {"drain_p2p", "drain P2P traffic"},
	gonvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET:     {"drain_and_reset", "drain and reset"},
	gonvml.GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN: {"recover_imex_domain", "needs IMEX domain recovery"},
	gonvml.GPU_RECOVERY_ACTION_BUS_RESET:           {"bus_reset", "needs bus reset"},
	gonvml.GPU_RECOVERY_ACTION_SYSTEM_REBOOT:       {"system_reboot", "needs system reboot"},
}

// RecoveryActionName names an NVML recovery action value ("action_N" for
// one this build does not know).
func RecoveryActionName(a uint32) string {
	if n, ok := recoveryActions[gonvml.DeviceGpuRecoveryAction(a)]; ok {
		return n.name
	}
	return fmt.Sprintf("action_%d", a)
}

// RecoveryActionCode is the NVML value of a GPUStatus.RecoveryAction name;
// false for "", unsupported and unreadable.
func RecoveryActionCode(name string) (uint32, bool) {
	for code, a := range recoveryActions {
		if a.name == name {
			return uint32(code), true
		}
	}
	if v, ok := strings.CutPrefix(name, "action_"); ok {
		if n, err := strconv.ParseUint(v, 10, 32); err == nil {
			return uint32(n), true
		}
	}
	return 0, false
}

// RowRemapStatus is a GPU's row-remapper state.
type RowRemapStatus struct {
	Supported     bool `json:"supported"`
	Correctable   int  `json:"correctable,omitempty"`
	Uncorrectable int  `json:"uncorrectable,omitempty"`
	Pending       bool `json:"pending,omitempty"`
	Failure       bool `json:"failure,omitempty"`
}

// gateView is what the last probe read for the gate.
type gateView struct {
	read bool // read at least once since the GPU last answered
	// action is the recovery action; actionSupported is false when the
	// driver lacks the field.
	action          gonvml.DeviceGpuRecoveryAction
	actionSupported bool
	actionErr       string // the last read failed (other than NOT_SUPPORTED)
	remap           RowRemapStatus
	remapErr        string
	// said*: the missing field and missing row remapping have been logged
	// for this GPU.
	saidNoAction, saidNoRemap bool
}

// readGate reads a GPU's recovery action and row remapping; it reports
// whether the GPU is lost.
func (m *Monitor) readGate(i int) (lost bool) {
	w := m.gpus[i]
	if w.handle == nil {
		return false
	}
	lib := m.opts.Lib
	g := &w.gate
	g.read = true

	a, err := nvml.Call(lib, "nvmlDeviceGetFieldValues", func() (uint64, gonvml.Return) {
		return recoveryActionField(w.handle)
	})
	g.actionErr = ""
	switch {
	case err == nil:
		g.action, g.actionSupported = gonvml.DeviceGpuRecoveryAction(a), true
	case nvml.IsLost(err):
		m.gpuLost(i, err)
		return true
	case nvml.IsNotSupported(err):
		g.action, g.actionSupported = gonvml.GPU_RECOVERY_ACTION_NONE, false
		if !g.saidNoAction {
			g.saidNoAction = true
			m.gateNews.noAction = append(m.gateNews.noAction, w.index)
		}
	default:
		g.actionSupported = true
		g.actionErr = err.Error()
		m.noteError("recovery_action", err)
	}

	type remap struct {
		corr, unc        int
		pending, failure bool
	}
	r, err := nvml.Call(lib, "nvmlDeviceGetRemappedRows", func() (remap, gonvml.Return) {
		c, u, p, f, ret := w.handle.GetRemappedRows()
		return remap{c, u, p, f}, ret
	})
	g.remapErr = ""
	switch {
	case err == nil:
		g.remap = RowRemapStatus{Supported: true, Correctable: r.corr, Uncorrectable: r.unc, Pending: r.pending, Failure: r.failure}
	case nvml.IsLost(err):
		m.gpuLost(i, err)
		return true
	case nvml.IsNotSupported(err):
		g.remap = RowRemapStatus{}
		if !g.saidNoRemap {
			g.saidNoRemap = true
			m.gateNews.noRemap = append(m.gateNews.noRemap, w.index)
		}
	default:
		g.remap.Supported = true
		g.remapErr = err.Error()
		m.noteError("row_remap", err)
	}
	return false
}

// gateNews collects, over one probe round, the GPUs found without the
// recovery action field or row remapping for the first time, so that the
// node says so in one line, not one per GPU.
type gateNews struct{ noAction, noRemap []int }

// sayGateNews logs what the round found missing, once.
func (m *Monitor) sayGateNews() {
	if len(m.gateNews.noAction) > 0 {
		m.log.Info("the driver reports no GPU recovery action field (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) for these GPUs: "+
			"their recovery waits for the quiet period and the row remapper only", "gpus", m.gateNews.noAction)
	}
	if len(m.gateNews.noRemap) > 0 {
		m.log.Info("no row remapping reported for these GPUs (before Ampere, or MIG on): their recovery does not wait for it",
			"gpus", m.gateNews.noRemap)
	}
	m.gateNews = gateNews{}
}

// recoveryActionField reads NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; a field
// the driver does not know answers NOT_SUPPORTED in its own return code.
func recoveryActionField(h gonvml.Device) (uint64, gonvml.Return) {
	v, ret := nvml.FieldValue(h, gonvml.FI_DEV_GET_GPU_RECOVERY_ACTION)
	return uint64(v), ret
}

// hold says what keeps a GPU's units out after the quiet period, or "" when
// the driver is content (or cannot say).
func (g *gateView) hold() string {
	if !g.read {
		return "recovery state not read yet"
	}
	var wants []string
	switch {
	case g.actionErr != "":
		wants = append(wants, "recovery action unreadable ("+g.actionErr+")")
	case g.actionSupported && g.action != gonvml.GPU_RECOVERY_ACTION_NONE:
		if a, ok := recoveryActions[g.action]; ok {
			wants = append(wants, a.wants)
		} else {
			wants = append(wants, fmt.Sprintf("unknown recovery action %d", g.action))
		}
	}
	switch {
	case g.remapErr != "":
		wants = append(wants, "row remap state unreadable ("+g.remapErr+")")
	case g.remap.Failure:
		wants = append(wants, "row remap failed")
	case g.remap.Pending:
		wants = append(wants, "row remap pending")
	}
	return strings.Join(wants, ", ")
}

// actionName is the recovery action for status and metrics.
func (g *gateView) actionName() string {
	switch {
	case !g.read:
		return ""
	case !g.actionSupported:
		return ActionUnsupported
	case g.actionErr != "":
		return "unreadable"
	}
	return RecoveryActionName(uint32(g.action))
}
