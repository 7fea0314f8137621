package placement

import (
	"fmt"
	"math/bits"
	"slices"
	"strconv"
	"strings"
)

// Policy says how SelectShared places shared units on physical GPUs.
type Policy int

// The policies; the zero value is Distributed.
const (
	// Distributed balances load: every unit goes to a GPU with the fewest
	// units in use, so one request spreads over distinct GPUs.
	Distributed Policy = iota
	// Packed fills GPUs that are already in use and keeps one request on
	// as few GPUs as possible.
	Packed
)

// String returns "distributed" or "packed".
func (p Policy) String() string {
	switch p {
	case Distributed:
		return "distributed"
	case Packed:
		return "packed"
	}
	return "Policy(" + strconv.Itoa(int(p)) + ")"
}

// Unit is one shareable device as the kubelet sees it: a time-slicing
// replica or a MIG device (or a replica of one).
type Unit struct {
	ID    string // the device ID the kubelet allocates; unique
	GPU   int    // index of the physical GPU in the Topology
	Group string // what the unit is carved from, e.g. the MIG device; "" for the whole GPU
}

// gpuState is SelectShared's view of one physical GPU.
type gpuState struct {
	free  []Unit // available units not in mustInclude, by Group then ID
	load  int    // allocated units plus must-include units on this GPU
	count int    // units to take from free
}

// SelectShared chooses size units among available that include every unit
// of mustInclude, and returns their IDs sorted. allocated[g] is how many
// units of GPU g are in use already (a missing key means none).
//
// The policy decides how many units each physical GPU gives; the topology
// decides between GPUs the policy finds equal. Must-include units are taken
// first and count toward their GPU's load. Then, for the remaining units:
//
// Distributed: each unit goes to a GPU with the lowest load, where load =
// allocated + units taken in this call (water-filling). The GPUs tied at
// the final level take the last units: first those this call has not used
// yet (so a 2-unit request on idle GPUs lands on two GPUs), chosen among
// themselves by Select's objective over the distinct GPUs of the answer (so
// the two are a well-connected pair); units still left after every unused
// tied GPU has one go to the used tied GPUs, lowest index first.
//
// Packed: GPUs holding must-include units are filled first (most loaded
// first, then lower index). Then, while units are still needed: if some GPU
// can hold all of them, the most loaded such GPU takes them (ties: fewer
// free units, i.e. best fit; then the higher weight to the GPUs already
// chosen; then lower index); otherwise the GPU with the most free units
// gives all of them (ties: most loaded, then weight to the chosen GPUs,
// then lower index). This uses the fewest GPUs possible.
//
// Within one GPU, units are taken by Group: Distributed takes the next unit
// from the group with the fewest units taken in this call (ties: the group
// with more available units, then the smaller Group), Packed from the group
// with the most units taken in this call (ties: fewer available units, then
// the smaller Group); within a group, the smallest ID comes first. So
// Packed keeps MIG-device replicas on the same MIG device, and Distributed
// spreads them.
//
// The answer depends only on the sets given, never on their order or on
// map iteration. Duplicate units (same ID and fields) are tolerated; two
// units with one ID but different GPU or Group are an error.
func (t *Topology) SelectShared(available, mustInclude []Unit, size int, allocated map[int]int, policy Policy) ([]string, error) {
	if size < 1 {
		return nil, fmt.Errorf("%w: size %d, want at least 1", ErrInvalidSize, size)
	}
	if policy != Distributed && policy != Packed {
		return nil, fmt.Errorf("%w: %d", ErrInvalidPolicy, policy)
	}
	avail, err := t.units(available, "available")
	if err != nil {
		return nil, err
	}
	must, err := t.units(mustInclude, "mustInclude")
	if err != nil {
		return nil, err
	}
	if size > len(avail) {
		return nil, fmt.Errorf("%w: size %d exceeds the %d distinct available units", ErrInvalidSize, size, len(avail))
	}
	if len(must) > size {
		return nil, fmt.Errorf("%w: %d distinct must-include units exceed size %d", ErrTooManyMust, len(must), size)
	}
	bad := -1 // report the smallest bad key: map order must not show
	for g, a := range allocated {
		if (g < 0 || g >= t.n || a < 0) && (bad < 0 || g < bad) {
			bad = g
		}
	}
	if bad >= 0 {
		return nil, fmt.Errorf("%w: allocated[%d] = %d, want a GPU in 0..%d and a count ≥ 0", ErrInvalidAlloc, bad, allocated[bad], t.n-1)
	}

	gpus := make([]gpuState, t.n)
	for g := range gpus {
		gpus[g].load = allocated[g]
	}
	var mustGPUs uint64
	chosen := make([]string, 0, size)
	for _, u := range must {
		if _, found := slices.BinarySearchFunc(avail, u, compareUnits); !found {
			return nil, fmt.Errorf("%w: must-include unit %q (GPU %d, group %q) is not in available", ErrNotAvailable, u.ID, u.GPU, u.Group)
		}
		chosen = append(chosen, u.ID)
		gpus[u.GPU].load++
		mustGPUs |= 1 << uint(u.GPU)
	}
	// The free units, sorted by GPU, Group, ID: each GPU's are a run.
	free := slices.DeleteFunc(avail, func(u Unit) bool {
		_, isMust := slices.BinarySearchFunc(must, u, compareUnits)
		return isMust
	})
	for i := 0; i < len(free); {
		j := i
		for j < len(free) && free[j].GPU == free[i].GPU {
			j++
		}
		gpus[free[i].GPU].free = free[i:j:j]
		i = j
	}

	if need := size - len(must); need > 0 {
		if policy == Distributed {
			t.distribute(gpus, mustGPUs, need)
		} else {
			t.pack(gpus, mustGPUs, need)
		}
	}
	for g := range gpus {
		chosen = appendUnits(chosen, gpus[g].free, must, gpus[g].count, policy)
	}
	slices.Sort(chosen)
	return chosen, nil
}

