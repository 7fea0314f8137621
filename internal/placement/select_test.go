package placement

import (
	"errors"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// bruteForce is the reference: it tries every subset S with must ⊆ S ⊆
// avail and |S| = size, straight from the definition of the objective —
// highest inside(S), then highest inside(avail \ S), then the
// lexicographically smallest index list — using only the Link matrix.
func bruteForce(links [][]Link, avail, must []int, size int) (best []int, primary, secondary int64) {
	inside := func(set []int) int64 {
		var s int64
		for a := 0; a < len(set); a++ {
			for b := a + 1; b < len(set); b++ {
				s += links[set[a]][set[b]].Weight()
			}
		}
		return s
	}
	avail = slices.Compact(slices.Sorted(slices.Values(avail)))
	var free []int
	for _, g := range avail {
		if !slices.Contains(must, g) {
			free = append(free, g)
		}
	}
	need := size - len(slices.Compact(slices.Sorted(slices.Values(must))))
	primary, secondary = -1, -1
	for m := uint64(0); m < 1<<len(free); m++ {
		if bits.OnesCount64(m) != need {
			continue
		}
		var set, rest []int
		for _, g := range avail {
			k := slices.Index(free, g)
			if k < 0 || m>>k&1 != 0 {
				set = append(set, g)
			} else {
				rest = append(rest, g)
			}
		}
		p, s := inside(set), inside(rest)
		// Subsets come in no useful order, so compare index lists too.
		if p > primary || p == primary && (s > secondary || s == secondary && slices.Compare(set, best) < 0) {
			best, primary, secondary = set, p, s
		}
	}
	return best, primary, secondary
}

// checkValid fails unless got is a valid answer: sorted, distinct, of the
// right size, within avail and containing must.
func checkValid(t testing.TB, what string, got, avail, must []int, size int) {
	t.Helper()
	if len(got) != size {
		t.Fatalf("%s: answer %v has %d GPUs, want size %d", what, got, len(got), size)
	}
	for i, g := range got {
		if i > 0 && got[i-1] >= g {
			t.Fatalf("%s: answer %v not strictly increasing", what, got)
		}
		if !slices.Contains(avail, g) {
			t.Fatalf("%s: answer %v has GPU %d, not in available %v", what, got, g, avail)
		}
	}
	for _, g := range must {
		if !slices.Contains(got, g) {
			t.Fatalf("%s: answer %v lacks must-include GPU %d", what, got, g)
		}
	}
}

// matchBruteForce runs Select and the reference and fails unless both give
// the identical set (so both scores agree too).
func matchBruteForce(t *testing.T, f fixture, avail, must []int, size int) {
	t.Helper()
	what := fmt.Sprintf("%s avail=%v must=%v size=%d", f.name, avail, must, size)
	got, err := f.topo.Select(avail, must, size)
	if err != nil {
		t.Fatalf("%s: Select: %v", what, err)
	}
	checkValid(t, what, got, avail, must, size)
	want, wp, ws := bruteForce(f.links, avail, must, size)
	// Check every search mode, whichever Select picked.
	am, mm, _ := f.topo.request(avail, must, size)
	for _, mode := range []searchMode{branchAndBound, enumerate, boundsOnly} {
		set, _ := f.topo.search(am, mm, size, mode, 0)
		if other := indices(set); !slices.Equal(other, want) {
			t.Fatalf("%s: search(mode %d) = %v, brute force = %v", what, mode, other, want)
		}
	}
	if !slices.Equal(got, want) {
		gp, _ := f.topo.Score(got)
		var rest []int
		for _, g := range slices.Compact(slices.Sorted(slices.Values(avail))) {
			if !slices.Contains(got, g) {
				rest = append(rest, g)
			}
		}
		gs, _ := f.topo.Score(rest)
		t.Fatalf("%s: Select = %v (primary %d, secondary %d), brute force = %v (primary %d, secondary %d)",
			what, got, gp, gs, want, wp, ws)
	}
}

func TestSelectMatchesBruteForceOnFixtures(t *testing.T) {
	fixtures := []fixture{dgx1(t), nvswitch(t), l4Box(t), dgx1Boards(t, 2)}
	for _, f := range fixtures {
		t.Run(f.name, func(t *testing.T) {
			n := f.topo.Len()
			all := make([]int, n)
			for i := range all {
				all[i] = i
			}
			// Every size with everything free, then seeded random requests.
			for size := 1; size <= n; size++ {
				matchBruteForce(t, f, all, nil, size)
			}
			r := rand.New(rand.NewPCG(1, uint64(n)))
			for range 200 {
				avail := pick(r, n, 0.3+0.7*r.Float64())
				if len(avail) == 0 {
					continue
				}
				size := 1 + r.IntN(len(avail))
				var must []int
				for _, g := range avail {
					if len(must) < size && r.IntN(6) == 0 {
						must = append(must, g)
					}
				}
				matchBruteForce(t, f, avail, must, size)
			}
		})
	}
}

func TestSelectMatchesBruteForceOnRandomTopologies(t *testing.T) {
	const cases = 600
	r := rand.New(rand.NewPCG(42, 7))
	for c := range cases {
		n := 2 + r.IntN(15)
		f := newFixture(t, fmt.Sprintf("random#%d(n=%d)", c, n), randomLinks(r, n))
		avail := pick(r, n, 0.4+0.6*r.Float64())
		if len(avail) == 0 {
			avail = []int{r.IntN(n)}
		}
		size := 1 + r.IntN(len(avail))
		var must []int
		for _, g := range avail {
			if len(must) < size && r.IntN(5) == 0 {
				must = append(must, g)
			}
		}
		// Shuffle and duplicate the input: the answer must not care.
		in := slices.Clone(avail)
		if len(in) > 1 {
			in = append(in, in[0])
		}
		r.Shuffle(len(in), func(i, j int) { in[i], in[j] = in[j], in[i] })
		matchBruteForce(t, f, in, must, size)
	}
}

func TestSelectHandChecked(t *testing.T) {
	d, l4, nvs := dgx1(t), l4Box(t), nvswitch(t)
	all8 := []int{0, 1, 2, 3, 4, 5, 6, 7}
	cases := []struct {
		name        string
		f           fixture
		avail, must []int
		size        int
		want        [][]int // any of these
	}{
		{"dgx1 quad from a free node is fully NVLinked", d, all8, nil, 4, [][]int{{0, 1, 2, 3}, {4, 5, 6, 7}}},
		{"dgx1 pair takes an NV2 link", d, all8, nil, 2, [][]int{{0, 3}, {0, 4}, {1, 2}, {1, 5}, {2, 3}, {4, 7}, {5, 6}, {6, 7}}},
		{"dgx1 must-include 5 pairs it with its NV2 peer", d, all8, []int{5}, 2, [][]int{{1, 5}, {5, 6}}},
		{"dgx1 quad with must-include 4 stays on its board", d, all8, []int{4}, 4, [][]int{{4, 5, 6, 7}}},
		{"dgx1 with 0 busy: quad on the other board", d, []int{1, 2, 3, 4, 5, 6, 7}, nil, 4, [][]int{{4, 5, 6, 7}}},
		{"l4 pair stays within NUMA 0", l4, []int{0, 1, 2, 3}, nil, 2, [][]int{{0, 1}}},
		{"l4 pair with 0 busy stays within NUMA 1", l4, []int{1, 2, 3}, nil, 2, [][]int{{2, 3}}},
		{"l4 must-include across sockets is honoured", l4, []int{0, 1, 2, 3}, []int{0, 2}, 2, [][]int{{0, 2}}},
		{"nvswitch quad stays within a socket", nvs, all8, nil, 4, [][]int{{0, 1, 2, 3}, {4, 5, 6, 7}}},
		{"duplicates in available are tolerated", d, []int{3, 3, 2, 2}, []int{2, 2}, 2, [][]int{{2, 3}}},
		{"size equal to available takes all", d, []int{7, 0, 5}, nil, 3, [][]int{{0, 5, 7}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := c.f.topo.Select(c.avail, c.must, c.size)
			if err != nil {
				t.Fatalf("Select(%v, %v, %d): %v", c.avail, c.must, c.size, err)
			}
			if !slices.ContainsFunc(c.want, func(w []int) bool { return slices.Equal(w, got) }) {
				t.Fatalf("Select(%v, %v, %d) = %v, want one of %v", c.avail, c.must, c.size, got, c.want)
			}
		})
	}
}

func TestSelectErrors(t *testing.T) {
	d := dgx1(t).topo
	cases := []struct {
		name        string
		avail, must []int
		size        int
		want        error
		mention     string // the message must name the bad input
	}{
		{"size zero", []int{0, 1}, nil, 0, ErrInvalidSize, "size 0"},
		{"size negative", []int{0, 1}, nil, -2, ErrInvalidSize, "size -2"},
		{"size above distinct available", []int{0, 1, 1}, nil, 3, ErrInvalidSize, "2 distinct available"},
		{"available index too large", []int{0, 8}, nil, 1, ErrOutOfRange, "available[1] = 8"},
		{"available index negative", []int{-1}, nil, 1, ErrOutOfRange, "available[0] = -1"},
		{"must-include index out of range", []int{0, 1}, []int{9}, 1, ErrOutOfRange, "mustInclude[0] = 9"},
		{"must-include not available", []int{0, 1, 2}, []int{1, 5}, 2, ErrNotAvailable, "mustInclude[1] = 5"},
		{"more must-include than size", []int{0, 1, 2}, []int{0, 1, 2}, 2, ErrTooManyMust, "3 distinct must-include GPUs exceed size 2"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := d.Select(c.avail, c.must, c.size)
			if !errors.Is(err, c.want) {
				t.Fatalf("Select(%v, %v, %d) = %v, %v; want error %v", c.avail, c.must, c.size, got, err, c.want)
			}
			if !strings.Contains(err.Error(), c.mention) {
				t.Fatalf("error %q does not mention %q", err, c.mention)
			}
		})
	}
}

