package nvmlbackend_test

// dcgm-exporter parity on the NVML path, through the production backend on
// simulated nodes: NVLink bandwidth (DCGM's rate arithmetic), PCIe rates
// (GPM or nvmlDeviceGetPcieThroughput, bytes per second), remapped rows and
// ECC totals; a NOT_SUPPORTED answer leaves a field out and is not asked
// again. The same checks on the real dlopen path with the fake library are
// in tests/kubelet/realnvml_parity_test.go.

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// callCounter counts some NVML device calls per GPU index.
type callCounter struct {
	mu sync.Mutex
	n  map[string]map[int]int // op → GPU → calls
}

// countParityCalls wraps the GPU handles' GetFieldValues,
// GetPcieThroughput, GetRemappedRows and GetTotalEccErrors.
func countParityCalls(tb testing.TB, e *procEnv) *callCounter {
	tb.Helper()
	c := &callCounter{n: map[string]map[int]int{}}
	add := func(op string, gpu int) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.n[op] == nil {
			c.n[op] = map[int]int{}
		}
		c.n[op][gpu]++
	}
	for _, g := range e.inv.GPUs {
		h, _ := e.inv.Handle(g.UUID)
		m, ok := sim.Mock(h)
		if !ok {
			tb.Fatalf("%s is not a simulated handle", g.UUID)
		}
		i := g.Index
		fv, pcie, rows, ecc := m.GetFieldValuesFunc, m.GetPcieThroughputFunc, m.GetRemappedRowsFunc, m.GetTotalEccErrorsFunc
		m.GetFieldValuesFunc = func(v []gonvml.FieldValue) gonvml.Return { add("GetFieldValues", i); return fv(v) }
		m.GetPcieThroughputFunc = func(c gonvml.PcieUtilCounter) (uint32, gonvml.Return) {
			add("GetPcieThroughput", i)
			return pcie(c)
		}
		m.GetRemappedRowsFunc = func() (int, int, bool, bool, gonvml.Return) { add("GetRemappedRows", i); return rows() }
		m.GetTotalEccErrorsFunc = func(t gonvml.MemoryErrorType, k gonvml.EccCounterType) (uint64, gonvml.Return) {
			add("GetTotalEccErrors", i)
			return ecc(t, k)
		}
	}
	return c
}

// take returns the calls of op on gpu since the last take.
func (c *callCounter) take(op string, gpu int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.n[op][gpu]
	delete(c.n[op], gpu)
	return n
}

// want is a field's expected value on a target; absent: left out.
type want struct {
	v      float64
	absent bool
}

func checkField(tb testing.TB, step string, res map[string]telemetry.Result, key string, f telemetry.Field, w want) {
	tb.Helper()
	r, ok := res[key]
	if !ok {
		tb.Fatalf("%s: no result for %s", step, key)
	}
	if r.Err != nil {
		tb.Fatalf("%s: %s: %v", step, key, r.Err)
	}
	got, have := r.Get(f)
	switch {
	case w.absent && have:
		tb.Errorf("%s: %s %s = %v, want it left out", step, key, f, got)
	case !w.absent && !have:
		tb.Errorf("%s: %s %s left out, want %v", step, key, f, w.v)
	case !w.absent && got != w.v:
		tb.Errorf("%s: %s %s = %v, want %v", step, key, f, got, w.v)
	}
}

func setTel(tb testing.TB, e *procEnv, gpu int, p sim.ExtraTelemetryPatch) {
	tb.Helper()
	if err := e.node.SetTelemetry(gpu, sim.TelemetryPatch{ExtraTelemetryPatch: p}); err != nil {
		tb.Fatal(err)
	}
}

func ptr[T any](v T) *T { return &v }

