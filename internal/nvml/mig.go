package nvml

import (
	"fmt"
	"math"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// A GPU instance reports its profile by ID (nvmlGpuInstanceInfo_t.profileId,
// the ID `nvidia-smi mig -lgip` shows: 19 for an A100's 1g.5gb), but
// nvmlDeviceGetGpuInstanceProfileInfo takes a profile index
// (NVML_GPU_INSTANCE_PROFILE_1_SLICE = 0 for the same profile). The two
// differ on every MIG-capable GPU, so a profile is found by asking for every
// index and matching the ID, and names and suffixes come from the matched
// index. Compute-instance profiles are looked up the same way.

// giProfile is one GPU-instance profile of a GPU: its index (the
// NVML_GPU_INSTANCE_PROFILE_* constant) and what NVML says about it.
type giProfile struct {
	index int
	info  gonvml.GpuInstanceProfileInfo
}

// migProfiles caches one GPU's profile tables for the length of a scan.
type migProfiles struct {
	l   *Library
	dev gonvml.Device
	gi  map[uint32]giProfile // by profile ID; nil until loaded
	// ci maps a GPU-instance profile ID to its compute-instance profiles
	// by CI profile ID.
	ci map[uint32]map[uint32]gonvml.ComputeInstanceProfileInfo
}

// gpuInstanceProfile finds the GPU-instance profile with the given ID.
func (p *migProfiles) gpuInstanceProfile(id uint32) (giProfile, error) {
	if p.gi == nil {
		p.gi = map[uint32]giProfile{}
		for index := 0; index < gonvml.GPU_INSTANCE_PROFILE_COUNT; index++ {
			info, err := Call(p.l, "nvmlDeviceGetGpuInstanceProfileInfo", func() (gonvml.GpuInstanceProfileInfo, gonvml.Return) {
				return p.dev.GetGpuInstanceProfileInfo(index)
			})
			if err != nil {
				if IsLost(err) {
					p.gi = nil
					return giProfile{}, err
				}
				continue // a profile this GPU does not have
			}
			if _, dup := p.gi[info.Id]; !dup {
				p.gi[info.Id] = giProfile{index: index, info: info}
			}
		}
	}
	prof, ok := p.gi[id]
	if !ok {
		p.l.countFailure("nvmlDeviceGetGpuInstanceProfileInfo")
		p.l.errors.Add(1)
		return prof, fmt.Errorf("no GPU-instance profile has ID %d (the GPU lists %d profiles): the driver and NVML disagree; check `nvidia-smi mig -lgip`", id, len(p.gi))
	}
	return prof, nil
}

// computeInstanceProfile returns the compute-instance profile with the
// given ID inside gi, whose GPU-instance profile is giID.
func (p *migProfiles) computeInstanceProfile(gi gonvml.GpuInstance, giID, ciID uint32) (gonvml.ComputeInstanceProfileInfo, error) {
	table, ok := p.ci[giID]
	if !ok {
		table = map[uint32]gonvml.ComputeInstanceProfileInfo{}
		for index := 0; index < gonvml.COMPUTE_INSTANCE_PROFILE_COUNT; index++ {
			info, err := Call(p.l, "nvmlGpuInstanceGetComputeInstanceProfileInfo", func() (gonvml.ComputeInstanceProfileInfo, gonvml.Return) {
				return gi.GetComputeInstanceProfileInfo(index, gonvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
			})
			if err != nil {
				if IsLost(err) {
					return gonvml.ComputeInstanceProfileInfo{}, err
				}
				continue
			}
			if _, dup := table[info.Id]; !dup {
				table[info.Id] = info
			}
		}
		if p.ci == nil {
			p.ci = map[uint32]map[uint32]gonvml.ComputeInstanceProfileInfo{}
		}
		p.ci[giID] = table
	}
	info, ok := table[ciID]
	if !ok {
		p.l.countFailure("nvmlGpuInstanceGetComputeInstanceProfileInfo")
		p.l.errors.Add(1)
		return info, fmt.Errorf("no compute-instance profile has ID %d in GPU-instance profile %d: check `nvidia-smi mig -lcip`", ciID, giID)
	}
	return info, nil
}

// describeMIG reads the MIG mode and, when MIG is on, every MIG device, the
// way real NVML exposes them: by slot index under the parent.
func describeMIG(l *Library, dev gonvml.Device, gpu *GPU, handles map[string]gonvml.Device, capsLoader *migCapsLoader) error {
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
	profiles := &migProfiles{l: l, dev: dev}
	var problems []string
	caps, err := capsLoader.get()
	if err != nil {
		problems = append(problems, err.Error())
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
		m, err := describeMIGDevice(l, dev, mig, gpu.MemoryBytes, profiles)
		if err != nil {
			if IsLost(err) {
				return err
			}
			problems = append(problems, fmt.Sprintf("MIG device in slot %d: %v", slot, err))
			continue
		}
		m.Index = len(gpu.MIGDevices)
		switch {
		case caps == nil:
		case gpu.Minor < 0:
			problems = append(problems, fmt.Sprintf("MIG device %s: no caps without the GPU's device minor", m.UUID))
		default:
			paths, err := caps.DevicePaths(gpu.Minor, m.GPUInstanceID, m.ComputeInstanceID)
			if err != nil {
				problems = append(problems, fmt.Sprintf("MIG device %s: %v", m.UUID, err))
			}
			m.CapDevicePaths = paths
		}
		gpu.MIGDevices = append(gpu.MIGDevices, m)
		handles[m.UUID] = mig
	}
	if len(problems) > 0 {
		gpu.Problem = strings.Join(problems, "; ")
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

func describeMIGDevice(l *Library, parent, mig gonvml.Device, parentMemory uint64, profiles *migProfiles) (MIGDevice, error) {
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
	} else if IsLost(err) {
		return m, err
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
	prof, err := profiles.gpuInstanceProfile(giInfo.ProfileId)
	if err != nil {
		return m, err
	}
	m.GPUInstanceProfileID = int(giInfo.ProfileId)
	m.Placement = MIGPlacement{Start: int(giInfo.Placement.Start), Size: int(giInfo.Placement.Size)}
	ci, err := Call(l, "nvmlGpuInstanceGetComputeInstanceById", func() (gonvml.ComputeInstance, gonvml.Return) {
		return gi.GetComputeInstanceById(m.ComputeInstanceID)
	})
	if err != nil {
		return m, err
	}
	ciInfo, err := Call(l, "nvmlComputeInstanceGetInfo", ci.GetInfo)
	if err != nil {
		return m, err
	}
	ciProf, err := profiles.computeInstanceProfile(gi, giInfo.ProfileId, ciInfo.ProfileId)
	if err != nil {
		return m, err
	}
	if m.MemoryBytes == 0 {
		m.MemoryBytes = prof.info.MemorySizeMB << 20
	}
	m.Profile = MIGProfileName(prof.index, prof.info.SliceCount, ciProf.SliceCount, prof.info.MemorySizeMB, parentMemory)
	if m.Attributes, err = migAttributes(l, mig, prof.info, ciProf); err != nil {
		return m, err
	}
	return m, nil
}

// MIGProfileName names a MIG profile the way nvidia-smi and the device
// plugin's resource names do: "<g>g.<gb>gb", "<c>c.<g>g.<gb>gb" when the
// compute instance uses fewer slices than its GPU instance, plus the
// media-engine or graphics suffix of the GPU-instance profile ("+me").
// giProfileIndex is the profile's index (NVML_GPU_INSTANCE_PROFILE_*), not
// its ID.
//
// The GB figure is the profile's share of the whole GPU, rounded up to an
// eighth, times the GPU's memory in whole GB: that is what makes a 4864 MiB
// slice of a 40 GiB A100 a "5gb" profile and a 9856 MiB one a "10gb".
func MIGProfileName(giProfileIndex int, giSlices, ciSlices uint32, memoryMiB, parentMemoryBytes uint64) string {
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
	return name + migProfileSuffix(giProfileIndex)
}

// migProfileSuffix is the suffix of a GPU-instance profile index.
func migProfileSuffix(index int) string {
	switch index {
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
