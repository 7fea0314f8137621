package sim

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// model is a GPU product the simulator knows: what NVML reports for it, and
// its MIG profiles when it has them (taken from go-nvml's mock tables).
type model struct {
	key    string // the name profiles use, e.g. "A100-SXM4-40GB"
	config gpus.Config
	// defaults for telemetry at idle
	smClockMHz, memClockMHz uint32
	idlePowerW              float64
}

var models = []model{
	{key: "A100-SXM4-40GB", config: driverIDs(renamed(gpus.A100_SXM4_40GB, "NVIDIA A100-SXM4-40GB"), ampereHopperIDs), smClockMHz: 1410, memClockMHz: 1215, idlePowerW: 55},
	{key: "A100-SXM4-80GB", config: driverIDs(gpus.A100_SXM4_80GB, ampereHopperIDs), smClockMHz: 1410, memClockMHz: 1593, idlePowerW: 60},
	{key: "A100-PCIE-40GB", config: driverIDs(gpus.A100_PCIE_40GB, ampereHopperIDs), smClockMHz: 1410, memClockMHz: 1215, idlePowerW: 35},
	{key: "A100-PCIE-80GB", config: driverIDs(gpus.A100_PCIE_80GB, ampereHopperIDs), smClockMHz: 1410, memClockMHz: 1512, idlePowerW: 40},
	{key: "A30-PCIE-24GB", config: driverIDs(gpus.A30_PCIE_24GB, a30IDs), smClockMHz: 1440, memClockMHz: 1215, idlePowerW: 30},
	{key: "H100-SXM5-80GB", config: driverIDs(gpus.H100_SXM5_80GB, ampereHopperIDs), smClockMHz: 1980, memClockMHz: 2619, idlePowerW: 70},
	{key: "H200-SXM5-141GB", config: driverIDs(gpus.H200_SXM5_141GB, ampereHopperIDs), smClockMHz: 1980, memClockMHz: 3201, idlePowerW: 75},
	{key: "B200-SXM5-180GB", config: driverIDs(gpus.B200_SXM5_180GB, ampereHopperIDs), smClockMHz: 1965, memClockMHz: 3996, idlePowerW: 120},
	{key: "V100-SXM2-16GB", config: gpus.Config{
		Name: "Tesla V100-SXM2-16GB", Architecture: gonvml.DEVICE_ARCH_VOLTA, Brand: gonvml.BRAND_TESLA,
		MemoryMB: 16384, CudaMajor: 7, CudaMinor: 0, PciDeviceId: 0x1DB110DE,
	}, smClockMHz: 1530, memClockMHz: 877, idlePowerW: 40},
	{key: "L4", config: gpus.Config{
		Name: "NVIDIA L4", Architecture: gonvml.DEVICE_ARCH_ADA, Brand: gonvml.BRAND_NVIDIA,
		MemoryMB: 23034, CudaMajor: 8, CudaMinor: 9, PciDeviceId: 0x27B810DE,
	}, smClockMHz: 2040, memClockMHz: 6251, idlePowerW: 16},
}

// The driver's GPU-instance profile IDs (what nvmlGpuInstanceGetInfo
// reports as profileId and `nvidia-smi mig -lgip` lists) by profile index
// (NVML_GPU_INSTANCE_PROFILE_*). go-nvml's mock tables use the index as the
// ID, which hides every index/ID mix-up; the simulator reports these IDs, as
// the driver and ../shared/tools/fakenvml do. A100, H100, H200 and B200 share
// one numbering (MIG user guide; fakenvml's README table); A30 has its own
// (its `nvidia-smi mig -lgip`: 1g.6gb 14, 1g.6gb+me 21, 2g.12gb 5,
// 2g.12gb+me 6, 4g.24gb 0).
var (
	ampereHopperIDs = map[int]uint32{
		gonvml.GPU_INSTANCE_PROFILE_1_SLICE:      19,
		gonvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1: 20,
		gonvml.GPU_INSTANCE_PROFILE_1_SLICE_REV2: 15,
		gonvml.GPU_INSTANCE_PROFILE_2_SLICE:      14,
		gonvml.GPU_INSTANCE_PROFILE_3_SLICE:      9,
		gonvml.GPU_INSTANCE_PROFILE_4_SLICE:      5,
		gonvml.GPU_INSTANCE_PROFILE_7_SLICE:      0,
	}
	a30IDs = map[int]uint32{
		gonvml.GPU_INSTANCE_PROFILE_1_SLICE:      14,
		gonvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1: 21,
		gonvml.GPU_INSTANCE_PROFILE_2_SLICE:      5,
		gonvml.GPU_INSTANCE_PROFILE_2_SLICE_REV1: 6,
		gonvml.GPU_INSTANCE_PROFILE_4_SLICE:      0,
	}
)

