package sim

import (
	"encoding/binary"
	"strings"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// TestRecoveryControl: /sim sets the recovery action field and the row
// remapper, NVML reports them as the driver does (field values; remapped
// rows NOT_SUPPORTED before Ampere and with MIG on), and bad input names
// what is wanted.
func TestRecoveryControl(t *testing.T) {
	n, srv := newTestNode(t, "dgx-h100")
	dev := n.devices[2]
	field := func() (uint32, gonvml.Return) {
		fv := []gonvml.FieldValue{{FieldId: gonvml.FI_DEV_GET_GPU_RECOVERY_ACTION}, {FieldId: gonvml.FI_DEV_MEMORY_TEMP}}
		if r := dev.GetFieldValues(fv); r != gonvml.SUCCESS {
			return 0, r
		}
		if fv[1].NvmlReturn != uint32(gonvml.SUCCESS) {
			t.Errorf("memory temperature beside the recovery action: return %d", fv[1].NvmlReturn)
		}
		return binary.NativeEndian.Uint32(fv[0].Value[:]), gonvml.Return(fv[0].NvmlReturn)
	}
	if a, r := field(); r != gonvml.SUCCESS || a != uint32(gonvml.GPU_RECOVERY_ACTION_NONE) {
		t.Fatalf("initial recovery action %d (%v), want none", a, r)
	}
	for _, c := range []struct {
		query string
		want  gonvml.DeviceGpuRecoveryAction
	}{{"node_reboot", gonvml.GPU_RECOVERY_ACTION_NODE_REBOOT}, {"DRAIN_P2P", gonvml.GPU_RECOVERY_ACTION_DRAIN_P2P}, {"4", gonvml.GPU_RECOVERY_ACTION_DRAIN_AND_RESET}, {"none", gonvml.GPU_RECOVERY_ACTION_NONE}} {
		if code, body := do(t, "POST", srv.URL+"/sim/gpus/2/recovery?action="+c.query, ""); code != 200 {
			t.Fatalf("recovery %s: %d %v", c.query, code, body)
		}
		if a, r := field(); r != gonvml.SUCCESS || a != uint32(c.want) {
			t.Errorf("after recovery %s: %d (%v), want %d", c.query, a, r, c.want)
		}
	}

	if code, body := do(t, "POST", srv.URL+"/sim/gpus/2/remap?corr=3&uncorr=1&pending=true", ""); code != 200 {
		t.Fatalf("remap: %d %v", code, body)
	}
	c, u, p, f, r := dev.GetRemappedRows()
	if r != gonvml.SUCCESS || c != 3 || u != 1 || !p || f {
		t.Errorf("GetRemappedRows = %d %d %v %v %v, want 3 1 true false SUCCESS", c, u, p, f, r)
	}
	if st := n.State()[2]; st.RowRemap != (RowRemap{Correctable: 3, Uncorrectable: 1, Pending: true}) {
		t.Errorf("state row remap %+v", st.RowRemap)
	}

	for _, e := range []struct{ path, want string }{
		{"/sim/gpus/2/recovery?action=reboot_please", "want none, gpu_reset"},
		{"/sim/gpus/2/recovery", "want none, gpu_reset"},
		{"/sim/gpus/2/remap?pending=maybe", "remap takes"},
		{"/sim/gpus/2/remap?corr=-1", "remap takes"},
		{"/sim/gpus/9/remap", "GPUs 0..7"},
	} {
		code, body := do(t, "POST", srv.URL+e.path, "")
		if msg, _ := body["error"].(string); code < 400 || !strings.Contains(msg, e.want) {
			t.Errorf("POST %s: %d %v, want an error with %q", e.path, code, body, e.want)
		}
	}

	volta, _ := newTestNode(t, "dgx1-volta")
	if _, _, _, _, r := volta.devices[0].GetRemappedRows(); r != gonvml.ERROR_NOT_SUPPORTED {
		t.Errorf("Volta GetRemappedRows: %v, want NOT_SUPPORTED", r)
	}
	if err := n.SetMIGLayout(2, true, []string{"3g.40gb"}); err != nil {
		t.Fatal(err)
	}
	if _, _, _, _, r := dev.GetRemappedRows(); r != gonvml.ERROR_NOT_SUPPORTED {
		t.Errorf("GetRemappedRows with MIG on: %v, want NOT_SUPPORTED", r)
	}
}
