package placement

import (
	"fmt"
	"math/bits"
	"sync"
)

// ExactLimit is the number of candidate GPUs (available, not must-include)
// up to which Select always searches to the proven optimum, however long
// that takes.
const ExactLimit = 16

// searchBudget caps the branch-and-bound work when more than ExactLimit
// candidates are available; past it Select keeps the best set found (at
// least as good as the heuristic). Work counts the candidates and adjacency
// entries the search examines, a few ns each: the cap is about half a
// millisecond of search.
const searchBudget = 100000

// Select chooses size GPUs among available that include every GPU of
// mustInclude, maximising the objective described in the package doc. The
// answer is sorted in increasing order. Duplicate indices are tolerated.
func (t *Topology) Select(available, mustInclude []int, size int) ([]int, error) {
	avail, must, err := t.request(available, mustInclude, size)
	if err != nil {
		return nil, err
	}
	set, _ := t.solve(avail, must, size)
	return indices(set), nil
}

// request validates a Select request and returns it as bit sets.
func (t *Topology) request(available, mustInclude []int, size int) (avail, must uint64, err error) {
	if size < 1 {
		return 0, 0, fmt.Errorf("%w: size %d, want at least 1", ErrInvalidSize, size)
	}
	if avail, err = t.mask(available, "available"); err != nil {
		return 0, 0, err
	}
	if must, err = t.mask(mustInclude, "mustInclude"); err != nil {
		return 0, 0, err
	}
	if na := bits.OnesCount64(avail); size > na {
		return 0, 0, fmt.Errorf("%w: size %d exceeds the %d distinct available GPUs", ErrInvalidSize, size, na)
	}
	if missing := must &^ avail; missing != 0 {
		g := bits.TrailingZeros64(missing)
		for k, i := range mustInclude {
			if i == g {
				return 0, 0, fmt.Errorf("%w: mustInclude[%d] = %d is not in available", ErrNotAvailable, k, g)
			}
		}
	}
	if nm := bits.OnesCount64(must); nm > size {
		return 0, 0, fmt.Errorf("%w: %d distinct must-include GPUs exceed size %d", ErrTooManyMust, nm, size)
	}
	return avail, must, nil
}

// exhaustiveLimit is the number of candidate sets up to which solve tries
// them all rather than computing a heuristic incumbent and bounds.
const exhaustiveLimit = 2000

// choose returns the binomial coefficient C(n, k), or limit if it is larger.
func choose(n, k, limit int) int {
	c := 1
	for i := 1; i <= k; i++ {
		c = c * (n - k + i) / i // exact: c·(n-k+i) is divisible by i here
		if c > limit {
			return limit
		}
	}
	return c
}

// searchStats tells how a solve went, for tests and reports.
type searchStats struct {
	exact bool // the search finished: the answer is the proven optimum
}

// solve returns the best set of size GPUs with must ⊆ set ⊆ avail. The
// arguments must be valid (see request).
func (t *Topology) solve(avail, must uint64, size int) (uint64, searchStats) {
	nc := bits.OnesCount64(avail &^ must)
	mode, budget := branchAndBound, 0 // no budget: exact
	if nc > ExactLimit {
		budget = searchBudget
	} else if choose(nc, size-bits.OnesCount64(must), exhaustiveLimit+1) <= exhaustiveLimit {
		// Few sets: trying them all is cheaper than a heuristic incumbent
		// and bounds. (Not under a budget, which could cut it short
		// before it found a good set.)
		mode = enumerate
	}
	return t.search(avail, must, size, mode, budget)
}

// searchMode is how search proceeds; solve picks one, tests try them all.
type searchMode int

const (
	branchAndBound searchMode = iota // heuristic incumbent, then bounded search
	enumerate                        // every set, no bounds
	boundsOnly                       // bounded search without a heuristic incumbent
)

// search is solve with the search mode and work budget (0: none) chosen by
// the caller.
func (t *Topology) search(avail, must uint64, size int, mode searchMode, budget int) (uint64, searchStats) {
	k := size - bits.OnesCount64(must)
	if k == 0 {
		return must, searchStats{exact: true}
	}
	if bits.OnesCount64(avail) == size {
		return avail, searchStats{exact: true}
	}
	var s searcher
	s.init(t, avail, must)
	if mode == enumerate {
		s.exhaustive = true
	} else {
		if mode == branchAndBound {
			s.heuristic(k)
		}
		s.adj = adjPool.Get().(*adjacency)
		defer adjPool.Put(s.adj)
		s.buildAdj()
	}
	s.budget = budget
	// Branch and bound over the candidates in increasing index order, from
	// the heuristic's set (if any) as the incumbent.
	s.dfs(0, must, s.inside0, s.deg0, k)
	return s.best, searchStats{exact: !s.aborted}
}