// driverIDs returns c with its GPU-instance profiles carrying the driver's
// IDs; the map is copied, never changed in place (it belongs to go-nvml).
// A profile index without an ID is a programming error caught by the
// package's tests (TestModelsUseDriverProfileIDs).
func driverIDs(c gpus.Config, ids map[int]uint32) gpus.Config {
	profiles := make(map[int]gonvml.GpuInstanceProfileInfo, len(c.MIGProfiles.GpuInstanceProfiles))
	for index, info := range c.MIGProfiles.GpuInstanceProfiles {
		id, ok := ids[index]
		if !ok {
			id = noDriverID
		}
		info.Id = id
		profiles[index] = info
	}
	c.MIGProfiles.GpuInstanceProfiles = profiles
	return c
}

// noDriverID marks a profile index missing from a driver ID table.
const noDriverID = ^uint32(0)

func renamed(c gpus.Config, name string) gpus.Config {
	c.Name = name
	return c
}

// findModel matches a profile's model by key or by product name, ignoring case.
func findModel(name string) (*model, error) {
	for i := range models {
		if strings.EqualFold(models[i].key, name) || strings.EqualFold(models[i].config.Name, name) {
			return &models[i], nil
		}
	}
	keys := make([]string, len(models))
	for i, m := range models {
		keys[i] = m.key
	}
	return nil, fmt.Errorf("unknown GPU model %q (known: %s)", name, strings.Join(keys, ", "))
}

// migProfiles maps the model's MIG profile names to GPU-instance profile
// indices (NVML_GPU_INSTANCE_PROFILE_*; the driver's IDs are in the infos).
func (m *model) migProfiles() map[string]int {
	out := map[string]int{}
	for index, info := range m.config.MIGProfiles.GpuInstanceProfiles {
		name := nvml.MIGProfileName(index, info.SliceCount, info.SliceCount, info.MemorySizeMB, m.config.MemoryMB<<20)
		out[name] = index
	}
	return out
}

// migSlices is the number of compute slices of a whole MIG-enabled GPU.
func (m *model) migSlices() uint32 {
	var most uint32
	for _, info := range m.config.MIGProfiles.GpuInstanceProfiles {
		most = max(most, info.SliceCount)
	}
	return most
}

func (m *model) migProfileNames() []string {
	var names []string
	for n := range m.migProfiles() {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// fullComputeProfile finds the compute-instance profile that spans a whole
// GPU instance.
func (m *model) fullComputeProfile(giProfile int) (gonvml.ComputeInstanceProfileInfo, bool) {
	gi := m.config.MIGProfiles.GpuInstanceProfiles[giProfile]
	for _, ci := range m.config.MIGProfiles.ComputeInstanceProfiles[giProfile] {
		if ci.SliceCount == gi.SliceCount {
			return ci, true
		}
	}
	return gonvml.ComputeInstanceProfileInfo{}, false
}

// placeMIG places GPU instances of the named profiles, in order, as the
// driver places instances created without a placement: each at the highest
// free start its profile allows (go-nvml's placement tables), backtracking
// when that leaves no room for a later one. It fails, naming the layout,
// when they do not fit the GPU's memory slices.
func (m *model) placeMIG(names []string) ([]gonvml.GpuInstancePlacement, error) {
	known := m.migProfiles()
	options := make([][]gonvml.GpuInstancePlacement, len(names))
	for k, name := range names {
		options[k] = slices.Clone(m.config.MIGProfiles.GpuInstancePlacements[known[name]])
		slices.SortFunc(options[k], func(a, b gonvml.GpuInstancePlacement) int { return int(b.Start) - int(a.Start) })
	}
	out := make([]gonvml.GpuInstancePlacement, len(names))
	var used uint64 // a bit per memory slice
	var place func(k int) bool
	place = func(k int) bool {
		if k == len(names) {
			return true
		}
		for _, p := range options[k] {
			mask := (uint64(1)<<p.Size - 1) << p.Start
			if p.Size == 0 || p.Start+p.Size > 64 || used&mask != 0 {
				continue
			}
			used |= mask
			out[k] = p
			if place(k + 1) {
				return true
			}
			used &^= mask
		}
		return false
	}
	if !place(0) {
		return nil, fmt.Errorf("the MIG devices %s do not fit %s's memory slices together (NVML's placements)", strings.Join(names, ", "), m.key)
	}
	return out, nil
}
