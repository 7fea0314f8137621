package sim_test

import (
	"testing"

	nvlibdevice "github.com/NVIDIA/go-nvlib/pkg/nvlib/device"
	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// NVIDIA's own MIG enumeration (go-nvlib v0.13.0's VisitMigDevices and
// GetProfile, what NVIDIA's device plugin uses) sees the simulated MIG
// devices with the names our inventory gives them, before and after a
// re-layout that uses the media-extension profile: the simulator answers
// as the driver does (profile IDs, not indices), and our naming agrees with
// NVIDIA's.
func TestMIGNamesMatchGoNvlib(t *testing.T) {
	n, lib := migNode(t)
	check := func(t *testing.T) {
		t.Helper()
		inv, err := nvml.Scan(lib, nvml.ScanOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ours := map[string]string{}
		for _, g := range inv.GPUs {
			for _, m := range g.MIGDevices {
				ours[m.UUID] = m.Profile
			}
		}
		theirs := map[string]string{}
		devlib := nvlibdevice.New(n.NVML(), nvlibdevice.WithVerifySymbols(false))
		err = devlib.VisitMigDevices(func(_ int, _ nvlibdevice.Device, _ int, mig nvlibdevice.MigDevice) error {
			uuid, ret := mig.GetUUID()
			if ret != gonvml.SUCCESS {
				t.Errorf("go-nvlib: MIG UUID: %v", ret)
			}
			p, err := mig.GetProfile()
			if err != nil {
				t.Errorf("go-nvlib: profile of %s: %v", uuid, err)
				return nil
			}
			theirs[uuid] = p.String()
			return nil
		})
		if err != nil {
			t.Fatalf("go-nvlib VisitMigDevices: %v", err)
		}
		if len(ours) == 0 || len(ours) != len(theirs) {
			t.Errorf("%d MIG devices in our inventory, %d through go-nvlib", len(ours), len(theirs))
		}
		for uuid, name := range ours {
			if theirs[uuid] != name {
				t.Errorf("%s: ours %q, go-nvlib %q", uuid, name, theirs[uuid])
			}
		}
	}
	check(t)
	if err := n.SetMIGLayout(0, true, []string{"1g.5gb+me", "2g.10gb", "3g.20gb"}); err != nil {
		t.Fatal(err)
	}
	check(t)
}
