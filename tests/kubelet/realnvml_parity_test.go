package kubelet

// dcgm-exporter parity on the production NVML path, through go-nvml's real
// dlopen of the fake libnvidia-ml.so.1 (C structs, the field-value array
// with scopeId, the stubs' NOT_SUPPORTED): the telemetry backend in this
// process, the library driven through its control socket (tel nvl_tx/
// nvl_rx, ecc, remap), one child process per profile since the library
// reads its profile once. The simulator runs the same checks with exact
// clocks in internal/telemetry/nvmlbackend/parity_test.go.

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
)

// parityChildEnv marks the child process a TestRealNVMLParity subtest runs
// its checks in.
const parityChildEnv = "GPU_PLUGIN_PARITY_CHILD"

// pcieOnlyProfile is a fakenvml profile without NVLink: two Ada GPUs on
// one PCIe switch.
const pcieOnlyProfile = `name pcie-pair
driver 550.90.07
cuda 12040
gpu GPU-0a1b2c3d-4e5f-4a6b-8c7d-e8f900000000  00000000:17:00.0  23034 0  8.9 Nvidia Ada 0x27b810de NVIDIA L4
gpu GPU-0a1b2c3d-4e5f-4a6b-8c7d-e8f900000001  00000000:18:00.0  23034 0  8.9 Nvidia Ada 0x27b810de NVIDIA L4
topo X   PIX
topo PIX X
`

// parityCase is one profile's expectations.
type parityCase struct {
	name    string
	profile string // FAKE_NVML_PROFILE; "" writes pcieOnlyProfile
	nvlink  bool   // the GPUs have NVLinks
	remap   bool   // the row remapper answers on GPUs with MIG off (Ampere and later)
	// busy is the GPU given NVLink traffic, ECC errors and remapped rows
	// (MIG off); mig, if ≥ 0, is a MIG-enabled GPU, whose MIG devices
	// carry its device-level values and never its remapped rows.
	busy, mig int
}

var parityCases = []parityCase{
	{name: "dgx1-v100", profile: "dgx1-v100", nvlink: true, remap: false, busy: 2, mig: -1},
	{name: "dgx-h100", profile: "dgx-h100", nvlink: true, remap: true, busy: 3, mig: -1},
	{name: "dgx-a100-mig", profile: "dgx-a100-mig", nvlink: true, remap: true, busy: 6, mig: 1},
	{name: "pcie-only", nvlink: false, remap: true, busy: 1, mig: -1},
}