// TestNVLinkBandwidth: DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL is DCGM's rate,
// Δ(TX+RX KiB, all links) / Δs / 1000, truncated, from the second reading
// on; left out on GPUs without NVLink, after a counter reset and when no
// time passed. MIG devices carry their GPU's value.
func TestNVLinkBandwidth(t *testing.T) {
	nvl := telemetry.NVLinkBandwidthTotal
	only := telemetry.MaskOf(nvl)
	type step struct {
		name    string
		advance time.Duration
		tx, rx  uint64 // GPU 0's counters, KiB
		want    want   // GPU 0 (and each of its MIG devices)
		idle    want   // GPU 1, counters untouched
	}
	rate := func(v float64) want { return want{v: v} }
	out := want{absent: true}
	steps := []step{
		{"first reading", 0, 1000, 500, out, out},
		{"4,000,000 KiB in 2 s", 2 * time.Second, 1000 + 3_000_000, 500 + 1_000_000, rate(2000), rate(0)},
		{"2,999 KiB in 1 s truncates", time.Second, 1000 + 3_002_999, 500 + 1_000_000, rate(2), rate(0)},
		{"no time passed", 0, 1000 + 3_500_000, 500 + 1_000_000, out, out},
		{"measured from the older reading", time.Second, 1000 + 4_002_999, 500 + 1_000_000, rate(1000), rate(0)},
		{"counters reset", time.Second, 10, 10, out, rate(0)},
		{"after the reset", time.Second, 10 + 500_000, 10, rate(500), rate(0)},
	}
	for _, profile := range []string{"dgx1-volta", "dgx-a100-mig", "dgx-h100"} {
		t.Run(profile, func(t *testing.T) {
			e := newProcEnv(t, profile)
			for _, s := range steps {
				e.clk.Advance(s.advance)
				setTel(t, e, 0, sim.ExtraTelemetryPatch{NVLinkTxKiB: ptr(s.tx), NVLinkRxKiB: ptr(s.rx)})
				res := e.sample(t, allFields, false)
				keys := []string{e.gpuKey(0)}
				if g := e.inv.GPUs[0]; g.MIGEnabled {
					keys = nil
					for k := range g.MIGDevices {
						keys = append(keys, e.migKey(0, k))
					}
				}
				for _, k := range keys {
					checkField(t, s.name, res, k, nvl, s.want)
				}
				if !e.inv.GPUs[1].MIGEnabled {
					checkField(t, s.name, res, e.gpuKey(1), nvl, s.idle)
				}
			}
		})
	}

	t.Run("no NVLink", func(t *testing.T) {
		e := newProcEnv(t, "pcie-l4x4")
		calls := countParityCalls(t, e)
		for round := range 3 {
			e.clk.Advance(time.Second)
			res := e.sample(t, only, false)
			checkField(t, "L4", res, e.gpuKey(0), nvl, out)
			if n := calls.take("GetFieldValues", 0); n != map[bool]int{true: 1, false: 0}[round == 0] {
				t.Errorf("round %d: %d field-value calls on a GPU without NVLink, want 1 in the first round, then none (NOT_SUPPORTED remembered)", round, n)
			}
		}
	})

	// A driver that answers the throughput fields but counts no NVLinks
	// on the GPU: left out, not 0.
	t.Run("link count 0", func(t *testing.T) {
		e := newProcEnv(t, "dgx-a100")
		h, _ := e.inv.Handle(e.gpuKey(2))
		m, _ := sim.Mock(h)
		orig := m.GetFieldValuesFunc
		m.GetFieldValuesFunc = func(v []gonvml.FieldValue) gonvml.Return {
			ret := orig(v)
			for k := range v {
				if v[k].FieldId == gonvml.FI_DEV_NVLINK_LINK_COUNT {
					binary.NativeEndian.PutUint32(v[k].Value[:], 0)
				}
			}
			return ret
		}
		for round := range 2 {
			e.clk.Advance(time.Second)
			res := e.sample(t, only, false)
			checkField(t, "link count 0", res, e.gpuKey(2), nvl, out)
			other := rate(0) // GPU 3 has its links
			if round == 0 {
				other = out
			}
			checkField(t, "link count 0", res, e.gpuKey(3), nvl, other)
		}
	})

	// A counter's own failure leaves the field out for the round and
	// keeps the GPU's other fields; INVALID_ARGUMENT (a driver without the
	// all-links scope) or NOT_SUPPORTED for good.
	t.Run("counter failures", func(t *testing.T) {
		e := newProcEnv(t, "dgx-a100")
		h, _ := e.inv.Handle(e.gpuKey(2))
		m, _ := sim.Mock(h)
		orig := m.GetFieldValuesFunc
		var fail gonvml.Return // for the TX counter
		m.GetFieldValuesFunc = func(v []gonvml.FieldValue) gonvml.Return {
			ret := orig(v)
			for k := range v {
				if v[k].FieldId == gonvml.FI_DEV_NVLINK_THROUGHPUT_DATA_TX && fail != gonvml.SUCCESS {
					v[k].NvmlReturn = uint32(fail)
				}
			}
			return ret
		}
		temp := telemetry.GPUTemp
		for _, s := range []struct {
			name string
			fail gonvml.Return
			tx   uint64
			want want
		}{
			{"first reading", gonvml.SUCCESS, 0, out},
			{"TX counter UNKNOWN", gonvml.ERROR_UNKNOWN, 1_000_000, out},
			{"measured from the first reading", gonvml.SUCCESS, 2_000_000, rate(1000)},
			{"TX counter INVALID_ARGUMENT", gonvml.ERROR_INVALID_ARGUMENT, 3_000_000, out},
			{"not asked again", gonvml.SUCCESS, 4_000_000, out},
		} {
			e.clk.Advance(time.Second)
			fail = s.fail
			setTel(t, e, 2, sim.ExtraTelemetryPatch{NVLinkTxKiB: ptr(s.tx)})
			res := e.sample(t, telemetry.MaskOf(nvl, temp), false)
			checkField(t, s.name, res, e.gpuKey(2), nvl, s.want)
			checkField(t, s.name, res, e.gpuKey(2), temp, want{v: 31})
		}
	})

	// A failure of the call fails the GPU's round, as for any field.
	t.Run("lost GPU", func(t *testing.T) {
		e := newProcEnv(t, "dgx-a100")
		if err := e.node.SetFault(4, "GetFieldValues", gonvml.ERROR_GPU_IS_LOST); err != nil {
			t.Fatal(err)
		}
		res := e.sample(t, only, false)
		if err := res[e.gpuKey(4)].Err; !nvml.IsLost(err) {
			t.Errorf("GPU 4 with GetFieldValues failing: err %v, want GPU_IS_LOST", err)
		}
	})
}

