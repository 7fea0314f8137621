package kubelet

import (
	"slices"
	"testing"
	"time"
)

// Time from daemon.New (the process's first real step) to the real device
// manager reporting all GPUs of a simulated dgx-h100 allocatable. Each
// iteration is a fresh daemon against one running manager; shutting it
// down is not timed.
//
//	cd tests/kubelet && go test -exec "$PWD/nsexec.sh" -run '^$' -bench StartToCapacity -benchtime 20x
func BenchmarkDaemonStartToCapacity(b *testing.B) {
	k := startKubelet(b)
	var newTotal time.Duration
	var took []time.Duration
	for b.Loop() {
		start := time.Now()
		p := startPlugin(b)
		newTotal += time.Since(start) // daemon.New: profile, simulated NVML, scan
		k.waitCapacity(gpuResource, dgxH100)
		took = append(took, time.Since(start))

		b.StopTimer()
		if err := p.stop(); err != nil {
			b.Fatal(err)
		}
		// The manager must see the endpoint go before the next daemon comes.
		k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 0})
		b.StartTimer()
	}
	b.ReportMetric(float64(newTotal.Microseconds())/float64(b.N)/1000, "ms-new/op")
	reportSpread(b, took)
}

// Time from a kubelet restart (old manager stopped, new one created and
// started, which deletes our socket) to the new manager reporting all GPUs
// again.
//
//	cd tests/kubelet && go test -exec "$PWD/nsexec.sh" -run '^$' -bench RestartToCapacity -benchtime 20x
func BenchmarkKubeletRestartToCapacity(b *testing.B) {
	k := startKubelet(b)
	p := startPlugin(b)
	k.waitCapacity(gpuResource, dgxH100)
	p.waitRegistered("first registration")
	var took []time.Duration
	for b.Loop() {
		start := time.Now()
		k.restart()
		k.waitCapacity(gpuResource, dgxH100)
		took = append(took, time.Since(start))

		// Capacity shows before our Register call returns; let it return
		// before the next restart.
		b.StopTimer()
		p.waitRegistered("after a restart")
		b.StartTimer()
	}
	reportSpread(b, took)
}

// reportSpread adds the median and the slowest iteration: a mean hides a
// registration that waited for a retry.
func reportSpread(b *testing.B, took []time.Duration) {
	if len(took) == 0 {
		return
	}
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(took[len(took)-1].Microseconds())/1000, "ms-max")
}

// BenchmarkStreamDropToCapacity: the real device manager's connection to
// our plugin is closed under a running kubelet (as when its receive fails);
// the time until its capacity is allocatable again. The daemon's 1 s
// stream grace window (plugin.Options.StreamGrace) is most of it.
func BenchmarkStreamDropToCapacity(b *testing.B) {
	k := startKubelet(b)
	p := startPlugin(b, "--rescan-interval=0")
	k.waitCapacity(gpuResource, dgxH100)
	p.waitRegistered("first registration")
	var took []time.Duration
	for b.Loop() {
		start := time.Now()
		if n := closePluginConnections(b, p.socket(gpuResource)); n == 0 {
			b.Fatalf("found no kubelet connection on %s to close", p.socket(gpuResource))
		}
		k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 0})
		k.waitCapacity(gpuResource, dgxH100)
		took = append(took, time.Since(start))
		b.StopTimer()
		p.waitRegistered("after a dropped stream")
		b.StartTimer()
	}
	reportSpread(b, took)
}