func TestNewTopologyErrors(t *testing.T) {
	ok := func(i, j int) Link { return Link{} }
	cases := []struct {
		name    string
		n       int
		link    func(i, j int) Link
		mention string
	}{
		{"no GPUs", 0, ok, "0 GPUs"},
		{"too many GPUs", 65, ok, "65 GPUs"},
		{"nil link", 4, nil, "nil link"},
		{"negative NVLinks", 3, func(i, j int) Link { return Link{NVLinks: -i} }, "GPUs 1-2 have -1 NVLinks"},
		{"too many NVLinks", 3, func(i, j int) Link { return Link{NVLinks: 256} }, "256 NVLinks"},
		{"bad proximity", 3, func(i, j int) Link { return Link{PCIe: 7} }, "PCIe proximity 7"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := NewTopology(c.n, c.link)
			if !errors.Is(err, ErrInvalidTopology) || !strings.Contains(err.Error(), c.mention) {
				t.Fatalf("NewTopology: error %v, want ErrInvalidTopology mentioning %q", err, c.mention)
			}
		})
	}
}

// TestWeightsAreLexicographic checks the constants against the worst case:
// a set of MaxGPUs GPUs whose pairs all carry the largest lower-order terms
// must still weigh less than one more unit of the next-higher term.
func TestWeightsAreLexicographic(t *testing.T) {
	pairs := int64(MaxGPUs * (MaxGPUs - 1) / 2)
	if got := pairs * NUMAWeight; got >= PCIeWeight {
		t.Errorf("NUMA terms of %d pairs sum to %d, not below PCIeWeight %d", pairs, got, PCIeWeight)
	}
	if got := pairs * (Link{PCIe: ProxPIX, SameNUMA: true}).Weight(); got >= NVLinkWeight {
		t.Errorf("PCIe+NUMA terms of %d pairs sum to %d, not below NVLinkWeight %d", pairs, got, NVLinkWeight)
	}
	// Degrees sum up to 2·pairs·max weight: far from overflow.
	if maxW := (Link{NVLinks: MaxNVLinks, PCIe: ProxPIX, SameNUMA: true}).Weight(); maxW > (1<<62)/(2*pairs) {
		t.Errorf("max weight %d can overflow int64 over %d pairs", maxW, pairs)
	}
}

