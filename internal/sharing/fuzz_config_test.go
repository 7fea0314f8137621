package sharing_test

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// FuzzConfigPlan runs whole config documents through everything a start
// or a live reload does with them before advertising: parsing, validation,
// NVIDIA's semantics or the resource customization opt-in, and NewPlan on
// a simulated dgx-a100-mig (whole GPUs and MIG devices of six profiles).
// Properties: nothing panics, and the memory allocated is bounded by the
// input's size plus what the largest plan the bounds allow needs
// (config.MaxDevicesPerResource devices) — a replica count of 10⁹ or 2⁶³−1
// must be refused, never allocated. An accepted plan keeps every resource
// within the bound.
//
// The committed corpus is in testdata/fuzz/FuzzConfigPlan; the corpus of
// NVIDIA-shaped configs (../config/testdata/nvidia) is added too.
func FuzzConfigPlan(f *testing.F) {
	inv := scan(f, "dgx-a100-mig")
	files, _ := filepath.Glob(filepath.Join("..", "config", "testdata", "nvidia", "*.y*ml"))
	for _, p := range files {
		if raw, err := os.ReadFile(p); err == nil {
			f.Add(raw, false)
			f.Add(raw, true)
		}
	}
	// The bound on the plan: every resource at the device bound, with room
	// for the maps and slices that index it.
	const planBudget = 256 << 20
	f.Fuzz(func(t *testing.T, raw []byte, customize bool) {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		c, err := config.ParseAs(raw, customize)
		var plan *sharing.Plan
		if err == nil {
			plan, err = sharing.NewPlan(inv, sharing.OptionsFrom(c))
		}
		runtime.ReadMemStats(&after)
		if used, budget := after.TotalAlloc-before.TotalAlloc, uint64(planBudget+1024*len(raw)); used > budget {
			t.Fatalf("allocated %d bytes for a %d-byte config (budget %d)", used, len(raw), budget)
		}
		if err != nil {
			return
		}
		for _, r := range plan.Resources {
			if len(r.Devices) > config.MaxDevicesPerResource {
				t.Fatalf("%s has %d devices, past the bound %d", r.Name, len(r.Devices), config.MaxDevicesPerResource)
			}
		}
	})
}
