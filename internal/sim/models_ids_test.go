package sim

import (
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Every MIG-capable model reports the driver's GPU-instance profile IDs,
// which differ from the profile indices, so a consumer that mixes them up
// fails on the simulator as it would on hardware.
func TestModelsUseDriverProfileIDs(t *testing.T) {
	a100 := map[int]uint32{ // fakenvml README / `nvidia-smi mig -lgip` on an A100
		gonvml.GPU_INSTANCE_PROFILE_1_SLICE: 19, gonvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1: 20,
		gonvml.GPU_INSTANCE_PROFILE_1_SLICE_REV2: 15, gonvml.GPU_INSTANCE_PROFILE_2_SLICE: 14,
		gonvml.GPU_INSTANCE_PROFILE_3_SLICE: 9, gonvml.GPU_INSTANCE_PROFILE_4_SLICE: 5,
		gonvml.GPU_INSTANCE_PROFILE_7_SLICE: 0,
	}
	for _, m := range models {
		profiles := m.config.MIGProfiles.GpuInstanceProfiles
		seen := map[uint32]int{}
		for index, info := range profiles {
			if info.Id == noDriverID {
				t.Errorf("%s: profile index %d has no driver ID", m.key, index)
			}
			if info.Id == uint32(index) {
				t.Errorf("%s: profile index %d reports ID %d = its index", m.key, index, info.Id)
			}
			if prev, dup := seen[info.Id]; dup {
				t.Errorf("%s: ID %d on profile indices %d and %d", m.key, info.Id, prev, index)
			}
			seen[info.Id] = index
		}
		if m.key == "A100-SXM4-40GB" || m.key == "H100-SXM5-80GB" {
			for index, id := range a100 {
				if got := profiles[index].Id; got != id {
					t.Errorf("%s: profile index %d has ID %d, want %d", m.key, index, got, id)
				}
			}
		}
	}
}

// The simulator's NVML answers as the driver does: a profile looked up by
// index carries its ID, a GPU instance reports that ID, and an index past
// the last profile is an invalid argument.
func TestSimulatedProfileIDs(t *testing.T) {
	p, err := LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	lib := NewNode(p, nil).NVML()
	dev, _ := lib.DeviceGetHandleByIndex(0) // 7 × 1g.5gb
	info, ret := dev.GetGpuInstanceProfileInfo(gonvml.GPU_INSTANCE_PROFILE_1_SLICE)
	if ret != gonvml.SUCCESS || info.Id != 19 || info.SliceCount != 1 {
		t.Errorf("profile index 0: %+v %v, want ID 19, 1 slice", info, ret)
	}
	if _, ret := dev.GetGpuInstanceProfileInfo(19); ret != gonvml.ERROR_INVALID_ARGUMENT {
		t.Errorf("profile index 19 (an ID used as an index): %v, want ERROR_INVALID_ARGUMENT", ret)
	}
	mig, ret := dev.GetMigDeviceHandleByIndex(0)
	if ret != gonvml.SUCCESS {
		t.Fatal(ret)
	}
	giID, _ := mig.GetGpuInstanceId()
	gi, ret := dev.GetGpuInstanceById(giID)
	if ret != gonvml.SUCCESS {
		t.Fatal(ret)
	}
	if giInfo, _ := gi.GetInfo(); giInfo.ProfileId != 19 {
		t.Errorf("GPU instance %d reports profile ID %d, want 19", giID, giInfo.ProfileId)
	}
}
