package sim

import (
	"encoding/binary"
	"strings"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// TestECCControl: /sim sets the ECC totals and mode; NVML reports them
// (aggregate = volatile unless given) and answers NOT_SUPPORTED with ECC
// off; bad input names what is wanted.
func TestECCControl(t *testing.T) {
	n, srv := newTestNode(t, "dgx-a100")
	dev := n.devices[3]
	totals := func() ([4]uint64, gonvml.Return) {
		var out [4]uint64
		k := 0
		for _, ctr := range []gonvml.EccCounterType{gonvml.VOLATILE_ECC, gonvml.AGGREGATE_ECC} {
			for _, typ := range []gonvml.MemoryErrorType{gonvml.MEMORY_ERROR_TYPE_CORRECTED, gonvml.MEMORY_ERROR_TYPE_UNCORRECTED} {
				v, r := dev.GetTotalEccErrors(typ, ctr)
				if r != gonvml.SUCCESS {
					return out, r
				}
				out[k] = v
				k++
			}
		}
		return out, gonvml.SUCCESS
	}
	if got, r := totals(); r != gonvml.SUCCESS || got != [4]uint64{} {
		t.Fatalf("initial ECC totals %v (%v), want zeros", got, r)
	}
	if cur, pend, r := dev.GetEccMode(); r != gonvml.SUCCESS || cur != gonvml.FEATURE_ENABLED || pend != gonvml.FEATURE_ENABLED {
		t.Errorf("initial ECC mode %v/%v (%v), want enabled", cur, pend, r)
	}
	for _, c := range []struct {
		query string
		want  [4]uint64 // SBE vol, DBE vol, SBE agg, DBE agg
		ret   gonvml.Return
	}{
		{"sbe=5&dbe=2", [4]uint64{5, 2, 5, 2}, gonvml.SUCCESS},
		{"sbe=5&dbe=2&agg_sbe=70&agg_dbe=30", [4]uint64{5, 2, 70, 30}, gonvml.SUCCESS},
		{"enabled=false", [4]uint64{}, gonvml.ERROR_NOT_SUPPORTED},
	} {
		if code, body := do(t, "POST", srv.URL+"/sim/gpus/3/ecc-errors?"+c.query, ""); code != 200 {
			t.Fatalf("ecc-errors %s: %d %v", c.query, code, body)
		}
		if got, r := totals(); r != c.ret || got != c.want {
			t.Errorf("after %s: totals %v (%v), want %v (%v)", c.query, got, r, c.want, c.ret)
		}
	}
	if cur, _, _ := dev.GetEccMode(); cur != gonvml.FEATURE_DISABLED {
		t.Errorf("ECC mode after enabled=false: %v", cur)
	}
	if st := n.State()[3]; !st.ECC.Disabled {
		t.Errorf("state ECC %+v, want disabled", st.ECC)
	}
	if _, r := dev.GetTotalEccErrors(gonvml.MEMORY_ERROR_TYPE_COUNT, gonvml.VOLATILE_ECC); r != gonvml.ERROR_INVALID_ARGUMENT {
		t.Errorf("a bad error type: %v, want INVALID_ARGUMENT", r)
	}
	for _, e := range []struct{ path, want string }{
		{"/sim/gpus/3/ecc-errors?sbe=-1", "ecc-errors takes"},
		{"/sim/gpus/3/ecc-errors?enabled=maybe", "ecc-errors takes"},
		{"/sim/gpus/9/ecc-errors", "GPUs 0..7"},
	} {
		code, body := do(t, "POST", srv.URL+e.path, "")
		if msg, _ := body["error"].(string); code < 400 || !strings.Contains(msg, e.want) {
			t.Errorf("POST %s: %d %v, want an error with %q", e.path, code, body, e.want)
		}
	}
}

// TestInterconnectTelemetry: PCIe throughput answers NOT_SUPPORTED until
// set; NVLink counters are field values on GPUs with NVLinks only, with
// the link count.
func TestInterconnectTelemetry(t *testing.T) {
	fields := func(dev gonvml.Device) (tx, rx uint64, links uint32, rets [3]gonvml.Return) {
		fv := []gonvml.FieldValue{
			{FieldId: gonvml.FI_DEV_NVLINK_THROUGHPUT_DATA_TX, ScopeId: 0xFFFFFFFF},
			{FieldId: gonvml.FI_DEV_NVLINK_THROUGHPUT_RAW_RX, ScopeId: 0xFFFFFFFF},
			{FieldId: gonvml.FI_DEV_NVLINK_LINK_COUNT},
		}
		if r := dev.GetFieldValues(fv); r != gonvml.SUCCESS {
			t.Fatalf("GetFieldValues: %v", r)
		}
		for k := range fv {
			rets[k] = gonvml.Return(fv[k].NvmlReturn)
		}
		return binary.NativeEndian.Uint64(fv[0].Value[:]), binary.NativeEndian.Uint64(fv[1].Value[:]),
			binary.NativeEndian.Uint32(fv[2].Value[:]), rets
	}
	ok := [3]gonvml.Return{gonvml.SUCCESS, gonvml.SUCCESS, gonvml.SUCCESS}
	for _, c := range []struct {
		profile string
		links   uint32
	}{{"dgx-h100", 18}, {"dgx1-volta", 6}, {"pcie-l4x4", 0}} {
		t.Run(c.profile, func(t *testing.T) {
			n, srv := newTestNode(t, c.profile)
			dev := n.devices[1]
			if _, r := dev.GetPcieThroughput(gonvml.PCIE_UTIL_TX_BYTES); r != gonvml.ERROR_NOT_SUPPORTED {
				t.Errorf("PCIe throughput before it is set: %v, want NOT_SUPPORTED", r)
			}
			body := `{"pcie_tx_kbps": 2048, "pcie_rx_kbps": 300, "nvlink_tx_kib": 1000, "nvlink_rx_kib": 7}`
			if code, resp := do(t, "PUT", srv.URL+"/sim/gpus/1/telemetry", body); code != 200 {
				t.Fatalf("telemetry: %d %v", code, resp)
			}
			for ctr, want := range map[gonvml.PcieUtilCounter]uint32{gonvml.PCIE_UTIL_TX_BYTES: 2048, gonvml.PCIE_UTIL_RX_BYTES: 300} {
				if v, r := dev.GetPcieThroughput(ctr); r != gonvml.SUCCESS || v != want {
					t.Errorf("PCIe throughput %d: %d (%v), want %d", ctr, v, r, want)
				}
			}
			tx, rx, links, rets := fields(dev)
			if c.links == 0 {
				if rets != [3]gonvml.Return{gonvml.ERROR_NOT_SUPPORTED, gonvml.ERROR_NOT_SUPPORTED, gonvml.SUCCESS} || links != 0 {
					t.Errorf("no NVLink: returns %v, link count %d; want NOT_SUPPORTED counters, 0 links", rets, links)
				}
				return
			}
			if rets != ok || tx != 1000 || rx != 7 || links != c.links {
				t.Errorf("NVLink: tx %d rx %d links %d (%v), want 1000 7 %d", tx, rx, links, rets, c.links)
			}
		})
	}
}
