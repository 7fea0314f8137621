package nvml

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// PCIeRelation is the closest common PCIe ancestor of two GPUs, in the words
// of `nvidia-smi topo -m`, from closest to farthest.
type PCIeRelation int

// The PCIe relations; the zero value is unknown.
const (
	PCIeUnknown  PCIeRelation = iota
	PCIeSelf                  // X: the same GPU
	PCIeInternal              // the same board (multi-GPU boards)
	PCIePIX                   // at most one PCIe bridge
	PCIePXB                   // several PCIe bridges, no host bridge
	PCIePHB                   // a PCIe host bridge
	PCIeNODE                  // host bridges within one NUMA node
	PCIeSYS                   // across NUMA nodes (SMP interconnect)
)

var pcieWords = map[PCIeRelation]string{
	PCIeUnknown: "?", PCIeSelf: "X", PCIeInternal: "PIX", PCIePIX: "PIX", PCIePXB: "PXB",
	PCIePHB: "PHB", PCIeNODE: "NODE", PCIeSYS: "SYS",
}

func (r PCIeRelation) String() string { return pcieWords[r] }

// MarshalText writes the nvidia-smi word.
func (r PCIeRelation) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText reads the nvidia-smi word back ("?" is unknown).
func (r *PCIeRelation) UnmarshalText(b []byte) error {
	if string(b) == "?" {
		*r = PCIeUnknown
		return nil
	}
	v, err := ParsePCIeRelation(string(b))
	*r = v
	return err
}

// ParsePCIeRelation reads an nvidia-smi word: X, PIX, PXB, PHB, NODE or SYS.
func ParsePCIeRelation(word string) (PCIeRelation, error) {
	switch strings.ToUpper(word) {
	case "X":
		return PCIeSelf, nil
	case "PIX":
		return PCIePIX, nil
	case "PXB":
		return PCIePXB, nil
	case "PHB":
		return PCIePHB, nil
	case "NODE":
		return PCIeNODE, nil
	case "SYS", "SOC":
		return PCIeSYS, nil
	}
	return PCIeUnknown, fmt.Errorf("unknown PCIe relation %q (want X, PIX, PXB, PHB, NODE or SYS)", word)
}

// ParseNVLinkCell reads an "NV<n>" cell of `nvidia-smi topo -m`; ok is false
// for any other word.
func ParseNVLinkCell(word string) (links int, ok bool, err error) {
	if !strings.HasPrefix(strings.ToUpper(word), "NV") || strings.EqualFold(word, "NODE") {
		return 0, false, nil
	}
	n, err := strconv.Atoi(word[2:])
	if err != nil || n < 1 {
		return 0, true, fmt.Errorf("bad NVLink cell %q (want NV<n> with n ≥ 1)", word)
	}
	return n, true, nil
}

func topologyLevel(l gonvml.GpuTopologyLevel) PCIeRelation {
	switch l {
	case gonvml.TOPOLOGY_INTERNAL:
		return PCIeInternal
	case gonvml.TOPOLOGY_SINGLE:
		return PCIePIX
	case gonvml.TOPOLOGY_MULTIPLE:
		return PCIePXB
	case gonvml.TOPOLOGY_HOSTBRIDGE:
		return PCIePHB
	case gonvml.TOPOLOGY_NODE:
		return PCIeNODE
	case gonvml.TOPOLOGY_SYSTEM:
		return PCIeSYS
	}
	return PCIeUnknown
}

// Link is what connects two GPUs.
type Link struct {
	NVLinks int          `json:"nvlinks"`
	PCIe    PCIeRelation `json:"pcie"`
}

// Topology is the pairwise link matrix, indexed by NVML index.
type Topology struct {
	Links [][]Link `json:"links"`
}

// Cell renders a pair as `nvidia-smi topo -m` does: X, NV<n>, or the PCIe word.
func (t Topology) Cell(i, j int) string {
	if i == j {
		return "X"
	}
	l := t.Links[i][j]
	if l.NVLinks > 0 {
		return "NV" + strconv.Itoa(l.NVLinks)
	}
	return l.PCIe.String()
}

