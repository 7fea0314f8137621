package placement

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// Benchmarks. Run with
//
//	go test -run '^$' -bench . -benchmem ./internal/placement/
//
// "all" = every GPU free; "random" = a seeded stream of random available
// subsets (30-100% of the GPUs), sizes and occasional must-includes.

type request struct {
	avail, must []int
	size        int
}

// randomRequests draws count seeded requests on n GPUs; sizes is the menu of
// sizes to draw from (nil: any size), capped by what is available.
func randomRequests(seed uint64, n, count int, sizes []int) []request {
	r := rand.New(rand.NewPCG(seed, uint64(n)))
	var out []request
	for len(out) < count {
		avail := pick(r, n, 0.3+0.7*r.Float64())
		if len(avail) == 0 {
			continue
		}
		size := 1 + r.IntN(len(avail))
		if sizes != nil {
			size = sizes[r.IntN(len(sizes))]
			if size > len(avail) {
				continue
			}
		}
		var must []int
		if r.IntN(4) == 0 {
			must = []int{avail[r.IntN(len(avail))]}
		}
		out = append(out, request{avail, must, size})
	}
	return out
}

func allGPUs(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

func BenchmarkSelect(b *testing.B) {
	pcie16 := func() fixture { // 16 PCIe-only GPUs: 4 per switch, 2 switches per socket
		links := make([][]Link, 16)
		for i := range links {
			links[i] = make([]Link, 16)
			for j := range links[i] {
				switch {
				case i == j:
				case i/4 == j/4:
					links[i][j] = Link{PCIe: ProxPIX, SameNUMA: true}
				case i/8 == j/8:
					links[i][j] = Link{PCIe: ProxNODE, SameNUMA: true}
				}
			}
		}
		return newFixture(b, "pcie16", links)
	}
	fixtures := []fixture{dgx1(b), nvswitch(b), l4Box(b), pcie16(), dgx1Boards(b, 2), dgx1Boards(b, 4), dgx1Boards(b, 8)}
	for _, f := range fixtures {
		n := f.topo.Len()
		for _, size := range []int{1, 2, 4, 8, 16} {
			if size > n {
				continue
			}
			all := allGPUs(n)
			b.Run(fmt.Sprintf("%s/all/size=%d", f.name, size), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if _, err := f.topo.Select(all, nil, size); err != nil {
						b.Fatal(err)
					}
				}
			})
			reqs := randomRequests(uint64(size), n, 1000, []int{size})
			b.Run(fmt.Sprintf("%s/random/size=%d", f.name, size), func(b *testing.B) {
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					q := reqs[i%len(reqs)]
					i++
					if _, err := f.topo.Select(q.avail, q.must, q.size); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkSelectLatency reports the per-call latency distribution on
// random requests (random available subsets, any size, sometimes a
// must-include). ns/op is the plain mean over b.N calls. The custom metrics
// p50-ns, p99-ns and max-ns come from a fixed pass after the timed loop:
// each of 2000 requests is timed 5 times and its fastest run kept, so that
// preemption on a busy machine does not pose as search time.
func BenchmarkSelectLatency(b *testing.B) {
	for _, f := range []fixture{dgx1(b), dgx1Boards(b, 2), dgx1Boards(b, 4), randomFixture(b, 16), randomFixture(b, 32)} {
		b.Run(f.name, func(b *testing.B) {
			reqs := randomRequests(7, f.topo.Len(), 2000, nil)
			i := 0
			for b.Loop() {
				q := reqs[i%len(reqs)]
				i++
				if _, err := f.topo.Select(q.avail, q.must, q.size); err != nil {
					b.Fatal(err)
				}
			}
			times := make([]time.Duration, len(reqs))
			for k, q := range reqs {
				times[k] = time.Duration(1 << 62)
				for range 5 {
					start := time.Now()
					f.topo.Select(q.avail, q.must, q.size)
					times[k] = min(times[k], time.Since(start))
				}
			}
			slices.Sort(times)
			pct := func(p float64) float64 { return float64(times[int(p*float64(len(times)-1))].Nanoseconds()) }
			b.ReportMetric(pct(0.50), "p50-ns")
			b.ReportMetric(pct(0.99), "p99-ns")
			b.ReportMetric(pct(1), "max-ns")
		})
	}
}

// randomFixture is a seeded random topology of n GPUs (see randomLinks).
func randomFixture(tb testing.TB, n int) fixture {
	r := rand.New(rand.NewPCG(11, uint64(n)))
	return newFixture(tb, fmt.Sprintf("random%d", n), randomLinks(r, n))
}

// BenchmarkSelectShared places 2 replicas on a DGX-1 with 4 replicas per
// GPU, some in use, under each policy.
func BenchmarkSelectShared(b *testing.B) {
	topo := dgx1(b).topo
	units := replicas(4, 0, 1, 2, 3, 4, 5, 6, 7)
	avail := without(units, "g0r0", "g3r0", "g3r1", "g5r0")
	allocated := map[int]int{0: 1, 3: 2, 5: 1}
	for _, policy := range []Policy{Distributed, Packed} {
		b.Run(policy.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := topo.SelectShared(avail, nil, 2, allocated, policy); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
