package telemetry_test

import (
	"bytes"
	"compress/gzip"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

var update = flag.Bool("update", false, "rewrite the golden exposition files in testdata")

// dcgmNames are the exported DCGM families of the default set, plus the
// attribution info metric.
func dcgmNames() []string {
	var names []string
	for _, m := range telemetry.DefaultMetricSet().Metrics {
		if m.Kind != telemetry.KindLabel {
			names = append(names, m.Name)
		}
	}
	return append(names, telemetry.PodInfoName)
}

// golden compares the collector's exposition of names with a file in
// testdata (rewritten with -update).
func golden(t *testing.T, c prometheus.Collector, file string, names ...string) {
	t.Helper()
	path := filepath.Join("testdata", file)
	if *update {
		got, err := testutil.CollectAndFormat(c, expfmt.TypeTextPlain, names...)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := testutil.CollectAndCompare(c, bytes.NewReader(want), names...); err != nil {
		t.Errorf("exposition differs from %s (run with -update after checking the change):\n%v", path, err)
	}
}

// TestExpositionDGXA100MIG: the exact exposition of a simulated DGX A100
// with mixed MIG layouts and injected telemetry, against
// testdata/dgx-a100-mig.prom; key families are also spelled out below.
func TestExpositionDGXA100MIG(t *testing.T) {
	e := newSimEnv(t, "dgx-a100-mig", envOptions{})
	e.clk.Advance(10 * time.Second) // 10 s at idle power: 550 J on GPU 5
	e.setTelemetry(t, 5, sim.TelemetryPatch{
		GPUUtil: ptr[uint32](77), MemCopyUtil: ptr[uint32](12), FBUsedMiB: ptr[uint64](20480), TemperatureC: ptr[uint32](64),
		PowerW: ptr(312.5), SMClockMHz: ptr[uint32](1275),
		ExtraTelemetryPatch: sim.ExtraTelemetryPatch{MemoryTempC: ptr[uint32](71), EncUtil: ptr[uint32](3), DecUtil: ptr[uint32](4), PCIeReplays: ptr[uint64](2)},
	})
	e.setTelemetry(t, 0, sim.TelemetryPatch{TemperatureC: ptr[uint32](45), PowerW: ptr(98.25)})
	e.xids.Store(&map[int]uint64{5: 79})
	e.clk.Advance(2 * time.Second) // then 2 s at 312.5 W
	gpu5 := e.inv.GPUs[5].UUID
	mig := e.inv.GPUs[0].MIGDevices[2]
	e.setPods(map[string][]podresources.Holder{
		gpu5: {{Namespace: "ml", Pod: "train-0", Container: "main", Resource: "nvidia.com/gpu"}},
		mig.UUID: {
			{Namespace: "dev", Pod: "nb-1", Container: "jupyter", Resource: "nvidia.com/mig-1g.5gb.shared"},
			{Namespace: "dev", Pod: "nb-2", Container: "jupyter", Resource: "nvidia.com/mig-1g.5gb.shared"},
		},
	})
	e.sample()

	// Utilization exists for whole GPUs only (5, 6, 7): MIG devices have none.
	if err := testutil.CollectAndCompare(e.collector, strings.NewReader(`
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{DCGM_FI_DRIVER_VERSION="550.54.15",Hostname="node-1",UUID="`+gpu5+`",container="main",device="nvidia5",gpu="5",modelName="NVIDIA A100-SXM4-40GB",namespace="ml",pci_bus_id="00000000:90:00.0",pod="train-0"} 77
DCGM_FI_DEV_GPU_UTIL{DCGM_FI_DRIVER_VERSION="550.54.15",Hostname="node-1",UUID="`+e.inv.GPUs[6].UUID+`",device="nvidia6",gpu="6",modelName="NVIDIA A100-SXM4-40GB",pci_bus_id="00000000:B7:00.0"} 0
DCGM_FI_DEV_GPU_UTIL{DCGM_FI_DRIVER_VERSION="550.54.15",Hostname="node-1",UUID="`+e.inv.GPUs[7].UUID+`",device="nvidia7",gpu="7",modelName="NVIDIA A100-SXM4-40GB",pci_bus_id="00000000:BD:00.0"} 0
`), "DCGM_FI_DEV_GPU_UTIL"); err != nil {
		t.Error(err)
	}
	// A shared MIG device carries no pod labels; both pods are in the
	// info metric, with the join labels.
	if err := testutil.CollectAndCompare(e.collector, strings.NewReader(`
# HELP gpu_plugin_pod_gpu_info 1 for every container holding a GPU or MIG device; join it to DCGM_* series on UUID and GPU_I_ID to attribute shared (time-sliced) devices to every pod that shares them.
# TYPE gpu_plugin_pod_gpu_info gauge
gpu_plugin_pod_gpu_info{GPU_I_ID="3",GPU_I_PROFILE="1g.5gb",Hostname="node-1",UUID="`+e.inv.GPUs[0].UUID+`",container="jupyter",gpu="0",namespace="dev",pod="nb-1",resource="nvidia.com/mig-1g.5gb.shared"} 1
gpu_plugin_pod_gpu_info{GPU_I_ID="3",GPU_I_PROFILE="1g.5gb",Hostname="node-1",UUID="`+e.inv.GPUs[0].UUID+`",container="jupyter",gpu="0",namespace="dev",pod="nb-2",resource="nvidia.com/mig-1g.5gb.shared"} 1
gpu_plugin_pod_gpu_info{Hostname="node-1",UUID="`+gpu5+`",container="main",gpu="5",namespace="ml",pod="train-0",resource="nvidia.com/gpu"} 1
`), telemetry.PodInfoName); err != nil {
		t.Error(err)
	}
	// Units: bytes → MiB, mW → W, mJ as is.
	got, err := testutil.CollectAndFormat(e.collector, expfmt.TypeTextPlain, "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_MEMORY_TEMP")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`DCGM_FI_DEV_FB_USED{DCGM_FI_DRIVER_VERSION="550.54.15",Hostname="node-1",UUID="` + gpu5 + `",container="main",device="nvidia5",gpu="5",modelName="NVIDIA A100-SXM4-40GB",namespace="ml",pci_bus_id="00000000:90:00.0",pod="train-0"} 20480`,
		`DCGM_FI_DEV_FB_RESERVED{DCGM_FI_DRIVER_VERSION="550.54.15",Hostname="node-1",UUID="` + gpu5 + `",container="main",device="nvidia5",gpu="5",modelName="NVIDIA A100-SXM4-40GB",namespace="ml",pci_bus_id="00000000:90:00.0",pod="train-0"} 409`,
		`gpu="5",modelName="NVIDIA A100-SXM4-40GB",namespace="ml",pci_bus_id="00000000:90:00.0",pod="train-0"} 312.5`,
		`gpu="5",modelName="NVIDIA A100-SXM4-40GB",namespace="ml",pci_bus_id="00000000:90:00.0",pod="train-0"} 1.175e+06`,
		`gpu="5",modelName="NVIDIA A100-SXM4-40GB",namespace="ml",pci_bus_id="00000000:90:00.0",pod="train-0"} 79`,
		`gpu="5",modelName="NVIDIA A100-SXM4-40GB",namespace="ml",pci_bus_id="00000000:90:00.0",pod="train-0"} 71`,
		// MIG series: the device's own memory, its GPU's power.
		`DCGM_FI_DEV_FB_FREE{DCGM_FI_DRIVER_VERSION="550.54.15",GPU_I_ID="3",GPU_I_PROFILE="1g.5gb",Hostname="node-1",UUID="` + e.inv.GPUs[0].UUID + `",device="nvidia0",gpu="0",modelName="NVIDIA A100-SXM4-40GB",pci_bus_id="00000000:07:00.0"} 4864`,
		`DCGM_FI_DEV_POWER_USAGE{DCGM_FI_DRIVER_VERSION="550.54.15",GPU_I_ID="3",GPU_I_PROFILE="1g.5gb",Hostname="node-1",UUID="` + e.inv.GPUs[0].UUID + `",device="nvidia0",gpu="0",modelName="NVIDIA A100-SXM4-40GB",pci_bus_id="00000000:07:00.0"} 98.25`,
	} {
		if !strings.Contains(string(got)+string(mustFormat(t, e.collector, "DCGM_FI_DEV_FB_FREE")), want) {
			t.Errorf("exposition lacks\n  %s", want)
		}
	}
	// Ampere has no GPM: no profiling family at all, not zeros.
	if got := mustFormat(t, e.collector, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"); len(got) > 0 {
		t.Errorf("profiling series on Ampere through NVML:\n%s", got)
	}
	golden(t, e.collector, "dgx-a100-mig.prom", dcgmNames()...)
}

func mustFormat(t *testing.T, c prometheus.Collector, names ...string) []byte {
	t.Helper()
	b, err := testutil.CollectAndFormat(c, expfmt.TypeTextPlain, names...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// formatAll is the text exposition of every family c collects.
func formatAll(t *testing.T, c prometheus.Collector) string {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

// TestProfilingGPM: on Hopper, GPM supplies DCGM_FI_PROF_* as 0–1 ratios
// from the second round on, for whole GPUs and for each MIG device.
func TestProfilingGPM(t *testing.T) {
	e := newSimEnv(t, "testdata/h100-mig.yaml", envOptions{})
	for gpu := range 2 {
		e.setTelemetry(t, gpu, sim.TelemetryPatch{ExtraTelemetryPatch: sim.ExtraTelemetryPatch{
			GREngineActive: ptr(55.0), TensorActive: ptr(20.0), DRAMActive: ptr(33.0),
		}})
	}
	e.sample()
	if got := mustFormat(t, e.collector, "DCGM_FI_PROF_GR_ENGINE_ACTIVE"); len(got) > 0 {
		t.Errorf("profiling values after one GPM sample (they need two):\n%s", got)
	}
	e.clk.Advance(time.Second)
	e.sample()
	g0, g1 := e.inv.GPUs[0].UUID, e.inv.GPUs[1].UUID
	want := ""
	for _, f := range []struct{ name, help, v string }{
		{"DCGM_FI_PROF_DRAM_ACTIVE", "Ratio of cycles the device memory interface is active sending or receiving data.", "0.33"},
		{"DCGM_FI_PROF_GR_ENGINE_ACTIVE", "Ratio of time the graphics engine is active.", "0.55"},
		{"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "Ratio of cycles the tensor (HMMA) pipe is active.", "0.2"},
	} {
		want += "# HELP " + f.name + " " + f.help + "\n# TYPE " + f.name + " gauge\n"
		for _, m := range []struct{ gi, profile string }{{"1", "3g.40gb"}, {"2", "1g.10gb"}, {"3", "1g.10gb"}} {
			want += f.name + `{DCGM_FI_DRIVER_VERSION="550.90.07",GPU_I_ID="` + m.gi + `",GPU_I_PROFILE="` + m.profile + `",Hostname="node-1",UUID="` + g0 + `",device="nvidia0",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:1B:00.0"} ` + f.v + "\n"
		}
		want += f.name + `{DCGM_FI_DRIVER_VERSION="550.90.07",Hostname="node-1",UUID="` + g1 + `",device="nvidia1",gpu="1",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:43:00.0"} ` + f.v + "\n"
	}
	if err := testutil.CollectAndCompare(e.collector, strings.NewReader(want),
		"DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE"); err != nil {
		t.Error(err)
	}
	// GPM has no PCIe rate per MIG device and the simulator none at all:
	// those fields are absent, not zero.
	if got := mustFormat(t, e.collector, "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES"); len(got) > 0 {
		t.Errorf("PCIe rates without a source:\n%s", got)
	}

	// Two GPM samples per device (3 MIG devices, 1 GPU); a new MIG layout
	// frees the old devices' samples; Close frees the rest.
	if n := e.node.GPMSamples(); n != 8 {
		t.Errorf("%d GPM samples allocated, want 8", n)
	}
	if err := e.node.SetMIGLayout(0, true, []string{"7g.80gb"}); err != nil {
		t.Fatal(err)
	}
	inv, err := nvml.Scan(e.lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.inv = inv
	e.clk.Advance(time.Second)
	e.sample()
	if n := e.node.GPMSamples(); n != 4 {
		t.Errorf("%d GPM samples after re-partitioning into one MIG device, want 4", n)
	}
	e.backend.Close()
	if n := e.node.GPMSamples(); n != 0 {
		t.Errorf("%d GPM samples left after Close", n)
	}
}

// TestUnsupportedFieldsOmitted: a field NVML does not support on a GPU is
// left out for that GPU only; the others keep it.
func TestUnsupportedFieldsOmitted(t *testing.T) {
	e := newSimEnv(t, "dgx-a100", envOptions{})
	if err := e.node.SetFault(1, "GetFieldValues", gonvml.ERROR_NOT_SUPPORTED); err != nil {
		t.Fatal(err)
	}
	e.sample()
	got := string(mustFormat(t, e.collector, "DCGM_FI_DEV_MEMORY_TEMP"))
	if strings.Contains(got, `gpu="1"`) || strings.Count(got, "DCGM_FI_DEV_MEMORY_TEMP{") != 7 {
		t.Errorf("memory temperature: want 7 GPUs, not GPU 1:\n%s", got)
	}
	// GDDR parts (L4) have no memory temperature at all.
	l4 := newSimEnv(t, "pcie-l4x4", envOptions{})
	l4.sample()
	if got := mustFormat(t, l4.collector, "DCGM_FI_DEV_MEMORY_TEMP"); len(got) > 0 {
		t.Errorf("memory temperature on L4:\n%s", got)
	}
	if got := mustFormat(t, l4.collector, "DCGM_FI_DEV_GPU_TEMP"); strings.Count(string(got), "{") != 4 {
		t.Errorf("GPU temperature on L4: want 4 series:\n%s", got)
	}
}

// TestFailingGPU: a lost GPU is served stale for a while, then dropped,
// and counted; the others are unaffected; it comes back when it answers.
func TestFailingGPU(t *testing.T) {
	e := newSimEnv(t, "dgx-h100", envOptions{})
	e.sample()
	if err := e.node.SetLost(2, true); err != nil {
		t.Fatal(err)
	}
	series := func() string { return string(mustFormat(t, e.collector, "DCGM_FI_DEV_GPU_TEMP")) }
	e.clk.Advance(time.Second)
	e.sample()
	if s := series(); !strings.Contains(s, `gpu="2"`) || strings.Count(s, "{") != 8 {
		t.Errorf("just after GPU 2 was lost: want its last values still served:\n%s", s)
	}
	e.clk.Advance(5 * time.Second)
	e.sample()
	if s := series(); strings.Contains(s, `gpu="2"`) || strings.Count(s, "{") != 7 {
		t.Errorf("6 s after GPU 2 was lost: want it dropped, the other 7 served:\n%s", s)
	}
	uuid := e.inv.GPUs[2].UUID
	if err := testutil.CollectAndCompare(e.stats, strings.NewReader(`
# HELP gpu_plugin_telemetry_devices Sampled GPUs and MIG devices by state: fresh (last round answered), stale (failing, last values still served), expired (failing for longer than the stale limit, not served).
# TYPE gpu_plugin_telemetry_devices gauge
gpu_plugin_telemetry_devices{state="expired"} 1
gpu_plugin_telemetry_devices{state="fresh"} 7
gpu_plugin_telemetry_devices{state="stale"} 0
`), "gpu_plugin_telemetry_devices"); err != nil {
		t.Error(err)
	}
	if got := string(mustFormat(t, e.stats, "gpu_plugin_telemetry_device_sample_failures_total")); !strings.Contains(got, `gpu_plugin_telemetry_device_sample_failures_total{gpu="2",uuid="`+uuid+`"} 2`) {
		t.Errorf("failures of GPU 2 not counted:\n%s", got)
	}
	if err := e.node.SetLost(2, false); err != nil {
		t.Fatal(err)
	}
	e.clk.Advance(time.Second)
	e.sample()
	if s := series(); !strings.Contains(s, `gpu="2"`) {
		t.Errorf("GPU 2 answering again but not served:\n%s", s)
	}
}

// TestHungGPUDoesNotBlockOthers: a GPU whose NVML call hangs is reported
// as failing after the round timeout; the others are served each round,
// and no second call piles up on the hung GPU.
func TestHungGPUDoesNotBlockOthers(t *testing.T) {
	release := make(chan struct{})
	calls := make(chan struct{}, 10)
	e := newSimEnv(t, "dgx-h100", envOptions{roundTimeout: 100 * time.Millisecond, before: func(e *simEnv) {
		h, _ := e.inv.Handle(e.inv.GPUs[3].UUID)
		d, ok := sim.Mock(h)
		if !ok {
			t.Fatal("not a simulated handle")
		}
		orig := d.GetTemperatureFunc
		d.GetTemperatureFunc = func(s gonvml.TemperatureSensors) (uint32, gonvml.Return) {
			calls <- struct{}{}
			<-release
			return orig(s)
		}
	}})
	for round := range 3 {
		e.clk.Advance(time.Second)
		start := time.Now()
		e.sample()
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("round %d took %s with one GPU hung", round, took)
		}
		snap := e.sampler.Snapshot()
		for i, d := range snap.Devices {
			if hung := i == 3; d.Stale != hung {
				t.Errorf("round %d: GPU %d stale=%v (%s)", round, i, d.Stale, d.Err)
			}
		}
	}
	if n := len(calls); n != 1 {
		t.Errorf("%d calls on the hung GPU, want 1 (no pile-up)", n)
	}
	close(release)
	// The hung call returns; a later round reads the GPU again.
	ctxDeadline := time.Now().Add(5 * time.Second)
	for {
		e.clk.Advance(time.Second)
		e.sample()
		if !e.sampler.Snapshot().Devices[3].Stale {
			break
		}
		if time.Now().After(ctxDeadline) {
			t.Fatal("GPU 3 still failing after its call returned")
		}
	}
}

// TestLint: promlint finds nothing in gpu_plugin_* families and, in
// DCGM_* families, exactly the problems inherent to dcgm-exporter's names
// (dcgm-exporter-compat.md §2).
func TestLint(t *testing.T) {
	e := newSimEnv(t, "dgx-a100-mig", envOptions{})
	e.setPods(map[string][]podresources.Holder{e.inv.GPUs[5].UUID: {{Namespace: "a", Pod: "b", Container: "c", Resource: "nvidia.com/gpu"}}})
	e.sample()
	allowed := map[string]bool{
		"label names should be written in 'snake_case' not 'camelCase'": true, // modelName, on every DCGM_* family
	}
	allowedFor := map[string]map[string]bool{
		`counter metrics should have "_total" suffix`: {
			"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": true, "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": true, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": true,
			"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": true, "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": true,
		},
		"metric name should not include type 'counter'": {"DCGM_FI_DEV_PCIE_REPLAY_COUNTER": true},
	}
	seen := map[string]bool{}
	for _, c := range []prometheus.Collector{e.collector, e.stats} {
		problems, err := testutil.CollectAndLint(c)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			seen[p.Metric+": "+p.Text] = true
			dcgm := strings.HasPrefix(p.Metric, "DCGM_")
			if dcgm && (allowed[p.Text] || allowedFor[p.Text][p.Metric]) {
				continue
			}
			t.Errorf("promlint: %s: %s", p.Metric, p.Text)
		}
	}
	// The compatibility exceptions are really there (the lint ran).
	for _, want := range []string{
		`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION: counter metrics should have "_total" suffix`,
		"DCGM_FI_DEV_PCIE_REPLAY_COUNTER: metric name should not include type 'counter'",
		"DCGM_FI_DEV_GPU_UTIL: label names should be written in 'snake_case' not 'camelCase'",
	} {
		if !seen[want] {
			t.Errorf("promlint did not report the known exception %q", want)
		}
	}
}

// TestCustomCounters: a counters file chooses the families, their types
// and help; a file without the driver label omits it.
func TestCustomCounters(t *testing.T) {
	set, err := telemetry.ParseCounters(strings.NewReader("DCGM_FI_DEV_GPU_TEMP, counter, My help.\n"))
	if err != nil {
		t.Fatal(err)
	}
	e := newSimEnv(t, "pcie-l4x4", envOptions{metrics: set, noPods: true})
	e.sample()
	got := formatAll(t, e.collector)
	if !strings.Contains(got, "# HELP DCGM_FI_DEV_GPU_TEMP My help.\n# TYPE DCGM_FI_DEV_GPU_TEMP counter\n") ||
		strings.Contains(got, "DCGM_FI_DEV_POWER_USAGE") || strings.Contains(got, "DCGM_FI_DRIVER_VERSION") ||
		strings.Contains(got, telemetry.PodInfoName) {
		t.Errorf("exposition with a one-line counters file:\n%s", got)
	}
}

// withoutScrapeFamilies drops the per-scrape timing families, whose values
// differ between two scrapes.
func withoutScrapeFamilies(text string) string {
	var keep []string
	for _, l := range strings.SplitAfter(text, "\n") {
		if !strings.Contains(l, "gpu_plugin_scrape_collector_") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "")
}

// TestWriteTextMatchesRegistry: the fast path the daemon serves writes
// exactly what the registry makes of Collect, for every shape of series.
func TestWriteTextMatchesRegistry(t *testing.T) {
	for _, tc := range []struct {
		name    string
		profile string
		setup   func(t *testing.T, e *simEnv)
	}{
		{"MIG with exclusive and shared pods", "dgx-a100-mig", func(t *testing.T, e *simEnv) {
			e.setPods(map[string][]podresources.Holder{
				e.inv.GPUs[5].UUID: {{Namespace: "ml", Pod: "train-0", Container: "main", Resource: "nvidia.com/gpu"}},
				e.inv.GPUs[1].MIGDevices[0].UUID: {
					{Namespace: "b", Pod: "p2", Container: "c", Resource: "nvidia.com/mig-3g.20gb.shared"},
					{Namespace: "a", Pod: `we"ird\name`, Container: "c", Resource: "nvidia.com/mig-3g.20gb.shared"},
				},
			})
		}},
		{"profiling and a lost GPU", "testdata/h100-mig.yaml", func(t *testing.T, e *simEnv) {
			e.setTelemetry(t, 1, sim.TelemetryPatch{PowerW: ptr(1.0 / 3), ExtraTelemetryPatch: sim.ExtraTelemetryPatch{GREngineActive: ptr(12.5)}})
			e.clk.Advance(time.Second)
			e.sample()
			if err := e.node.SetLost(1, true); err != nil {
				t.Fatal(err)
			}
		}},
		{"whole GPUs, no attribution", "dgx-h100", nil},
		// Per-pod series beside the device series of DCGM_FI_DEV_FB_USED
		// and GPU_UTIL, sorted in with them.
		{"per-pod accounting, time-sliced and MIG", "dgx-a100-mig", nil},
		// dcgm-exporter's --kubernetes-virtual-gpus shape: copies per
		// holder, and per-pod FB_USED and GPU_UTIL beside the device's.
		{"virtual GPUs: per-pod accounting, time-sliced and MIG", "dgx-a100-mig", nil},
		{"virtual GPUs: a lost GPU, replicas held", "dgx-h100", func(t *testing.T, e *simEnv) {
			uuid := e.inv.GPUs[1].UUID
			e.setPods(map[string][]podresources.Holder{
				uuid: {
					{Namespace: "a", Pod: "p1", Container: "c", Resource: "nvidia.com/gpu", DeviceIDs: []string{uuid + "::0", uuid + "::4"}},
					{Namespace: "a", Pod: "p2", Container: "c", Resource: "nvidia.com/gpu", DeviceIDs: []string{uuid + "::1"}},
				},
				e.inv.GPUs[2].UUID: {{Namespace: "a", Pod: "p3", Container: "c", Resource: "nvidia.com/gpu", DeviceIDs: []string{e.inv.GPUs[2].UUID}}},
			})
			e.clk.Advance(time.Second)
			e.sample()
			if err := e.node.SetLost(2, true); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var pp *perPodNode
			opts := envOptions{}
			if strings.HasPrefix(tc.name, "per-pod") || strings.HasPrefix(tc.name, "virtual GPUs: per-pod") {
				pp = newPerPodNode(t, 30)
				opts = pp.options()
				opts.perPodDCGM = true
			}
			opts.virtualGPUs = strings.HasPrefix(tc.name, "virtual GPUs")
			e := newSimEnv(t, tc.profile, opts)
			e.sample()
			if pp != nil {
				pp.place(t, e)
			}
			if tc.setup != nil {
				tc.setup(t, e)
			}
			e.clk.Advance(time.Second)
			e.sample()
			var b bytes.Buffer
			e.collector.WriteText(&b)
			fast, slow := withoutScrapeFamilies(b.String()), withoutScrapeFamilies(formatAll(t, e.collector))
			if fast != slow {
				t.Errorf("WriteText differs from the registry's exposition\n--- WriteText\n%s\n--- registry\n%s", fast, slow)
			}
			if pp != nil && (!strings.Contains(fast, telemetry.PodMemoryName) || !regexp.MustCompile(`(?m)^DCGM_FI_DEV_GPU_UTIL\{.*pod_uid="0`).MatchString(fast)) {
				t.Errorf("no per-pod series:\n%s", fast)
			}
			if !strings.Contains(b.String(), `gpu_plugin_scrape_collector_success{collector="dcgm"} 1`) {
				t.Errorf("WriteText lacks the collector's success:\n%s", b.String())
			}
		})
	}
}

// TestHandler: /metrics serves the registry's families and the DCGM ones
// as text 0.0.4, gzipped when asked.
func TestHandler(t *testing.T) {
	e := newSimEnv(t, "dgx-h100", envOptions{})
	e.sample()
	reg := prometheus.NewRegistry()
	reg.MustRegister(e.stats)
	h := telemetry.Handler(reg, e.collector, nil)
	for _, gz := range []bool{false, true} {
		req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
		// Prometheus' own Accept header asks for OpenMetrics first.
		req.Header.Set("Accept", "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
		if gz {
			req.Header.Set("Accept-Encoding", "gzip")
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		body := rec.Body.Bytes()
		if gz {
			if rec.Header().Get("Content-Encoding") != "gzip" {
				t.Fatalf("gzip asked, Content-Encoding %q", rec.Header().Get("Content-Encoding"))
			}
			zr, err := gzip.NewReader(bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			if body, err = io.ReadAll(zr); err != nil {
				t.Fatal(err)
			}
		}
		if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
			t.Errorf("Content-Type %q, want text 0.0.4", ct)
		}
		for _, want := range []string{"# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n", "# TYPE gpu_plugin_telemetry_sample_duration_seconds histogram\n", "DCGM_FI_DEV_GPU_TEMP{"} {
			if !bytes.Contains(body, []byte(want)) {
				t.Errorf("gzip=%v: body lacks %q", gz, want)
			}
		}
		// What Prometheus' parser makes of it.
		parser := expfmt.NewTextParser(model.LegacyValidation)
		if _, err := parser.TextToMetricFamilies(bytes.NewReader(body)); err != nil {
			t.Errorf("gzip=%v: not valid text exposition: %v", gz, err)
		}
	}
}

// TestLabelOptions: --no-hostname drops Hostname; blanks in modelName can
// become dashes.
func TestLabelOptions(t *testing.T) {
	e := newSimEnv(t, "pcie-l4x4", envOptions{noPods: true})
	e.sample()
	c := telemetry.NewCollector(telemetry.CollectorOptions{Sampler: e.sampler, ReplaceBlanksInModelName: true, Now: e.clk.Now})
	got := string(mustFormat(t, c, "DCGM_FI_DEV_GPU_TEMP"))
	if strings.Contains(got, "Hostname=") || !strings.Contains(got, `modelName="NVIDIA-L4"`) {
		t.Errorf("without a host name, with dashes:\n%s", got)
	}
}

// TestLegacyCounters: dcgm-exporter 1.x's lowercase names are served under
// those names from the same fields; each name whose field is not served is
// listed, and the file does not silently export nothing.
func TestLegacyCounters(t *testing.T) {
	set, err := telemetry.LoadCounters("testdata/legacy-1x-counters.csv")
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Skipped) != 2 || !strings.Contains(set.Skipped[0], "dcgm_pcie_tx_throughput (DCGM field 200)") {
		t.Errorf("skipped %q, want the two PCIe throughput lines", set.Skipped)
	}
	if len(set.Metrics) != 20 {
		t.Errorf("%d metrics, want the 20 served lines", len(set.Metrics))
	}
	e := newSimEnv(t, "pcie-l4x4", envOptions{metrics: set, noPods: true})
	e.sample()
	got := formatAll(t, e.collector)
	for _, want := range []string{"# TYPE dcgm_gpu_temp gauge\n", "\ndcgm_gpu_utilization{", "\ndcgm_fb_used{"} {
		if !strings.Contains(got, want) {
			t.Errorf("exposition lacks %q", want)
		}
	}
	if strings.Contains(got, "DCGM_FI_DEV_GPU_TEMP") {
		t.Errorf("a 1.x file exported DCGM_FI_* names too:\n%s", got)
	}
}
