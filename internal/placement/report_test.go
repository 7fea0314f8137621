package placement

import (
	"math/bits"
	"math/rand/v2"
	"os"
	"testing"
)

// TestFragmentationReport simulates a seeded stream of 10,000 events on the
// 8-GPU DGX-1 and the 16-GPU two-board node, once with Select and once with
// a first-fit baseline (the lowest free indices), and logs:
//
//   - served / rejected: requests that fit the free GPU count or not (the
//     same for both policies: it depends only on sizes);
//   - vs-free: mean over served requests of size ≥ 2 of score(chosen) /
//     score(best set among the GPUs free at that moment). Select is 1 by
//     construction; it measures what a policy gives up at each request;
//   - vs-empty: mean of score(chosen) / score(best set of that size on an
//     empty node). Below 1 it measures fragmentation: what earlier choices
//     cost this request;
//   - NVLink-able: served requests whose size admits a fully NVLinked set
//     (every pair ≥ 1 NVLink) on the empty node, i.e. one that better
//     earlier choices could have kept free, as a free count ≥ size always
//     fits it in some arrangement. Of those: got = the chosen set is fully
//     NVLinked; gone = no fully NVLinked set was left among the free GPUs
//     (earlier choices fragmented the node); passed = one was left but the
//     policy chose another set (Select may, as it maximises total links,
//     not their minimum).
//
// It runs only with PLACEMENT_REPORT=1:
//
//	PLACEMENT_REPORT=1 go test -run TestFragmentationReport -v ./internal/placement/
func TestFragmentationReport(t *testing.T) {
	if os.Getenv("PLACEMENT_REPORT") == "" {
		t.Skip("set PLACEMENT_REPORT=1 to run the fragmentation simulation")
	}
	for _, f := range []fixture{dgx1(t), dgx1Boards(t, 2)} {
		for _, policy := range []string{"select", "first-fit"} {
			st := simulate(t, f, policy, 10000)
			t.Logf("%-7s %-9s served %5d rejected %4d | vs-free %.4f vs-empty %.4f | NVLink-able %4d: got %4d gone %4d passed %3d",
				f.name, policy, st.served, st.rejected, st.vsFree/float64(st.scored), st.vsEmpty/float64(st.scored),
				st.cliqueable, st.gotClique, st.gone, st.passed)
			for _, size := range []int{2, 4, 8} {
				if c := st.bySize[size]; c != nil {
					t.Logf("%-7s %-9s   size %d: NVLink-able %4d, got %4d, gone %4d", f.name, policy, size, c[0], c[1], c[2])
				}
			}
		}
	}
}

type simStats struct {
	bySize                              map[int]*[3]int // size → NVLink-able, got, gone
	served, rejected, scored            int
	vsFree, vsEmpty                     float64
	cliqueable, gotClique, gone, passed int
}

func simulate(t *testing.T, f fixture, policy string, events int) simStats {
	n := f.topo.Len()
	all := uint64(1)<<uint(n) - 1
	r := rand.New(rand.NewPCG(2024, uint64(n)))
	sizes := []int{1, 2, 4, 8}
	best := func(free uint64, size int) int64 {
		set, _ := f.topo.solve(free, 0, size)
		return f.topo.inside(set)
	}
	emptyBest := map[int]int64{}
	emptyClique := map[int]bool{}
	for _, s := range sizes {
		emptyBest[s] = best(all, s)
		emptyClique[s] = hasClique(f.topo, all, s)
	}
	st := simStats{bySize: map[int]*[3]int{}}
	var live []uint64
	free := all
	for range events {
		if len(live) > 0 && r.IntN(2) == 0 {
			k := r.IntN(len(live))
			free |= live[k]
			live = append(live[:k], live[k+1:]...)
			continue
		}
		size := sizes[r.IntN(len(sizes))]
		if size > bits.OnesCount64(free) {
			st.rejected++
			continue
		}
		st.served++
		var set uint64
		if policy == "select" {
			set, _ = f.topo.solve(free, 0, size)
		} else {
			for m := free; bits.OnesCount64(set) < size; m &= m - 1 {
				set |= m & -m
			}
		}
		if size >= 2 {
			got := float64(f.topo.inside(set))
			st.scored++
			st.vsFree += ratio(got, best(free, size))
			st.vsEmpty += ratio(got, emptyBest[size])
			if emptyClique[size] {
				if st.bySize[size] == nil {
					st.bySize[size] = new([3]int)
				}
				st.bySize[size][0]++
				st.cliqueable++
				switch {
				case isClique(f.topo, set):
					st.gotClique++
					st.bySize[size][1]++
				case !hasClique(f.topo, free, size):
					st.gone++
					st.bySize[size][2]++
				default:
					st.passed++
				}
			}
		}
		free &^= set
		live = append(live, set)
	}
	return st
}

// ratio is got/best, or 1 when nothing scores (all pairs weigh 0).
func ratio(got float64, best int64) float64 {
	if best == 0 {
		return 1
	}
	return got / float64(best)
}

// isClique reports whether every pair of set has at least one NVLink.
func isClique(t *Topology, set uint64) bool {
	for a := set; a != 0; a &= a - 1 {
		for b := a & (a - 1); b != 0; b &= b - 1 {
			if t.Weight(bits.TrailingZeros64(a), bits.TrailingZeros64(b)) < NVLinkWeight {
				return false
			}
		}
	}
	return true
}

// hasClique reports whether some size-subset of free is fully NVLinked.
func hasClique(t *Topology, free uint64, size int) bool {
	var rec func(cands, set uint64, k int) bool
	rec = func(cands, set uint64, k int) bool {
		if k == 0 {
			return true
		}
		for m := cands; m != 0; m &= m - 1 {
			v := bits.TrailingZeros64(m)
			if isClique(t, set|1<<uint(v)) && rec(m&(m-1), set|1<<uint(v), k-1) {
				return true
			}
		}
		return false
	}
	return rec(free, 0, size)
}
