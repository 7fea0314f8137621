package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/perf/benchfmt"
)

// resultSet is one suite's results by benchmark name (without the
// -GOMAXPROCS suffix), each a map from the unit as printed to its value.
type resultSet map[string]map[string]float64

var gomaxprocsSuffix = regexp.MustCompile(`-\d+$`)

// parseBench reads `go test -bench` output.
func parseBench(output []byte, file string) (resultSet, error) {
	set := resultSet{}
	r := benchfmt.NewReader(bytes.NewReader(output), file)
	for r.Scan() {
		res, ok := r.Result().(*benchfmt.Result)
		if !ok {
			continue // unit metadata and syntax errors: test log lines are not benchmark lines
		}
		values := map[string]float64{}
		for _, v := range res.Values {
			unit, val := v.Unit, v.Value
			if v.OrigUnit != "" {
				unit, val = v.OrigUnit, v.OrigValue
			}
			values[unit] = val
		}
		// benchfmt drops the "Benchmark" prefix; keep names as go test prints them.
		set["Benchmark"+gomaxprocsSuffix.ReplaceAllString(res.Name.String(), "")] = values
	}
	if err := r.Err(); err != nil {
		return nil, err
	}
	if len(set) == 0 {
		return nil, errors.New("no benchmark results in the output")
	}
	return set, nil
}

type verdict string

const (
	verdictPass   verdict = "pass"
	verdictMiss   verdict = "**MISS**"
	verdictNone   verdict = "—"
	verdictNotRun verdict = "not run"
)

type row struct {
	what, measured, target, upstream, note, suite string
	verdict                                       verdict
}

// buildRows evaluates every figure against its suite's results. A figure
// whose suite did not run or whose benchmark is missing says so.
func buildRows(figs []figure, results map[string]resultSet, notRun map[string]string) []row {
	rows := make([]row, 0, len(figs))
	for _, f := range figs {
		r := row{what: f.what, upstream: f.upstream, note: f.note, suite: f.suite, verdict: verdictNone, target: "—"}
		if f.target != nil {
			r.target = f.target.text
		}
		set, ran := results[f.suite]
		values, found := set[f.bench]
		switch {
		case !ran:
			r.verdict, r.measured = verdictNotRun, notRun[f.suite]
		case !found:
			r.verdict, r.measured = verdictNotRun, "benchmark "+f.bench+" missing from the output"
		default:
			r.measured, r.verdict = evaluate(f, values)
		}
		rows = append(rows, r)
	}
	return rows
}

func evaluate(f figure, values map[string]float64) (string, verdict) {
	parts := make([]string, 0, len(f.metrics))
	shown := make([]float64, len(f.metrics))
	for i, m := range f.metrics {
		v, ok := values[m.unit]
		if !ok {
			return fmt.Sprintf("metric %q missing from %s", m.unit, f.bench), verdictNotRun
		}
		shown[i] = v * m.scale
		text := formatValue(shown[i]) + m.suffix
		if m.label != "" {
			text = m.label + " " + text
		}
		parts = append(parts, text)
	}
	v := verdictNone
	if t := f.target; t != nil {
		v = verdictPass
		if shown[t.metric] > t.max {
			v = verdictMiss
		}
	}
	return strings.Join(parts, ", "), v
}

