package daemon_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
)

// BenchmarkConcurrentScrapes builds the gpu-plugin binary and runs it on
// the simulated dgx-a100-mig node against a stand-in kubelet; then 1, 200
// or 1,000 clients scrape /metrics at once, SCRAPE_ROUNDS (default 5)
// times each, back to back, with gzip as Prometheus asks. It reports the
// latency p50/p99 over all scrapes, the daemon's peak RSS (VmHWM, a fresh
// process per client count) and the scrapes refused (503) or failed.
// SCRAPE_BIN=path measures that binary instead of building this tree.
//
//	go test -run '^$' -bench ConcurrentScrapes -benchtime 1x ./internal/daemon/
func BenchmarkConcurrentScrapes(b *testing.B) {
	rounds := 5
	if s := os.Getenv("SCRAPE_ROUNDS"); s != "" {
		if _, err := fmt.Sscan(s, &rounds); err != nil || rounds < 1 {
			b.Fatalf("SCRAPE_ROUNDS=%q: want a positive number", s)
		}
	}
	// SCRAPE_BIN measures another build (e.g. an older commit's) instead.
	bin := os.Getenv("SCRAPE_BIN")
	if bin == "" {
		bin = buildDaemon(b)
	}
	for _, clients := range []int{1, 200, 1000} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			for b.Loop() {
				scrapeLoad(b, bin, clients, rounds)
			}
		})
	}
}

func scrapeLoad(b *testing.B, bin string, clients, rounds int) {
	kdir := socketDir(b)
	k, err := fakekubelet.Start(kdir, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer k.Stop()
	addr := freeLoopbackAddr(b)
	cmd, logs, stop := startDaemon(b, bin, "--simulate=dgx-a100-mig", "--kubelet-socket-dir="+kdir, "--metrics-address="+addr,
		"--pod-resources-socket=", "--node-labels=false", "--node-name=bench")
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := k.WaitFor(ctx, func(k *fakekubelet.Kubelet) bool { return len(k.Resources()) > 0 }); err != nil {
		b.Fatalf("the daemon did not register: %v\n%s", err, logs.String())
	}

	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: clients, MaxConnsPerHost: 0}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: time.Minute}
	url := "http://" + addr + "/metrics"
	var (
		mu      sync.Mutex
		lat     []time.Duration
		refused int
		failed  int
		size    int64
	)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range rounds {
				req, _ := http.NewRequest(http.MethodGet, url, nil)
				req.Header.Set("Accept-Encoding", "gzip")
				t0 := time.Now()
				resp, err := client.Do(req)
				var n int64
				code := 0
				if err == nil {
					n, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					code = resp.StatusCode
				}
				took := time.Since(t0)
				mu.Lock()
				switch {
				case code == http.StatusOK:
					lat = append(lat, took)
					size = n
				case code == http.StatusServiceUnavailable:
					refused++
				default:
					failed++
				}
				mu.Unlock()
			}
		}()
	}
	close(start)
	wg.Wait()
	hwm := procStatus(b, cmd.Process.Pid, "VmHWM")
	if len(lat) == 0 {
		b.Fatalf("no scrape succeeded (%d refused, %d failed)\n%s", refused, failed, logs.String())
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(hwm/1024, "VmHWM-MB")
	b.ReportMetric(float64(refused), "refused")
	b.ReportMetric(float64(failed), "failed")
	b.ReportMetric(float64(size), "gzip-bytes")
}
