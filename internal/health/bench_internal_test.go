package health

import (
	"context"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// BenchmarkMonitorEvents measures the monitor's cost per event: XIDs fed
// through a go-nvml mock event set, half fatal (repeats on an unhealthy
// GPU), half skipped, as in an XID storm.
//
//	go test -run '^$' -bench MonitorEvents -benchmem ./internal/health
func BenchmarkMonitorEvents(b *testing.B) {
	n := newMockNode(b)
	r := runMonitor(b, MonitorOptions{Lib: n.lib, Inventory: fixed(n.inv), Recovery: RecoverNever,
		ProbeInterval: time.Hour, WaitTimeout: 500 * time.Millisecond})
	r.waitStatus(b, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	b.ReportAllocs()
	b.ResetTimer()
	done := uint64(0)
	for done < uint64(b.N) {
		batch := min(uint64(b.N)-done, uint64(cap(n.events)/2))
		for i := uint64(0); i < batch; i++ {
			if i%2 == 0 {
				n.xid(0, 48)
			} else {
				n.xid(0, 13)
			}
		}
		done += batch
		// WaitFor wakes on probe rounds and mode changes only, and there
		// are none in an hour: watch the counter instead.
		for eventsSeen(r.m) < done {
			runtime.Gosched()
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

func eventsSeen(m *Monitor) uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st.Events
}

// TestIdleMonitorCost measures what an idle monitor costs on a simulated
// dgx-h100 with the default settings (probe every 5 s, 200 ms waits): CPU
// time per second of the whole test process, against the same window
// without the monitor, and goroutines. Opt-in, it takes 2 × the window:
//
//	GPU_PLUGIN_MEASURE_IDLE=10s go test -run IdleMonitorCost -v ./internal/health
func TestIdleMonitorCost(t *testing.T) {
	window, err := time.ParseDuration(os.Getenv("GPU_PLUGIN_MEASURE_IDLE"))
	if err != nil || window <= 0 {
		t.Skip("set GPU_PLUGIN_MEASURE_IDLE to a duration (e.g. 10s) to measure the idle monitor's cost")
	}
	_, lib, inv := simNode(t, "dgx-h100")
	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			t.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	measure := func() (perSecond time.Duration) {
		runtime.GC()
		c0, t0 := cpu(), time.Now()
		time.Sleep(window) // the thing measured is idleness itself
		return time.Duration(float64(cpu()-c0) / time.Since(t0).Seconds())
	}
	goroutines0 := runtime.NumGoroutine()
	baseline := measure()

	ctx, cancel := context.WithCancel(context.Background())
	m := NewMonitor(MonitorOptions{Lib: lib, Inventory: fixed(inv), State: NewState(nil, nil)})
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	if err := m.WaitFor(ctxT(t), func(s MonitorStatus) bool { return s.Mode == ModeEvents && s.ProbeRounds > 0 }); err != nil {
		t.Fatal(err)
	}
	goroutines1 := runtime.NumGoroutine()
	calls0, _ := lib.Stats()
	withMonitor := measure()
	calls1, _ := lib.Stats()
	cancel()
	<-done
	t.Logf("idle monitor over %s: process CPU %s/s with it, %s/s without (monitor ≈ %s/s = %.4f%% of one core); "+
		"goroutines %d → %d while running (+%d); NVML calls %.1f/s",
		window, withMonitor, baseline, withMonitor-baseline, 100*float64(withMonitor-baseline)/float64(time.Second),
		goroutines0, goroutines1, goroutines1-goroutines0, float64(calls1-calls0)/window.Seconds())
}
