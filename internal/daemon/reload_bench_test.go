package daemon

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// BenchmarkReloadLatency measures a config change from the file's rename
// until the stand-in kubelet has received the new ListAndWatch list (8
// GPUs, replicas alternating 2 and 3, so every reload changes 16 ↔ 24
// devices on the open stream). "debounce=100ms" is the daemon's default;
// "debounce=0" shows the cost of the pipeline itself.
func BenchmarkReloadLatency(b *testing.B) {
	for _, debounce := range []time.Duration{defaultReloadDebounce, -1} {
		name := "debounce=" + debounce.String()
		if debounce < 0 {
			name = "debounce=0"
		}
		b.Run(name, func(b *testing.B) {
			dir, err := os.MkdirTemp("", "gpb")
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { os.RemoveAll(dir) })
			e := &rlEnv{t: b, dir: dir, cfgPath: dir + "/config.yaml", logs: &testkit.Buffer{}, debounce: debounce}
			e.write(tsConfig)
			e.start("dgx-h100")
			e.waitCapacity("nvidia.com/gpu", 16, 16)
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				replicas := 3 - i%2
				start := time.Now()
				e.write(strings.Replace(tsConfig, "replicas: 2", fmt.Sprintf("replicas: %d", replicas), 1))
				e.waitCapacity("nvidia.com/gpu", 8*replicas, 8*replicas)
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}

// BenchmarkRescan measures one periodic re-scan of dgx-a100-mig (8 GPUs,
// 5 of them MIG-partitioned into 16 devices) through the simulated NVML:
// "unchanged" is the steady state (scan and compare); "changed" also
// re-partitions GPU 3 each time and builds and hands over the new
// resources.
func BenchmarkRescan(b *testing.B) {
	cfg, _, err := config.Load("gpu-plugin", []string{"--simulate=dgx-a100-mig", "--mig-strategy=mixed", "--metrics-address=",
		"--node-labels=false", "--kubelet-socket-dir=" + b.TempDir()}, func(string) string { return "" }, io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	d, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	r := d.rl
	r.adv = d.adv
	b.Run("unchanged", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			r.rescan()
		}
		if st := d.ReloadStatus(); st.Rescans["changed"] != 0 || st.Rescans["failure"] != 0 {
			b.Fatalf("re-scans: %v", st.Rescans)
		}
	})
	layouts := [][]string{{"3g.20gb", "3g.20gb"}, {"7g.40gb"}}
	b.Run("changed", func(b *testing.B) {
		b.ReportAllocs()
		before := d.ReloadStatus().Rescans["changed"]
		for i := 0; i < b.N; i++ {
			if err := d.node.SetMIGLayout(3, true, layouts[i%2]); err != nil {
				b.Fatal(err)
			}
			r.rescan()
		}
		if got := d.ReloadStatus().Rescans["changed"] - before; got != uint64(b.N) {
			b.Fatalf("%d of %d re-scans saw the change", got, b.N)
		}
	})
}