func TestScore(t *testing.T) {
	d := dgx1(t).topo
	// {0,1,2,3}: NV1+NV1+NV2+NV2+NV1+NV2 = 9 links; PCIe PIX twice, NODE
	// four times; all on NUMA 0.
	want := 9*NVLinkWeight + (2*int64(ProxPIX)+4*int64(ProxNODE))*PCIeWeight + 6*NUMAWeight
	if got, err := d.Score([]int{3, 2, 1, 0, 0}); err != nil || got != want {
		t.Errorf("Score({0,1,2,3}) = %d, %v; want %d", got, err, want)
	}
	if _, err := d.Score([]int{8}); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("Score({8}) error = %v, want ErrOutOfRange", err)
	}
	if got := d.Weight(0, 3); got != 2*NVLinkWeight+int64(ProxNODE)*PCIeWeight+NUMAWeight {
		t.Errorf("Weight(0, 3) = %d, want NV2 NODE same-NUMA", got)
	}
}

// TestSelectAboveExactLimit checks answers beyond ExactLimit: always valid
// and never worse than the heuristic alone. On 32 GPUs it also runs the
// search without budget (the exact optimum) and logs how often and by how
// much the budgeted answer falls short; on 64 it logs how often the budgeted
// search still proved optimality.
func TestSelectAboveExactLimit(t *testing.T) {
	fixtures := []fixture{dgx1Boards(t, 4), randomFixture(t, 32), dgx1Boards(t, 8), randomFixture(t, 64)}
	if testing.Short() {
		fixtures = fixtures[:2]
	}
	for _, f := range fixtures {
		t.Run(f.name, func(t *testing.T) {
			n := f.topo.Len()
			count := 300
			if n > 32 {
				count = 100 // no exact reference to compute: fewer will do
			}
			reqs := randomRequests(3, n, count, nil)
			exact, short, worst := 0, 0, 1.0
			for _, q := range reqs {
				what := fmt.Sprintf("%s avail=%v must=%v size=%d", f.name, q.avail, q.must, q.size)
				got, err := f.topo.Select(q.avail, q.must, q.size)
				if err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				checkValid(t, what, got, q.avail, q.must, q.size)
				gp, _ := f.topo.Score(got)
				am, mm, _ := f.topo.request(q.avail, q.must, q.size)
				set, st := f.topo.solve(am, mm, q.size)
				if !slices.Equal(indices(set), got) {
					t.Fatalf("%s: solve = %v, Select = %v", what, indices(set), got)
				}
				if st.exact {
					exact++
				}
				var s searcher
				s.init(f.topo, am, mm)
				if k := q.size - len(q.must); k > 0 && len(q.avail) > q.size {
					s.heuristic(k)
					if gp < s.bestP {
						t.Fatalf("%s: Select scores %d, below the heuristic's %d", what, gp, s.bestP)
					}
				}
				if n <= 32 && !st.exact {
					opt, _ := f.topo.search(am, mm, q.size, branchAndBound, 0)
					if op := f.topo.inside(opt); gp < op {
						short++
						worst = min(worst, float64(gp)/float64(op))
					}
				}
			}
			if n <= 32 {
				t.Logf("%s: %d/%d calls proven optimal within the budget; %d below the exact optimum (worst score ratio %.6f)",
					f.name, exact, len(reqs), short, worst)
			} else {
				t.Logf("%s: %d/%d calls proven optimal within the budget", f.name, exact, len(reqs))
			}
		})
	}
}

