package nvml

import (
	"fmt"
	"math"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// describeMIG reads the MIG mode and, when MIG is on, every MIG device, the
// way real NVML exposes them: by slot index under the parent.
func describeMIG(l *Library, dev gonvml.Device, gpu *GPU, handles map[string]gonvml.Device) error {
	current, _, err := Call2(l, "nvmlDeviceGetMigMode", dev.GetMigMode)
	if err != nil {
		if IsLost(err) {
			return err
		}
		return nil // not MIG-capable
	}
	gpu.MIGCapable = true
	gpu.MIGEnabled = current == gonvml.DEVICE_MIG_ENABLE
	if !gpu.MIGEnabled {
		return nil
	}
	slots, err := Call(l, "nvmlDeviceGetMaxMigDeviceCount", dev.GetMaxMigDeviceCount)
	if err != nil {
		return migErr(gpu, err)
	}
	for slot := 0; slot < slots; slot++ {
		mig, err := Call(l, "nvmlDeviceGetMigDeviceHandleByIndex", func() (gonvml.Device, gonvml.Return) {
			return dev.GetMigDeviceHandleByIndex(slot)
		})
		if err != nil {
			if IsLost(err) {
				return err
			}
			continue // an empty slot answers NOT_FOUND
		}
		m, err := describeMIGDevice(l, dev, mig, gpu.MemoryBytes)
		if err != nil {
			if IsLost(err) {
				return err
			}
			gpu.Problem = fmt.Sprintf("MIG device in slot %d: %v", slot, err)
			continue
		}
		m.Index = len(gpu.MIGDevices)
		gpu.MIGDevices = append(gpu.MIGDevices, m)
		handles[m.UUID] = mig
	}
	return nil
}

func migErr(gpu *GPU, err error) error {
	if IsLost(err) {
		return err
	}
	gpu.Problem = fmt.Sprintf("MIG enabled but its devices cannot be listed: %v", err)
	return nil
}

func describeMIGDevice(l *Library, parent, mig gonvml.Device, parentMemory uint64) (MIGDevice, error) {
	var m MIGDevice
	var err error
	if m.UUID, err = Call(l, "nvmlDeviceGetUUID", mig.GetUUID); err != nil {
		return m, err
	}
	if m.GPUInstanceID, err = Call(l, "nvmlDeviceGetGpuInstanceId", mig.GetGpuInstanceId); err != nil {
		return m, err
	}
	if m.ComputeInstanceID, err = Call(l, "nvmlDeviceGetComputeInstanceId", mig.GetComputeInstanceId); err != nil {
		return m, err
	}
	if mem, err := Call(l, "nvmlDeviceGetMemoryInfo", mig.GetMemoryInfo); err == nil {
		m.MemoryBytes = mem.Total
	}
	gi, err := Call(l, "nvmlDeviceGetGpuInstanceById", func() (gonvml.GpuInstance, gonvml.Return) {
		return parent.GetGpuInstanceById(m.GPUInstanceID)
	})
	if err != nil {
		return m, err
	}
	giInfo, err := Call(l, "nvmlGpuInstanceGetInfo", gi.GetInfo)
	if err != nil {
		return m, err
	}
	giProfile, err := Call(l, "nvmlDeviceGetGpuInstanceProfileInfo", func() (gonvml.GpuInstanceProfileInfo, gonvml.Return) {
		return parent.GetGpuInstanceProfileInfo(int(giInfo.ProfileId))
	})
	if err != nil {
		return m, err
	}
	ciSlices := giProfile.SliceCount
	if ci, err := Call(l, "nvmlGpuInstanceGetComputeInstanceById", func() (gonvml.ComputeInstance, gonvml.Return) {
		return gi.GetComputeInstanceById(m.ComputeInstanceID)
	}); err == nil {
		if ciInfo, err := Call(l, "nvmlComputeInstanceGetInfo", ci.GetInfo); err == nil {
			if p, err := Call(l, "nvmlGpuInstanceGetComputeInstanceProfileInfo", func() (gonvml.ComputeInstanceProfileInfo, gonvml.Return) {
				return gi.GetComputeInstanceProfileInfo(int(ciInfo.ProfileId), gonvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
			}); err == nil {
				ciSlices = p.SliceCount
			}
		}
	}
	if m.MemoryBytes == 0 {
		m.MemoryBytes = giProfile.MemorySizeMB << 20
	}
	m.Profile = MIGProfileName(int(giProfile.Id), giProfile.SliceCount, ciSlices, giProfile.MemorySizeMB, parentMemory)
	return m, nil
}

// MIGProfileName names a MIG profile the way nvidia-smi and the device
// plugin's resource names do: "<g>g.<gb>gb", "<c>c.<g>g.<gb>gb" when the
// compute instance uses fewer slices than its GPU instance, plus the
// media-engine or graphics suffix of the GPU-instance profile ("+me").
//
// The GB figure is the profile's share of the whole GPU, rounded up to an
// eighth, times the GPU's memory in whole GB: that is what makes a 4864 MiB
// slice of a 40 GiB A100 a "5gb" profile and a 9856 MiB one a "10gb".
func MIGProfileName(giProfileID int, giSlices, ciSlices uint32, memoryMiB, parentMemoryBytes uint64) string {
	gb := memoryMiB / 1024
	if parentMemoryBytes > 0 {
		share := float64(memoryMiB<<20) / float64(parentMemoryBytes)
		share = math.Ceil(share*8) / 8
		parentGB := float64((parentMemoryBytes + (1<<30 - 1)) >> 30)
		gb = uint64(math.Round(share * parentGB))
	}
	name := fmt.Sprintf("%dg.%dgb", giSlices, gb)
	if ciSlices > 0 && ciSlices < giSlices {
		name = fmt.Sprintf("%dc.%s", ciSlices, name)
	}
	return name + migProfileSuffix(giProfileID)
}

func migProfileSuffix(id int) string {
	switch id {
	case gonvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1, gonvml.GPU_INSTANCE_PROFILE_2_SLICE_REV1:
		return "+me"
	case gonvml.GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, gonvml.GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME:
		return "+me.all"
	case gonvml.GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, gonvml.GPU_INSTANCE_PROFILE_2_SLICE_NO_ME:
		return "-me"
	case gonvml.GPU_INSTANCE_PROFILE_1_SLICE_GFX, gonvml.GPU_INSTANCE_PROFILE_2_SLICE_GFX,
		gonvml.GPU_INSTANCE_PROFILE_3_SLICE_GFX, gonvml.GPU_INSTANCE_PROFILE_4_SLICE_GFX:
		return "+gfx"
	}
	return ""
}
