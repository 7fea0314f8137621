package placement

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// replicas returns perGPU time-slicing replicas of each listed GPU, all of
// one group per GPU, named "g<gpu>r<i>".
func replicas(perGPU int, gpus ...int) []Unit {
	var out []Unit
	for _, g := range gpus {
		for i := range perGPU {
			out = append(out, Unit{ID: fmt.Sprintf("g%dr%d", g, i), GPU: g, Group: fmt.Sprintf("gpu%d", g)})
		}
	}
	return out
}

// without drops the units with the given IDs.
func without(units []Unit, ids ...string) []Unit {
	return slices.DeleteFunc(slices.Clone(units), func(u Unit) bool { return slices.Contains(ids, u.ID) })
}

// gpusOf maps answer IDs back to their GPUs, sorted.
func gpusOf(ids []string, units []Unit) []int {
	var out []int
	for _, id := range ids {
		for _, u := range units {
			if u.ID == id {
				out = append(out, u.GPU)
			}
		}
	}
	slices.Sort(out)
	return out
}

func TestSelectShared(t *testing.T) {
	d, l4 := dgx1(t), l4Box(t)
	l4Units := replicas(4, 0, 1, 2, 3)
	// GPU 0 has 1 replica in use, GPU 1 has 3: their first ones are gone.
	l4Busy := without(l4Units, "g0r0", "g1r0", "g1r1", "g1r2")
	l4BusyAlloc := map[int]int{0: 1, 1: 3}
	// MIG: GPU 0 has 2 free MIG devices (1 in use), GPU 1 has 3 free.
	mig := []Unit{
		{ID: "mig0b", GPU: 0, Group: "mig0b"}, {ID: "mig0c", GPU: 0, Group: "mig0c"},
		{ID: "mig1a", GPU: 1, Group: "mig1a"}, {ID: "mig1b", GPU: 1, Group: "mig1b"}, {ID: "mig1c", GPU: 1, Group: "mig1c"},
	}
	// Time-sliced MIG devices: A has 4 replicas free, B has 2 (2 in use).
	migReplicas := []Unit{
		{ID: "A0", GPU: 0, Group: "A"}, {ID: "A1", GPU: 0, Group: "A"}, {ID: "A2", GPU: 0, Group: "A"}, {ID: "A3", GPU: 0, Group: "A"},
		{ID: "B2", GPU: 0, Group: "B"}, {ID: "B3", GPU: 0, Group: "B"},
	}
	cases := []struct {
		name      string
		topo      *Topology
		avail     []Unit
		must      []Unit
		size      int
		allocated map[int]int
		policy    Policy
		want      []string
	}{
		{"distributed: 2 replicas on idle DGX-1 take an NV2 pair", d.topo, replicas(4, 0, 1, 2, 3, 4, 5, 6, 7), nil, 2, nil, Distributed, []string{"g2r0", "g3r0"}},
		{"distributed: 3 replicas on idle L4s spread, PIX pair first", l4.topo, l4Units, nil, 3, nil, Distributed, []string{"g0r0", "g1r0", "g2r0"}},
		{"distributed: 1 replica goes to the least loaded GPU", l4.topo, l4Busy, nil, 1, map[int]int{0: 2, 1: 1, 2: 0, 3: 2}, Distributed, []string{"g2r0"}},
		{"distributed: at equal load a second GPU beats a second replica", l4.topo, l4Units, nil, 2, map[int]int{0: 2, 1: 1, 2: 0, 3: 2}, Distributed, []string{"g1r0", "g2r0"}},
		{"distributed: water-fills the idle GPUs first", l4.topo, l4Busy, nil, 5, l4BusyAlloc, Distributed, []string{"g0r1", "g2r0", "g2r1", "g3r0", "g3r1"}},
		{"distributed: must-include loads its GPU", l4.topo, l4Units, []Unit{l4Units[0]}, 2, nil, Distributed, []string{"g0r0", "g1r0"}},
		{"packed: 1 replica goes to the most loaded GPU", l4.topo, l4Busy, nil, 1, l4BusyAlloc, Packed, []string{"g1r3"}},
		{"packed: 2 replicas best-fit on one GPU", l4.topo, l4Busy, nil, 2, l4BusyAlloc, Packed, []string{"g0r1", "g0r2"}},
		{"packed: 4 replicas need an idle GPU", l4.topo, l4Busy, nil, 4, l4BusyAlloc, Packed, []string{"g2r0", "g2r1", "g2r2", "g2r3"}},
		{"packed: 6 replicas use the fewest GPUs", l4.topo, l4Busy, nil, 6, l4BusyAlloc, Packed, []string{"g0r1", "g0r2", "g2r0", "g2r1", "g2r2", "g2r3"}},
		{"packed: must-include GPU is filled first", l4.topo, l4Units, []Unit{l4Units[8]}, 3, nil, Packed, []string{"g2r0", "g2r1", "g2r2"}},
		{"packed: spill-over GPU is the best connected", l4.topo, l4Units, []Unit{l4Units[8]}, 6, nil, Packed, []string{"g2r0", "g2r1", "g2r2", "g2r3", "g3r0", "g3r1"}},
		{"packed: MIG devices stay on the same parent", l4.topo, mig, nil, 2, map[int]int{0: 1}, Packed, []string{"mig0b", "mig0c"}},
		{"distributed: MIG devices spread over parents", l4.topo, mig, nil, 2, map[int]int{0: 1}, Distributed, []string{"mig0b", "mig1a"}},
		{"packed: replicas of one MIG device, busiest first", l4.topo, migReplicas, nil, 2, map[int]int{0: 2}, Packed, []string{"B2", "B3"}},
		{"packed: then the next MIG device", l4.topo, migReplicas, nil, 3, map[int]int{0: 2}, Packed, []string{"A0", "B2", "B3"}},
		{"distributed: replicas spread over MIG devices", l4.topo, migReplicas, nil, 2, map[int]int{0: 2}, Distributed, []string{"A0", "B2"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := c.topo.SelectShared(c.avail, c.must, c.size, c.allocated, c.policy)
			if err != nil {
				t.Fatalf("SelectShared(size %d, %v): %v", c.size, c.policy, err)
			}
			if !slices.Equal(got, c.want) {
				t.Fatalf("SelectShared(size %d, %v) = %v (GPUs %v), want %v (GPUs %v)",
					c.size, c.policy, got, gpusOf(got, c.avail), c.want, gpusOf(c.want, c.avail))
			}
			// The same sets in another order give the same answer.
			r := rand.New(rand.NewPCG(1, 2))
			avail := append(slices.Clone(c.avail), c.avail...) // duplicates too
			r.Shuffle(len(avail), func(i, j int) { avail[i], avail[j] = avail[j], avail[i] })
			again, err := c.topo.SelectShared(avail, c.must, c.size, c.allocated, c.policy)
			if err != nil || !slices.Equal(again, got) {
				t.Fatalf("on shuffled, duplicated input: %v, %v; first answer %v", again, err, got)
			}
		})
	}
}

