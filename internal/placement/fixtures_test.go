package placement

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

// Test fixtures: real node topologies, written the way `nvidia-smi topo -m`
// prints them, plus seeded random ones.

// dgx1Matrix is a DGX-1 (V100) hybrid cube mesh. "topo" rows are the
// NVLink/PCIe matrix; "pcie" rows give the PCIe relation under NV cells.
const dgx1Matrix = `
topo X   NV1 NV1 NV2 NV2 SYS SYS SYS
topo NV1 X   NV2 NV1 SYS NV2 SYS SYS
topo NV1 NV2 X   NV2 SYS SYS NV1 SYS
topo NV2 NV1 NV2 X   SYS SYS SYS NV1
topo NV2 SYS SYS SYS X   NV1 NV1 NV2
topo SYS NV2 SYS SYS NV1 X   NV2 NV1
topo SYS SYS NV1 SYS NV1 NV2 X   NV2
topo SYS SYS SYS NV1 NV2 NV1 NV2 X
pcie X    PIX  NODE NODE SYS  SYS  SYS  SYS
pcie PIX  X    NODE NODE SYS  SYS  SYS  SYS
pcie NODE NODE X    PIX  SYS  SYS  SYS  SYS
pcie NODE NODE PIX  X    SYS  SYS  SYS  SYS
pcie SYS  SYS  SYS  SYS  X    PIX  NODE NODE
pcie SYS  SYS  SYS  SYS  PIX  X    NODE NODE
pcie SYS  SYS  SYS  SYS  NODE NODE X    PIX
pcie SYS  SYS  SYS  SYS  NODE NODE PIX  X
`

// l4Matrix is a PCIe-only box of four L4s on two sockets: 0,1 share a PCIe
// switch on NUMA 0; 2,3 hang off different host bridges of NUMA 1.
const l4Matrix = `
topo X    PIX  SYS  SYS
topo PIX  X    SYS  SYS
topo SYS  SYS  X    NODE
topo SYS  SYS  NODE X
`

// nvswitchMatrix is an 8-GPU NVSwitch box (HGX A100): every pair NV12, PCIe
// NODE within a socket and SYS across.
const nvswitchMatrix = `
topo X    NV12 NV12 NV12 NV12 NV12 NV12 NV12
topo NV12 X    NV12 NV12 NV12 NV12 NV12 NV12
topo NV12 NV12 X    NV12 NV12 NV12 NV12 NV12
topo NV12 NV12 NV12 X    NV12 NV12 NV12 NV12
topo NV12 NV12 NV12 NV12 X    NV12 NV12 NV12
topo NV12 NV12 NV12 NV12 NV12 X    NV12 NV12
topo NV12 NV12 NV12 NV12 NV12 NV12 X    NV12
topo NV12 NV12 NV12 NV12 NV12 NV12 NV12 X
pcie X    NODE NODE NODE SYS  SYS  SYS  SYS
pcie NODE X    NODE NODE SYS  SYS  SYS  SYS
pcie NODE NODE X    NODE SYS  SYS  SYS  SYS
pcie NODE NODE NODE X    SYS  SYS  SYS  SYS
pcie SYS  SYS  SYS  SYS  X    NODE NODE NODE
pcie SYS  SYS  SYS  SYS  NODE X    NODE NODE
pcie SYS  SYS  SYS  SYS  NODE NODE X    NODE
pcie SYS  SYS  SYS  SYS  NODE NODE NODE X
`

// fixture is a named test topology with its links kept for brute force.
type fixture struct {
	name  string
	links [][]Link
	topo  *Topology
}

// parseMatrix reads the topo/pcie text form above. numa[i] is GPU i's NUMA
// node. A "topo" cell is X, NV<n> or a PCIe word; the PCIe relation of an
// NV cell comes from the "pcie" rows (SYS if there are none).
func parseMatrix(text string, numa []int) ([][]Link, error) {
	var topo, pcie [][]string
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "topo":
			topo = append(topo, f[1:])
		case "pcie":
			pcie = append(pcie, f[1:])
		default:
			return nil, fmt.Errorf("line %q: want a topo or pcie row", line)
		}
	}
	n := len(topo)
	if len(numa) != n || (pcie != nil && len(pcie) != n) {
		return nil, fmt.Errorf("%d topo rows, %d pcie rows, %d NUMA nodes", n, len(pcie), len(numa))
	}
	links := make([][]Link, n)
	for i := range links {
		links[i] = make([]Link, n)
		if len(topo[i]) != n || (pcie != nil && len(pcie[i]) != n) {
			return nil, fmt.Errorf("row %d: want %d cells", i, n)
		}
		for j := range links[i] {
			if i == j {
				continue
			}
			l := Link{SameNUMA: numa[i] == numa[j]}
			cell := topo[i][j]
			if rest, ok := strings.CutPrefix(cell, "NV"); ok {
				nv, err := strconv.Atoi(rest)
				if err != nil {
					return nil, fmt.Errorf("cell %d,%d = %q: %v", i, j, cell, err)
				}
				l.NVLinks = nv
				cell = "SYS"
			}
			if pcie != nil {
				cell = pcie[i][j]
			}
			p, err := parseProximity(cell)
			if err != nil {
				return nil, fmt.Errorf("cell %d,%d: %v", i, j, err)
			}
			l.PCIe = p
			links[i][j] = l
		}
	}
	for i := range links {
		for j := range links {
			if links[i][j] != links[j][i] {
				return nil, fmt.Errorf("cells %d,%d and %d,%d differ", i, j, j, i)
			}
		}
	}
	return links, nil
}