// TestRealNVMLParity: DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL in DCGM's unit
// (Δ KiB / Δ s / 1000, all links, TX + RX), left out without NVLink;
// remapped rows and ECC totals as the library reports them, left out
// where NOT_SUPPORTED (Volta, MIG on) and not asked again; PCIe rates left
// out (the library has neither GPM nor nvmlDeviceGetPcieThroughput) after
// one call per GPU and direction.
func TestRealNVMLParity(t *testing.T) {
	requireKubeletNamespace(t)
	libDir := fakeNVMLDir(t)
	for _, pc := range parityCases {
		t.Run(pc.name, func(t *testing.T) {
			profile := pc.profile
			if profile == "" && os.Getenv(parityChildEnv) == "" {
				profile = filepath.Join(t.TempDir(), "pcie-pair.profile")
				if err := os.WriteFile(profile, []byte(pcieOnlyProfile), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			// Each profile in a child process of its own.
			if inFakeNVMLChild(t, parityChildEnv, libDir, profile) {
				parityChecks(t, libDir, pc)
			}
		})
	}
}

func parityChecks(t *testing.T, libDir string, pc parityCase) {
	ours, inv := openFakeNVML(t, libDir)
	if g := inv.GPUs[pc.busy]; g.MIGEnabled {
		t.Fatalf("GPU %d has MIG on; the case wants it whole", pc.busy)
	}
	if pc.mig >= 0 && !inv.GPUs[pc.mig].MIGEnabled {
		t.Fatalf("GPU %d has MIG off; the case wants it on", pc.mig)
	}
	layout := telemetry.NewLayout(inv, 1)
	backend := nvmlbackend.New(nvmlbackend.Options{Lib: ours})
	defer backend.Close()
	ctl := fakeCtl(t, os.Getenv("FAKE_NVML_SOCKET"))
	calls := func() map[string]uint64 {
		out := map[string]uint64{}
		for k, v := range keyValues(ctl("calls")) {
			var n uint64
			fmt.Sscan(v, &n)
			out[k] = n
		}
		return out
	}

	nvl := telemetry.NVLinkBandwidthTotal
	rows := []telemetry.Field{telemetry.UncorrectableRemappedRows, telemetry.CorrectableRemappedRows, telemetry.RowRemapFailure}
	ecc := []telemetry.Field{telemetry.ECCSBEVolatileTotal, telemetry.ECCDBEVolatileTotal, telemetry.ECCSBEAggregateTotal, telemetry.ECCDBEAggregateTotal}
	pcie := []telemetry.Field{telemetry.ProfPCIeTxBytes, telemetry.ProfPCIeRxBytes}
	fields := telemetry.DefaultMetricSet().Fields() | telemetry.MaskOf(ecc...)

	// A round, timed: the library stamps its field values with its own
	// clock when called, somewhere within [start, end].
	type round struct {
		res        map[string]telemetry.Result
		start, end time.Time
	}
	sample := func(fields telemetry.Mask) round {
		t.Helper()
		out := make([]telemetry.Result, len(layout.Targets))
		req := &telemetry.Request{Inventory: inv, Targets: layout.Targets, Fields: fields, Out: out}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r := round{res: map[string]telemetry.Result{}, start: time.Now()}
		if err := backend.Sample(ctx, req); err != nil {
			t.Fatal(err)
		}
		r.end = time.Now()
		for i, tg := range layout.Targets {
			if out[i].Err != nil {
				t.Fatalf("%s: %v", tg.Key, out[i].Err)
			}
			r.res[tg.Key] = out[i]
		}
		return r
	}
	// keys are a GPU's targets: itself, or its MIG devices.
	keys := func(gpu int) []string {
		g := inv.GPUs[gpu]
		if !g.MIGEnabled {
			return []string{g.UUID}
		}
		var out []string
		for _, m := range g.MIGDevices {
			out = append(out, m.UUID)
		}
		return out
	}
	get := func(r round, key string, f telemetry.Field) (float64, bool) {
		res := r.res[key]
		return res.Get(f)
	}

	// Counters before the first round; every GPU with NVLinks idles at 0.
	const txKiB, rxKiB = 3_000_000, 2_000_000
	ctl(fmt.Sprintf("tel %d nvl_tx=1000 nvl_rx=500", pc.busy))
	ctl(fmt.Sprintf("ecc %d 5 2 70 30", pc.busy))
	ctl(fmt.Sprintf("remap %d 3 1 0 1", pc.busy))
	if pc.mig >= 0 {
		ctl(fmt.Sprintf("tel %d nvl_tx=0 nvl_rx=0", pc.mig))
		ctl(fmt.Sprintf("ecc %d 9 0", pc.mig))
	}
	before := calls()
	r1 := sample(fields)
	for _, k := range keys(pc.busy) {
		if v, ok := get(r1, k, nvl); ok {
			t.Errorf("round 1: %s NVLink bandwidth %v after one reading, want it left out (a rate needs two)", k, v)
		}
	}

	time.Sleep(time.Second)
	ctl(fmt.Sprintf("tel %d nvl_tx=%d nvl_rx=%d", pc.busy, 1000+txKiB, 500+rxKiB))
	r2 := sample(fields)
	r3 := sample(fields) // the calls NOT_SUPPORTED answered are not made again
	after := calls()

	// NVLink: DCGM's arithmetic over the library's timestamps, which lie
	// between the rounds' bounds.
	lo := math.Trunc((txKiB + rxKiB) / r2.end.Sub(r1.start).Seconds() / 1000)
	hi := math.Trunc((txKiB + rxKiB) / r2.start.Sub(r1.end).Seconds() / 1000)
	for gpu := range inv.GPUs {
		for _, k := range keys(gpu) {
			v, ok := get(r2, k, nvl)
			switch {
			case !pc.nvlink && ok:
				t.Errorf("GPU %d (%s) without NVLink: NVLink bandwidth %v, want it left out", gpu, k, v)
			case !pc.nvlink:
			case !ok:
				t.Errorf("GPU %d (%s): NVLink bandwidth left out", gpu, k)
			case gpu == pc.busy && (v < lo || v > hi):
				t.Errorf("GPU %d: NVLink bandwidth %v, want %v..%v (5,000,000 KiB in about 1 s, ÷ 1000)", gpu, v, lo, hi)
			case gpu != pc.busy && v != 0:
				t.Errorf("GPU %d (%s): NVLink bandwidth %v with no traffic, want 0", gpu, k, v)
			}
		}
	}
	if v, _ := get(r2, inv.GPUs[pc.busy].UUID, nvl); pc.nvlink {
		t.Logf("NVLink bandwidth on GPU %d: %v (DCGM unit, %v..%v)", pc.busy, v, lo, hi)
	}

	// Remapped rows, ECC totals, PCIe rates, in rounds 2 and 3.
	for _, r := range []round{r2, r3} {
		for gpu := range inv.GPUs {
			for _, k := range keys(gpu) {
				wantRows := pc.remap && !inv.GPUs[gpu].MIGEnabled
				for i, f := range rows {
					v, ok := get(r, k, f)
					want := []float64{0, 0, 0}
					if gpu == pc.busy {
						want = []float64{1, 3, 1}
					}
					if ok != wantRows || (ok && v != want[i]) {
						t.Errorf("GPU %d (%s): %s = %v (present %v), want %v (present %v)", gpu, k, f, v, ok, want[i], wantRows)
					}
				}
				for i, f := range ecc {
					v, ok := get(r, k, f)
					want := []float64{0, 0, 0, 0}
					switch gpu {
					case pc.busy:
						want = []float64{5, 2, 70, 30}
					case pc.mig:
						want = []float64{9, 0, 9, 0} // aggregate = volatile unless given
					}
					if !ok || v != want[i] {
						t.Errorf("GPU %d (%s): %s = %v (present %v), want %v", gpu, k, f, v, ok, want[i])
					}
				}
				for _, f := range pcie {
					if v, ok := get(r, k, f); ok {
						t.Errorf("GPU %d (%s): %s = %v without GPM or nvmlDeviceGetPcieThroughput, want it left out", gpu, k, f, v)
					}
				}
			}
		}
	}

	// Calls over the three rounds: a NOT_SUPPORTED answer is remembered.
	made := func(fn string) uint64 { return after[fn] - before[fn] }
	whole := 0
	for _, g := range inv.GPUs {
		if !g.MIGEnabled {
			whole++
		}
	}
	remapGPUs := len(inv.GPUs) * 3 // every round, where it answers
	if !pc.remap {
		remapGPUs = len(inv.GPUs) // once, NOT_SUPPORTED
	} else if pc.mig >= 0 {
		remapGPUs = 3*whole + (len(inv.GPUs) - whole) // MIG-enabled GPUs: once
	}
	for _, c := range []struct {
		fn   string
		want uint64
	}{
		{"nvmlDeviceGetRemappedRows", uint64(remapGPUs)},
		{"nvmlDeviceGetTotalEccErrors", uint64(len(inv.GPUs) * 4 * 3)},
		{"nvmlDeviceGetPcieThroughput!", uint64(whole * 2)},
		{"nvmlGpmQueryDeviceSupport!", uint64(len(inv.GPUs))},
	} {
		if got := made(c.fn); got != c.want {
			t.Errorf("%s called %d times in 3 rounds, want %d", c.fn, got, c.want)
		}
	}
	if !pc.nvlink {
		// Asked for NVLink alone, a GPU that answered NOT_SUPPORTED
		// gets no field-value call at all.
		only := telemetry.MaskOf(nvl)
		b0 := calls()
		sample(only)
		if n := calls()["nvmlDeviceGetFieldValues"] - b0["nvmlDeviceGetFieldValues"]; n != 0 {
			t.Errorf("NVLink alone on GPUs without NVLink: %d field-value calls in a later round, want none (NOT_SUPPORTED remembered)", n)
		}
	}
	t.Logf("calls in 3 rounds: %v", nvmlCallsOf(after, before))
}

// nvmlCallsOf is after − before as nvmlCalls, for the log.
func nvmlCallsOf(after, before map[string]uint64) nvmlCalls {
	return nvmlCalls(after).minus(nvmlCalls(before))
}