func TestSelectSharedErrors(t *testing.T) {
	l4 := l4Box(t).topo
	units := replicas(2, 0, 1)
	cases := []struct {
		name      string
		avail     []Unit
		must      []Unit
		size      int
		allocated map[int]int
		policy    Policy
		want      error
		mention   string
	}{
		{"size zero", units, nil, 0, nil, Distributed, ErrInvalidSize, "size 0"},
		{"size above available", units, nil, 5, nil, Distributed, ErrInvalidSize, "4 distinct available units"},
		{"unknown policy", units, nil, 1, nil, Policy(7), ErrInvalidPolicy, "7"},
		{"empty ID", []Unit{{GPU: 0}}, nil, 1, nil, Packed, ErrInvalidUnit, "available[0] has an empty ID"},
		{"GPU out of range", []Unit{{ID: "x", GPU: 4}}, nil, 1, nil, Packed, ErrOutOfRange, `available[0] ("x") is on GPU 4`},
		{"one ID on two GPUs", []Unit{{ID: "x", GPU: 0}, {ID: "x", GPU: 1}}, nil, 1, nil, Packed, ErrInvalidUnit, `ID "x" twice`},
		{"must-include not available", units, []Unit{{ID: "g3r0", GPU: 3}}, 1, nil, Packed, ErrNotAvailable, `"g3r0"`},
		{"must-include on another GPU", units, []Unit{{ID: "g0r0", GPU: 1, Group: "gpu0"}}, 1, nil, Packed, ErrNotAvailable, `"g0r0" (GPU 1`},
		{"more must-include than size", units, units[:3], 2, nil, Packed, ErrTooManyMust, "3 distinct must-include units exceed size 2"},
		{"negative allocated", units, nil, 1, map[int]int{1: -1, 3: 0}, Distributed, ErrInvalidAlloc, "allocated[1] = -1"},
		{"allocated GPU out of range", units, nil, 1, map[int]int{9: 1, 7: 2, 0: 1}, Distributed, ErrInvalidAlloc, "allocated[7] = 2"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := l4.SelectShared(c.avail, c.must, c.size, c.allocated, c.policy)
			if !errors.Is(err, c.want) {
				t.Fatalf("SelectShared = %v, %v; want error %v", got, err, c.want)
			}
			if !strings.Contains(err.Error(), c.mention) {
				t.Fatalf("error %q does not mention %q", err, c.mention)
			}
		})
	}
}

