package placement

import (
	"errors"
	"fmt"
	"math/bits"
	"sort"
	"strconv"
)

// Proximity is how close two GPUs are over PCIe, in the words of
// `nvidia-smi topo -m`. Higher is closer.
type Proximity int

// The PCIe proximities, farthest first. The zero value is ProxSYS, so a
// relation nobody reported costs nothing extra: it is simply the worst.
const (
	ProxSYS  Proximity = iota // across NUMA nodes (the SMP interconnect)
	ProxNODE                  // between PCIe host bridges of one NUMA node
	ProxPHB                   // through a PCIe host bridge
	ProxPXB                   // through several PCIe bridges, no host bridge
	ProxPIX                   // through at most one PCIe bridge

	// ProxUnknown is for relations the driver did not report; it is ProxSYS.
	ProxUnknown = ProxSYS
)

var proximityWords = [...]string{"SYS", "NODE", "PHB", "PXB", "PIX"}

// String returns the nvidia-smi word (SYS, NODE, PHB, PXB, PIX).
func (p Proximity) String() string {
	if p < ProxSYS || p > ProxPIX {
		return "Proximity(" + strconv.Itoa(int(p)) + ")"
	}
	return proximityWords[p]
}

// Link is what connects two distinct GPUs.
type Link struct {
	NVLinks  int       // NVLink connections between the two GPUs, 0..MaxNVLinks
	PCIe     Proximity // PCIe proximity; counts only between equal NVLink totals
	SameNUMA bool      // both GPUs are attached to the same NUMA node
}

// Scoring constants: the weight of a pair is
//
//	NVLinks*NVLinkWeight + PCIe*PCIeWeight + SameNUMA*NUMAWeight
//
// A set's score is the sum over its pairs; a set of up to 64 GPUs has at
// most C(64,2) = 2016 pairs. The constants make that sum compare
// lexicographically (NVLinks, then PCIe, then NUMA):
//
//   - NUMA terms of 2016 pairs sum to at most 2016 < PCIeWeight = 2^11 = 2048,
//     so one PCIe step outweighs any NUMA difference;
//   - PCIe and NUMA terms of one pair are at most 4*2048+1 = 8193, and of
//     2016 pairs at most 2016*8193 = 16,517,088 < NVLinkWeight = 2^24, so one
//     NVLink outweighs any PCIe/NUMA difference.
//
// With MaxNVLinks = 255 a set scores below 2016*(255*2^24+8193) < 2^43, far
// from int64 overflow even when summing degrees.
const (
	NVLinkWeight int64 = 1 << 24
	PCIeWeight   int64 = 1 << 11
	NUMAWeight   int64 = 1
	MaxNVLinks         = 255 // the most NVLinks NewTopology accepts per pair
)

// MaxGPUs is the largest topology NewTopology accepts.
const MaxGPUs = 64

// Weight is the integer pair weight of l (see NVLinkWeight).
func (l Link) Weight() int64 {
	w := int64(l.NVLinks)*NVLinkWeight + int64(l.PCIe)*PCIeWeight
	if l.SameNUMA {
		w += NUMAWeight
	}
	return w
}

// Errors returned by this package; the returned errors wrap one of these and
// name the offending input.
var (
	ErrInvalidTopology = errors.New("placement: invalid topology")
	ErrInvalidSize     = errors.New("placement: invalid size")
	ErrOutOfRange      = errors.New("placement: GPU index out of range")
	ErrNotAvailable    = errors.New("placement: must-include device not available")
	ErrTooManyMust     = errors.New("placement: more must-include devices than size")
	ErrInvalidUnit     = errors.New("placement: invalid unit")
	ErrInvalidPolicy   = errors.New("placement: invalid policy")
	ErrInvalidAlloc    = errors.New("placement: invalid allocated count")
)

// Topology is the precomputed pair-weight matrix of one node's GPUs. It is
// immutable and safe for concurrent use.
type Topology struct {
	n int
	w []int64 // w[i*n+j]: pair weight, 0 on the diagonal

	// For each GPU i, the other GPUs by decreasing weight to i (ties: lower
	// index first): nbr[i*n : i*n+n-1], their weights in nbrW. The search
	// bound walks these to find a GPU's heaviest edges into a candidate set.
	nbr  []uint8
	nbrW []int64
}

