package telemetry_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// TestDefaultMetricSet: the built-in set is dcgm-exporter's default
// counters file (dcgm-exporter-compat.md §2), in its order, with its types
// and help texts.
func TestDefaultMetricSet(t *testing.T) {
	want := []struct{ name, kind, help string }{
		{"DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."},
		{"DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz)."},
		{"DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C)."},
		{"DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."},
		{"DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."},
		{"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ)."},
		{"DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries."},
		{"DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."},
		{"DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."},
		{"DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %)."},
		{"DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %)."},
		{"DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered."},
		{"DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."},
		{"DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."},
		{"DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB)."},
		{"DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "counter", "Total number of NVLink bandwidth counters for all lanes."},
		{"DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "vGPU License status"},
		{"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors"},
		{"DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors"},
		{"DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed"},
		{"DCGM_FI_DRIVER_VERSION", "label", "Driver Version"},
		{"DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active."},
		{"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge", "Ratio of cycles the tensor (HMMA) pipe is active."},
		{"DCGM_FI_PROF_DRAM_ACTIVE", "gauge", "Ratio of cycles the device memory interface is active sending or receiving data."},
		{"DCGM_FI_PROF_PCIE_TX_BYTES", "gauge", "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second."},
		{"DCGM_FI_PROF_PCIE_RX_BYTES", "gauge", "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second."},
	}
	s := telemetry.DefaultMetricSet()
	if len(s.Skipped) > 0 {
		t.Errorf("default set skips lines: %v", s.Skipped)
	}
	if len(s.Metrics) != len(want) {
		t.Fatalf("default set has %d metrics, want %d", len(s.Metrics), len(want))
	}
	for i, w := range want {
		m := s.Metrics[i]
		if m.Name != w.name || m.Kind != w.kind || m.Help != w.help {
			t.Errorf("default metric %d: %s %s %q, want %s %s %q", i, m.Name, m.Kind, m.Help, w.name, w.kind, w.help)
		}
		if m.Field.String() != m.Name {
			t.Errorf("%s maps to catalog field %s", m.Name, m.Field)
		}
	}
}

func TestParseCounters(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    []string // name/kind of each metric
		skipped int
		err     string
	}{
		{name: "comments blanks and spaces",
			in:   "# a comment\n\n  DCGM_FI_DEV_GPU_TEMP ,  gauge , GPU temperature (in C).\nDCGM_FI_DEV_FB_USED,gauge,used\n",
			want: []string{"DCGM_FI_DEV_GPU_TEMP/gauge", "DCGM_FI_DEV_FB_USED/gauge"}},
		{name: "label and counter",
			in:   "DCGM_FI_DRIVER_VERSION, label, Driver Version\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, counter, mJ\n",
			want: []string{"DCGM_FI_DRIVER_VERSION/label", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION/counter"}},
		{name: "commented-out fields of the upstream file",
			in:   "# DCGM_FI_PROF_SM_ACTIVE, gauge, x\nDCGM_FI_PROF_SM_ACTIVE, gauge, The ratio of cycles an SM has at least 1 warp assigned.\n",
			want: []string{"DCGM_FI_PROF_SM_ACTIVE/gauge"}},
		{name: "fields not served are skipped, not fatal",
			in:   "DCGM_FI_DEV_POWER_VIOLATION, counter, ns\nDCGM_EXP_XID_ERRORS_COUNT, gauge, n\nDCGM_FI_DEV_GPU_UTIL, gauge, u\n",
			want: []string{"DCGM_FI_DEV_GPU_UTIL/gauge"}, skipped: 2},
		{name: "histogram is skipped", in: "DCGM_FI_DEV_GPU_UTIL, histogram, u\nDCGM_FI_DEV_GPU_TEMP, gauge, t\n", want: []string{"DCGM_FI_DEV_GPU_TEMP/gauge"}, skipped: 1},
		{name: "a metric field cannot be a label", in: "DCGM_FI_DEV_GPU_UTIL, label, u\nDCGM_FI_DEV_GPU_TEMP, gauge, t\n", want: []string{"DCGM_FI_DEV_GPU_TEMP/gauge"}, skipped: 1},
		{name: "nothing served is an error", in: "DCGM_FI_DEV_GPU_UTIL, histogram, u\nDCGM_FI_DEV_POWER_VIOLATION, counter, v\n",
			err: "line 1: DCGM_FI_DEV_GPU_UTIL: type histogram is not supported (gauge, counter, label); no line of the file names a field gpu-plugin serves"},
		{name: "1.x names", in: "dcgm_gpu_temp, gauge, t\ndcgm_pcie_tx_throughput, counter, x\ndcgm_fi_prof_dram_active, gauge, d\n",
			want: []string{"dcgm_gpu_temp/gauge", "dcgm_fi_prof_dram_active/gauge"}, skipped: 1},
		{name: "a 1.x name and its DCGM_FI name are one field", in: "dcgm_gpu_temp, gauge, t\nDCGM_FI_DEV_GPU_TEMP, gauge, t\n",
			err: "line 2: DCGM_FI_DEV_GPU_TEMP is listed twice (first on line 1)"},
		{name: "two columns", in: "DCGM_FI_DEV_GPU_UTIL, gauge\n", err: "line 1: 2 columns, want 3"},
		{name: "bad type", in: "\n\nDCGM_FI_DEV_GPU_UTIL, gague, u\n", err: `line 3: DCGM_FI_DEV_GPU_UTIL: unknown type "gague"`},
		{name: "not a field name", in: "gpu_util, gauge, u\n", err: `"gpu_util" is not a DCGM field name`},
		{name: "duplicate", in: "DCGM_FI_DEV_GPU_UTIL, gauge, u\nDCGM_FI_DEV_GPU_UTIL, gauge, v\n", err: "line 2: DCGM_FI_DEV_GPU_UTIL is listed twice (first on line 1)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := telemetry.ParseCounters(strings.NewReader(tc.in))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range s.Metrics {
				got = append(got, m.Name+"/"+m.Kind)
			}
			if strings.Join(got, " ") != strings.Join(tc.want, " ") {
				t.Errorf("metrics %v, want %v", got, tc.want)
			}
			if len(s.Skipped) != tc.skipped {
				t.Errorf("skipped %v, want %d lines", s.Skipped, tc.skipped)
			}
		})
	}
}

func TestLoadCounters(t *testing.T) {
	if s, err := telemetry.LoadCounters(""); err != nil || len(s.Metrics) != len(telemetry.DefaultMetricSet().Metrics) {
		t.Errorf("empty path: %v, want the default set", err)
	}
	path := filepath.Join(t.TempDir(), "counters.csv")
	if err := os.WriteFile(path, []byte("DCGM_FI_DEV_GPU_UTIL, gauge, GPU utilization (in %).\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := telemetry.LoadCounters(path)
	if err != nil || len(s.Metrics) != 1 || s.Fields() != telemetry.MaskOf(telemetry.GPUUtil) {
		t.Errorf("one-line file: %+v, %v", s, err)
	}
	_, err = telemetry.LoadCounters(filepath.Join(t.TempDir(), "missing.csv"))
	if err == nil || !strings.Contains(err.Error(), "--collectors") {
		t.Errorf("a missing file: %v, want an error naming --collectors", err)
	}
}
