package telemetry_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// discard is a ResponseWriter that keeps nothing.
type discard struct {
	h http.Header
	n int
}

func (d *discard) Header() http.Header { return d.h }
func (d *discard) Write(p []byte) (int, error) {
	d.n += len(p)
	return len(p), nil
}
func (d *discard) WriteHeader(int) {}

// attribute gives n pods devices round-robin over the node's units (so
// beyond one pod per unit, devices are time-sliced).
func attribute(e *simEnv, n int) {
	units := make([]string, 0, len(e.sampler.Snapshot().Layout.Targets))
	for _, t := range e.sampler.Snapshot().Layout.Targets {
		units = append(units, t.Key)
	}
	by := map[string][]podresources.Holder{}
	for i := range n {
		u := units[i%len(units)]
		by[u] = append(by[u], podresources.Holder{Namespace: "team-" + strconv.Itoa(i%7), Pod: fmt.Sprintf("job-%04d-0", i), Container: "main", Resource: "nvidia.com/mig-1g.5gb"})
	}
	e.setPods(by)
}

// BenchmarkScrape measures a whole /metrics request of the telemetry
// families through telemetry.Handler, as the daemon serves it (gather of
// the sampler's own metrics, DCGM_* families from WriteText), and reports
// p50/p99 latency; allocations are per scrape. gzip=1 asks for compression
// as Prometheus does.
//
//	go test -run '^$' -bench Scrape -benchmem ./internal/telemetry/
func BenchmarkScrape(b *testing.B) {
	for _, tc := range []struct {
		profile string
		pods    int
		gzip    bool
		perPod  bool // per-pod accounting: each pod runs a process
		virtual bool // VirtualGPUs (with perPod)
	}{
		{"dgx-h100", 0, false, false, false},
		{"dgx-h100", 8, false, false, false},
		{"dgx-h100", 8, true, false, false},
		{"dgx-h100", 80, false, true, false},
		// dcgm-exporter's --kubernetes-virtual-gpus shape: 8 GPUs × 10
		// replicas, each held by one of 80 pods.
		{"dgx-h100", 80, false, true, true},
		{"testdata/dgx-a100-56mig.yaml", 0, false, false, false},
		{"testdata/dgx-a100-56mig.yaml", 100, false, false, false},
		{"testdata/dgx-a100-56mig.yaml", 1000, false, false, false},
		{"testdata/dgx-a100-56mig.yaml", 100, true, false, false},
		{"testdata/dgx-a100-56mig.yaml", 1000, false, true, false},
	} {
		name := fmt.Sprintf("%s/pods=%d/gzip=%v", tc.profile, tc.pods, tc.gzip)
		if tc.perPod {
			name += "/per-pod"
		}
		if tc.virtual {
			name += "/virtual-gpus"
		}
		b.Run(name, func(b *testing.B) {
			var pp *perPodNode
			opts := envOptions{}
			if tc.perPod {
				pp = newPerPodNode(b, tc.pods)
				opts = pp.options()
				opts.virtualGPUs = tc.virtual
			}
			e := newSimEnv(b, tc.profile, opts)
			e.sample()
			if pp != nil {
				pp.place(b, e)
			} else {
				attribute(e, tc.pods)
			}
			e.clk.Advance(time.Second)
			e.sample() // GPM has values from the second round
			reg := prometheus.NewRegistry()
			reg.MustRegister(e.stats)
			h := telemetry.Handler(reg, e.collector, nil)
			req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
			if tc.gzip {
				req.Header.Set("Accept-Encoding", "gzip")
			}
			w := &discard{h: http.Header{}}
			h.ServeHTTP(w, req) // builds the cached view once
			lat := make([]time.Duration, 0, 1024)
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := rusage(b)
			for b.Loop() {
				start := time.Now()
				h.ServeHTTP(w, req)
				lat = append(lat, time.Since(start))
			}
			cpu := rusage(b) - cpu0
			b.StopTimer()
			// CPU time per scrape (GC included) does not depend on how busy
			// the machine is; wall-clock percentiles do.
			b.ReportMetric(float64(cpu.Microseconds())/1000/float64(len(lat)), "cpu-ms/scrape")
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(w.n)/float64(len(lat)+1), "bytes/scrape")
		})
	}
}

// BenchmarkSampleRound is the cost of one sampling round through the NVML
// backend (on the simulator: mock calls, no ioctls).
func BenchmarkSampleRound(b *testing.B) {
	for _, profile := range []string{"dgx-h100", "testdata/dgx-a100-56mig.yaml"} {
		b.Run(profile, func(b *testing.B) {
			e := newSimEnv(b, profile, envOptions{})
			b.ReportAllocs()
			for b.Loop() {
				e.clk.Advance(time.Second)
				e.sample()
			}
		})
	}
}

// BenchmarkSamplerCPU runs the sampler at its default 1 s interval for
// TELEMETRY_CPU_SECONDS (default 10) and reports the process CPU it used
// (getrusage, user + system) as a percentage of one core. The test binary
// runs nothing else meanwhile; the simulator's moq mocks record every call,
// which is included.
//
//	go test -run '^$' -bench SamplerCPU ./internal/telemetry/
func BenchmarkSamplerCPU(b *testing.B) {
	secs := 10
	if s, err := strconv.Atoi(os.Getenv("TELEMETRY_CPU_SECONDS")); err == nil && s > 0 {
		secs = s
	}
	for _, tc := range []struct {
		profile string
		procs   int // > 0: per-pod accounting, one pod per process
	}{{"dgx-h100", 0}, {"testdata/dgx-a100-56mig.yaml", 0}, {"dgx-h100", 100}} {
		name := tc.profile
		if tc.procs > 0 {
			name += fmt.Sprintf("/per-pod/processes=%d", tc.procs)
		}
		b.Run(name, func(b *testing.B) {
			var pp *perPodNode
			opts := envOptions{}
			if tc.procs > 0 {
				pp = newPerPodNode(b, tc.procs)
				opts = pp.options()
			}
			e := newSimEnv(b, tc.profile, opts)
			if pp != nil {
				e.sample()
				pp.place(b, e)
			}
			for b.Loop() {
				before := rusage(b)
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second)
				_ = e.sampler.Run(ctx)
				cancel()
				used := rusage(b) - before
				b.ReportMetric(100*used.Seconds()/float64(secs), "%core")
				b.ReportMetric(float64(e.sampler.Stats().Rounds), "rounds")
			}
		})
	}
}

func rusage(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
