package cdi

import (
	"fmt"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// inventoryView presents an Inventory to nvcdi as the NVML library it
// expects. nvcdi then describes exactly the devices the node advertises,
// from the same snapshot, without a second NVML session: every NVML call
// stays behind internal/nvml's guards, and the spec is a function of the
// inventory (and the driver root's files) alone.
//
// The embedded interfaces are nil: a call nvcdi makes that the view does
// not answer panics, and Generate turns that panic into an error naming
// the call.
type inventoryView struct {
	gonvml.Interface
	inv     *nvml.Inventory
	gpus    []*gpuView // the usable GPUs, in NVML index order
	devices map[string]gonvml.Device
}

type gpuView struct {
	gonvml.Device
	gpu *nvml.GPU
}

func newInventoryView(inv *nvml.Inventory) *inventoryView {
	v := &inventoryView{inv: inv, devices: map[string]gonvml.Device{}}
	for i := range inv.GPUs {
		g := &inv.GPUs[i]
		if !g.Usable() || g.Lost {
			continue
		}
		gv := &gpuView{gpu: g}
		v.gpus = append(v.gpus, gv)
		v.devices[g.UUID] = gv
	}
	return v
}

func (v *inventoryView) Init() gonvml.Return     { return gonvml.SUCCESS }
func (v *inventoryView) Shutdown() gonvml.Return { return gonvml.SUCCESS }

func (v *inventoryView) ErrorString(r gonvml.Return) string {
	return fmt.Sprintf("NVML return %d", int32(r))
}

func (v *inventoryView) SystemGetDriverVersion() (string, gonvml.Return) {
	if v.inv.DriverVersion == "" {
		return "", gonvml.ERROR_NOT_SUPPORTED
	}
	return v.inv.DriverVersion, gonvml.SUCCESS
}

func (v *inventoryView) SystemGetCudaDriverVersion() (int, gonvml.Return) {
	var major, minor int
	if _, err := fmt.Sscanf(v.inv.CUDADriverVersion, "%d.%d", &major, &minor); err != nil {
		return 0, gonvml.ERROR_NOT_SUPPORTED
	}
	return major*1000 + minor*10, gonvml.SUCCESS
}

func (v *inventoryView) DeviceGetCount() (int, gonvml.Return) { return len(v.gpus), gonvml.SUCCESS }

func (v *inventoryView) DeviceGetHandleByIndex(i int) (gonvml.Device, gonvml.Return) {
	if i < 0 || i >= len(v.gpus) {
		return nil, gonvml.ERROR_INVALID_ARGUMENT
	}
	return v.gpus[i], gonvml.SUCCESS
}

func (v *inventoryView) DeviceGetHandleByUUID(uuid string) (gonvml.Device, gonvml.Return) {
	if d, ok := v.devices[uuid]; ok {
		return d, gonvml.SUCCESS
	}
	return nil, gonvml.ERROR_NOT_FOUND
}

func (g *gpuView) GetUUID() (string, gonvml.Return)         { return g.gpu.UUID, gonvml.SUCCESS }
func (g *gpuView) GetName() (string, gonvml.Return)         { return g.gpu.Name, gonvml.SUCCESS }
func (g *gpuView) GetIndex() (int, gonvml.Return)           { return g.gpu.Index, gonvml.SUCCESS }
func (g *gpuView) IsMigDeviceHandle() (bool, gonvml.Return) { return false, gonvml.SUCCESS }

func (g *gpuView) GetMinorNumber() (int, gonvml.Return) {
	if g.gpu.Minor < 0 {
		return 0, gonvml.ERROR_NOT_SUPPORTED
	}
	return g.gpu.Minor, gonvml.SUCCESS
}

func (g *gpuView) GetPciInfo() (gonvml.PciInfo, gonvml.Return) {
	var p gonvml.PciInfo
	id := strings.ToLower(g.gpu.PCIBusID)
	for i := 0; i < len(id) && i < len(p.BusId)-1; i++ {
		p.BusId[i] = int8(id[i])
	}
	for i := 0; i < len(id) && i < len(p.BusIdLegacy)-1; i++ {
		p.BusIdLegacy[i] = int8(id[i])
	}
	fmt.Sscanf(id, "%x:%x:%x", &p.Domain, &p.Bus, &p.Device)
	return p, gonvml.SUCCESS
}

func (g *gpuView) GetMigMode() (int, int, gonvml.Return) {
	if !g.gpu.MIGCapable {
		return 0, 0, gonvml.ERROR_NOT_SUPPORTED
	}
	mode := gonvml.DEVICE_MIG_DISABLE
	if g.gpu.MIGEnabled {
		mode = gonvml.DEVICE_MIG_ENABLE
	}
	return mode, mode, gonvml.SUCCESS
}

// GetMaxMigDeviceCount is 0: MIG devices are described by migDevices, not
// by nvcdi, which reads the capability minors from the host's /proc only
// (see Generate). A MIG-enabled GPU is still reported as such, so nvcdi
// leaves it out as a whole GPU, as it does on a real node.
func (g *gpuView) GetMaxMigDeviceCount() (int, gonvml.Return) { return 0, gonvml.SUCCESS }

// Extensions answers go-nvlib's "does this driver have symbol X" checks:
// the inventory came from a driver that answered them.
func (v *inventoryView) Extensions() gonvml.ExtendedInterface { return symbols{} }

type symbols struct{}

func (symbols) LookupSymbol(string) error { return nil }

func (g *gpuView) GetMemoryInfo() (gonvml.Memory, gonvml.Return) {
	return gonvml.Memory{Total: g.gpu.MemoryBytes, Free: g.gpu.MemoryBytes}, gonvml.SUCCESS
}

func (g *gpuView) GetCudaComputeCapability() (int, int, gonvml.Return) {
	return g.gpu.ComputeCapability.Major, g.gpu.ComputeCapability.Minor, gonvml.SUCCESS
}