func parseProximity(word string) (Proximity, error) {
	for p := ProxSYS; p <= ProxPIX; p++ {
		if p.String() == word {
			return p, nil
		}
	}
	return 0, fmt.Errorf("unknown PCIe word %q", word)
}

// newFixture builds a fixture from a link matrix, failing the test on error.
func newFixture(tb testing.TB, name string, links [][]Link) fixture {
	tb.Helper()
	topo, err := NewTopology(len(links), func(i, j int) Link { return links[i][j] })
	if err != nil {
		tb.Fatalf("fixture %s: NewTopology: %v", name, err)
	}
	return fixture{name: name, links: links, topo: topo}
}

func mustParse(tb testing.TB, name, text string, numa []int) fixture {
	tb.Helper()
	links, err := parseMatrix(text, numa)
	if err != nil {
		tb.Fatalf("fixture %s: %v", name, err)
	}
	return newFixture(tb, name, links)
}

func dgx1(tb testing.TB) fixture {
	return mustParse(tb, "dgx1", dgx1Matrix, []int{0, 0, 0, 0, 1, 1, 1, 1})
}

func l4Box(tb testing.TB) fixture {
	return mustParse(tb, "l4x4", l4Matrix, []int{0, 0, 1, 1})
}

func nvswitch(tb testing.TB) fixture {
	return mustParse(tb, "nvswitch8", nvswitchMatrix, []int{0, 0, 0, 0, 1, 1, 1, 1})
}

// dgx1Boards is `boards` DGX-1 boards joined over SYS; board b's GPUs are
// 8b..8b+7 on NUMA nodes 2b and 2b+1.
func dgx1Boards(tb testing.TB, boards int) fixture {
	tb.Helper()
	one := dgx1(tb).links
	n := 8 * boards
	links := make([][]Link, n)
	for i := range links {
		links[i] = make([]Link, n)
		for j := range links[i] {
			if i != j && i/8 == j/8 {
				links[i][j] = one[i%8][j%8]
			} // across boards: zero Link = no NVLink, SYS, other NUMA
		}
	}
	return newFixture(tb, fmt.Sprintf("dgx1x%d", boards), links)
}

// randomLinks draws a topology of n GPUs: GPUs sit on 1-4 NUMA nodes, PCIe
// proximity is random within a node and SYS across, NVLinks are sparse and
// 1-3 wide; sometimes everything is tied to stress the tie rules.
func randomLinks(r *rand.Rand, n int) [][]Link {
	numa := make([]int, n)
	nodes := 1 + r.IntN(4)
	for i := range numa {
		numa[i] = r.IntN(nodes)
	}
	density := r.Float64()
	flat := r.IntN(8) == 0 // all pairs alike but NUMA: many ties
	links := make([][]Link, n)
	for i := range links {
		links[i] = make([]Link, n)
	}
	for i := 0; i < n; i++ {
		for j := i + 1; j < n; j++ {
			l := Link{SameNUMA: numa[i] == numa[j]}
			if l.SameNUMA {
				l.PCIe = Proximity(1 + r.IntN(4))
			}
			if !flat && r.Float64() < density {
				l.NVLinks = 1 + r.IntN(3)
			}
			if flat {
				l.PCIe = ProxNODE
			}
			links[i][j], links[j][i] = l, l
		}
	}
	return links
}

// pick returns a random subset of 0..n-1 with about a fraction p of them.
func pick(r *rand.Rand, n int, p float64) []int {
	var out []int
	for i := 0; i < n; i++ {
		if r.Float64() < p {
			out = append(out, i)
		}
	}
	return out
}
