package health

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

// TestRecoveryGate: after a fatal XID and the quiet period, a GPU returns
// only when NVML's recovery action reads none and no row remap is pending
// or failed; otherwise it stays out saying what the driver wants, and
// returns by itself once the condition clears. A driver without the field
// or without row remapping gates on what it has.
func TestRecoveryGate(t *testing.T) {
	type setup func(t *testing.T, n *sim.Node, gpu int)
	action := func(a gonvml.DeviceGpuRecoveryAction) setup {
		return func(t *testing.T, n *sim.Node, gpu int) {
			if err := n.SetRecoveryAction(gpu, a); err != nil {
				t.Fatal(err)
			}
		}
	}
	remap := func(r sim.RowRemap) setup {
		return func(t *testing.T, n *sim.Node, gpu int) {
			if err := n.SetRowRemap(gpu, r); err != nil {
				t.Fatal(err)
			}
		}
	}
	fault := func(call string, code gonvml.Return) setup {
		return func(t *testing.T, n *sim.Node, gpu int) {
			if err := n.SetFault(gpu, call, code); err != nil {
				t.Fatal(err)
			}
		}
	}
	both := func(a, b setup) setup {
		return func(t *testing.T, n *sim.Node, gpu int) { a(t, n, gpu); b(t, n, gpu) }
	}
	clearAll := both(action(gonvml.GPU_RECOVERY_ACTION_NONE), remap(sim.RowRemap{Correctable: 3, Uncorrectable: 1}))
	unfault := func(call string) setup { return fault(call, gonvml.SUCCESS) }

	cases := []struct {
		name    string
		profile string
		set     setup
		held    string // "" when the GPU returns after the quiet period
		action  string // GPUStatus.RecoveryAction while set
		unset   setup  // clears the condition (held cases)
	}{
		{"action none", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_NONE), "", "none", nil},
		{"gpu reset", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_GPU_RESET), "needs GPU reset", "gpu_reset", clearAll},
		{"node reboot", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_NODE_REBOOT), "needs node reboot", "node_reboot", clearAll},
		{"drain p2p", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_DRAIN_P2P), "drain P2P traffic", "drain_p2p", clearAll},
		{"drain and reset", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET), "drain and reset", "drain_and_reset", clearAll},
		{"recover imex domain", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN), "needs IMEX domain recovery", "recover_imex_domain", clearAll},
		{"bus reset", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_BUS_RESET), "needs bus reset", "bus_reset", clearAll},
		{"system reboot", "dgx-h100", action(gonvml.GPU_RECOVERY_ACTION_SYSTEM_REBOOT), "needs system reboot", "system_reboot", clearAll},
		{"unknown action", "dgx-h100", action(42), "unknown recovery action 42", "action_42", clearAll},
		{"remapped rows only", "dgx-h100", remap(sim.RowRemap{Correctable: 2, Uncorrectable: 1}), "", "none", nil},
		{"remap pending", "dgx-h100", remap(sim.RowRemap{Uncorrectable: 1, Pending: true}), "row remap pending", "none", clearAll},
		{"remap failed", "dgx-h100", remap(sim.RowRemap{Uncorrectable: 512, Failure: true}), "row remap failed", "none", clearAll},
		{"reset and remap pending", "dgx-h100",
			both(action(gonvml.GPU_RECOVERY_ACTION_GPU_RESET), remap(sim.RowRemap{Pending: true})),
			"needs GPU reset, row remap pending", "gpu_reset", clearAll},
		// Drivers without the field: the gate uses row remapping alone.
		{"no field, action set", "dgx-h100",
			both(fault("GetFieldValues", gonvml.ERROR_NOT_SUPPORTED), action(gonvml.GPU_RECOVERY_ACTION_GPU_RESET)), "", "unsupported", nil},
		{"no field, remap pending", "dgx-h100",
			both(fault("GetFieldValues", gonvml.ERROR_NOT_SUPPORTED), remap(sim.RowRemap{Pending: true})),
			"row remap pending", "unsupported", remap(sim.RowRemap{})},
		// No row remapping (Volta; MIG on): the gate uses the field alone.
		{"volta, remap pending ignored", "dgx1-volta", remap(sim.RowRemap{Pending: true}), "", "none", nil},
		{"volta, gpu reset", "dgx1-volta", action(gonvml.GPU_RECOVERY_ACTION_GPU_RESET), "needs GPU reset", "gpu_reset", clearAll},
		// A failing read holds (safe) until it reads again.
		{"remap unreadable", "dgx-h100", fault("GetRemappedRows", gonvml.ERROR_UNKNOWN), "row remap state unreadable", "none",
			unfault("GetRemappedRows")},
		{"action unreadable", "dgx-h100", fault("GetFieldValues", gonvml.ERROR_UNKNOWN), "recovery action unreadable", "unreadable",
			unfault("GetFieldValues")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			node, lib, inv := simNode(t, tc.profile)
			clock := newFakeClock()
			r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), QuietPeriod: time.Minute, Now: clock.Now})
			r.waitStatus(t, "events armed", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
			const gpu = 2
			uuid := inv.GPUs[gpu].UUID
			tc.set(t, node, gpu)
			if _, err := node.InjectXID(gpu, 48, -1, -1); err != nil {
				t.Fatal(err)
			}
			r.waitUnit(t, uuid, false)
			r.rounds(t, 1)
			if st := r.state.Status(uuid); st.Healthy || strings.Contains(st.Reason, "recovery held") {
				t.Fatalf("within the quiet period: %+v, want out for the XID only", st)
			}
			clock.Advance(2 * time.Minute)
			if tc.held == "" {
				st := r.waitUnit(t, uuid, true)
				if !strings.Contains(st.Reason, "recovered") {
					t.Errorf("returned with reason %q, want recovered", st.Reason)
				}
				r.rounds(t, 1)
				if got := r.m.Status().GPUs[gpu].RecoveryAction; got != tc.action {
					t.Errorf("recoveryAction %q, want %q", got, tc.action)
				}
				return
			}
			r.rounds(t, 2)
			st := r.state.Status(uuid)
			if st.Healthy || !strings.Contains(st.Reason, "recovery held: "+tc.held) || !strings.Contains(st.Reason, "XID 48") {
				t.Fatalf("after the quiet period: %+v, want out with reason \"recovery held: %s … (was: XID 48 …)\"", st, tc.held)
			}
			ms := r.m.Status()
			if g := ms.GPUs[gpu]; g.RecoveryAction != tc.action || !strings.HasPrefix(g.RecoveryHold, tc.held) {
				t.Errorf("GPU status %+v, want recoveryAction %q and recoveryHold %q", g, tc.action, tc.held)
			}
			if len(ms.Faults) != 1 || !strings.HasPrefix(ms.Faults[0].Held, tc.held) {
				t.Errorf("faults %+v, want one held for %q", ms.Faults, tc.held)
			}
			// The operator acts (nvidia-smi -r): the condition clears and
			// the GPU returns by itself, the quiet period being long over.
			tc.unset(t, node, gpu)
			st = r.waitUnit(t, uuid, true)
			if !strings.Contains(st.Reason, "recovered") {
				t.Errorf("returned with reason %q, want recovered", st.Reason)
			}
			r.waitStatus(t, "no recovery hold", func(s MonitorStatus) bool { return s.GPUs[gpu].RecoveryHold == "" && len(s.Faults) == 0 })
		})
	}
}