func TestSelectDeterministic(t *testing.T) {
	f := dgx1Boards(t, 4)
	r := rand.New(rand.NewPCG(9, 9))
	for range 50 {
		avail := pick(r, 32, 0.6)
		if len(avail) < 2 {
			continue
		}
		size := 1 + r.IntN(len(avail))
		first, err := f.topo.Select(avail, nil, size)
		if err != nil {
			t.Fatal(err)
		}
		shuffled := slices.Clone(avail)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		again, err := f.topo.Select(shuffled, nil, size)
		if err != nil || !slices.Equal(first, again) {
			t.Fatalf("Select(%v, size %d) = %v, then %v (%v) on shuffled input", avail, size, first, again, err)
		}
	}
}

func TestSelectDoesNotAllocateBeyondResult(t *testing.T) {
	f := dgx1Boards(t, 2)
	avail := []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
	allocs := testing.AllocsPerRun(20, func() {
		if _, err := f.topo.Select(avail, []int{3}, 6); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 1 {
		t.Errorf("Select allocates %.0f times per call, want 1 (the result)", allocs)
	}
}

// TestTopologyConcurrentUse runs Select from several goroutines on one
// Topology (meaningful under -race) and checks they agree with a serial run.
func TestTopologyConcurrentUse(t *testing.T) {
	f := dgx1Boards(t, 2)
	reqs := randomRequests(3, 16, 200, nil)
	want := make([][]int, len(reqs))
	for i, q := range reqs {
		want[i], _ = f.topo.Select(q.avail, q.must, q.size)
	}
	errs := make(chan error, 4)
	for w := range 4 {
		go func() {
			for i := range reqs {
				q := reqs[(i+w*50)%len(reqs)]
				got, err := f.topo.Select(q.avail, q.must, q.size)
				if err != nil || !slices.Equal(got, want[(i+w*50)%len(reqs)]) {
					errs <- fmt.Errorf("worker %d request %v: got %v (%v), serial run gave %v", w, q, got, err, want[(i+w*50)%len(reqs)])
					return
				}
			}
			errs <- nil
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
