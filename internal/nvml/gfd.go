package nvml

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// What GPU feature discovery's labels need beyond identity: the PCI class
// (nvidia.com/gpu.mode), the NVLink fabric a GPU is attached to
// (nvidia.com/gpu.clique) and a MIG device's attributes
// (nvidia.com/mig-<profile>.multiprocessors, .slices.*, .engines.*). Each is
// optional: a call that fails or is not supported leaves the field empty and
// the label out, and never fails the scan (only a lost GPU does).

// PCI classes (class, subclass and programming interface, as sysfs prints
// them) that nvidia.com/gpu.mode distinguishes.
const (
	PCIClassVGA = 0x030000 // VGA-compatible controller: display ("graphics") mode
	PCIClass3D  = 0x030200 // 3D controller: compute mode
)

// Fabric is the NVLink fabric (NVSwitch/NVLink network, e.g. GB200 NVL72)
// a GPU has completed registering with.
type Fabric struct {
	ClusterUUID string `json:"clusterUuid"` // e.g. "7b968a6d-c8aa-45e1-9e07-e1e51be99c31"
	CliqueID    uint32 `json:"cliqueId"`
}

// MIGAttributes is what nvmlDeviceGetAttributes reports for a MIG device.
type MIGAttributes struct {
	MemoryMiB       uint64 `json:"memoryMiB"`
	Multiprocessors uint32 `json:"multiprocessors"`
	GISlices        uint32 `json:"giSlices"`
	CISlices        uint32 `json:"ciSlices"`
	CopyEngines     uint32 `json:"copyEngines"`
	Decoders        uint32 `json:"decoders"`
	Encoders        uint32 `json:"encoders"`
	JPEGs           uint32 `json:"jpegs"`
	OFAs            uint32 `json:"ofas"`
}

// hasSymbol reports whether the loaded NVML exports name. Calling a function
// the library lacks kills the process, so newer calls ask first; a library
// that cannot answer (a partial mock) is taken to lack it.
func hasSymbol(l *Library, name string) bool {
	return Do(l, "nvmlLookupSymbol", func() gonvml.Return {
		if l.iface.Extensions().LookupSymbol(name) != nil {
			return gonvml.ERROR_FUNCTION_NOT_FOUND
		}
		return gonvml.SUCCESS
	}) == nil
}

// describeFeatures fills the GPU's PCI class and fabric. Only a lost GPU is
// an error.
func describeFeatures(l *Library, dev gonvml.Device, gpu *GPU, sysRoot string) error {
	if hasSymbol(l, "nvmlDeviceGetPciInfoExt") {
		ext, err := Call(l, "nvmlDeviceGetPciInfoExt", dev.GetPciInfoExt)
		if IsLost(err) {
			return err
		}
		if err == nil && ext.BaseClass != 0 {
			gpu.PCIClass = ext.BaseClass<<16 | ext.SubClass<<8
		}
	}
	if gpu.PCIClass == 0 {
		gpu.PCIClass = sysfsPCIClass(sysRoot, gpu.PCIBusID)
	}
	if hasSymbol(l, "nvmlDeviceGetGpuFabricInfo") {
		info, err := Call(l, "nvmlDeviceGetGpuFabricInfo", dev.GetGpuFabricInfo)
		if IsLost(err) {
			return err
		}
		// Attached means registration completed, with a cluster and
		// without an error, as go-nvlib's IsFabricAttached decides.
		if err == nil && info.State == gonvml.GPU_FABRIC_STATE_COMPLETED &&
			gonvml.Return(info.Status) == gonvml.SUCCESS && info.ClusterUuid != [16]uint8{} {
			gpu.Fabric = &Fabric{ClusterUUID: formatUUID(info.ClusterUuid), CliqueID: info.CliqueId}
		}
	}
	return nil
}

// formatUUID prints 16 bytes as a canonical lower-case UUID.
func formatUUID(b [16]uint8) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// sysfsPCIClass reads /sys/bus/pci/devices/<bdf>/class ("0x030200"); 0 when
// unknown.
func sysfsPCIClass(sysRoot, bus string) uint32 {
	if sysRoot == "" || bus == "" {
		return 0
	}
	bdf := strings.ToLower(bus)
	if len(bdf) == len("00000000:07:00.0") {
		bdf = bdf[4:]
	}
	raw, err := os.ReadFile(filepath.Join(sysRoot, "bus", "pci", "devices", bdf, "class"))
	if err != nil {
		return 0
	}
	v, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(raw)), "0x"), 16, 32)
	if err != nil {
		return 0
	}
	return uint32(v)
}

// migAttributes reads a MIG device's attributes from nvmlDeviceGetAttributes,
// or, where that fails, from its GPU- and compute-instance profiles (the
// same numbers: the compute instance's SMs and shared engines, the GPU
// instance's memory). Only a lost GPU is an error.
func migAttributes(l *Library, mig gonvml.Device, gi gonvml.GpuInstanceProfileInfo, ci gonvml.ComputeInstanceProfileInfo) (*MIGAttributes, error) {
	a, err := Call(l, "nvmlDeviceGetAttributes", mig.GetAttributes)
	if IsLost(err) {
		return nil, err
	}
	if err == nil {
		return &MIGAttributes{
			MemoryMiB: a.MemorySizeMB, Multiprocessors: a.MultiprocessorCount,
			GISlices: a.GpuInstanceSliceCount, CISlices: a.ComputeInstanceSliceCount,
			CopyEngines: a.SharedCopyEngineCount, Decoders: a.SharedDecoderCount, Encoders: a.SharedEncoderCount,
			JPEGs: a.SharedJpegCount, OFAs: a.SharedOfaCount,
		}, nil
	}
	if gi.SliceCount == 0 {
		return nil, nil
	}
	out := &MIGAttributes{
		MemoryMiB: gi.MemorySizeMB, Multiprocessors: gi.MultiprocessorCount, GISlices: gi.SliceCount, CISlices: gi.SliceCount,
		CopyEngines: gi.CopyEngineCount, Decoders: gi.DecoderCount, Encoders: gi.EncoderCount, JPEGs: gi.JpegCount, OFAs: gi.OfaCount,
	}
	if ci.SliceCount > 0 {
		out.Multiprocessors, out.CISlices = ci.MultiprocessorCount, ci.SliceCount
		out.CopyEngines, out.Decoders, out.Encoders = ci.SharedCopyEngineCount, ci.SharedDecoderCount, ci.SharedEncoderCount
		out.JPEGs, out.OFAs = ci.SharedJpegCount, ci.SharedOfaCount
	}
	return out, nil
}
