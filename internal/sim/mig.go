package sim

import (
	"fmt"
	"strconv"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// migLayout is a GPU's current MIG mode and devices. A layout is never
// changed in place: SetMIGLayout swaps in a new one under the node's mutex,
// and readers take the whole value under it.
type migLayout struct {
	enabled bool
	migs    []*simMIG
	devs    []gonvml.Device // the MIG device handle (simDevice) for each of migs
	gen     int             // how many times SetMIGLayout re-partitioned the GPU
}

func (l migLayout) profiles() []string {
	var out []string
	for _, m := range l.migs {
		out = append(out, m.profile)
	}
	return out
}

// newMIGLayout builds the mock devices of a layout; it takes no lock.
func (n *Node) newMIGLayout(g *simGPU, enabled bool, migs []*simMIG, gen int) migLayout {
	l := migLayout{enabled: enabled, migs: migs, gen: gen}
	for _, m := range migs {
		l.devs = append(l.devs, simDevice{n.newMIGDevice(g, m)})
	}
	return l
}

// migLayoutOf returns GPU i's current layout.
func (n *Node) migLayoutOf(i int) migLayout {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state[i].mig
}

// migByUUID finds a current MIG device of GPU i by UUID.
func (n *Node) migByUUID(i int, uuid string) gonvml.Device {
	l := n.migLayoutOf(i)
	for k, m := range l.migs {
		if m.uuid == uuid {
			return l.devs[k]
		}
	}
	return nil
}

// SetMIGLayout re-partitions a GPU, as mig-parted or nvidia-smi would:
// every MIG device is destroyed and the listed profiles are created in order
// (each new device gets a new UUID). enabled=false turns MIG mode off and
// needs an empty list; enabled=true with an empty list leaves MIG on with no
// devices. The GPU's compute processes end. The daemon sees the change on
// its next inventory scan.
func (n *Node) SetMIGLayout(gpu int, enabled bool, profiles []string) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	g := n.spec.gpus[gpu]
	m := g.model
	if len(m.config.MIGProfiles.GpuInstanceProfiles) == 0 {
		return fmt.Errorf("GPU %d (%s) does not support MIG", gpu, m.key)
	}
	if !enabled && len(profiles) > 0 {
		return fmt.Errorf("MIG devices need MIG mode on: set enabled to true, or list no devices")
	}
	known := m.migProfiles()
	var slices uint32
	for k, name := range profiles {
		id, ok := known[name]
		if !ok {
			return fmt.Errorf("devices[%d]: unknown MIG profile %q for %s (known: %s)", k, name, m.key, strings.Join(m.migProfileNames(), ", "))
		}
		slices += m.config.MIGProfiles.GpuInstanceProfiles[id].SliceCount
	}
	if most := m.migSlices(); slices > most {
		return fmt.Errorf("the MIG devices need %d compute slices; %s has %d", slices, m.key, most)
	}
	placements, err := m.placeMIG(profiles)
	if err != nil {
		return err
	}

	n.mu.Lock()
	defer n.mu.Unlock()
	gen := n.state[gpu].mig.gen + 1
	var migs []*simMIG
	for k, name := range profiles {
		id := known[name]
		migs = append(migs, &simMIG{
			profile: name, giProfile: id, giID: k + 1, ciID: 0, placement: placements[k],
			uuid:      "MIG-" + stableUUID(n.spec.name, "mig", strconv.Itoa(gpu), strconv.Itoa(k), "layout", strconv.Itoa(gen)),
			memoryMiB: m.config.MIGProfiles.GpuInstanceProfiles[id].MemorySizeMB,
		})
	}
	// Building the mock devices takes no lock: their funcs read state later.
	n.state[gpu].mig = n.newMIGLayout(g, enabled, migs, gen)
	// Re-partitioning needs an idle GPU: no process survives it.
	n.state[gpu].procs = nil
	return nil
}
