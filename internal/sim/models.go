package sim

import (
	"fmt"
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
	{key: "A100-SXM4-40GB", config: renamed(gpus.A100_SXM4_40GB, "NVIDIA A100-SXM4-40GB"), smClockMHz: 1410, memClockMHz: 1215, idlePowerW: 55},
	{key: "A100-SXM4-80GB", config: gpus.A100_SXM4_80GB, smClockMHz: 1410, memClockMHz: 1593, idlePowerW: 60},
	{key: "A100-PCIE-40GB", config: gpus.A100_PCIE_40GB, smClockMHz: 1410, memClockMHz: 1215, idlePowerW: 35},
	{key: "A100-PCIE-80GB", config: gpus.A100_PCIE_80GB, smClockMHz: 1410, memClockMHz: 1512, idlePowerW: 40},
	{key: "A30-PCIE-24GB", config: gpus.A30_PCIE_24GB, smClockMHz: 1440, memClockMHz: 1215, idlePowerW: 30},
	{key: "H100-SXM5-80GB", config: gpus.H100_SXM5_80GB, smClockMHz: 1980, memClockMHz: 2619, idlePowerW: 70},
	{key: "H200-SXM5-141GB", config: gpus.H200_SXM5_141GB, smClockMHz: 1980, memClockMHz: 3201, idlePowerW: 75},
	{key: "B200-SXM5-180GB", config: gpus.B200_SXM5_180GB, smClockMHz: 1965, memClockMHz: 3996, idlePowerW: 120},
	{key: "V100-SXM2-16GB", config: gpus.Config{
		Name: "Tesla V100-SXM2-16GB", Architecture: gonvml.DEVICE_ARCH_VOLTA, Brand: gonvml.BRAND_TESLA,
		MemoryMB: 16384, CudaMajor: 7, CudaMinor: 0, PciDeviceId: 0x1DB110DE,
	}, smClockMHz: 1530, memClockMHz: 877, idlePowerW: 40},
	{key: "L4", config: gpus.Config{
		Name: "NVIDIA L4", Architecture: gonvml.DEVICE_ARCH_ADA, Brand: gonvml.BRAND_NVIDIA,
		MemoryMB: 23034, CudaMajor: 8, CudaMinor: 9, PciDeviceId: 0x27B810DE,
	}, smClockMHz: 2040, memClockMHz: 6251, idlePowerW: 16},
}

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

// migProfiles maps the model's MIG profile names to GPU-instance profile IDs.
func (m *model) migProfiles() map[string]int {
	out := map[string]int{}
	for id, info := range m.config.MIGProfiles.GpuInstanceProfiles {
		name := nvml.MIGProfileName(id, info.SliceCount, info.SliceCount, info.MemorySizeMB, m.config.MemoryMB<<20)
		out[name] = id
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
