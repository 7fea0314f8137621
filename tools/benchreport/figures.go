package main

import (
	"context"
	"strings"
)

// suite is one `go test -bench` invocation; several figures read its
// results.
type suite struct {
	id    string
	dir   string // module directory, relative to the repository root
	pkg   string
	bench string // -bench regexp
	extra []string
	env   []string
	root  bool // tests/kubelet: runs through nsexec.sh, needs root
}

func (s suite) args() []string {
	args := []string{"test", "-run", "^$", "-bench", s.bench}
	args = append(args, s.extra...)
	if s.root {
		args = append(args, "-exec", "$PWD/nsexec.sh")
	}
	return append(args, s.pkg)
}

// command is the line a reader pastes into a shell to reproduce the suite.
func (s suite) command() string {
	var b strings.Builder
	if s.dir != "." {
		b.WriteString("cd " + s.dir + " && ")
	}
	for _, e := range s.env {
		b.WriteString(e + " ")
	}
	b.WriteString("go")
	for _, a := range s.args() {
		if strings.ContainsAny(a, "^$|()* ") && a != "$PWD/nsexec.sh" {
			a = "'" + a + "'"
		} else if a == "$PWD/nsexec.sh" {
			a = `"$PWD/nsexec.sh"`
		}
		b.WriteString(" " + a)
	}
	return b.String()
}

func (s suite) run(ctx context.Context) ([]byte, error) {
	args := s.args()
	for i, a := range args {
		if a == "$PWD/nsexec.sh" {
			args[i] = "./nsexec.sh"
			if abs, err := absPath(s.dir, "nsexec.sh"); err == nil {
				args[i] = abs
			}
		}
	}
	return command(ctx, s.dir, s.env, append([]string{"go"}, args...)...)
}

// suites, in the order they run. Each is sized to give stable percentiles
// in a few tens of seconds on a 2-core machine.
var suites = []suite{
	{id: "A", dir: ".", pkg: "./cmd/gpu-plugin/", bench: "^BenchmarkStartToRegistered$", extra: []string{"-benchtime", "30x"}},
	{id: "B", dir: ".", pkg: "./internal/plugin/", bench: "^(BenchmarkAllocate|BenchmarkListAndWatchUpdate|BenchmarkPreferredOverSocket)$", extra: []string{"-benchtime", "2s", "-benchmem"}},
	{id: "C", dir: ".", pkg: "./internal/placement/", bench: "^BenchmarkSelectLatency$"},
	{id: "D", dir: ".", pkg: "./internal/health/", bench: "^BenchmarkEventToListAndWatch$", extra: []string{"-benchtime", "2000x"}},
	{id: "E", dir: ".", pkg: "./internal/daemon/", bench: "^BenchmarkReloadLatency$", extra: []string{"-benchtime", "30x"}},
	{id: "F", dir: ".", pkg: "./internal/daemon/", bench: "^BenchmarkRescan$", extra: []string{"-benchmem"}},
	{id: "G", dir: ".", pkg: "./internal/telemetry/", bench: "^BenchmarkScrape$", extra: []string{"-benchmem"}},
	{id: "G2", dir: ".", pkg: "./internal/telemetry/", bench: "^BenchmarkScrapeAfterRound$", extra: []string{"-benchmem"}},
	{id: "H", dir: ".", pkg: "./internal/daemon/", bench: "^BenchmarkDaemonScrape$", extra: []string{"-benchmem"}},
	{id: "I", dir: ".", pkg: "./internal/telemetry/", bench: "^BenchmarkSamplerCPU$", extra: []string{"-benchtime", "1x"}, env: []string{"TELEMETRY_CPU_SECONDS=10"}},
	{id: "J", dir: ".", pkg: "./internal/daemon/", bench: "^(BenchmarkDaemonRSS|BenchmarkDaemonRSSPerPod)$", extra: []string{"-benchtime", "1x"}},
	{id: "K", dir: "tests/kubelet", pkg: ".", bench: "^(BenchmarkDaemonStartToCapacity|BenchmarkKubeletRestartToCapacity)$", extra: []string{"-benchtime", "20x"}, root: true},
	{id: "L", dir: ".", pkg: "./internal/daemon/", bench: "^BenchmarkConcurrentScrapes$", extra: []string{"-benchtime", "1x"}},
	{id: "M", dir: "tests/kubelet", pkg: ".", bench: "^BenchmarkStreamDropToCapacity$", extra: []string{"-benchtime", "5x"}, root: true},
	{id: "O", dir: ".", pkg: "./internal/cdi/", bench: "^BenchmarkGenerate$", extra: []string{"-benchtime", "50x", "-benchmem"}},
	{id: "P", dir: ".", pkg: "./internal/daemon/", bench: "^BenchmarkMPS$", extra: []string{"-benchtime", "20x"}},
	{id: "Q", dir: "tests/kubelet", pkg: ".", bench: "^BenchmarkDRA$", extra: []string{"-benchtime", "20x"}, root: true},
}

