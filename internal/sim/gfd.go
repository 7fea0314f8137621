package sim

import (
	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// What GPU feature discovery's labels read beyond identity: the PCI class
// (every simulated model is a 3D controller, i.e. in compute mode, as
// data-centre GPUs ship) and the NVLink fabric registration, which no
// built-in model has (nvmlDeviceGetGpuFabricInfo answers NOT_SUPPORTED, as
// it does on HGX and PCIe boards) until SetFabric gives one.

func (n *Node) addFeatureFuncs(d *mock.Device, g *simGPU) {
	i := g.index
	d.GetPciInfoExtFunc = func() (gonvml.PciInfoExt, gonvml.Return) {
		p := pciInfo(g.busID, g.model.config.PciDeviceId)
		return value(n, i, "GetPciInfoExt", gonvml.PciInfoExt{
			Version: gonvml.STRUCT_VERSION(gonvml.PciInfoExt{}, 1), Domain: p.Domain, Bus: p.Bus, Device: p.Device,
			PciDeviceId: p.PciDeviceId, BaseClass: 0x03, SubClass: 0x02, BusId: p.BusId,
		})
	}
	d.GetGpuFabricInfoFunc = func() (gonvml.GpuFabricInfo, gonvml.Return) {
		info, r := read(n, i, "GetGpuFabricInfo", func(s *gpuState) gonvml.GpuFabricInfo { return s.fabric })
		if r == gonvml.SUCCESS && info == (gonvml.GpuFabricInfo{}) {
			return info, gonvml.ERROR_NOT_SUPPORTED
		}
		return info, r
	}
}

// SetFabric sets what nvmlDeviceGetGpuFabricInfo reports for a GPU, as on an
// NVLink-network system (GB200 NVL72): state GPU_FABRIC_STATE_COMPLETED,
// status SUCCESS, the cluster UUID and clique ID. The zero value makes the
// call NOT_SUPPORTED again.
func (n *Node) SetFabric(gpu int, info gonvml.GpuFabricInfo) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.state[gpu].fabric = info
	return nil
}