// searcher holds one solve's state in fixed arrays so that the search does
// not allocate. Sets are bit masks over GPU indices.
//
// A set S is compared by the key (p, d, S): p = inside(S) (higher is
// better), d = Σ_{s∈S} deg(s) with deg(s) the weight from s to every
// available GPU (lower is better: it leaves more weight among the GPUs left
// free), then the lexicographically smaller index list.
type searcher struct {
	n          int
	w          []int64
	nbr        []uint8
	nbrW       []int64
	adj        *adjacency // bounds only; from adjPool
	avail      uint64
	must       uint64
	candMask   uint64         // available, not must-include
	cands      [MaxGPUs]uint8 // candMask in increasing order
	nc         int            // len(cands)
	deg        [MaxGPUs]int64 // weight from a GPU to all available GPUs
	gain       [MaxGPUs]int64 // weight from a candidate to the current set
	scratch    [MaxGPUs]int64 // bound work space
	inside0    int64          // inside(must)
	deg0       int64          // Σ deg over must
	best       uint64         // incumbent
	bestP      int64          // its inside weight; -1 while none
	bestD      int64          // its Σ deg
	budget     int            // work limit, 0 = none
	work       int            // candidates and adjacency entries examined
	aborted    bool           // the budget ran out
	exhaustive bool           // no bounds: try every set
	lsGain     [MaxGPUs]int64 // heuristic: weight to its current set
}

func (s *searcher) init(t *Topology, avail, must uint64) {
	s.n, s.w, s.nbr, s.nbrW = t.n, t.w, t.nbr, t.nbrW
	s.avail, s.must, s.candMask = avail, must, avail&^must
	s.bestP = -1
	for m := s.candMask; m != 0; m &= m - 1 {
		s.cands[s.nc] = uint8(bits.TrailingZeros64(m))
		s.nc++
	}
	for m := avail; m != 0; m &= m - 1 {
		i := bits.TrailingZeros64(m)
		var d int64
		for j, wij := range s.w[i*s.n : i*s.n+s.n] { // dense and branch-free
			d += wij & -int64(avail>>uint(j)&1)
		}
		s.deg[i] = d
		var g int64
		for r := must; r != 0; r &= r - 1 {
			g += s.w[i*s.n+bits.TrailingZeros64(r)]
		}
		s.gain[i] = g
		if must>>uint(i)&1 != 0 {
			s.deg0 += d
			s.inside0 += g // counts each must pair twice; halved below
		}
	}
	s.inside0 /= 2
}

// adjacency lists, for each candidate cands[j], the other candidates in
// the topology's decreasing-weight order, up to the first zero weight:
// list[j*MaxGPUs:][:n[j]]. At 4 KiB it is pooled rather than part of every
// searcher, which small problems never need it for.
type adjacency struct {
	list [MaxGPUs * MaxGPUs]uint8
	n    [MaxGPUs]uint8
}

var adjPool = sync.Pool{New: func() any { return new(adjacency) }}

// buildAdj fills s.adj for the bounds.
func (s *searcher) buildAdj() {
	for j := 0; j < s.nc; j++ {
		v := int(s.cands[j])
		row := s.adj.list[j*MaxGPUs : j*MaxGPUs+MaxGPUs]
		n := 0
		for i, x := range s.nbr[v*s.n : v*s.n+s.n-1] {
			if s.nbrW[v*s.n+i] == 0 {
				break
			}
			if s.candMask>>x&1 != 0 {
				row[n] = x
				n++
			}
		}
		s.adj.n[j] = uint8(n)
	}
}

// offer makes (set, p, d) the incumbent if it beats it.
func (s *searcher) offer(set uint64, p, d int64) {
	if s.beats(set, p, d) {
		s.best, s.bestP, s.bestD = set, p, d
	}
}

// beats reports whether (set, p, d) is strictly better than the incumbent.
func (s *searcher) beats(set uint64, p, d int64) bool {
	if p != s.bestP {
		return p > s.bestP
	}
	if d != s.bestD {
		return d < s.bestD
	}
	return lexLess(set, s.best)
}

// lexLess reports whether the sorted index list of a is lexicographically
// smaller than that of b, for sets of equal size: the smallest index in
// which they differ belongs to a.
func lexLess(a, b uint64) bool {
	x := a ^ b
	return x != 0 && a&(x&-x) != 0
}