// MarshalJSON also writes the matrix as nvidia-smi prints it, for people.
func (t Topology) MarshalJSON() ([]byte, error) {
	matrix := make([][]string, len(t.Links))
	for i := range t.Links {
		matrix[i] = make([]string, len(t.Links))
		for j := range t.Links {
			matrix[i][j] = t.Cell(i, j)
		}
	}
	type plain Topology
	return json.Marshal(struct {
		plain
		Matrix [][]string `json:"matrix"`
	}{plain(t), matrix})
}

// scanTopology queries NVLinks and PCIe ancestry between every pair of
// identified GPUs. devices[i] is nil for GPUs that could not be opened.
//
// NVLinks that end on an NVSwitch (HGX/DGX boards) connect a GPU to every
// other GPU on the same switch fabric; nvidia-smi reports such a pair as
// NV<min(links of the two GPUs)>, and so do we.
func scanTopology(l *Library, devices []gonvml.Device, gpus []GPU) Topology {
	n := len(devices)
	t := Topology{Links: make([][]Link, n)}
	for i := range t.Links {
		t.Links[i] = make([]Link, n)
		t.Links[i][i] = Link{PCIe: PCIeSelf}
	}
	byBus := map[string]int{}
	for i, g := range gpus {
		if devices[i] != nil && g.PCIBusID != "" {
			byBus[g.PCIBusID] = i
		}
	}
	direct := make([][]int, n)
	switchLinks := make([]int, n)
	for i, dev := range devices {
		direct[i] = make([]int, n)
		if dev == nil {
			continue
		}
		for link := 0; link < gonvml.NVLINK_MAX_LINKS; link++ {
			state, err := Call(l, "nvmlDeviceGetNvLinkState", func() (gonvml.EnableState, gonvml.Return) {
				return dev.GetNvLinkState(link)
			})
			if err != nil {
				if errors.Is(err, gonvml.ERROR_INVALID_ARGUMENT) || (link == 0 && IsNotSupported(err)) {
					break // past the GPU's last link, or no NVLink at all
				}
				continue
			}
			if state != gonvml.FEATURE_ENABLED {
				continue
			}
			kind, err := Call(l, "nvmlDeviceGetNvLinkRemoteDeviceType", func() (gonvml.IntNvLinkDeviceType, gonvml.Return) {
				return dev.GetNvLinkRemoteDeviceType(link)
			})
			if err == nil && kind == gonvml.NVLINK_DEVICE_TYPE_SWITCH {
				switchLinks[i]++
				continue
			}
			remote, err := Call(l, "nvmlDeviceGetNvLinkRemotePciInfo", func() (gonvml.PciInfo, gonvml.Return) {
				return dev.GetNvLinkRemotePciInfo(link)
			})
			if err != nil {
				continue
			}
			if j, ok := byBus[busID(remote)]; ok && j != i {
				direct[i][j]++
			}
		}
	}
	for i := 0; i < n; i++ {
		for j := i + 1; j < n; j++ {
			if devices[i] == nil || devices[j] == nil {
				continue
			}
			links := max(direct[i][j], direct[j][i]) + min(switchLinks[i], switchLinks[j])
			level, err := Call(l, "nvmlDeviceGetTopologyCommonAncestor", func() (gonvml.GpuTopologyLevel, gonvml.Return) {
				return devices[i].GetTopologyCommonAncestor(devices[j])
			})
			rel := PCIeUnknown
			if err == nil {
				rel = topologyLevel(level)
			}
			if rel == PCIeUnknown {
				// Without NVML's answer, NUMA placement still tells near from far.
				rel = PCIeSYS
				if gpus[i].NUMANode >= 0 && gpus[i].NUMANode == gpus[j].NUMANode {
					rel = PCIeNODE
				}
			}
			t.Links[i][j] = Link{NVLinks: links, PCIe: rel}
			t.Links[j][i] = t.Links[i][j]
		}
	}
	return t
}
