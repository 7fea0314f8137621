package telemetry_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// simEnv is the exporter on a simulated node, through the production NVML
// backend and the simulator's real code path, on a manual clock.
type simEnv struct {
	clk       *testkit.Clock
	node      *sim.Node
	lib       *nvml.Library
	inv       *nvml.Inventory
	sampler   *telemetry.Sampler
	collector *telemetry.Collector
	stats     *telemetry.StatsCollector
	backend   *nvmlbackend.Backend
	pods      atomic.Pointer[podresources.Snapshot]
	xids      atomic.Pointer[map[int]uint64]
}

type envOptions struct {
	metrics      *telemetry.MetricSet
	roundTimeout time.Duration
	noPods       bool
	// onDeviceError is the sampler's OnDeviceError.
	onDeviceError func(key string, err error)
	// before runs after the inventory scan, before anything samples
	// (to replace a mock function).
	before func(*simEnv)
	// attributor, if set, turns on per-pod accounting with what it
	// returns for the environment.
	attributor  func(*simEnv) telemetry.Attributor
	perPodDCGM  bool // the collector's PerPodDCGM
	virtualGPUs bool // and VirtualGPUs
}

func newSimEnv(t testing.TB, profile string, o envOptions) *simEnv {
	t.Helper()
	p, err := sim.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	e := &simEnv{clk: newClock()}
	e.node = sim.NewNode(p, e.clk.Now)
	if e.lib, err = nvml.Open(e.node.NVML()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.lib.Close() })
	if e.inv, err = nvml.Scan(e.lib, nvml.ScanOptions{}); err != nil {
		t.Fatal(err)
	}
	if o.before != nil {
		o.before(e)
	}
	none := map[int]uint64{}
	e.xids.Store(&none)
	backend := nvmlbackend.New(nvmlbackend.Options{Lib: e.lib, XIDs: func() map[int]uint64 { return *e.xids.Load() }})
	e.backend = backend
	t.Cleanup(func() { backend.Close() })
	var attr telemetry.Attributor
	if o.attributor != nil {
		attr = o.attributor(e)
	}
	e.sampler = telemetry.NewSampler(telemetry.SamplerOptions{
		Attributor: attr,
		Inventory:  func() *nvml.Inventory { return e.inv },
		Backends:   telemetry.Selection{Configured: "auto", Fallback: backend},
		Metrics:    o.metrics, Interval: time.Second, RoundTimeout: o.roundTimeout, Now: e.clk.Now,
		OnDeviceError: o.onDeviceError,
	})
	e.pods.Store(&podresources.Snapshot{ByUnit: map[string][]podresources.Holder{}})
	opts := telemetry.CollectorOptions{Sampler: e.sampler, Hostname: "node-1", Now: e.clk.Now, PerPodDCGM: o.perPodDCGM, VirtualGPUs: o.virtualGPUs}
	if !o.noPods {
		opts.Pods = func() *podresources.Snapshot { return e.pods.Load() }
	}
	e.collector = telemetry.NewCollector(opts)
	e.stats = telemetry.NewStatsCollector(e.sampler, e.clk.Now)
	return e
}

func (e *simEnv) sample() { e.sampler.SampleOnce(context.Background()) }

func (e *simEnv) setTelemetry(t testing.TB, gpu int, p sim.TelemetryPatch) {
	t.Helper()
	if err := e.node.SetTelemetry(gpu, p); err != nil {
		t.Fatal(err)
	}
}

func (e *simEnv) setPods(byUnit map[string][]podresources.Holder) {
	e.pods.Store(&podresources.Snapshot{ByUnit: byUnit, Taken: e.clk.Now()})
}

func ptr[T any](v T) *T { return &v }
