package kubelet

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	resourcev1 "k8s.io/api/resource/v1"
)

// reportPercentiles reports p50, p99 and max in milliseconds.
func reportPercentiles(b *testing.B, took []time.Duration) {
	if len(took) == 0 {
		return
	}
	slices.Sort(took)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(took[len(took)/2]), "p50-ms")
	b.ReportMetric(ms(took[len(took)*99/100]), "p99-ms")
	b.ReportMetric(ms(took[len(took)-1]), "max-ms")
}

// BenchmarkDRA measures the DRA plugin under the real kubelet DRA manager,
// with the API shim validating every ResourceSlice write:
//
//   - prepare: the kubelet's PrepareResources for a pod with a new 1-GPU
//     claim (its claim read, NodePrepareResources over gRPC, the claim read
//     from the API, the CDI spec and the checkpoint written), dgx-h100;
//   - xid-to-slice: an XID on a GPU → the device's taint in the API's
//     ResourceSlice, dgx-h100;
//   - publish-dgx-a100-mig: a health change on one GPU → the node's whole
//     slice (every MIG and whole-GPU device) rewritten and stored.
//
// Each is an isolated event: between iterations the daemon's API client
// is given a second to refill its rate limit (client-go's 5 requests/s,
// burst 10), which events in quick succession share.
//
//	cd tests/kubelet && go test -exec "$PWD/nsexec.sh" -run '^$' -bench '^BenchmarkDRA$' -benchtime 30x
func BenchmarkDRA(b *testing.B) {
	requireKubeletNamespace(b)
	settle := func() { time.Sleep(time.Second) }
	rig := func(b *testing.B, profile string) (*draKubelet, *plugin) {
		tmp := b.TempDir()
		reg, plugins := filepath.Join(tmp, "registry"), filepath.Join(tmp, "plugins")
		k := startDRAKubelet(b, reg)
		p := draDaemon(b, k, reg, plugins, "--allocation-mode=dra", "--simulate="+profile)
		k.waitRegistered(draDriver)
		k.waitSlices("a slice", func(s []resourcev1.ResourceSlice) bool { return len(s) == 1 })
		return k, p
	}
	b.Run("prepare", func(b *testing.B) {
		k, p := rig(b, "dgx-h100")
		dev := fmt.Sprintf("gpu-%d", p.d.Inventory().GPUs[1].Minor)
		var took []time.Duration
		i := 0
		for b.Loop() {
			b.StopTimer()
			name := fmt.Sprintf("c%d", i)
			i++
			k.claim(draNamespace, name, draResult(dev))
			pod := k.pod("p"+name, name)
			b.StartTimer()
			start := time.Now()
			if err := k.prepare(pod); err != nil {
				b.Fatal(err)
			}
			took = append(took, time.Since(start))
			b.StopTimer()
			if err := k.unprepare(pod); err != nil {
				b.Fatal(err)
			}
			settle()
			b.StartTimer()
		}
		reportPercentiles(b, took)
	})
	b.Run("xid-to-slice", func(b *testing.B) {
		k, p := rig(b, "dgx-h100")
		g := p.d.Inventory().GPUs[3]
		dev := fmt.Sprintf("gpu-%d", g.Minor)
		tainted := func(want bool) func([]resourcev1.ResourceSlice) bool {
			return func(s []resourcev1.ResourceSlice) bool {
				d := sliceDevice(s, dev)
				return d != nil && (len(d.Taints) > 0) == want
			}
		}
		var took []time.Duration
		for b.Loop() {
			start := time.Now()
			if _, err := p.d.SimNode().InjectXID(3, 48, -1, -1); err != nil {
				b.Fatal(err)
			}
			k.waitSlices("the taint", tainted(true))
			took = append(took, time.Since(start))
			b.StopTimer()
			p.d.Health().SetHealthy(g.UUID, "benchmark: recovered")
			k.waitSlices("no taint", tainted(false))
			settle()
			b.StartTimer()
		}
		reportPercentiles(b, took)
	})
	b.Run("publish-dgx-a100-mig", func(b *testing.B) {
		k, p := rig(b, "dgx-a100-mig")
		g := p.d.Inventory().GPUs[0]
		var took []time.Duration
		devices := 0
		for i := 0; b.Loop(); i++ {
			gen := k.slices()[0].Spec.Pool.Generation
			start := time.Now()
			if i%2 == 0 {
				p.d.Health().SetUnhealthy(g.UUID, "benchmark: quarantined")
			} else {
				p.d.Health().SetHealthy(g.UUID, "benchmark: recovered")
			}
			s := k.waitSlices("the slice rewritten", func(s []resourcev1.ResourceSlice) bool { return len(s) == 1 && s[0].Spec.Pool.Generation > gen })
			took = append(took, time.Since(start))
			devices = len(s[0].Spec.Devices)
			b.StopTimer()
			settle()
			b.StartTimer()
		}
		b.ReportMetric(float64(devices), "devices")
		reportPercentiles(b, took)
	})
}
