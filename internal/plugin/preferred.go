package plugin

import (
	"log/slog"
	"sync/atomic"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/placement"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// TopologyPreferrer answers GetPreferredAllocation with the placement
// package: the best-connected set of whole GPUs, or, for replicas and MIG
// devices, the sharedDevicesAllocationPolicy across physical GPUs first and
// topology among them. The topology is precomputed from the inventory
// (SetInventory, at start and after each re-scan), so a call makes no NVML
// call.
type TopologyPreferrer struct {
	log  *slog.Logger
	topo atomic.Pointer[placement.Topology]
}

// NewTopologyPreferrer returns a preferrer that falls back to FirstFit until
// SetInventory is called.
func NewTopologyPreferrer(log *slog.Logger) *TopologyPreferrer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &TopologyPreferrer{log: log}
}

// SetInventory precomputes the pair weights of a (new) inventory.
func (p *TopologyPreferrer) SetInventory(inv *nvml.Inventory) error {
	n := len(inv.GPUs)
	if n == 0 {
		p.topo.Store(nil)
		return nil
	}
	t, err := placement.NewTopology(n, func(i, j int) placement.Link {
		l := inv.Topology.Links[i][j]
		a, b := inv.GPUs[i].NUMANode, inv.GPUs[j].NUMANode
		return placement.Link{NVLinks: min(l.NVLinks, placement.MaxNVLinks), PCIe: proximity(l.PCIe), SameNUMA: a >= 0 && a == b}
	})
	if err != nil {
		return err
	}
	p.topo.Store(t)
	return nil
}

func proximity(r nvml.PCIeRelation) placement.Proximity {
	switch r {
	case nvml.PCIeInternal, nvml.PCIePIX:
		return placement.ProxPIX
	case nvml.PCIePXB:
		return placement.ProxPXB
	case nvml.PCIePHB:
		return placement.ProxPHB
	case nvml.PCIeNODE:
		return placement.ProxNODE
	}
	return placement.ProxSYS
}

// Prefer implements Preferrer. It never fails: should placement reject the
// request (it cannot, given the server's validation), FirstFit answers.
func (p *TopologyPreferrer) Prefer(res *sharing.Resource, available, mustInclude []*sharing.Device, size int) []string {
	t := p.topo.Load()
	if t == nil {
		return FirstFit{}.Prefer(res, available, mustInclude, size)
	}
	var ids []string
	var err error
	if res.Shared() || hasMIG(available) {
		ids, err = p.preferShared(t, res, available, mustInclude, size)
	} else {
		ids, err = preferWhole(t, available, mustInclude, size)
	}
	if err != nil {
		p.log.Warn("topology-aware placement failed; answering first-fit", "resource", res.Name, "err", err)
		return FirstFit{}.Prefer(res, available, mustInclude, size)
	}
	return ids
}

func hasMIG(devs []*sharing.Device) bool {
	for _, d := range devs {
		if d.MIG != nil {
			return true
		}
	}
	return false
}

// preferWhole chooses whole GPUs by topology.
func preferWhole(t *placement.Topology, available, mustInclude []*sharing.Device, size int) ([]string, error) {
	byGPU := make(map[int]string, len(available))
	avail := make([]int, 0, len(available))
	for _, d := range available {
		byGPU[d.GPUIndex] = d.ID
		avail = append(avail, d.GPUIndex)
	}
	must := make([]int, len(mustInclude))
	for i, d := range mustInclude {
		must[i] = d.GPUIndex
	}
	picked, err := t.Select(avail, must, size)
	if err != nil {
		return nil, err
	}
	ids := make([]string, len(picked))
	for i, g := range picked {
		ids[i] = byGPU[g]
	}
	return ids, nil
}

// preferShared applies the allocation policy to replicas and MIG devices.
// A GPU's allocated count is how many of the resource's units on it the
// kubelet did not offer as available.
func (p *TopologyPreferrer) preferShared(t *placement.Topology, res *sharing.Resource, available, mustInclude []*sharing.Device, size int) ([]string, error) {
	allocated := map[int]int{}
	for i := range res.Devices {
		allocated[res.Devices[i].GPUIndex]++
	}
	unit := func(d *sharing.Device) placement.Unit {
		return placement.Unit{ID: d.ID, GPU: d.GPUIndex, Group: d.Physical}
	}
	avail := make([]placement.Unit, len(available))
	for i, d := range available {
		avail[i] = unit(d)
		allocated[d.GPUIndex]--
	}
	must := make([]placement.Unit, len(mustInclude))
	for i, d := range mustInclude {
		must[i] = unit(d)
	}
	policy := placement.Distributed
	if res.AllocationPolicy == "packed" {
		policy = placement.Packed
	}
	return t.SelectShared(avail, must, size, allocated, policy)
}
