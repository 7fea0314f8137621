// Command benchreport runs the project's benchmarks once, in one sitting,
// and writes docs/benchmarks.md: one table of every figure the issues name,
// each with its target, a pass/miss verdict, NVIDIA's figure where one was
// measured, and the command that reproduces it, plus the machine it ran on.
// `make bench` runs it; the report is never edited by hand.
//
// The real-kubelet and real-NVML figures (tests/kubelet) need root, util-
// linux's unshare and ../shared/tools/fakenvml; without them those rows say
// "not run" and why, rather than quoting an old run.
//
// It is a developer tool, not part of the daemon: it runs `go test` and
// `git` as child processes.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

func main() {
	out := flag.String("o", "docs/benchmarks.md", "the report to write")
	raw := flag.String("raw", "", "also keep the raw `go test -bench` output in this file")
	nvmlReport := flag.String("nvml-report", "docs/benchmarks-nvml.md", "where the real-NVML test writes its detailed report")
	idle := flag.String("idle", "60s", "idle window of the real-NVML CPU figure (REALNVML_IDLE)")
	skipKubelet := flag.Bool("skip-kubelet", false, "do not run the tests/kubelet figures (they need root)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage: go run ./tools/benchreport [flags]\n\n"+
			"Runs every benchmark behind docs/benchmarks.md once and rewrites it. Run it on a quiet\n"+
			"machine from the repository root (make bench does). About 8 minutes; the tests/kubelet\n"+
			"part needs root and ../shared/tools/fakenvml.\n\nFlags:\n")
		flag.PrintDefaults()
	}
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *out, *raw, *nvmlReport, *idle, *skipKubelet); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, out, rawPath, nvmlReport, idle string, skipKubelet bool) error {
	if _, err := os.Stat("go.mod"); err != nil {
		return errors.New("run it from the repository root (go.mod not found here)")
	}
	var raw bytes.Buffer
	rep := &report{started: time.Now().UTC(), machine: describeMachine(ctx)}
	rep.loadStart = loadAverage()

	results := map[string]resultSet{}
	for _, r := range suites {
		if r.root && skipKubelet {
			rep.skipped(r.id, "skipped with -skip-kubelet")
			continue
		}
		if r.root {
			if why := kubeletPrerequisites(); why != "" {
				rep.skipped(r.id, why)
				continue
			}
		}
		fmt.Fprintf(os.Stderr, "== [%s] %s\n", r.id, r.command())
		start := time.Now()
		output, err := r.run(ctx)
		raw.WriteString(fmt.Sprintf("### [%s] %s\n", r.id, r.command()))
		raw.Write(output)
		if err != nil {
			return fmt.Errorf("[%s] %s: %w\n%s", r.id, r.command(), err, tail(output, 40))
		}
		set, err := parseBench(output, r.id)
		if err != nil {
			return fmt.Errorf("[%s]: %w", r.id, err)
		}
		results[r.id] = set
		rep.took(r.id, time.Since(start))
	}

	nvmlRows, nvmlNote := nvmlFigures(ctx, skipKubelet, nvmlReport, idle, &raw)
	rep.loadEnd = loadAverage()
	rep.rows = append(buildRows(figures, results, rep.notRun), nvmlRows...)
	rep.nvmlNote = nvmlNote
	rep.nvmlReport = nvmlReport

	if rawPath != "" {
		if err := os.WriteFile(rawPath, raw.Bytes(), 0o644); err != nil {
			return err
		}
	}
	var buf bytes.Buffer
	rep.write(&buf)
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "wrote %s: %d figures, %d missed, %d not run\n", out, len(rep.rows), rep.count(verdictMiss), rep.count(verdictNotRun))
	return nil
}

// kubeletPrerequisites says why the tests/kubelet suites cannot run here,
// or "" when they can.
func kubeletPrerequisites() string {
	if os.Geteuid() != 0 {
		return "needs root (a private mount namespace over /var/lib/kubelet): run make bench as root"
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		return "needs unshare (Debian package util-linux)"
	}
	return ""
}

