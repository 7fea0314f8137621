package sharing_test

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// scan builds the inventory of a built-in profile or of a profile document,
// through the simulated NVML and the production scanner.
func scan(t testing.TB, profile string) *nvml.Inventory {
	t.Helper()
	return testkit.Inventory(t, profile)
}

// options parses a config document's sharing options.
func options(t testing.TB, doc string) sharing.Options {
	t.Helper()
	c, err := config.Parse([]byte(doc))
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	return sharing.OptionsFrom(c)
}

func counts(rs []*sharing.Resource) map[string]int {
	out := map[string]int{}
	for _, r := range rs {
		out[r.Name] = len(r.Devices)
	}
	return out
}

const (
	uniformMIG = `name: uniform
gpus:
  - {model: A100-SXM4-40GB, count: 2, migEnabled: true, migDevices: [1g.5gb, 1g.5gb, 1g.5gb, 1g.5gb, 1g.5gb, 1g.5gb, 1g.5gb]}
`
	unevenMIG = `name: uneven
gpus:
  - {model: A100-SXM4-40GB, migEnabled: true, migDevices: [3g.20gb, 3g.20gb]}
  - {model: A100-SXM4-40GB, migEnabled: true, migDevices: [3g.20gb, 2g.10gb, 1g.5gb]}
`
	emptyMIG = `name: empty
gpus:
  - {model: A100-SXM4-40GB, migEnabled: true, migDevices: [7g.40gb]}
  - {model: A100-SXM4-40GB, migEnabled: true}
`
	a100MixedCounts = "nvidia.com/gpu=3 nvidia.com/mig-1g.5gb=9 nvidia.com/mig-1g.5gb.me=1 nvidia.com/mig-2g.10gb=2 nvidia.com/mig-3g.20gb=3 nvidia.com/mig-4g.20gb=1 nvidia.com/mig-7g.40gb=1"
)

func parseCounts(s string) map[string]int {
	out := map[string]int{}
	for _, f := range strings.Fields(s) {
		name, n, _ := strings.Cut(f, "=")
		var v int
		fmt.Sscan(n, &v)
		out[name] = v
	}
	return out
}