// compareUnits orders units by GPU, then Group, then ID.
func compareUnits(a, b Unit) int {
	if a.GPU != b.GPU {
		return a.GPU - b.GPU
	}
	if c := strings.Compare(a.Group, b.Group); c != 0 {
		return c
	}
	return strings.Compare(a.ID, b.ID)
}

// units validates a list of units and returns it de-duplicated and sorted
// by GPU, Group, ID. what names the argument in errors.
func (t *Topology) units(list []Unit, what string) ([]Unit, error) {
	for k, u := range list {
		if u.ID == "" {
			return nil, fmt.Errorf("%w: %s[%d] has an empty ID", ErrInvalidUnit, what, k)
		}
		if u.GPU < 0 || u.GPU >= t.n {
			return nil, fmt.Errorf("%w: %s[%d] (%q) is on GPU %d, want 0..%d", ErrOutOfRange, what, k, u.ID, u.GPU, t.n-1)
		}
	}
	// Sorting by ID first brings duplicates together.
	out := slices.Clone(list)
	slices.SortFunc(out, func(a, b Unit) int {
		if c := strings.Compare(a.ID, b.ID); c != 0 {
			return c
		}
		return compareUnits(a, b)
	})
	out = slices.Compact(out) // exact duplicates
	for k := 1; k < len(out); k++ {
		if prev, u := out[k-1], out[k]; prev.ID == u.ID {
			return nil, fmt.Errorf("%w: %s has ID %q twice, on GPU %d group %q and GPU %d group %q",
				ErrInvalidUnit, what, u.ID, prev.GPU, prev.Group, u.GPU, u.Group)
		}
	}
	slices.SortFunc(out, compareUnits)
	return out, nil
}