// dfs tries every way to add k GPUs from cands[pos:] to set, whose inside
// weight is p and Σ deg is d: for j = pos, pos+1, ... it takes cands[j] as
// the next (smallest) new member and recurses on cands[j+1:]. s.gain holds
// the weight from every cands[pos:] to set.
func (s *searcher) dfs(pos int, set uint64, p, d int64, k int) {
	if k == 1 {
		// The last pick is exact without branching: the candidate with the
		// highest gain, then lowest deg, then lowest index.
		s.work += s.nc - pos
		bv := int(s.cands[pos])
		for j := pos + 1; j < s.nc; j++ {
			v := int(s.cands[j])
			if s.gain[v] > s.gain[bv] || s.gain[v] == s.gain[bv] && s.deg[v] < s.deg[bv] {
				bv = v
			}
		}
		s.offer(set|1<<uint(bv), p+s.gain[bv], d+s.deg[bv])
		return
	}
	for j := pos; s.nc-j >= k; j++ {
		if s.aborted {
			return
		}
		s.work += s.nc - j
		if s.budget > 0 && s.work > s.budget {
			s.aborted = true
			return
		}
		// Completions from cands[j+1:] are among those from cands[j:], so
		// once these cannot win, no later j can.
		if !s.exhaustive && s.prune(j, set, p, d, k) {
			return
		}
		v := int(s.cands[j])
		row := s.w[v*s.n:]
		for i := j + 1; i < s.nc; i++ {
			s.gain[s.cands[i]] += row[s.cands[i]]
		}
		s.dfs(j+1, set|1<<uint(v), p+s.gain[v], d+s.deg[v], k-1)
		for i := j + 1; i < s.nc; i++ {
			s.gain[s.cands[i]] -= row[s.cands[i]]
		}
	}
}

// prune reports whether no completion of set by k GPUs from cands[pos:] can
// beat the incumbent.
//
// Primary bound: a completion T adds Σ_{v∈T} gain[v] + inside(T), and
// inside(T) ≤ ½ Σ_{v∈T} (sum of v's k-1 heaviest edges into U = cands[pos:]).
// So 2·p + the k largest values of 2·gain[v] + heavy(v) bound twice the
// score. Only if that cannot exceed the incumbent's score do the secondary
// bound (d + the k smallest deg in U) and the index order decide.
func (s *searcher) prune(pos int, set uint64, p, d int64, k int) bool {
	if s.bestP < 0 {
		return false
	}
	lo := s.cands[pos]
	vals := s.scratch[:0]
	for j := pos; j < s.nc; j++ {
		v := s.cands[j]
		val := 2 * s.gain[v]
		if left := k - 1; left > 0 {
			// Candidates below lo are decided: skip them.
			row := s.w[int(v)*s.n:]
			adj := s.adj.list[j*MaxGPUs : j*MaxGPUs+int(s.adj.n[j])]
			scanned := len(adj)
			for i, x := range adj {
				if x >= lo {
					val += row[x]
					if left--; left == 0 {
						scanned = i + 1
						break
					}
				}
			}
			s.work += scanned
		}
		vals = append(vals, val)
	}
	ub := (2*p + sumLargest(vals, k)) / 2
	if ub != s.bestP {
		return ub < s.bestP
	}
	// Only ties on the primary score remain possible.
	vals = s.scratch[:0]
	for j := pos; j < s.nc; j++ {
		vals = append(vals, -s.deg[s.cands[j]])
	}
	dl := d - sumLargest(vals, k)
	if dl != s.bestD {
		return dl > s.bestD
	}
	// Only full ties remain: every completion agrees with set below lo, so
	// if set and the incumbent differ there, the first difference decides
	// the index order for all completions.
	x := (set ^ s.best) & (1<<lo - 1)
	return x != 0 && s.best&(x&-x) != 0
}

// sumLargest returns the sum of the k largest values in vals (1 ≤ k ≤
// len(vals)), reordering vals: a quickselect moves them to the front.
func sumLargest(vals []int64, k int) int64 {
	lo, hi := 0, len(vals)-1
	for lo < hi {
		// Partition vals[lo..hi] around its middle value, larger first.
		pivot := vals[lo+(hi-lo)/2]
		i, j := lo, hi
		for i <= j {
			for vals[i] > pivot {
				i++
			}
			for vals[j] < pivot {
				j--
			}
			if i <= j {
				vals[i], vals[j] = vals[j], vals[i]
				i++
				j--
			}
		}
		// Now vals[lo..j] ≥ pivot ≥ vals[i..hi], and j < i.
		switch {
		case k-1 <= j:
			hi = j
		case k-1 >= i:
			lo = i
		default:
			lo = hi // vals[k-1] sits between the parts: done
		}
	}
	var sum int64
	for _, v := range vals[:k] {
		sum += v
	}
	return sum
}