// nvmlFigures runs TestRealNVMLFigures, which measures the daemon on the
// fake libnvidia-ml.so.1 beside NVIDIA's figures and writes its detailed
// report to nvmlReport, and turns that report's table into rows of ours.
func nvmlFigures(ctx context.Context, skip bool, nvmlReport, idle string, raw *bytes.Buffer) ([]row, string) {
	const id = "N"
	notRun := func(why string) ([]row, string) {
		return []row{{what: "real NVML path (fake libnvidia-ml.so.1) under the real device manager", verdict: verdictNotRun, measured: why, suite: id}}, why
	}
	if skip {
		return notRun("skipped with -skip-kubelet")
	}
	if why := kubeletPrerequisites(); why != "" {
		return notRun(why)
	}
	src, err := filepath.Abs("../shared/tools/fakenvml")
	if err != nil {
		return notRun(err.Error())
	}
	if _, err := os.Stat(filepath.Join(src, "build.sh")); err != nil {
		return notRun("needs ../shared/tools/fakenvml beside the repository")
	}
	tmp, err := os.MkdirTemp("", "benchreport")
	if err != nil {
		return notRun(err.Error())
	}
	defer os.RemoveAll(tmp)
	absReport, _ := filepath.Abs(nvmlReport)
	steps := []struct {
		dir  string
		env  []string
		args []string
	}{
		{".", nil, []string{"sh", filepath.Join(src, "build.sh"), tmp}},
		{"tests/kubelet", nil, []string{"go", "test", "-c", "-o", filepath.Join(tmp, "kubelet.test"), "."}},
		{"tests/kubelet", []string{"FAKE_NVML_LIB=" + tmp, "REALNVML_REPORT=" + absReport, "REALNVML_IDLE=" + idle},
			[]string{"./nsexec.sh", filepath.Join(tmp, "kubelet.test"), "-test.run", "^TestRealNVMLFigures$", "-test.v", "-test.timeout", "20m"}},
	}
	for _, s := range steps {
		fmt.Fprintf(os.Stderr, "== [%s] (%s) %s\n", id, s.dir, strings.Join(s.args, " "))
		output, err := command(ctx, s.dir, s.env, s.args...)
		fmt.Fprintf(raw, "### [%s] (%s) %s\n", id, s.dir, strings.Join(s.args, " "))
		raw.Write(output)
		if err != nil {
			return notRun(fmt.Sprintf("failed: %s: %v (%s)", strings.Join(s.args, " "), err, strings.TrimSpace(tail(output, 3))))
		}
	}
	text, err := os.ReadFile(nvmlReport)
	if err != nil {
		return notRun(err.Error())
	}
	rows, err := parseNVMLTable(text, id)
	if err != nil {
		return notRun(fmt.Sprintf("cannot read the table of %s: %v", nvmlReport, err))
	}
	return rows, ""
}

// command runs args in dir with extra environment and returns stdout and
// stderr together.
func command(ctx context.Context, dir string, env []string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout = io.MultiWriter(&out, progress{})
	cmd.Stderr = cmd.Stdout
	err := cmd.Run()
	return out.Bytes(), err
}

// progress echoes benchmark result lines to stderr so a long run shows life.
type progress struct{}

func (progress) Write(p []byte) (int, error) {
	sc := bufio.NewScanner(bytes.NewReader(p))
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "Benchmark") || strings.HasPrefix(line, "--- FAIL") {
			fmt.Fprintln(os.Stderr, "  ", line)
		}
	}
	return len(p), nil
}

func tail(b []byte, lines int) string {
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// describeMachine is the "ran on" line: CPU, cores, memory, kernel, Go and
// the commit measured.
func describeMachine(ctx context.Context) string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			mem = fmt.Sprintf(", %.1f GiB memory", float64(kb)/(1<<20))
		}
	}
	kernel := "unknown kernel"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = "Linux " + strings.TrimSpace(string(b))
	}
	commit := "unknown commit"
	if b, err := exec.CommandContext(ctx, "git", "describe", "--always", "--dirty").Output(); err == nil {
		commit = "commit " + strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%s, %d CPUs%s, %s, %s, %s/%s, %s", cpu, runtime.NumCPU(), mem, kernel, runtime.Version(), runtime.GOOS, runtime.GOARCH, commit)
}

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