// distribute sets the per-GPU counts for the Distributed policy (see
// SelectShared): water-filling to a level, then topology among the GPUs
// tied at that level.
func (t *Topology) distribute(gpus []gpuState, mustGPUs uint64, need int) {
	// fill(l) is how many units it takes to raise every GPU to load l
	// (as far as its free units allow). Find the highest level l with
	// fill(l) ≤ need; fill grows with l.
	fill := func(l int) int {
		sum := 0
		for _, g := range gpus {
			sum += min(len(g.free), max(0, l-g.load))
		}
		return sum
	}
	// Search from the lowest load of a GPU with free units (fill = 0) to
	// the highest load one can reach (fill = all free units ≥ need).
	lo, hi := -1, 0
	for _, g := range gpus {
		if len(g.free) > 0 {
			if lo < 0 || g.load < lo {
				lo = g.load
			}
			hi = max(hi, g.load+len(g.free))
		}
	}
	for lo < hi { // largest l in [lo, hi] with fill(l) ≤ need
		mid := lo + (hi-lo+1)/2
		if fill(mid) <= need {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	used := mustGPUs // GPUs in the answer so far
	var tied uint64  // GPUs at the level with units left
	rem := need
	for i := range gpus {
		g := &gpus[i]
		g.count = min(len(g.free), max(0, lo-g.load))
		rem -= g.count
		if g.count > 0 {
			used |= 1 << uint(i)
		}
		if g.load+g.count == lo && g.count < len(g.free) {
			tied |= 1 << uint(i)
		}
	}
	fresh := tied &^ used // tied GPUs not yet in the answer
	if rem == 0 {
		return
	}
	take := fresh
	if nf := bits.OnesCount64(fresh); rem < nf {
		// Choose rem of the fresh GPUs: the best-connected answer.
		set, _ := t.solve(used|fresh, used, bits.OnesCount64(used)+rem)
		take = set &^ used
	}
	rem -= bits.OnesCount64(take)
	// rem < the number of tied GPUs, so the lowest used tied GPUs suffice.
	for m := tied &^ take; rem > 0; m &= m - 1 {
		take |= m & -m
		rem--
	}
	for m := take; m != 0; m &= m - 1 {
		gpus[bits.TrailingZeros64(m)].count++
	}
}

// pack sets the per-GPU counts for the Packed policy (see SelectShared).
func (t *Topology) pack(gpus []gpuState, mustGPUs uint64, need int) {
	// GPUs with must-include units first, most loaded first.
	order := indices(mustGPUs)
	slices.SortStableFunc(order, func(a, b int) int { return gpus[b].load - gpus[a].load })
	for _, i := range order {
		g := &gpus[i]
		g.count = min(len(g.free), need)
		need -= g.count
	}
	chosen := mustGPUs
	link := func(i int) int64 { // weight from GPU i to the chosen GPUs
		var s int64
		for m := chosen; m != 0; m &= m - 1 {
			s += t.w[i*t.n+bits.TrailingZeros64(m)]
		}
		return s
	}
	for need > 0 {
		best, bestLink, fits := -1, int64(0), false
		for i := range gpus {
			g := &gpus[i]
			if chosen>>uint(i)&1 != 0 || len(g.free) == 0 {
				continue
			}
			l := link(i)
			if best < 0 {
				best, bestLink, fits = i, l, len(g.free) >= need
				continue
			}
			b := &gpus[best]
			f := len(g.free) >= need
			var better bool
			switch {
			case f != fits:
				better = f
			case f: // best fit among GPUs that hold everything
				better = g.load > b.load ||
					g.load == b.load && (len(g.free) < len(b.free) ||
						len(g.free) == len(b.free) && l > bestLink)
			default: // fewest GPUs: largest first
				better = len(g.free) > len(b.free) ||
					len(g.free) == len(b.free) && (g.load > b.load ||
						g.load == b.load && l > bestLink)
			}
			if better {
				best, bestLink, fits = i, l, f
			}
		}
		g := &gpus[best]
		g.count = min(len(g.free), need)
		need -= g.count
		chosen |= 1 << uint(best)
	}
}

// appendUnits appends the IDs of count units taken from free (one GPU's
// free units, sorted by Group then ID) by the group rule of SelectShared.
// must holds the must-include units, which count as taken.
func appendUnits(out []string, free, must []Unit, count int, policy Policy) []string {
	if count == 0 {
		return out
	}
	if count == len(free) {
		for _, u := range free {
			out = append(out, u.ID)
		}
		return out
	}
	// Groups are runs of free.
	type group struct {
		name             string
		next, end        int // untaken units are free[next:end]
		taken, available int // units taken (must-include too), units available
	}
	var groups []group
	for i := 0; i < len(free); {
		j := i
		for j < len(free) && free[j].Group == free[i].Group {
			j++
		}
		groups = append(groups, group{name: free[i].Group, next: i, end: j, available: j - i})
		i = j
	}
	gpu := free[0].GPU
	for _, u := range must {
		if u.GPU != gpu {
			continue
		}
		for i := range groups {
			if groups[i].name == u.Group {
				groups[i].taken++
				groups[i].available++
			}
		}
	}
	for ; count > 0; count-- {
		best := -1
		for i := range groups {
			g := &groups[i]
			if g.next == g.end {
				continue
			}
			if best < 0 {
				best = i
				continue
			}
			b := &groups[best]
			if policy == Distributed {
				if g.taken < b.taken || g.taken == b.taken && g.available > b.available {
					best = i
				}
			} else if g.taken > b.taken || g.taken == b.taken && g.available < b.available {
				best = i
			}
		}
		g := &groups[best]
		out = append(out, free[g.next].ID)
		g.next++
		g.taken++
	}
	return out
}