// TestResourcesPerProfile is the table of what each simulated node
// advertises under each config.
func TestResourcesPerProfile(t *testing.T) {
	tests := []struct {
		name, profile, config string
		want                  string // resource=count ...
		warnings              int
	}{
		{"a100-mig none: MIG GPUs advertised whole", "dgx-a100-mig", "flags: {migStrategy: none}", "nvidia.com/gpu=8", 0},
		{"a100-mig mixed", "dgx-a100-mig", "flags: {migStrategy: mixed}", a100MixedCounts, 0},
		{"uniform single", uniformMIG, "flags: {migStrategy: single}", "nvidia.com/gpu=14", 0},
		{"single without MIG is none", "dgx-h100", "flags: {migStrategy: single}", "nvidia.com/gpu=8", 0},
		{"h100 time-slicing 8x4", "dgx-h100", `
sharing:
  timeSlicing:
    resources: [{name: nvidia.com/gpu, replicas: 4}]`, "nvidia.com/gpu=32", 0},
		{"h100 renameByDefault", "dgx-h100", `
sharing:
  timeSlicing:
    renameByDefault: true
    resources: [{name: nvidia.com/gpu, replicas: 3}]`, "nvidia.com/gpu.shared=24", 0},
		{"h100 rename wins over renameByDefault", "dgx-h100", `
sharing:
  timeSlicing:
    renameByDefault: true
    resources: [{name: gpu, rename: gpu.timesliced, replicas: 2}]`, "nvidia.com/gpu.timesliced=16", 0},
		{"h100 devices count with rename", "dgx-h100", `
sharing:
  timeSlicing:
    resources: [{name: gpu, rename: gpu.shared, devices: 2, replicas: 5}]`, "nvidia.com/gpu=6 nvidia.com/gpu.shared=10", 0},
		{"h100 per-GPU replica counts through two entries", "dgx-h100", `
sharing:
  timeSlicing:
    resources:
    - {name: gpu, rename: gpu.small, devices: [0, 1, 2, 3], replicas: 4}
    - {name: gpu, rename: gpu.large, devices: [4, 5], replicas: 2}`, "nvidia.com/gpu=2 nvidia.com/gpu.large=4 nvidia.com/gpu.small=16", 0},
		{"h100 subset covering every GPU keeps the name", "dgx-h100", `
sharing:
  timeSlicing:
    resources:
    - {name: gpu, devices: [0, 1, 2, 3, 4, 5, 6, 7], replicas: 2}`, "nvidia.com/gpu=16", 0},
		{"a100-mig mixed, MIG replicas (operator example)", "dgx-a100-mig", `
flags: {migStrategy: mixed}
sharing:
  timeSlicing:
    resources:
    - {name: nvidia.com/mig-1g.5gb, replicas: 2}
    - {name: nvidia.com/mig-2g.10gb, replicas: 2}
    - {name: nvidia.com/mig-3g.20gb, replicas: 3}
    - {name: nvidia.com/mig-7g.40gb, replicas: 7}`,
			"nvidia.com/gpu=3 nvidia.com/mig-1g.5gb=18 nvidia.com/mig-1g.5gb.me=1 nvidia.com/mig-2g.10gb=4 nvidia.com/mig-3g.20gb=9 nvidia.com/mig-4g.20gb=1 nvidia.com/mig-7g.40gb=7", 0},
		{"a100-mig MIG devices by index, renamed", "dgx-a100-mig", `
flags: {migStrategy: mixed}
sharing:
  timeSlicing:
    resources: [{name: nvidia.com/mig-3g.20gb, rename: mig-3g.20gb.shared, devices: ["2:0", "2:1"], replicas: 2}]`,
			strings.Replace(a100MixedCounts, "nvidia.com/mig-3g.20gb=3", "nvidia.com/mig-3g.20gb=1 nvidia.com/mig-3g.20gb.shared=4", 1), 0},
		{"an entry for a resource this node lacks is a warning", "dgx-h100", `
sharing:
  timeSlicing:
    resources: [{name: nvidia.com/mig-1g.10gb, replicas: 2}, {name: gpu, replicas: 2}]`, "nvidia.com/gpu=16", 1},
		{"resources.gpus pattern without the NVIDIA prefix", "dgx-h100", `
resources:
  gpus: [{pattern: "H100 80GB HBM3", name: h100}]`, "nvidia.com/h100=8", 0},
		{"resources.gpus glob, first match wins, default after", "dgx-h100", `
resources:
  gpus: [{pattern: "*A100*", name: a100}, {pattern: "NVIDIA H100*", name: h100}, {pattern: "*", name: other}]`, "nvidia.com/h100=8", 0},
		{"resources.mig rename of a profile, then sharing it", "dgx-a100-mig", `
flags: {migStrategy: mixed}
resources:
  mig: [{pattern: "1g.5gb*", name: mig-small}]
sharing:
  timeSlicing:
    resources: [{name: mig-small, replicas: 2}]`,
			"nvidia.com/gpu=3 nvidia.com/mig-small=20 nvidia.com/mig-2g.10gb=2 nvidia.com/mig-3g.20gb=3 nvidia.com/mig-4g.20gb=1 nvidia.com/mig-7g.40gb=1", 0},
		{"mixed with a MIG GPU that has no devices", emptyMIG, "flags: {migStrategy: mixed}", "nvidia.com/mig-7g.40gb=1", 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inv := scan(t, tc.profile)
			plan, err := sharing.NewPlan(inv, options(t, "version: v1\n"+tc.config))
			if err != nil {
				t.Fatal(err)
			}
			if got, want := counts(plan.Resources), parseCounts(tc.want); !maps.Equal(got, want) {
				t.Errorf("resources: got %v, want %v", got, want)
			}
			if len(plan.Warnings) != tc.warnings {
				t.Errorf("warnings: got %q, want %d", plan.Warnings, tc.warnings)
			}
			names := make([]string, len(plan.Resources))
			for i, r := range plan.Resources {
				names[i] = r.Name
			}
			if !slices.IsSorted(names) {
				t.Errorf("resources not sorted by name: %v", names)
			}
		})
	}
}

func TestReplicaDevices(t *testing.T) {
	inv := scan(t, "dgx-h100")
	rs, err := sharing.Build(inv, options(t, `version: v1
flags:
  plugin: {sharedDevicesAllocationPolicy: packed}
sharing:
  timeSlicing:
    failRequestsGreaterThanOne: true
    resources: [{name: gpu, replicas: 3}]`))
	if err != nil {
		t.Fatal(err)
	}
	r := rs[0]
	if !r.Shared() || r.Replicas != 3 || !r.FailRequestsGreaterThanOne || r.AllocationPolicy != "packed" || r.Base != "nvidia.com/gpu" {
		t.Errorf("resource settings: %+v", r)
	}
	for i, d := range r.Devices {
		g := inv.GPUs[i/3]
		wantID := fmt.Sprintf("%s::%d", g.UUID, i%3)
		if d.ID != wantID || d.Physical != g.UUID || d.Replica != i%3 || d.GPUIndex != g.Index || d.NUMANode != g.NUMANode {
			t.Errorf("device %d: %+v, want ID %s on GPU %d", i, d, wantID, g.Index)
		}
		phys, n, err := sharing.SplitReplicaID(d.ID)
		if err != nil || phys != g.UUID || n != i%3 {
			t.Errorf("SplitReplicaID(%s) = %s %d %v", d.ID, phys, n, err)
		}
	}
}

