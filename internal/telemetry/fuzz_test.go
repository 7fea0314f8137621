package telemetry_test

import (
	"bytes"
	"context"
	"encoding/csv"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
)

// FuzzParseCounters feeds ParseCounters arbitrary counters files (the
// --collectors CSV). Properties:
//   - nothing panics; an error names its line ("line N: …");
//   - an accepted set is well-formed: catalog fields under their DCGM
//     names, gauge/counter/label (label only for the driver version), each
//     field once;
//   - the set written back out as CSV parses to the same set (idempotent);
//   - a collector serving the set on a simulated node writes an
//     exposition Prometheus' parser accepts, each family with the file's
//     help text and type.
//
// The committed corpus is in testdata/fuzz/FuzzParseCounters.
func FuzzParseCounters(f *testing.F) {
	for _, s := range []string{
		"DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).\n",
		"# comment\n\n  DCGM_FI_DEV_FB_USED ,  gauge , used\nDCGM_FI_DRIVER_VERSION, label, Driver Version\n",
		"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, counter, \"quoted, with a comma\"\n",
		"DCGM_FI_DEV_POWER_USAGE, gauge, \"two\nlines \\ and a backslash\"\n",
		"DCGM_FI_DEV_GPU_UTIL, histogram, u\nDCGM_FI_DEV_GPU_UTIL, label, u\nDCGM_FI_DEV_POWER_VIOLATION, counter, ns\n",
		"DCGM_FI_DEV_GPU_UTIL, gauge, u\nDCGM_FI_DEV_GPU_UTIL, gauge, v\n",
		"DCGM_FI_DEV_GPU_UTIL, gauge\n",
		"gpu_util, gauge, u\n",
		"dcgm_fi_dev_gpu_util, gauge, lower case\n",
		"DCGM_FI_DEV_GPU_UTIL, GAUGE, u\r\nDCGM_FI_DEV_SM_CLOCK,gauge,\"a \"\"quoted\"\" word\"\r\n",
		"DCGM_FI_DEV_SM_CLOCK, gauge, bare \"quote\n",
	} {
		f.Add([]byte(s))
	}
	if raw, err := os.ReadFile("default-counters.csv"); err == nil {
		f.Add(raw)
	}

	node := sim.NewNode(mustProfile(f, "pcie-l4x4"), nil)
	lib, err := nvml.Open(node.NVML())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { lib.Close() })
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		f.Fatal(err)
	}
	backend := nvmlbackend.New(nvmlbackend.Options{Lib: lib})
	f.Cleanup(func() { backend.Close() })
	lineRE := regexp.MustCompile(`^line [0-9]+: `)

	f.Fuzz(func(t *testing.T, raw []byte) {
		s, err := telemetry.ParseCounters(bytes.NewReader(raw))
		if err != nil {
			if s != nil {
				t.Fatalf("ParseCounters returned a set with an error: %v", err)
			}
			if !lineRE.MatchString(err.Error()) {
				t.Fatalf("error does not name its line: %v", err)
			}
			return
		}
		checkMetricSet(t, s)

		var out bytes.Buffer
		w := csv.NewWriter(&out)
		for _, m := range s.Metrics {
			if err := w.Write([]string{m.Name, m.Kind, m.Help}); err != nil {
				t.Fatal(err)
			}
		}
		w.Flush()
		again, err := telemetry.ParseCounters(bytes.NewReader(out.Bytes()))
		if err != nil {
			t.Fatalf("the accepted set, written back out, does not parse: %v\n%s", err, out.Bytes())
		}
		if len(again.Skipped) != 0 || len(again.Metrics) != len(s.Metrics) {
			t.Fatalf("round trip: %d metrics and skipped %v, want the %d metrics\n%s", len(again.Metrics), again.Skipped, len(s.Metrics), out.Bytes())
		}
		for i := range s.Metrics {
			if again.Metrics[i] != s.Metrics[i] {
				t.Fatalf("round trip changed metric %d: %+v, want %+v", i, again.Metrics[i], s.Metrics[i])
			}
		}
		if len(s.Metrics) > 0 {
			checkExposition(t, s, inv, backend)
		}
	})
}

// checkMetricSet asserts what every accepted set must hold.
func checkMetricSet(t *testing.T, s *telemetry.MetricSet) {
	seen := map[telemetry.Field]bool{}
	for _, m := range s.Metrics {
		if m.Field >= telemetry.NumFields || m.Field.String() != m.Name {
			t.Fatalf("metric %q maps to field %d (%s)", m.Name, m.Field, m.Field)
		}
		switch m.Kind {
		case telemetry.KindGauge, telemetry.KindCounter:
			if m.Field == telemetry.DriverVersion {
				t.Fatalf("%s accepted as a %s", m.Name, m.Kind)
			}
		case telemetry.KindLabel:
			if m.Field != telemetry.DriverVersion {
				t.Fatalf("%s accepted as a label", m.Name)
			}
		default:
			t.Fatalf("%s has kind %q", m.Name, m.Kind)
		}
		if seen[m.Field] {
			t.Fatalf("%s accepted twice", m.Name)
		}
		seen[m.Field] = true
		if m.Help != strings.TrimSpace(m.Help) {
			t.Fatalf("%s: help %q is not trimmed", m.Name, m.Help)
		}
	}
}

// checkExposition serves s on the simulated node and parses what the
// daemon's fast path writes.
func checkExposition(t *testing.T, s *telemetry.MetricSet, inv *nvml.Inventory, backend *nvmlbackend.Backend) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	sampler := telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory: func() *nvml.Inventory { return inv },
		Backends:  telemetry.Selection{Configured: "auto", Fallback: backend},
		Metrics:   s, Interval: time.Second, Now: clock,
	})
	sampler.SampleOnce(context.Background())
	c := telemetry.NewCollector(telemetry.CollectorOptions{Sampler: sampler, Hostname: "node-1", Now: clock})
	var b bytes.Buffer
	c.WriteText(&b)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(b.Bytes()))
	if err != nil {
		t.Fatalf("the exposition does not parse: %v\n%s", err, b.Bytes())
	}
	for _, m := range s.Metrics {
		fam, ok := fams[m.Name]
		if m.Kind == telemetry.KindLabel {
			continue
		}
		if !ok {
			continue // a field the simulated L4 does not support is omitted
		}
		if fam.GetHelp() != m.Help {
			t.Fatalf("%s: help %q in the exposition, want %q", m.Name, fam.GetHelp(), m.Help)
		}
		if want := strings.ToUpper(m.Kind); fam.GetType().String() != want {
			t.Fatalf("%s: type %s in the exposition, want %s", m.Name, fam.GetType(), want)
		}
	}
}

func mustProfile(t testing.TB, name string) *sim.Profile {
	t.Helper()
	p, err := sim.LoadProfile(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
