package placement

import (
	"errors"
	"math/bits"
	"slices"
	"testing"
)

// FuzzSelect builds a topology of 1..24 GPUs from bytes (each pair's NVLink
// count, PCIe proximity and NUMA bit come from one byte) and a request from
// bit masks. Select must not panic; it must either fail with one of the
// package's errors or return a valid answer, and on up to 12 GPUs the
// answer of every search mode must match the brute-force reference.
func FuzzSelect(f *testing.F) {
	f.Add([]byte{8, 0x81, 0x42, 0x13}, uint64(0xff), uint64(0x01), 4)
	f.Add([]byte{16}, uint64(0xffff), uint64(0), 8)
	f.Add([]byte{20, 0xff, 0x00, 0x37, 0x5a}, uint64(0xfffff), uint64(0x100), 9)
	f.Add([]byte{3}, uint64(0x7), uint64(0x7), 2) // too many must-include
	f.Fuzz(func(t *testing.T, data []byte, availMask, mustMask uint64, size int) {
		if len(data) == 0 {
			return
		}
		n := 1 + int(data[0])%24
		links := make([][]Link, n)
		for i := range links {
			links[i] = make([]Link, n)
		}
		k := 1
		for i := 0; i < n; i++ {
			for j := i + 1; j < n; j++ {
				var b byte
				if len(data) > 1 {
					b = data[1+k%(len(data)-1)] ^ byte(k*31) // vary pairs even for short input
				}
				k++
				l := Link{NVLinks: int(b & 3), PCIe: Proximity(b>>2) % 5, SameNUMA: b&0x80 != 0}
				links[i][j], links[j][i] = l, l
			}
		}
		fx := newFixture(t, "fuzz", links)
		// Indices may run past n to exercise range errors.
		toList := func(m uint64) []int {
			var out []int
			for ; m != 0; m &= m - 1 {
				out = append(out, bits.TrailingZeros64(m)%(n+2))
			}
			return out
		}
		avail, must := toList(availMask), toList(mustMask)
		size %= 30
		got, err := fx.topo.Select(avail, must, size)
		if err != nil {
			for _, e := range []error{ErrInvalidSize, ErrOutOfRange, ErrNotAvailable, ErrTooManyMust} {
				if errors.Is(err, e) {
					return
				}
			}
			t.Fatalf("Select: unexpected error %v", err)
		}
		checkValid(t, "fuzz", got, avail, must, size)
		if n <= 12 {
			want, _, _ := bruteForce(links, avail, slices.Compact(slices.Sorted(slices.Values(must))), size)
			if !slices.Equal(got, want) {
				t.Fatalf("Select(%v, %v, %d) = %v, brute force %v", avail, must, size, got, want)
			}
			am, mm, _ := fx.topo.request(avail, must, size)
			for _, mode := range []searchMode{branchAndBound, enumerate, boundsOnly} {
				if set, _ := fx.topo.search(am, mm, size, mode, 0); !slices.Equal(indices(set), want) {
					t.Fatalf("search(%v, %v, %d, mode %d) = %v, brute force %v", avail, must, size, mode, indices(set), want)
				}
			}
		}
	})
}