// TestRecoveryGateMIG: a MIG-enabled GPU reports no row remapping; its MIG
// devices are gated by the recovery action of their GPU.
func TestRecoveryGateMIG(t *testing.T) {
	node, lib, inv := simNode(t, "dgx-a100-mig")
	clock := newFakeClock()
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), QuietPeriod: time.Minute, Now: clock.Now})
	r.waitStatus(t, "events armed", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	gpu := -1
	for i, g := range inv.GPUs {
		if len(g.MIGDevices) > 0 {
			gpu = i
			break
		}
	}
	if gpu < 0 {
		t.Fatal("dgx-a100-mig has no GPU with MIG devices")
	}
	mig := inv.GPUs[gpu].MIGDevices[0]
	if err := node.SetRowRemap(gpu, sim.RowRemap{Pending: true}); err != nil {
		t.Fatal(err)
	}
	if err := node.SetRecoveryAction(gpu, gonvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET); err != nil {
		t.Fatal(err)
	}
	if _, err := node.InjectXID(gpu, 48, mig.GPUInstanceID, mig.ComputeInstanceID); err != nil {
		t.Fatal(err)
	}
	r.waitUnit(t, mig.UUID, false)
	r.rounds(t, 1)
	clock.Advance(2 * time.Minute)
	r.rounds(t, 2)
	if st := r.state.Status(mig.UUID); st.Healthy || !strings.Contains(st.Reason, "recovery held: drain and reset (was:") {
		t.Fatalf("MIG device %+v, want held for drain and reset only (no row remapping with MIG on)", st)
	}
	if g := r.m.Status().GPUs[gpu]; g.RowRemap == nil || g.RowRemap.Supported {
		t.Errorf("GPU status %+v, want row remapping reported as unsupported", g)
	}
	if err := node.SetRecoveryAction(gpu, gonvml.GPU_RECOVERY_ACTION_NONE); err != nil {
		t.Fatal(err)
	}
	r.waitUnit(t, mig.UUID, true)
}

// TestRecoveryGateSaysOnce: a driver without the recovery action field and
// GPUs without row remapping are said once for the node, in one Info line
// each, however many GPUs and probe rounds.
func TestRecoveryGateSaysOnce(t *testing.T) {
	node, lib, inv := simNode(t, "dgx1-volta") // no row remapper
	for i := range inv.GPUs {
		if err := node.SetFault(i, "GetFieldValues", gonvml.ERROR_NOT_SUPPORTED); err != nil {
			t.Fatal(err)
		}
	}
	logs := &countingHandler{}
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), Logger: slog.New(logs)})
	r.rounds(t, 5)
	counts, _ := logs.get()
	var field, remap int
	for msg, n := range counts {
		switch {
		case strings.Contains(msg, "no GPU recovery action field"):
			field += n
		case strings.Contains(msg, "no row remapping"):
			remap += n
		}
	}
	if field != 1 || remap != 1 {
		t.Errorf("log lines %v: want one about the missing field and one about row remapping", counts)
	}
	for _, g := range r.m.Status().GPUs {
		if g.RecoveryAction != ActionUnsupported || g.RowRemap == nil || g.RowRemap.Supported || g.RecoveryHold != "" {
			t.Errorf("GPU %d status %+v (row remap %+v), want action unsupported, row remapping unsupported, no hold", g.Index, g, g.RowRemap)
		}
	}
}