// NewTopology builds the topology of n GPUs (1 ≤ n ≤ MaxGPUs), indexed
// 0..n-1. link is called once for every pair i < j; links are symmetric.
func NewTopology(n int, link func(i, j int) Link) (*Topology, error) {
	if n < 1 || n > MaxGPUs {
		return nil, fmt.Errorf("%w: %d GPUs, want 1..%d", ErrInvalidTopology, n, MaxGPUs)
	}
	if link == nil {
		return nil, fmt.Errorf("%w: nil link function", ErrInvalidTopology)
	}
	t := &Topology{n: n, w: make([]int64, n*n), nbr: make([]uint8, n*n), nbrW: make([]int64, n*n)}
	for i := 0; i < n; i++ {
		for j := i + 1; j < n; j++ {
			l := link(i, j)
			if l.NVLinks < 0 || l.NVLinks > MaxNVLinks {
				return nil, fmt.Errorf("%w: GPUs %d-%d have %d NVLinks, want 0..%d", ErrInvalidTopology, i, j, l.NVLinks, MaxNVLinks)
			}
			if l.PCIe < ProxSYS || l.PCIe > ProxPIX {
				return nil, fmt.Errorf("%w: GPUs %d-%d have PCIe proximity %d, want %d..%d", ErrInvalidTopology, i, j, l.PCIe, ProxSYS, ProxPIX)
			}
			t.w[i*n+j] = l.Weight()
			t.w[j*n+i] = l.Weight()
		}
	}
	order := make([]int, 0, n)
	for i := 0; i < n; i++ {
		order = order[:0]
		for j := 0; j < n; j++ {
			if j != i {
				order = append(order, j)
			}
		}
		row := t.w[i*n : i*n+n]
		sort.SliceStable(order, func(a, b int) bool { return row[order[a]] > row[order[b]] })
		for k, j := range order {
			t.nbr[i*n+k] = uint8(j)
			t.nbrW[i*n+k] = row[j]
		}
	}
	return t, nil
}

// Len is the number of GPUs.
func (t *Topology) Len() int { return t.n }

// Weight is the pair weight of GPUs i and j (0 when i == j). It panics if
// either index is out of range, like a slice index.
func (t *Topology) Weight(i, j int) int64 {
	if uint(i) >= uint(t.n) || uint(j) >= uint(t.n) {
		panic(fmt.Sprintf("placement: Weight(%d, %d) out of range [0,%d)", i, j, t.n))
	}
	return t.w[i*t.n+j]
}

// Score is the primary objective of a set: the sum of the pair weights over
// its unordered pairs. Duplicate indices count once.
func (t *Topology) Score(set []int) (int64, error) {
	m, err := t.mask(set, "set")
	if err != nil {
		return 0, err
	}
	return t.inside(m), nil
}

// mask turns indices into a bit set, checking their range; what names the
// argument in errors.
func (t *Topology) mask(idx []int, what string) (uint64, error) {
	var m uint64
	for k, i := range idx {
		if uint(i) >= uint(t.n) {
			return 0, fmt.Errorf("%w: %s[%d] = %d, want 0..%d", ErrOutOfRange, what, k, i, t.n-1)
		}
		m |= 1 << uint(i)
	}
	return m, nil
}

// inside is the total pair weight within the set m.
func (t *Topology) inside(m uint64) int64 {
	var s int64
	for a := m; a != 0; a &= a - 1 {
		i := bits.TrailingZeros64(a)
		row := t.w[i*t.n:]
		for b := a & (a - 1); b != 0; b &= b - 1 {
			s += row[bits.TrailingZeros64(b)]
		}
	}
	return s
}

// indices lists the members of m in increasing order.
func indices(m uint64) []int {
	out := make([]int, 0, bits.OnesCount64(m))
	for ; m != 0; m &= m - 1 {
		out = append(out, bits.TrailingZeros64(m))
	}
	return out
}