// heuristic sets the incumbent: the best of the peeled set and a greedy
// completion from every candidate as the first pick, each improved by
// 1-swap local search.
func (s *searcher) heuristic(k int) {
	set, p, d := s.localSearch(s.peel(bits.OnesCount64(s.must) + k))
	s.offer(set, p, d)
	var seen [MaxGPUs]uint64 // greedy sets already improved
	ns := 0
next:
	for i := 0; i < s.nc; i++ {
		set, p, d := s.greedy(int(s.cands[i]), k)
		for _, m := range seen[:ns] {
			if m == set {
				continue next // local search would end where it did before
			}
		}
		seen[ns] = set
		ns++
		set, p, d = s.localSearch(set, p, d)
		s.offer(set, p, d)
	}
}

// greedy completes must ∪ {first} by repeatedly adding the candidate with
// the highest weight to the set so far. Ties go to the better connected
// candidate (higher deg), which opens a promising new cluster when nothing
// connects to the set; local search and the bounds see to the secondary
// objective.
func (s *searcher) greedy(first, k int) (uint64, int64, int64) {
	g := &s.lsGain
	for i := 0; i < s.nc; i++ {
		c := s.cands[i]
		g[c] = s.gain[c]
	}
	set, p, d := s.must, s.inside0, s.deg0
	add := func(v int) {
		set |= 1 << uint(v)
		p += g[v]
		d += s.deg[v]
		row := s.w[v*s.n:]
		for i := 0; i < s.nc; i++ {
			c := s.cands[i]
			g[c] += row[c]
		}
	}
	add(first)
	for ; k > 1; k-- {
		bv := -1
		for m := s.candMask &^ set; m != 0; m &= m - 1 {
			v := bits.TrailingZeros64(m)
			if bv < 0 || g[v] > g[bv] || g[v] == g[bv] && s.deg[v] > s.deg[bv] {
				bv = v
			}
		}
		add(bv)
	}
	return set, p, d
}

// peel starts from every available GPU and repeatedly drops the candidate
// with the least weight to the rest (ties: the higher index) until size
// GPUs remain: the classic densest-subgraph heuristic, which keeps whole
// well-connected clusters where greedy may straddle them. It leaves s.lsGain
// as localSearch needs it.
func (s *searcher) peel(size int) (uint64, int64, int64) {
	g := &s.lsGain
	set := s.avail
	for i := 0; i < s.nc; i++ {
		c := s.cands[i]
		g[c] = s.deg[c] // weight to the whole available set
	}
	for n := bits.OnesCount64(set); n > size; n-- {
		bv := -1
		for m := s.candMask & set; m != 0; m &= m - 1 {
			v := bits.TrailingZeros64(m)
			if bv < 0 || g[v] <= g[bv] {
				bv = v
			}
		}
		set &^= 1 << uint(bv)
		row := s.w[bv*s.n:]
		for i := 0; i < s.nc; i++ {
			c := s.cands[i]
			g[c] -= row[c]
		}
	}
	// g now holds every candidate's weight to set; sum the set directly.
	var p, d int64
	for m := set; m != 0; m &= m - 1 {
		v := bits.TrailingZeros64(m)
		d += s.deg[v]
		row := s.w[v*s.n:]
		for r := m & (m - 1); r != 0; r &= r - 1 {
			p += row[bits.TrailingZeros64(r)]
		}
	}
	return set, p, d
}

// localSearch applies the best improving swap of one chosen candidate for
// one unchosen candidate until none improves (p, d, index order). s.lsGain
// must hold the weight from every candidate to set, as greedy and peel
// leave it.
func (s *searcher) localSearch(set uint64, p, d int64) (uint64, int64, int64) {
	g := &s.lsGain
	for {
		bs, bp, bd := set, p, d
		bu, bv := -1, -1
		for mu := set &^ s.must; mu != 0; mu &= mu - 1 {
			u := bits.TrailingZeros64(mu)
			row := s.w[u*s.n:]
			for mv := s.candMask &^ set; mv != 0; mv &= mv - 1 {
				v := bits.TrailingZeros64(mv)
				np := p - g[u] + g[v] - row[v]
				if np < bp {
					continue
				}
				nd := d - s.deg[u] + s.deg[v]
				ns := set ^ (1<<uint(u) | 1<<uint(v))
				if np > bp || nd < bd || nd == bd && lexLess(ns, bs) {
					bs, bp, bd, bu, bv = ns, np, nd, u, v
				}
			}
		}
		if bu < 0 {
			return set, p, d
		}
		set, p, d = bs, bp, bd
		ru, rv := s.w[bu*s.n:], s.w[bv*s.n:]
		for i := 0; i < s.nc; i++ {
			c := s.cands[i]
			g[c] += rv[c] - ru[c]
		}
	}
}
