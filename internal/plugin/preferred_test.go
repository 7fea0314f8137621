package plugin_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/placement"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

func topologyEnv(t testing.TB, profile string) (*env, *placement.Topology) {
	t.Helper()
	inv := inventory(t, profile)
	pref := plugin.NewTopologyPreferrer(nil)
	if err := pref.SetInventory(inv); err != nil {
		t.Fatal(err)
	}
	e := startEnvWith(t, inv, defaultRespond(), true, pref)
	e.waitAllocatable(t, len(inv.GPUs), len(inv.GPUs))
	return e, topologyOf(t, inv)
}

// topologyOf builds the reference topology from the inventory independently
// of the preferrer's own mapping.
func topologyOf(t testing.TB, inv *nvml.Inventory) *placement.Topology {
	prox := map[string]placement.Proximity{"PIX": placement.ProxPIX, "PXB": placement.ProxPXB, "PHB": placement.ProxPHB,
		"NODE": placement.ProxNODE, "SYS": placement.ProxSYS}
	topo, err := placement.NewTopology(len(inv.GPUs), func(i, j int) placement.Link {
		l := inv.Topology.Links[i][j]
		return placement.Link{NVLinks: l.NVLinks, PCIe: prox[l.PCIe.String()],
			SameNUMA: inv.GPUs[i].NUMANode == inv.GPUs[j].NUMANode && inv.GPUs[i].NUMANode >= 0}
	})
	if err != nil {
		t.Fatal(err)
	}
	return topo
}

// bestScore is the brute-force optimum: the highest score of any set of
// the size within available that holds mustInclude.
func bestScore(t *placement.Topology, available, mustInclude []int, size int) int64 {
	best := int64(-1)
	var rec func(start int, set []int)
	rec = func(start int, set []int) {
		if len(set) == size {
			for _, m := range mustInclude {
				if !slices.Contains(set, m) {
					return
				}
			}
			s, _ := t.Score(set)
			best = max(best, s)
			return
		}
		for k := start; k < len(available); k++ {
			rec(k+1, append(set, available[k]))
		}
	}
	rec(0, nil)
	return best
}

// TestPreferredOverGRPCIsOptimal asks over the plugin socket, on every
// built-in profile, for random available sets and sizes, and checks each
// answer against the brute-force optimum.
func TestPreferredOverGRPCIsOptimal(t *testing.T) {
	for _, profile := range sim.BuiltinNames() {
		if profile == "dgx-a100-mig" {
			continue // its nvidia.com/gpu resource is whole GPUs only under migStrategy none: same topology as dgx-a100
		}
		t.Run(profile, func(t *testing.T) {
			e, topo := topologyEnv(t, profile)
			u := e.uuids()
			index := map[string]int{}
			for i, id := range u {
				index[id] = i
			}
			rng := rand.New(rand.NewPCG(1, uint64(len(profile))))
			ctx := context.Background()
			for round := 0; round < 60; round++ {
				perm := rng.Perm(len(u))
				avail := perm[:1+rng.IntN(len(u))]
				size := 1 + rng.IntN(len(avail))
				var must []int
				if rng.IntN(2) == 0 {
					must = avail[:rng.IntN(size+1)]
				}
				var availIDs, mustIDs []string
				for _, i := range avail {
					availIDs = append(availIDs, u[i])
				}
				for _, i := range must {
					mustIDs = append(mustIDs, u[i])
				}
				got, err := e.kubelet.Preferred(ctx, gpuResource, availIDs, mustIDs, size)
				if err != nil {
					t.Fatal(err)
				}
				var set []int
				for _, id := range got {
					set = append(set, index[id])
				}
				score, err := topo.Score(set)
				if err != nil || len(set) != size {
					t.Fatalf("answer %v for size %d: %v", set, size, err)
				}
				for _, m := range must {
					if !slices.Contains(set, m) {
						t.Fatalf("answer %v lacks must-include GPU %d", set, m)
					}
				}
				if want := bestScore(topo, avail, must, size); score != want {
					t.Errorf("available %v must %v size %d: answer %v scores %d, optimum %d", avail, must, size, set, score, want)
				}
			}
		})
	}
}

// TestPreferredHandChecked: the cases a person can check by eye.
func TestPreferredHandChecked(t *testing.T) {
	quads := [][]int{{0, 1, 2, 3}, {4, 5, 6, 7}}
	e, _ := topologyEnv(t, "dgx1-volta")
	u := e.uuids()
	got, err := e.kubelet.Preferred(context.Background(), gpuResource, u, nil, 4)
	if err != nil {
		t.Fatal(err)
	}
	ok := false
	for _, q := range quads {
		var ids []string
		for _, i := range q {
			ids = append(ids, u[i])
		}
		slices.Sort(ids)
		g := slices.Clone(got)
		slices.Sort(g)
		ok = ok || slices.Equal(ids, g)
	}
	if !ok {
		t.Errorf("DGX-1, 4 GPUs of 8: got %v, want one fully NVLinked quad (0-3 or 4-7)", got)
	}

	e2, _ := topologyEnv(t, "pcie-l4x4")
	l4 := e2.uuids()
	got, err = e2.kubelet.Preferred(context.Background(), gpuResource, l4, nil, 2)
	if err != nil {
		t.Fatal(err)
	}
	numa := map[string]int{}
	for _, g := range e2.inv.GPUs {
		numa[g.UUID] = g.NUMANode
	}
	if len(got) != 2 || numa[got[0]] != numa[got[1]] {
		t.Errorf("L4, 2 GPUs: got %v, want two on one NUMA node", got)
	}
}

// BenchmarkPreferredOverSocket measures GetPreferredAllocation as the
// kubelet sees it, over the unix socket, on the DGX-1 (8 GPUs).
func BenchmarkPreferredOverSocket(b *testing.B) {
	e, _ := topologyEnv(b, "dgx1-volta")
	u := e.uuids()
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 7))
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		perm := rng.Perm(8)
		avail := make([]string, 0, 8)
		for _, k := range perm[:2+rng.IntN(7)] {
			avail = append(avail, u[k])
		}
		start := time.Now()
		if _, err := e.kubelet.Preferred(ctx, gpuResource, avail, nil, 1+rng.IntN(len(avail))); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	reportPercentiles(b, lat)
}