// formatValue keeps three significant digits, without exponent notation.
func formatValue(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case v >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

// parseNVMLTable turns the table of TestRealNVMLFigures' report (columns:
// measure, target, NVIDIA v0.20.0, then one per fake-library profile) into
// rows. Its cells already say whether a target is missed ("misses …").
func parseNVMLTable(text []byte, suite string) ([]row, error) {
	var header []string
	var rows []row
	for line := range strings.SplitSeq(string(text), "\n") {
		if !strings.HasPrefix(line, "|") {
			if header != nil && len(rows) > 0 {
				break
			}
			continue
		}
		cells := splitRow(line)
		switch {
		case header == nil:
			header = cells
			if len(header) < 4 {
				return nil, fmt.Errorf("table header %q: want measure, target, NVIDIA and at least one profile", line)
			}
			continue
		case strings.Trim(strings.Join(cells, ""), "-: ") == "":
			continue // the |---| line
		case len(cells) != len(header):
			return nil, fmt.Errorf("row %q has %d cells, the header %d", line, len(cells), len(header))
		}
		var measured []string
		missed := false
		for i := 3; i < len(cells); i++ {
			measured = append(measured, header[i]+": "+cells[i])
			if strings.Contains(cells[i], "misses") {
				missed = true
			}
		}
		v := verdictNone
		if cells[1] != "—" && cells[1] != "" {
			v = verdictPass
			if missed {
				v = verdictMiss
			}
		}
		rows = append(rows, row{what: "Real NVML path: " + cells[0], target: cells[1], upstream: cells[2],
			measured: strings.Join(measured, "<br>"), verdict: v, suite: suite})
	}
	if len(rows) == 0 {
		return nil, errors.New("no table found")
	}
	return rows, nil
}

func splitRow(line string) []string {
	line = strings.TrimSpace(line)
	line = strings.TrimPrefix(line, "|")
	line = strings.TrimSuffix(line, "|")
	cells := strings.Split(line, "|")
	for i := range cells {
		cells[i] = strings.TrimSpace(cells[i])
	}
	return cells
}

// report is everything docs/benchmarks.md says.
type report struct {
	started            time.Time
	machine            string
	loadStart, loadEnd string
	rows               []row
	notRun             map[string]string
	durations          map[string]time.Duration
	nvmlNote           string
	nvmlReport         string
}

func (r *report) skipped(suite, why string) {
	if r.notRun == nil {
		r.notRun = map[string]string{}
	}
	r.notRun[suite] = why
}

func (r *report) took(suite string, d time.Duration) {
	if r.durations == nil {
		r.durations = map[string]time.Duration{}
	}
	r.durations[suite] = d
}

func (r *report) count(v verdict) int {
	n := 0
	for _, row := range r.rows {
		if row.verdict == v {
			n++
		}
	}
	return n
}

func (r *report) write(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p("# Benchmarks\n\n")
	p("<!-- Generated by `make bench` (tools/benchreport); do not edit by hand: re-run it. -->\n\n")
	p("Every figure below was measured in one run of `make bench`, on one machine, one suite after the other.\n")
	p("Figures are medians and tails of many calls unless the row says otherwise. A target comes from the\n")
	p("issue that asked for the figure; NVIDIA's figures are from `nvidia-device-plugin-compat.md` and the\n")
	p("issues (NVIDIA k8s-device-plugin v0.20.0, go-gpuallocator, dcgm-exporter).\n\n")
	p("- Run: %s UTC, %s.\n", r.started.Format("2006-01-02 15:04"), r.machine)
	p("- Load average (1, 5, 15 min) at the start: %s; at the end: %s. The machine may be shared: tails\n", r.loadStart, r.loadEnd)
	p("  (p99, max) are the figures most sensitive to that.\n")
	p("- Verdicts: %d pass, %d **MISS**, %d without a target, %d not run.\n\n",
		r.count(verdictPass), r.count(verdictMiss), r.count(verdictNone), r.count(verdictNotRun))

	p("| Figure | Measured | Target | Verdict | NVIDIA / upstream | Suite |\n")
	p("|---|---|---|---|---|---|\n")
	for _, row := range r.rows {
		measured := row.measured
		if row.note != "" {
			measured += " (" + row.note + ")"
		}
		upstream := row.upstream
		if upstream == "" {
			upstream = "—"
		}
		p("| %s | %s | %s | %s | %s | [%s](#suite-%s) |\n", cell(row.what), cell(measured), cell(row.target), row.verdict, cell(upstream), row.suite, strings.ToLower(row.suite))
	}

	p("\n## Suites: the commands that reproduce each figure\n\n")
	p("Run from the repository root. The tests/kubelet suites need root (they run the real device manager\n")
	p("in a private mount namespace through `nsexec.sh`).\n\n")
	for _, s := range suites {
		p("<a id=\"suite-%s\"></a>\n", strings.ToLower(s.id))
		p("- **%s**: `%s`%s\n", s.id, s.command(), r.suiteStatus(s.id))
	}
	p("<a id=\"suite-n\"></a>\n")
	p("- **N**: `TestRealNVMLFigures` in tests/kubelet: gpu-plugin without `--simulate`, as its own process, on\n")
	p("  the fake `libnvidia-ml.so.1` (`../shared/tools/fakenvml`) under the real kubelet device manager, beside\n")
	p("  NVIDIA's plugin v0.20.0 measured on the same library. Its detailed report, with how each figure is\n")
	p("  taken and the command, is [%s](%s).", filepath.Base(r.nvmlReport), filepath.Base(r.nvmlReport))
	if r.nvmlNote != "" {
		p(" Not run this time: %s.", r.nvmlNote)
	}
	p("\n\n`make bench` is `go run ./tools/benchreport`; `go run ./tools/benchreport -h` lists its options\n")
	p("(`-raw FILE` keeps the raw benchmark output).\n")
}

func (r *report) suiteStatus(id string) string {
	if why, ok := r.notRun[id]; ok {
		return " — not run: " + why
	}
	if d, ok := r.durations[id]; ok {
		return fmt.Sprintf(" (%s)", d.Round(time.Second))
	}
	return ""
}

// cell makes text safe inside a Markdown table cell.
func cell(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "|", `\|`), "\n", " ")
}

func absPath(dir, name string) (string, error) {
	return filepath.Abs(filepath.Join(dir, name))
}