func TestSelectDevicesByUUID(t *testing.T) {
	inv := scan(t, "dgx-a100-mig")
	g1 := inv.GPUs[1]
	m := g1.MIGDevices[2] // a 1g.5gb
	doc := fmt.Sprintf(`version: v1
flags: {migStrategy: mixed}
sharing:
  timeSlicing:
    resources:
    - {name: gpu, rename: gpu.shared, devices: [%q], replicas: 2}
    - {name: mig-1g.5gb, rename: mig-1g.5gb.shared, devices: [%q, "MIG-%s/%d/%d"], replicas: 2}`,
		inv.GPUs[6].UUID, m.UUID, g1.UUID, g1.MIGDevices[3].GPUInstanceID, g1.MIGDevices[3].ComputeInstanceID)
	rs, err := sharing.Build(inv, options(t, doc))
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*sharing.Resource{}
	for _, r := range rs {
		byName[r.Name] = r
	}
	if r := byName["nvidia.com/gpu.shared"]; r == nil || len(r.Devices) != 2 || r.Devices[0].Physical != inv.GPUs[6].UUID {
		t.Errorf("GPU selected by UUID: %+v", r)
	}
	r := byName["nvidia.com/mig-1g.5gb.shared"]
	if r == nil || len(r.Devices) != 4 || r.Devices[0].Physical != m.UUID || r.Devices[2].Physical != g1.MIGDevices[3].UUID {
		t.Fatalf("MIG devices selected by UUID and by the MIG-GPU-<uuid>/<gi>/<ci> form: %+v", r)
	}
	if got := len(byName["nvidia.com/mig-1g.5gb"].Devices); got != 7 {
		t.Errorf("unselected 1g.5gb devices stay unshared: %d, want 7", got)
	}
}

