package sharing_test

import (
	"errors"
	"maps"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// TestMPSPlans: what sharing.mps advertises on a node, and what it refuses
// there, as NVIDIA's plugin and MPS control daemon do.
func TestMPSPlans(t *testing.T) {
	const h100x8 = "name: h\ngpus:\n  - {model: H100-SXM5-80GB, count: 8}\n"
	const v100x2 = "name: v\ngpus:\n  - {model: V100-SXM2-16GB, count: 2}\n"
	mps := func(extra string, replicas string) string {
		return "version: v1\n" + extra + "sharing:\n  mps:\n    resources:\n    - {name: gpu, replicas: " + replicas + "}\n"
	}
	for _, tc := range []struct {
		name, profile, doc string
		want               string // resource counts
		wantErr            string // field path and message start
	}{
		{"8 GPUs × 10", h100x8, mps("", "10"), "nvidia.com/gpu=80", ""},
		{"48 clients on Hopper", h100x8, mps("", "48"), "nvidia.com/gpu=384", ""},
		{"49 clients on Hopper", h100x8, mps("", "49"), "", "sharing.mps.resources[0].replicas: 49 is more than the 48 clients an MPS server takes on GPU 0"},
		{"16 clients on Volta", v100x2, mps("", "16"), "nvidia.com/gpu=32", ""},
		{"17 clients on Volta", v100x2, mps("", "17"), "", "sharing.mps.resources[0].replicas: 17 is more than the 16 clients an MPS server takes on GPU 0"},
		{"renameByDefault", h100x8, "version: v1\nsharing:\n  mps:\n    renameByDefault: true\n    resources:\n    - {name: gpu, replicas: 2}\n", "nvidia.com/gpu.shared=16", ""},
		{"MIG devices under single", uniformMIG, mps("flags: {migStrategy: single}\n", "2"), "", "sharing.mps: MPS shares whole GPUs only, but nvidia.com/gpu is MIG device 0:"},
		{"a resource this node lacks shares nothing", h100x8, "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/other, replicas: 2}\n", "nvidia.com/gpu=8", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := config.ParseAs([]byte(tc.doc), false) // with NVIDIA's defaults
			if err != nil {
				t.Fatal(err)
			}
			p, err := sharing.NewPlan(scan(t, tc.profile), sharing.OptionsFrom(c))
			if tc.wantErr != "" {
				var fe *config.FieldError
				if err == nil || !errors.As(err, &fe) || !strings.HasPrefix(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want a field error starting %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got, want := counts(p.Resources), parseCounts(tc.want); !maps.Equal(got, want) {
				t.Fatalf("resources %v, want %v", got, want)
			}
			for _, r := range p.Resources {
				if r.Replicas < 2 {
					if r.MPS {
						t.Errorf("%s is unshared but marked MPS", r.Name)
					}
					continue
				}
				unit := sharing.MPSHealthUnit(r.Name)
				if !r.MPS || !r.FailRequestsGreaterThanOne {
					t.Errorf("%s: MPS %v failRequestsGreaterThanOne %v, want both", r.Name, r.MPS, r.FailRequestsGreaterThanOne)
				}
				for _, d := range r.Devices {
					units := d.HealthUnits()
					if d.MPSUnit != unit || units[len(units)-1] != unit {
						t.Fatalf("%s: health units %v, want the daemon's %s last", d.ID, units, unit)
					}
				}
			}
		})
	}
}

func TestMaxMPSClients(t *testing.T) {
	for _, tc := range []struct {
		cc   nvml.ComputeCapability
		want int
	}{{nvml.ComputeCapability{Major: 6, Minor: 0}, 16}, {nvml.ComputeCapability{Major: 7, Minor: 0}, 16}, {nvml.ComputeCapability{Major: 7, Minor: 5}, 48}, {nvml.ComputeCapability{Major: 9, Minor: 0}, 48}} {
		if got := sharing.MaxMPSClients(tc.cc); got != tc.want {
			t.Errorf("MaxMPSClients(%s) = %d, want %d", tc.cc, got, tc.want)
		}
	}
}

// TestTimeSlicingIsNotMPS: time-sliced replicas carry no daemon unit.
func TestTimeSlicingIsNotMPS(t *testing.T) {
	p, err := sharing.NewPlan(scan(t, "name: h\ngpus:\n  - {model: H100-SXM5-80GB, count: 1}\n"),
		options(t, "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: gpu, replicas: 2}\n"))
	if err != nil {
		t.Fatal(err)
	}
	r := p.Resources[0]
	if r.MPS || r.Devices[0].MPSUnit != "" || len(r.Devices[0].HealthUnits()) != 1 {
		t.Errorf("time-sliced resource: MPS %v unit %q units %v", r.MPS, r.Devices[0].MPSUnit, r.Devices[0].HealthUnits())
	}
}
