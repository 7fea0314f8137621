package main

import (
	"bytes"
	"strings"
	"testing"
)

const benchOutput = `goos: linux
goarch: amd64
pkg: github.com/gpu-plugin/gpu-plugin/internal/telemetry
cpu: Some CPU
some test log line
BenchmarkScrape/testdata/dgx-a100-56mig.yaml/pods=100/gzip=false-2   	    2000	    512345 ns/op	         0.41 p50-ms	         2.60 p99-ms	     51234 bytes/scrape	   12 B/op	       3 allocs/op
BenchmarkSamplerCPU/dgx-h100-2   	       1	10000000000 ns/op	         0.08 %core	        10.00 rounds
PASS
ok  	github.com/gpu-plugin/gpu-plugin/internal/telemetry	12.3s
`

func TestParseBench(t *testing.T) {
	set, err := parseBench([]byte(benchOutput), "G")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		bench, unit string
		want        float64
	}{
		{"BenchmarkScrape/testdata/dgx-a100-56mig.yaml/pods=100/gzip=false", "p99-ms", 2.60},
		{"BenchmarkScrape/testdata/dgx-a100-56mig.yaml/pods=100/gzip=false", "ns/op", 512345},
		{"BenchmarkScrape/testdata/dgx-a100-56mig.yaml/pods=100/gzip=false", "allocs/op", 3},
		{"BenchmarkSamplerCPU/dgx-h100", "%core", 0.08},
	} {
		got, ok := set[tc.bench][tc.unit]
		if !ok || got != tc.want {
			t.Errorf("%s %s = %v (found %v), want %v; parsed %v", tc.bench, tc.unit, got, ok, tc.want, set)
		}
	}
	if _, err := parseBench([]byte("PASS\nok x 1s\n"), "empty"); err == nil {
		t.Error("output without benchmark lines: want an error, got none")
	}
}

func TestBuildRowsVerdicts(t *testing.T) {
	results := map[string]resultSet{"G": {
		"BenchmarkFast": {"p99-ms": 2.6, "allocs/op": 3},
		"BenchmarkSlow": {"p99-ms": 7.5, "allocs/op": 3},
	}}
	figs := []figure{
		{what: "fast", suite: "G", bench: "BenchmarkFast", metrics: []metric{p99ms, allocs}, target: &target{0, 5, "p99 ≤ 5 ms"}},
		{what: "slow", suite: "G", bench: "BenchmarkSlow", metrics: []metric{p99ms}, target: &target{0, 5, "p99 ≤ 5 ms"}},
		{what: "no target", suite: "G", bench: "BenchmarkSlow", metrics: []metric{p99ms}},
		{what: "missing bench", suite: "G", bench: "BenchmarkGone", metrics: []metric{p99ms}},
		{what: "missing metric", suite: "G", bench: "BenchmarkFast", metrics: []metric{p50ms}, target: &target{0, 5, "p50 ≤ 5 ms"}},
		{what: "suite skipped", suite: "K", bench: "BenchmarkX", metrics: []metric{p50ms}},
	}
	rows := buildRows(figs, results, map[string]string{"K": "needs root"})
	want := []struct {
		verdict  verdict
		measured string
	}{
		{verdictPass, "p99 2.60 ms, 3.00 allocs/op"},
		{verdictMiss, "p99 7.50 ms"},
		{verdictNone, "p99 7.50 ms"},
		{verdictNotRun, "benchmark BenchmarkGone missing from the output"},
		{verdictNotRun, `metric "p50-ms" missing from BenchmarkFast`},
		{verdictNotRun, "needs root"},
	}
	for i, w := range want {
		if rows[i].verdict != w.verdict || rows[i].measured != w.measured {
			t.Errorf("%s: got %q %q, want %q %q", figs[i].what, rows[i].verdict, rows[i].measured, w.verdict, w.measured)
		}
	}
}

func TestParseNVMLTable(t *testing.T) {
	text := `# title

| Measure | Target | NVIDIA v0.20.0 | gpu-plugin, a | gpu-plugin, b |
|---|---|---|---|---|
| XID 79 drop | p99 ≤ 5 ms | 1.5–3.4 ms | p99 2.8 ms | p99 1.4 ms |
| GetPreferredAllocation | p99 ≤ 0.2 ms | p50 1.2 ms | **misses p99 ≤ 0.2 ms**: p99 681 µs | p99 0.1 ms |
| Allocate 2 | — | envs | ` + "`A=1`" + ` | ` + "`A=1`" + ` |

How each figure is taken: | not a row
`
	rows, err := parseNVMLTable([]byte(text), "N")
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 3 {
		t.Fatalf("got %d rows, want 3: %+v", len(rows), rows)
	}
	for i, w := range []struct {
		verdict  verdict
		measured string
	}{
		{verdictPass, "gpu-plugin, a: p99 2.8 ms<br>gpu-plugin, b: p99 1.4 ms"},
		{verdictMiss, "gpu-plugin, a: **misses p99 ≤ 0.2 ms**: p99 681 µs<br>gpu-plugin, b: p99 0.1 ms"},
		{verdictNone, "gpu-plugin, a: `A=1`<br>gpu-plugin, b: `A=1`"},
	} {
		if rows[i].verdict != w.verdict || rows[i].measured != w.measured {
			t.Errorf("row %d: got %q %q, want %q %q", i, rows[i].verdict, rows[i].measured, w.verdict, w.measured)
		}
	}
	if _, err := parseNVMLTable([]byte("no table here"), "N"); err == nil {
		t.Error("text without a table: want an error")
	}
	if _, err := parseNVMLTable([]byte("| a | b | c | d |\n|---|---|---|---|\n| 1 | 2 |\n"), "N"); err == nil {
		t.Error("a row shorter than the header: want an error")
	}
}

func TestReportWritesEveryRowAndSuite(t *testing.T) {
	rep := &report{machine: "test machine", rows: []row{
		{what: "a | b", measured: "1 ms", target: "≤ 2 ms", verdict: verdictPass, suite: "A"},
		{what: "c", measured: "3 ms", target: "≤ 2 ms", verdict: verdictMiss, suite: "B"},
	}, notRun: map[string]string{"K": "needs root"}, nvmlReport: "docs/benchmarks-nvml.md", nvmlNote: "needs root"}
	var buf bytes.Buffer
	rep.write(&buf)
	out := buf.String()
	for _, want := range []string{
		"do not edit by hand", "test machine", "1 pass, 1 **MISS**",
		`| a \| b | 1 ms | ≤ 2 ms | pass |`, "| c | 3 ms | ≤ 2 ms | **MISS** |",
		"go test -run '^$' -bench '^BenchmarkStartToRegistered$' -benchtime 30x ./cmd/gpu-plugin/",
		`cd tests/kubelet && go test -run '^$' -bench`, `-exec "$PWD/nsexec.sh" .`,
		"— not run: needs root", "Not run this time: needs root.",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

// TestSuiteIDsUnique: every suite, the real-NVML one included, has its own
// letter, so the report's suite links are not ambiguous.
func TestSuiteIDsUnique(t *testing.T) {
	seen := map[string]bool{"N": true} // nvmlFigures' suite
	for _, s := range suites {
		if seen[s.id] {
			t.Errorf("suite id %s used twice", s.id)
		}
		seen[s.id] = true
	}
}