// metric is one reported value of a benchmark, shown as label + value +
// suffix after multiplying by scale (units converted for reading).
type metric struct {
	label  string
	unit   string // as the benchmark printed it: "ns/op", "p99-ms", …
	scale  float64
	suffix string
}

// target is a bound on one metric, in its displayed units.
type target struct {
	metric int // index into figure.metrics
	max    float64
	text   string
}

// figure is one row of the table.
type figure struct {
	what     string
	suite    string
	bench    string // full name without the -GOMAXPROCS suffix
	metrics  []metric
	target   *target
	upstream string
	note     string
}

var (
	p50ms  = metric{"p50", "p50-ms", 1, " ms"}
	p99ms  = metric{"p99", "p99-ms", 1, " ms"}
	maxms  = metric{"max", "max-ms", 1, " ms"}
	p50us  = metric{"p50", "p50-µs", 1, " µs"}
	p99us  = metric{"p99", "p99-µs", 1, " µs"}
	meanus = metric{"mean", "ns/op", 1e-3, " µs"}
	allocs = metric{"", "allocs/op", 1, " allocs/op"}
)

// figures: every figure the issues name that an in-process benchmark
// measures. The real-NVML rows come from TestRealNVMLFigures' own table.
var figures = []figure{
	{what: "Process start → registered, simulated dgx-h100 (exec to the stand-in kubelet listing 8 GPUs)", suite: "A", bench: "BenchmarkStartToRegistered",
		metrics: []metric{{"p50", "p50-ms", 1, " ms"}, {"max", "max-ms", 1, " ms"}}},
	{what: "daemon start → capacity 8 in the real kubelet device manager (simulated dgx-h100)", suite: "K", bench: "BenchmarkDaemonStartToCapacity",
		metrics: []metric{{"p50", "ms-p50", 1, " ms"}, {"max", "ms-max", 1, " ms"}}, upstream: "16–37 ms from process start, on the fake NVML library"},
	{what: "Kubelet restart → capacity back (real device manager, 20 restarts)", suite: "K", bench: "BenchmarkKubeletRestartToCapacity",
		metrics: []metric{{"p50", "ms-p50", 1, " ms"}, {"max", "ms-max", 1, " ms"}}, target: &target{0, 20, "p50 ≤ 20 ms"}, upstream: "5–15 ms, health lost"},
	{what: "Allocate over the plugin socket (2 GPUs, dgx-h100)", suite: "B", bench: "BenchmarkAllocate",
		metrics: []metric{meanus, allocs}},
	{what: "ListAndWatch update: health change → list received by the client", suite: "B", bench: "BenchmarkListAndWatchUpdate",
		metrics: []metric{p50us, p99us}},
	{what: "GetPreferredAllocation over the plugin socket, 8 GPUs (DGX-1), random requests", suite: "B", bench: "BenchmarkPreferredOverSocket",
		metrics: []metric{p50us, p99us}, target: &target{1, 200, "p99 ≤ 200 µs"}, upstream: "p50 1.2–2.2 ms over the socket",
		note: "gRPC's own round trip on this machine is most of it: see the no-op RPC floor in the real-NVML rows"},
	{what: "Placement search, 8 GPUs (DGX-1 hybrid cube mesh)", suite: "C", bench: "BenchmarkSelectLatency/dgx1",
		metrics: []metric{{"p50", "p50-ns", 1e-3, " µs"}, {"p99", "p99-ns", 1e-3, " µs"}, meanus}, target: &target{1, 3.3, "p99 ≤ 3.3 µs (100× under go-gpuallocator's 0.33 ms)"},
		upstream: "go-gpuallocator 0.04–0.33 ms per call"},
	{what: "Placement search, 16 GPUs (two DGX-1 boards over SYS)", suite: "C", bench: "BenchmarkSelectLatency/dgx1x2",
		metrics: []metric{{"p50", "p50-ns", 1e-3, " µs"}, {"p99", "p99-ns", 1e-3, " µs"}, {"max", "max-ns", 1e-3, " µs"}}, target: &target{1, 1000, "p99 ≤ 1 ms"},
		upstream: "go-gpuallocator 2.3 s to 42 s per call"},
	{what: "Placement search, 16 GPUs (seeded random topology)", suite: "C", bench: "BenchmarkSelectLatency/random16",
		metrics: []metric{{"p50", "p50-ns", 1e-3, " µs"}, {"p99", "p99-ns", 1e-3, " µs"}, {"max", "max-ns", 1e-3, " µs"}}, target: &target{1, 1000, "p99 ≤ 1 ms"}},
	{what: "Placement search, 32 GPUs (four DGX-1 boards)", suite: "C", bench: "BenchmarkSelectLatency/dgx1x4",
		metrics: []metric{{"p50", "p50-ns", 1e-3, " µs"}, {"p99", "p99-ns", 1e-3, " µs"}, {"max", "max-ns", 1e-3, " µs"}}, note: "no target: reported to show it does not blow up"},
	{what: "Placement search, 32 GPUs (seeded random topology)", suite: "C", bench: "BenchmarkSelectLatency/random32",
		metrics: []metric{{"p50", "p50-ns", 1e-3, " µs"}, {"p99", "p99-ns", 1e-3, " µs"}, {"max", "max-ns", 1e-3, " µs"}}, note: "no target: reported to show it does not blow up"},
	{what: "Health: XID event → ListAndWatch update at the client (dgx-h100, 8 × 8 replicas)", suite: "D", bench: "BenchmarkEventToListAndWatch",
		metrics: []metric{p50ms, p99ms, maxms}, target: &target{1, 100, "p99 ≤ 100 ms"}},
	{what: "Config reload: file renamed → new ListAndWatch list (16 ↔ 24 devices), default 100 ms debounce", suite: "E", bench: "BenchmarkReloadLatency/debounce=100ms",
		metrics: []metric{{"p50", "p50-µs", 1e-3, " ms"}, {"p99", "p99-µs", 1e-3, " ms"}}, note: "the debounce waits for writers to finish; the next row is the pipeline alone"},
	{what: "Config reload without the debounce", suite: "E", bench: "BenchmarkReloadLatency/debounce=0",
		metrics: []metric{{"p50", "p50-µs", 1e-3, " ms"}, {"p99", "p99-µs", 1e-3, " ms"}}},
	{what: "Re-scan of dgx-a100-mig, unchanged", suite: "F", bench: "BenchmarkRescan/unchanged",
		metrics: []metric{meanus, allocs}},
	{what: "Re-scan of dgx-a100-mig, GPU 3 re-partitioned (new resources handed over)", suite: "F", bench: "BenchmarkRescan/changed",
		metrics: []metric{meanus, allocs}},
	{what: "Scrape, dgx-h100 with 8 attributed pods", suite: "G", bench: "BenchmarkScrape/dgx-h100/pods=8/gzip=false",
		metrics: []metric{p50ms, p99ms, allocs}, target: &target{1, 5, "p99 ≤ 5 ms"}},
	{what: "Scrape, 56 MIG devices with 100 attributed pods", suite: "G", bench: "BenchmarkScrape/testdata/dgx-a100-56mig.yaml/pods=100/gzip=false",
		metrics: []metric{p50ms, p99ms, allocs}, target: &target{1, 5, "p99 ≤ 5 ms"}},
	{what: "Scrape, 56 MIG devices with 1,000 attributed pods (flat in pod count)", suite: "G", bench: "BenchmarkScrape/testdata/dgx-a100-56mig.yaml/pods=1000/gzip=false",
		metrics: []metric{p50ms, p99ms, allocs}, target: &target{1, 5, "p99 ≤ 5 ms"}},
	{what: "Scrape, dgx-h100, 8 GPUs × 10 pods with per-pod accounting", suite: "G", bench: "BenchmarkScrape/dgx-h100/pods=80/gzip=false/per-pod",
		metrics: []metric{p50ms, p99ms, allocs}, target: &target{1, 5, "p99 ≤ 5 ms"}},
	{what: "Scrape, 56 MIG devices × 1,000 pods with per-pod accounting", suite: "G", bench: "BenchmarkScrape/testdata/dgx-a100-56mig.yaml/pods=1000/gzip=false/per-pod",
		metrics: []metric{p50ms, p99ms, allocs}, target: &target{1, 5, "p99 ≤ 5 ms"}},
	{what: "First scrape after a sampling round, 56 MIG devices × 1,000 pods with per-pod accounting", suite: "G2", bench: "BenchmarkScrapeAfterRound/testdata/dgx-a100-56mig.yaml/pods=1000",
		metrics: []metric{p50ms, p99ms}, target: &target{1, 5, "p99 ≤ 5 ms"}},
	{what: "Scrape through the daemon's HTTP listener (56 MIG devices, 100 pods)", suite: "H", bench: "BenchmarkDaemonScrape/gzip=false",
		metrics: []metric{p50ms, p99ms}, target: &target{1, 5, "p99 ≤ 5 ms"}},
	{what: "Sampler CPU, dgx-h100, 1 s interval", suite: "I", bench: "BenchmarkSamplerCPU/dgx-h100",
		metrics: []metric{{"", "%core", 1, " % of a core"}}, target: &target{0, 1, "≤ 1% of a core"}},
	{what: "Sampler CPU, 56 MIG devices, 1 s interval", suite: "I", bench: "BenchmarkSamplerCPU/testdata/dgx-a100-56mig.yaml",
		metrics: []metric{{"", "%core", 1, " % of a core"}}, target: &target{0, 1, "≤ 1% of a core"}},
	{what: "Sampler CPU, dgx-h100, per-pod accounting with 100 processes, 1 s interval", suite: "I", bench: "BenchmarkSamplerCPU/dgx-h100/per-pod/processes=100",
		metrics: []metric{{"", "%core", 1, " % of a core"}}, target: &target{0, 1, "≤ 1% of a core"}},
	{what: "MPS: config applied (unshared → sharing.mps, 4 GPUs × 2) → replicas allocatable at the kubelet, fake control daemon", suite: "P", bench: "BenchmarkMPS/apply",
		metrics: []metric{p50ms, p99ms, maxms}, note: "daemon start, limits, then the re-advertisement; the stand-in kubelet over real gRPC"},
	{what: "MPS: control daemon killed → every replica unhealthy at the kubelet", suite: "P", bench: "BenchmarkMPS/death",
		metrics: []metric{p50ms, p99ms, maxms}, note: "the exit is seen through the daemon's pidfd, at once; a hung daemon takes two 10 s probes"},
	{what: "DRA: claim prepared through the real kubelet DRA manager (1 GPU, dgx-h100): claim read, NodePrepareResources, CDI spec and checkpoint", suite: "Q", bench: "BenchmarkDRA/prepare",
		metrics: []metric{p50ms, p99ms, maxms}, note: "isolated claims; the API client's 5 requests/s (burst 10) is shared with slice writes"},
	{what: "DRA: XID on a GPU → its device taint stored in the ResourceSlice (dgx-h100)", suite: "Q", bench: "BenchmarkDRA/xid-to-slice",
		metrics: []metric{p50ms, p99ms, maxms}, note: "one List and one Update through the API shim, which validates the slice as the API server does"},
	{what: "DRA: ResourceSlice of dgx-a100-mig (20 devices: 17 MIG, 3 GPUs) rewritten after a health change", suite: "Q", bench: "BenchmarkDRA/publish-dgx-a100-mig",
		metrics: []metric{p50ms, p99ms, maxms}},
	{what: "Whole-daemon RSS, 56 MIG devices, 100 pods, scraped every 100 ms", suite: "J", bench: "BenchmarkDaemonRSS",
		metrics: []metric{{"VmRSS", "VmRSS-MB", 1, " MB"}, {"peak (VmHWM)", "VmHWM-MB", 1, " MB"}}, target: &target{1, 40, "≤ 40 MB"},
		upstream: "dcgm-exporter: 100–500 MB reported by its users"},
	{what: "Whole-daemon RSS with per-pod accounting: 100 pods each running a process in a real pod cgroup (root)", suite: "J", bench: "BenchmarkDaemonRSSPerPod",
		metrics: []metric{{"VmRSS", "VmRSS-MB", 1, " MB"}, {"peak (VmHWM)", "VmHWM-MB", 1, " MB"}}, target: &target{1, 40, "≤ 40 MB"}},
	{what: "1 client scraping /metrics (gzip, 5 scrapes each), dgx-a100-mig: latency and the daemon's peak RSS", suite: "L", bench: "BenchmarkConcurrentScrapes/clients=1",
		metrics: []metric{p50ms, p99ms, {"peak RSS", "VmHWM-MB", 1, " MB"}}},
	{what: "200 concurrent scrapes, dgx-a100-mig", suite: "L", bench: "BenchmarkConcurrentScrapes/clients=200",
		metrics: []metric{p50ms, p99ms, {"peak RSS", "VmHWM-MB", 1, " MB"}, {"refused", "refused", 1, ""}}},
	{what: "1,000 concurrent scrapes, dgx-a100-mig (bounded: shared render, 64 writers + 192 waiting, 128 connections)", suite: "L", bench: "BenchmarkConcurrentScrapes/clients=1000",
		metrics: []metric{p50ms, p99ms, {"peak RSS", "VmHWM-MB", 1, " MB"}, {"refused", "refused", 1, ""}}, target: &target{2, 64, "peak RSS ≤ 64 MiB"},
		note: "before the bound: 372 MB peak, p99 2.7 s"},
	{what: "Kubelet drops the ListAndWatch stream (connection closed, no restart) → capacity back (real device manager)", suite: "M", bench: "BenchmarkStreamDropToCapacity",
		metrics: []metric{{"p50", "ms-p50", 1, " ms"}, {"max", "ms-max", 1, " ms"}}, note: "the 1 s stream grace window is most of it"},
	{what: "CDI spec generation through nvcdi, dgx-h100 (at start; after a reload or re-scan that changed the GPUs)", suite: "O", bench: "BenchmarkGenerate/dgx-h100",
		metrics: []metric{{"mean", "ns/op", 1e-6, " ms"}, allocs}, note: "needs root (device nodes in the driver root); skipped otherwise"},
	{what: "CDI spec generation through nvcdi, dgx-a100-mig (8 GPUs, 17 MIG devices)", suite: "O", bench: "BenchmarkGenerate/dgx-a100-mig",
		metrics: []metric{{"mean", "ns/op", 1e-6, " ms"}, allocs}},
}