// TestSelectSharedInvariants checks the policies' defining properties on
// seeded random requests: Distributed never leaves a pick on a GPU that is
// more than one unit busier than a GPU with free units left; Packed uses the
// fewest GPUs possible. Both give valid, order-independent answers.
func TestSelectSharedInvariants(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 5))
	f := dgx1Boards(t, 2)
	for c := range 500 {
		var avail []Unit
		allocated := map[int]int{}
		for g := range 16 {
			total := 1 + r.IntN(6)
			used := r.IntN(total + 1)
			if used > 0 {
				allocated[g] = used
			}
			for i := used; i < total; i++ {
				avail = append(avail, Unit{ID: fmt.Sprintf("g%02dr%d", g, i), GPU: g, Group: fmt.Sprintf("m%d", i%2)})
			}
		}
		if len(avail) == 0 {
			continue
		}
		size := 1 + r.IntN(min(len(avail), 12))
		var must []Unit
		for _, u := range avail {
			if len(must) < size && r.IntN(30) == 0 {
				must = append(must, u)
			}
		}
		for _, policy := range []Policy{Distributed, Packed} {
			what := fmt.Sprintf("case %d %v size %d must %d", c, policy, size, len(must))
			got, err := f.topo.SelectShared(avail, must, size, allocated, policy)
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			if len(got) != size || len(slices.Compact(slices.Clone(got))) != size {
				t.Fatalf("%s: answer %v is not %d distinct units", what, got, size)
			}
			picks := map[int]int{} // per GPU, must-include included
			freeLeft := map[int]int{}
			for _, u := range avail {
				if slices.Contains(got, u.ID) {
					picks[u.GPU]++
				} else {
					freeLeft[u.GPU]++
				}
			}
			for _, u := range must {
				if !slices.Contains(got, u.ID) {
					t.Fatalf("%s: answer lacks must-include %s", what, u.ID)
				}
			}
			mustPicks := map[int]int{}
			for _, u := range must {
				mustPicks[u.GPU]++
			}
			switch policy {
			case Distributed:
				for g, p := range picks {
					if p == mustPicks[g] {
						continue // only must-include units here
					}
					for h, left := range freeLeft {
						if left > 0 && allocated[g]+picks[g]-1 > allocated[h]+picks[h] {
							t.Fatalf("%s: GPU %d ends at load %d though GPU %d ends at %d with units free",
								what, g, allocated[g]+picks[g], h, allocated[h]+picks[h])
						}
					}
				}
			case Packed:
				// Fewest GPUs: the must GPUs plus the fewest others whose
				// free units cover what the must GPUs cannot.
				need := size - len(must)
				var others []int
				for g := range 16 {
					free := picks[g] - mustPicks[g] + freeLeft[g]
					if mustPicks[g] > 0 {
						need -= free
					} else if free > 0 {
						others = append(others, free)
					}
				}
				slices.Sort(others)
				minGPUs := len(mustPicks)
				for i := len(others) - 1; need > 0; i-- {
					need -= others[i]
					minGPUs++
				}
				if len(picks) != minGPUs {
					t.Fatalf("%s: answer uses %d GPUs, %d would do", what, len(picks), minGPUs)
				}
			}
			shuffled := slices.Clone(avail)
			r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
			again, err := f.topo.SelectShared(shuffled, must, size, allocated, policy)
			if err != nil || !slices.Equal(again, got) {
				t.Fatalf("%s: shuffled input gives %v (%v), first %v", what, again, err, got)
			}
		}
	}
}