// TestPCIeRates: DCGM_FI_PROF_PCIE_TX/RX_BYTES in bytes per second: from
// GPM on Hopper (MiB/s × 2²⁰, from the second round), else from
// nvmlDeviceGetPcieThroughput (KB/s × 1024, every round) on whole GPUs
// only; never for MIG devices without a per-instance source; NOT_SUPPORTED
// left out and not asked again.
func TestPCIeRates(t *testing.T) {
	tx, rx := telemetry.ProfPCIeTxBytes, telemetry.ProfPCIeRxBytes
	out := want{absent: true}
	for _, tc := range []struct {
		name    string
		profile string
		gpm     bool // GPM works on the profile's GPUs
		noGPM   bool // GPM made to fail: the NVML counter instead
	}{
		{"Ampere: NVML counter", "dgx-a100-mig", false, false},
		{"Volta: NVML counter", "dgx1-volta", false, false},
		{"Hopper: GPM", "dgx-h100", true, false},
		{"Hopper without GPM: NVML counter", "dgx-h100", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newProcEnv(t, tc.profile)
			if tc.noGPM {
				for i := range e.inv.GPUs {
					if err := e.node.SetFault(i, "GpmQueryDeviceSupport", gonvml.ERROR_NOT_SUPPORTED); err != nil {
						t.Fatal(err)
					}
				}
			}
			calls := countParityCalls(t, e)
			// The last whole GPU gets rates; the one before it none (unset:
			// NOT_SUPPORTED); GPU 0 on dgx-a100-mig is MIG-enabled.
			last := len(e.inv.GPUs) - 1
			setTel(t, e, last, sim.ExtraTelemetryPatch{PCIeTxKBps: ptr[uint32](2048), PCIeRxKBps: ptr[uint32](300)})
			setTel(t, e, 0, sim.ExtraTelemetryPatch{PCIeTxKBps: ptr[uint32](100), PCIeRxKBps: ptr[uint32](100)})
			for round := range 3 {
				e.clk.Advance(time.Second)
				res := e.sample(t, allFields, false)
				step := map[int]string{0: "round 1", 1: "round 2", 2: "round 3"}[round]
				wTx, wRx := want{v: 2048 * 1024}, want{v: 300 * 1024}
				if tc.gpm && round == 0 {
					wTx, wRx = out, out // GPM needs two samples
				}
				checkField(t, step, res, e.gpuKey(last), tx, wTx)
				checkField(t, step, res, e.gpuKey(last), rx, wRx)
				checkField(t, step, res, e.gpuKey(last-1), tx, out)
				checkField(t, step, res, e.gpuKey(last-1), rx, out)
				if g := e.inv.GPUs[0]; g.MIGEnabled {
					for k := range g.MIGDevices {
						checkField(t, step, res, e.migKey(0, k), tx, out)
					}
				}
				nvmlCalls := calls.take("GetPcieThroughput", last) + calls.take("GetPcieThroughput", last-1)
				wantCalls := map[bool]int{true: 4, false: 2}[round == 0] // unset GPU: asked once per direction
				if tc.gpm {
					wantCalls = 0
				}
				if nvmlCalls != wantCalls {
					t.Errorf("%s: %d nvmlDeviceGetPcieThroughput calls on GPUs %d and %d, want %d", step, nvmlCalls, last-1, last, wantCalls)
				}
				if g := e.inv.GPUs[0]; g.MIGEnabled {
					if n := calls.take("GetPcieThroughput", 0); n != 0 {
						t.Errorf("%s: %d nvmlDeviceGetPcieThroughput calls on MIG-enabled GPU 0, want none", step, n)
					}
				}
			}
		})
	}

	// GPM per MIG device: the simulator has no PCIe rates there, so they
	// are left out while the whole GPU has them.
	t.Run("Hopper MIG", func(t *testing.T) {
		e := newProcEnv(t, "../testdata/h100-mig.yaml")
		for gpu := range 2 {
			setTel(t, e, gpu, sim.ExtraTelemetryPatch{PCIeTxKBps: ptr[uint32](1024), PCIeRxKBps: ptr[uint32](512)})
		}
		for range 2 {
			e.clk.Advance(time.Second)
			e.sample(t, allFields, false)
		}
		e.clk.Advance(time.Second)
		res := e.sample(t, allFields, false)
		checkField(t, "H100", res, e.gpuKey(1), tx, want{v: 1 << 20})
		checkField(t, "H100", res, e.gpuKey(1), rx, want{v: 512 << 10})
		for k := range e.inv.GPUs[0].MIGDevices {
			checkField(t, "H100 MIG", res, e.migKey(0, k), tx, out)
			checkField(t, "H100 MIG", res, e.migKey(0, k), rx, out)
		}
	})
}

