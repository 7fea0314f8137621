package telemetry_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podusage"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// perPodNode turns on per-pod accounting for a benchmark: n pods, each
// running one compute process, spread round-robin over the node's units
// (time-sliced beyond one per unit), with a /proc of their cgroups.
type perPodNode struct {
	proc string
	dir  *podusage.Directory
	pods int
}

func newPerPodNode(tb testing.TB, pods int) *perPodNode {
	return &perPodNode{proc: tb.TempDir(), dir: podusage.NewDirectory(), pods: pods}
}

// options are the environment's: an Accountant over its pod snapshot,
// and per-pod DCGM series too (the heavier exposition).
func (p *perPodNode) options() envOptions {
	return envOptions{perPodDCGM: true, attributor: func(e *simEnv) telemetry.Attributor {
		return podusage.NewAccountant(podusage.Options{
			Resolver: podusage.NewResolver(p.proc), Directory: p.dir,
			Holders: func() *podresources.Snapshot { return e.pods.Load() },
		})
	}}
}

// place allocates the pods and starts their processes.
func (p *perPodNode) place(tb testing.TB, e *simEnv) {
	targets := e.sampler.Snapshot().Layout.Targets
	by := map[string][]podresources.Holder{}
	procs := map[int][]sim.Process{}
	p.dir.MarkSynced()
	for i := range p.pods {
		t := targets[i%len(targets)]
		uid := fmt.Sprintf("%08x-0000-4000-8000-000000000000", i)
		name := fmt.Sprintf("job-%04d-0", i)
		cid := strings.Repeat(fmt.Sprintf("%x", i%16), 64)
		p.dir.Set(podusage.Pod{UID: uid, Namespace: "team", Name: name, Containers: map[string]string{cid: "main"}})
		h := podresources.Holder{Namespace: "team", Pod: name, Container: "main", Resource: "nvidia.com/gpu", DeviceIDs: []string{t.Key}}
		if p.pods > len(targets) { // time-sliced: replica IDs, as the kubelet lists them
			h.DeviceIDs = []string{t.Key + "::" + strconv.Itoa(i/len(targets))}
		}
		by[t.Key] = append(by[t.Key], h)
		pid := 1000 + i
		dir := filepath.Join(p.proc, fmt.Sprint(pid))
		must(tb, os.MkdirAll(dir, 0o755))
		must(tb, os.WriteFile(filepath.Join(dir, "cgroup"), []byte("0::/kubepods/besteffort/pod"+uid+"/"+cid+"\n"), 0o644))
		must(tb, os.WriteFile(filepath.Join(dir, "stat"), fmt.Appendf(nil, "%d (python) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 %d 0 0\n", pid, pid), 0o644))
		sp := sim.Process{PID: uint32(pid), UsedMiB: 64, SMUtil: uint32(1 + i%20)}
		if t.MIG != nil {
			sp.MIG, sp.SMUtil = t.MIG.UUID, 0
		}
		procs[t.GPU.Index] = append(procs[t.GPU.Index], sp)
	}
	e.setPods(by)
	for gpu, list := range procs {
		must(tb, e.node.SetProcesses(gpu, list))
	}
}

func must(tb testing.TB, err error) {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkScrapeAfterRound is the first scrape after each sampling round
// with per-pod accounting on: the one that labels the round's per-pod
// series (later scrapes of the same round reuse them). The round itself
// is not timed.
//
//	go test -run '^$' -bench ScrapeAfterRound -benchmem ./internal/telemetry/
func BenchmarkScrapeAfterRound(b *testing.B) {
	for _, tc := range []struct {
		profile string
		pods    int
		virtual bool // VirtualGPUs
	}{{"dgx-h100", 80, false}, {"testdata/dgx-a100-56mig.yaml", 1000, false}, {"dgx-h100", 80, true}} {
		name := fmt.Sprintf("%s/pods=%d", tc.profile, tc.pods)
		if tc.virtual {
			name += "/virtual-gpus"
		}
		b.Run(name, func(b *testing.B) {
			pp := newPerPodNode(b, tc.pods)
			opts := pp.options()
			opts.virtualGPUs = tc.virtual
			e := newSimEnv(b, tc.profile, opts)
			e.sample()
			pp.place(b, e)
			var buf bytes.Buffer
			lat := make([]time.Duration, 0, 1024)
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				e.clk.Advance(time.Second)
				e.sample()
				buf.Reset()
				b.StartTimer()
				start := time.Now()
				e.collector.WriteText(&buf)
				lat = append(lat, time.Since(start))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}

// TestPerPodDCGMSeriesOptIn: per-pod accounting alone leaves the DCGM
// families one series per device (sums over them stay right); the
// per-pod DCGM series come only with PerPodDCGM.
func TestPerPodDCGMSeriesOptIn(t *testing.T) {
	for _, dcgm := range []bool{false, true} {
		pp := newPerPodNode(t, 16)
		opts := pp.options()
		opts.perPodDCGM = dcgm
		e := newSimEnv(t, "dgx-h100", opts)
		e.sample()
		pp.place(t, e)
		e.clk.Advance(time.Second)
		e.sample()
		var b bytes.Buffer
		e.collector.WriteText(&b)
		perPod := 0
		for _, l := range strings.Split(b.String(), "\n") {
			if strings.HasPrefix(l, "DCGM_") && strings.Contains(l, `pod_uid="`) {
				perPod++
			}
		}
		// 16 pods on 8 GPUs: FB_USED and GPU_UTIL each.
		if want := map[bool]int{false: 0, true: 32}[dcgm]; perPod != want {
			t.Errorf("PerPodDCGM %v: %d per-pod DCGM series, want %d", dcgm, perPod, want)
		}
		if !strings.Contains(b.String(), telemetry.PodSMUtilName+"{") {
			t.Errorf("PerPodDCGM %v: no %s series", dcgm, telemetry.PodSMUtilName)
		}
	}
}
