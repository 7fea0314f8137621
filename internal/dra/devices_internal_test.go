package dra

import (
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

func TestMIGDeviceName(t *testing.T) {
	whole := &nvml.MIGAttributes{GISlices: 3, CISlices: 3}
	split := &nvml.MIGAttributes{GISlices: 3, CISlices: 1}
	placed := nvml.MIGPlacement{Start: 4, Size: 4}
	for _, tc := range []struct {
		name    string
		m       nvml.MIGDevice
		sibling *nvml.MIGDevice // another device of the same GPU
		want    string
	}{
		{"NVIDIA's name", nvml.MIGDevice{UUID: "MIG-a", Profile: "3g.20gb", GPUInstanceID: 2, GPUInstanceProfileID: 9, Placement: placed, Attributes: whole},
			nil, "gpu-3-mig-9-4-4"},
		{"without attributes", nvml.MIGDevice{UUID: "MIG-a", Profile: "3g.20gb", GPUInstanceID: 2, GPUInstanceProfileID: 9, Placement: placed},
			&nvml.MIGDevice{UUID: "MIG-b", GPUInstanceID: 1}, "gpu-3-mig-9-4-4"},
		{"a compute instance smaller than its GPU instance", nvml.MIGDevice{UUID: "MIG-a", Profile: "1c.3g.20gb", GPUInstanceID: 2, ComputeInstanceID: 1,
			GPUInstanceProfileID: 9, Placement: placed, Attributes: split}, nil, "gpu-3-mig-9-4-4-ci1"},
		{"one of two in a GPU instance", nvml.MIGDevice{UUID: "MIG-a", Profile: "3g.20gb", GPUInstanceID: 2, ComputeInstanceID: 0,
			GPUInstanceProfileID: 9, Placement: placed}, &nvml.MIGDevice{UUID: "MIG-b", GPUInstanceID: 2, ComputeInstanceID: 1}, "gpu-3-mig-9-4-4-ci0"},
		{"no placement from NVML", nvml.MIGDevice{UUID: "MIG-a", Profile: "1g.5gb+me", GPUInstanceID: 7, ComputeInstanceID: 0, GPUInstanceProfileID: 20},
			nil, "gpu-3-mig-1g5gb-me-7-0"},
	} {
		g := &nvml.GPU{Minor: 3, MIGDevices: []nvml.MIGDevice{tc.m}}
		if tc.sibling != nil {
			g.MIGDevices = append(g.MIGDevices, *tc.sibling)
		}
		if got := migDeviceName(g, &g.MIGDevices[0]); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}

// Two GPU instances that NVML places in the same slices still get names of
// their own: one duplicate would make the API refuse the whole slice.
func TestMIGDeviceNamesUnique(t *testing.T) {
	same := nvml.MIGPlacement{Start: 0, Size: 1}
	g := nvml.GPU{Minor: 2, UUID: "GPU-a", MIGEnabled: true, MIGDevices: []nvml.MIGDevice{
		{UUID: "MIG-a", Profile: "1g.5gb", GPUInstanceID: 7, GPUInstanceProfileID: 19, Placement: same},
		{UUID: "MIG-b", Profile: "1g.5gb", GPUInstanceID: 8, GPUInstanceProfileID: 19, Placement: same},
	}}
	devs := describe(&nvml.Inventory{GPUs: []nvml.GPU{g}}, []string{"MIG-a", "MIG-b"})
	if len(devs) != 2 || devs[0].name != "gpu-2-mig-19-0-1" || devs[1].name != "gpu-2-mig-1g5gb-8-0" {
		var names []string
		for _, d := range devs {
			names = append(names, d.name)
		}
		t.Errorf("names %v, want gpu-2-mig-19-0-1 and gpu-2-mig-1g5gb-8-0", names)
	}
}

// A placement that no MIG GPU has adds no memory-slice capacities, which
// would otherwise grow with a number NVML chose.
func TestMIGMemorySlicesBounded(t *testing.T) {
	inv := &nvml.Inventory{}
	g := &nvml.GPU{Minor: 0, UUID: "GPU-a"}
	for _, tc := range []struct {
		p    nvml.MIGPlacement
		want int
	}{
		{nvml.MIGPlacement{Start: 4, Size: 4}, 4},
		{nvml.MIGPlacement{Start: 0, Size: 8}, 8},
		{nvml.MIGPlacement{Start: 6, Size: 4}, 0},
		{nvml.MIGPlacement{Start: 0, Size: 1 << 30}, 0},
		{nvml.MIGPlacement{Start: -1, Size: 2}, 0},
	} {
		m := &nvml.MIGDevice{UUID: "MIG-a", Placement: tc.p}
		d := migDevice(inv, g, m, "x")
		n := 0
		for k := range d.Capacity {
			if strings.HasPrefix(k, "memorySlice") {
				n++
			}
		}
		if n != tc.want {
			t.Errorf("placement %+v: %d memory-slice capacities, want %d", tc.p, n, tc.want)
		}
	}
}