// TestRemappedRowsAndECC: the row remapper (Ampere and later, not while
// MIG is on) and the ECC totals (not with ECC off) are read on the NVML
// path; unsupported ones are left out and not asked again, and a MIG
// mode change asks again.
func TestRemappedRowsAndECC(t *testing.T) {
	unc, corr, fail := telemetry.UncorrectableRemappedRows, telemetry.CorrectableRemappedRows, telemetry.RowRemapFailure
	eccFields := []telemetry.Field{telemetry.ECCSBEVolatileTotal, telemetry.ECCDBEVolatileTotal, telemetry.ECCSBEAggregateTotal, telemetry.ECCDBEAggregateTotal}
	fields := allFields | telemetry.MaskOf(eccFields...)
	out := want{absent: true}
	type gpuCase struct {
		gpu         int
		migOn       bool
		remap       bool // the GPU has a row remapper NVML reports
		eccDisabled bool
	}
	for _, tc := range []struct {
		profile string
		gpus    []gpuCase
	}{
		{"dgx-a100-mig", []gpuCase{{gpu: 0, migOn: true}, {gpu: 5, remap: true}, {gpu: 6, remap: true, eccDisabled: true}}},
		{"dgx1-volta", []gpuCase{{gpu: 0}, {gpu: 1, eccDisabled: true}}},
		{"dgx-h100", []gpuCase{{gpu: 0, remap: true}}},
	} {
		t.Run(tc.profile, func(t *testing.T) {
			e := newProcEnv(t, tc.profile)
			calls := countParityCalls(t, e)
			for _, g := range tc.gpus {
				if err := e.node.SetRowRemap(g.gpu, sim.RowRemap{Correctable: 3 + g.gpu, Uncorrectable: 1, Pending: true, Failure: true}); err != nil {
					t.Fatal(err)
				}
				ecc := sim.ECCCounts{Disabled: g.eccDisabled, SBEVolatile: 5, DBEVolatile: 2, SBEAggregate: 70 + uint64(g.gpu), DBEAggregate: 30}
				if err := e.node.SetECC(g.gpu, ecc); err != nil {
					t.Fatal(err)
				}
			}
			for round := range 2 {
				e.clk.Advance(time.Second)
				res := e.sample(t, fields, false)
				for _, g := range tc.gpus {
					keys := []string{e.gpuKey(g.gpu)}
					if g.migOn {
						keys = nil
						for k := range e.inv.GPUs[g.gpu].MIGDevices {
							keys = append(keys, e.migKey(g.gpu, k))
						}
					}
					for _, key := range keys {
						rows := []want{{v: 1}, {v: float64(3 + g.gpu)}, {v: 1}}
						if !g.remap {
							rows = []want{out, out, out}
						}
						for k, f := range []telemetry.Field{unc, corr, fail} {
							checkField(t, "remap", res, key, f, rows[k])
						}
						ecc := []want{{v: 5}, {v: 2}, {v: 70 + float64(g.gpu)}, {v: 30}}
						if g.eccDisabled {
							ecc = []want{out, out, out, out}
						}
						for k, f := range eccFields {
							checkField(t, "ECC", res, key, f, ecc[k])
						}
					}
					wantRows, wantECC := 1, 4
					if round > 0 && !g.remap {
						wantRows = 0 // NOT_SUPPORTED remembered
					}
					if round > 0 && g.eccDisabled {
						wantECC = 0
					}
					if n := calls.take("GetRemappedRows", g.gpu); n != wantRows {
						t.Errorf("round %d: GPU %d: %d GetRemappedRows calls, want %d", round+1, g.gpu, n, wantRows)
					}
					if n := calls.take("GetTotalEccErrors", g.gpu); n != wantECC {
						t.Errorf("round %d: GPU %d: %d GetTotalEccErrors calls, want %d", round+1, g.gpu, n, wantECC)
					}
				}
			}
			if tc.profile != "dgx-a100-mig" {
				return
			}
			// MIG off on GPU 0: its remapper answers again.
			if err := e.node.SetMIGLayout(0, false, nil); err != nil {
				t.Fatal(err)
			}
			inv, err := nvml.Scan(e.lib, nvml.ScanOptions{})
			if err != nil {
				t.Fatal(err)
			}
			e.inv, e.layout = inv, telemetry.NewLayout(inv, 2)
			e.clk.Advance(time.Second)
			res := e.sample(t, fields, false)
			checkField(t, "MIG turned off", res, e.gpuKey(0), corr, want{v: 3})
			checkField(t, "MIG turned off", res, e.gpuKey(0), fail, want{v: 1})
		})
	}
}