// TestBadInput checks every refusal names the GPU or field and the fix.
func TestBadInput(t *testing.T) {
	tests := []struct {
		name, profile, config string
		field                 string // FieldError path, "" when not a field error
		want                  []string
	}{
		{"single with MIG and non-MIG GPUs", "dgx-a100-mig", "flags: {migStrategy: single}", "",
			[]string{"GPU 5 (GPU-", "MIG disabled", "GPU 0 (GPU-", "--mig-strategy=mixed"}},
		{"single with uneven profiles", unevenMIG, "flags: {migStrategy: single}", "",
			[]string{"GPU 1 (GPU-", "3g.20gb, 2g.10gb, 1g.5gb", "GPU 0 (GPU-", "one MIG profile"}},
		{"single with an empty MIG GPU", emptyMIG, "flags: {migStrategy: single}", "",
			[]string{"GPU 1 (GPU-", "no MIG devices"}},
		{"devices entry matching no GPU", "dgx-h100", `
sharing: {timeSlicing: {resources: [{name: gpu, rename: gpu.shared, replicas: 2, devices: [0, 9]}]}}`,
			"sharing.timeSlicing.resources[0].devices[1]", []string{`"9" matches no nvidia.com/gpu device`, "allowed: 0, 1, 2, 3, 4, 5, 6, 7"}},
		{"GPU index on a MIG resource", "dgx-a100-mig", `
flags: {migStrategy: mixed}
sharing: {timeSlicing: {resources: [{name: mig-7g.40gb, rename: big, replicas: 2, devices: [3]}]}}`,
			"sharing.timeSlicing.resources[0].devices[0]", []string{"holds MIG devices", "allowed: 3:0"}},
		{"unknown UUID", "dgx-h100", `
sharing: {timeSlicing: {resources: [{name: gpu, rename: s, replicas: 2, devices: ["GPU-00000000-0000-4000-8000-000000000000"]}]}}`,
			"sharing.timeSlicing.resources[0].devices[0]", []string{"matches no nvidia.com/gpu device"}},
		{"count larger than the node", "dgx-h100", `
sharing: {timeSlicing: {resources: [{name: gpu, rename: s, replicas: 2, devices: 9}]}}`,
			"sharing.timeSlicing.resources[0].devices", []string{"this node has 8 nvidia.com/gpu devices", "1..8"}},
		{"subset without a rename", "dgx-h100", `
sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, devices: [0, 1]}]}}`,
			"sharing.timeSlicing.resources[0].devices", []string{"shares 2 of the 8", "set rename", "renameByDefault: true"}},
		{"two entries share one device", "dgx-h100", `
sharing: {timeSlicing: {resources: [{name: gpu, rename: a, replicas: 2, devices: [0, 1]}, {name: gpu, rename: b, replicas: 2, devices: [1]}]}}`,
			"sharing.timeSlicing.resources[1].devices", []string{"is already shared by sharing.timeSlicing.resources[0]"}},
		{"two entries, one name", "dgx-h100", `
sharing: {timeSlicing: {resources: [{name: gpu, rename: a, replicas: 2, devices: [0]}, {name: gpu, rename: a, replicas: 3, devices: [1]}]}}`,
			"sharing.timeSlicing.resources[1]", []string{"as sharing.timeSlicing.resources[0] does"}},
		{"rename onto an existing resource", "dgx-a100-mig", `
flags: {migStrategy: mixed}
sharing: {timeSlicing: {resources: [{name: mig-1g.5gb, rename: gpu, replicas: 2}]}}`,
			"sharing.timeSlicing.resources[0].rename", []string{"nvidia.com/gpu is already the name of 3 unshared devices"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := sharing.NewPlan(scan(t, tc.profile), options(t, "version: v1\n"+tc.config))
			if err == nil {
				t.Fatal("accepted")
			}
			var fe *config.FieldError
			if tc.field != "" && (!errors.As(err, &fe) || fe.Path != tc.field) {
				t.Errorf("error %q does not name the field %s", err, tc.field)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
	if _, err := sharing.NewPlan(scan(t, "dgx-h100"), sharing.Options{MigStrategy: "sideways"}); err == nil ||
		!strings.Contains(err.Error(), `"sideways" is not one of none, single, mixed`) {
		t.Errorf("unknown MIG strategy: %v", err)
	}
}

func TestMIGResourceNames(t *testing.T) {
	for profile, want := range map[string]string{
		"1g.10gb": "nvidia.com/mig-1g.10gb", "1g.10gb+me": "nvidia.com/mig-1g.10gb.me",
		"1g.20gb+me.all": "nvidia.com/mig-1g.20gb.me.all", "1g.20gb-me": "nvidia.com/mig-1g.20gb-me",
	} {
		if got := sharing.MIGResourceName(profile); got != want {
			t.Errorf("MIGResourceName(%s) = %s, want %s", profile, got, want)
		}
	}
}

func TestMatch(t *testing.T) {
	for _, tc := range []struct {
		pattern, name string
		want          bool
	}{
		{"*", "anything", true}, {"*", "", true},
		{"A100", "A100", true}, {"A100", "NVIDIA A100", false}, // anchored
		{"*A100*", "NVIDIA A100-SXM4-40GB", true}, {"*A100", "NVIDIA A100-SXM4-40GB", false},
		{"NVIDIA*40GB", "NVIDIA A100-SXM4-40GB", true}, {"1g.*", "1g.5gb+me", true}, {"1g.*", "2g.10gb", false},
		{"a*b*c", "abc", true}, {"a*b*c", "acb", false}, {"a*a", "a", false}, {"1g.5gb", "1g.5gbx", false},
		{"[a]", "[a]", true}, // no character classes: brackets are literal
	} {
		if got := sharing.Match(tc.pattern, tc.name); got != tc.want {
			t.Errorf("Match(%q, %q) = %t, want %t", tc.pattern, tc.name, got, tc.want)
		}
	}
}

// TestWholeMIGGPUSharesItsInstancesHealth: under migStrategy none a
// MIG-enabled GPU is advertised whole; a fault on one of its MIG instances
// must make that whole device unfit.
func TestWholeMIGGPUSharesItsInstancesHealth(t *testing.T) {
	inv := scan(t, "dgx-a100-mig")
	rs, err := sharing.Build(inv, options(t, "version: v1\nflags: {migStrategy: none}\n"))
	if err != nil {
		t.Fatal(err)
	}
	d, ok := rs[0].Lookup(inv.GPUs[1].UUID)
	if !ok {
		t.Fatal("GPU 1 not advertised whole")
	}
	units := d.HealthUnits()
	if len(units) != 1+len(inv.GPUs[1].MIGDevices) || !slices.Contains(units, inv.GPUs[1].MIGDevices[2].UUID) {
		t.Errorf("GPU 1's health units %v do not include its MIG devices", units)
	}
	if whole, _ := rs[0].Lookup(inv.GPUs[6].UUID); len(whole.HealthUnits()) != 1 {
		t.Errorf("a GPU without MIG has health units %v", whole.HealthUnits())
	}
}
