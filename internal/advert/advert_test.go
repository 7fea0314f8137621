package advert_test

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// load builds a config from flags and, when doc is not empty, a config file.
func load(t *testing.T, doc string, args ...string) *config.Config {
	t.Helper()
	if doc != "" {
		path := filepath.Join(t.TempDir(), "config.yaml")
		if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--config="+path)
	}
	c, _, err := config.Load("gpu-plugin", args, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestBuildAgrees: the resources, the Allocate options, the CDI spec and
// the labels of one advertisement describe the same devices: every device
// a resource advertises resolves in the spec under the name Allocate gives
// it, and the labels count what the resources hold.
func TestBuildAgrees(t *testing.T) {
	inv := testkit.Inventory(t, "dgx-a100-mig")
	env := advert.Env{SimulatedDriverRoot: testkit.DriverRoot(t, inv)}
	for _, ids := range []string{config.IDUUID, config.IDIndex} {
		t.Run(ids, func(t *testing.T) {
			cfg := load(t, "", "--mig-strategy=mixed", "--device-list-strategy=cdi-cri", "--device-id-strategy="+ids, "--node-labels=true")
			a, err := advert.Build(inv, cfg, env)
			if err != nil {
				t.Fatal(err)
			}
			if !a.Respond.CDICRI || a.Respond.Envvar || a.Respond.IndexIDs != (ids == config.IDIndex) || a.Respond.DevRoot != env.SimulatedDriverRoot {
				t.Errorf("Allocate options %+v", a.Respond)
			}
			dir := t.TempDir()
			if _, err := cdi.WriteAll(dir, a.CDISpecs); err != nil {
				t.Fatal(err)
			}
			cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(dir), cdiapi.WithAutoRefresh(false))
			if err != nil {
				t.Fatal(err)
			}
			counts := map[string]int{}
			for _, r := range a.Resources {
				counts[r.Name] = len(r.Devices)
				for _, d := range r.Devices {
					name := d.Physical
					if ids == config.IDIndex {
						name = d.IndexID()
					}
					if cache.GetDevice(cdi.QualifiedName(cdi.Class, name)) == nil {
						t.Errorf("%s device %s: %s does not resolve in the CDI spec", r.Name, d.ID, name)
					}
				}
			}
			want := map[string]int{"nvidia.com/gpu": 3, "nvidia.com/mig-1g.5gb": 9, "nvidia.com/mig-1g.5gb.me": 1, "nvidia.com/mig-2g.10gb": 2,
				"nvidia.com/mig-3g.20gb": 3, "nvidia.com/mig-4g.20gb": 1, "nvidia.com/mig-7g.40gb": 1}
			for name, n := range want {
				if counts[name] != n {
					t.Errorf("%s: %d devices, want %d (all: %v)", name, counts[name], n, counts)
				}
			}
			for _, profile := range []string{"1g.5gb", "3g.20gb"} {
				if got := a.Labels["nvidia.com/mig-"+profile+".count"]; got != strconv.Itoa(counts["nvidia.com/mig-"+profile]) {
					t.Errorf("label mig-%s.count = %q, resources hold %d", profile, got, counts["nvidia.com/mig-"+profile])
				}
			}
		})
	}
}

// TestCompare: one definition of what changed between two advertisements.
func TestCompare(t *testing.T) {
	inv := testkit.Inventory(t, "dgx-h100")
	env := advert.Env{SimulatedDriverRoot: testkit.DriverRoot(t, inv)}
	const sliced = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: %d\n"
	build := func(doc string, args ...string) *advert.Advertisement {
		t.Helper()
		// Labels off unless a case turns them on: the last flag wins.
		a, err := advert.Build(inv, load(t, doc, append([]string{"--node-labels=false"}, args...)...), env)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	for _, tc := range []struct {
		name                         string
		old, next                    *advert.Advertisement
		added, removed, changed      []string
		respond, cdiChanged, labeled bool
	}{
		{name: "nothing", old: build(""), next: build("")},
		{name: "from nothing", old: nil, next: build(""), added: []string{"nvidia.com/gpu"}, respond: true},
		{name: "replicas", old: build(strings.Replace(sliced, "%d", "2", 1)), next: build(strings.Replace(sliced, "%d", "4", 1)),
			changed: []string{"nvidia.com/gpu"}},
		{name: "renamed by default", old: build(""), next: build(strings.Replace(sliced, "%d", "2", 1) + "    renameByDefault: true\n"),
			added: []string{"nvidia.com/gpu.shared"}, removed: []string{"nvidia.com/gpu"}},
		{name: "strategy to CDI", old: build(""), next: build("", "--device-list-strategy=cdi-cri"), respond: true, cdiChanged: true},
		{name: "CDI hooks", old: build("", "--device-list-strategy=cdi-cri"), next: build("", "--device-list-strategy=cdi-cri", "--cdi-disable-hooks=all"), cdiChanged: true},
		{name: "index IDs", old: build(""), next: build("", "--device-id-strategy=index"), respond: true},
		{name: "labels on", old: build("", "--node-labels=false"), next: build("", "--node-labels=true"), labeled: true},
		{name: "replicas, labelled", old: build(strings.Replace(sliced, "%d", "2", 1), "--node-labels=true"),
			next: build(strings.Replace(sliced, "%d", "4", 1), "--node-labels=true"), changed: []string{"nvidia.com/gpu"}, labeled: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := advert.Compare(tc.old, tc.next)
			if !slices.Equal(d.Added, tc.added) || !slices.Equal(d.Removed, tc.removed) || !slices.Equal(d.Changed, tc.changed) ||
				d.Respond != tc.respond || d.CDI != tc.cdiChanged || d.Labels != tc.labeled {
				t.Errorf("diff %+v, want added %v removed %v changed %v respond %v cdi %v labels %v",
					d, tc.added, tc.removed, tc.changed, tc.respond, tc.cdiChanged, tc.labeled)
			}
			if d.Empty() != (tc.name == "nothing") {
				t.Errorf("Empty() = %v", d.Empty())
			}
		})
	}
}

// TestBuildRefuses: a config the GPUs cannot take, or a CDI spec that
// cannot be generated, is an error, so the caller keeps what it has.
func TestBuildRefuses(t *testing.T) {
	inv := testkit.Inventory(t, "dgx-a100-mig")
	// mig-strategy single needs one profile on every MIG GPU.
	if _, err := advert.Build(inv, load(t, "", "--mig-strategy=single"), advert.Env{}); err == nil {
		t.Error("single strategy on mixed profiles: built")
	}
	// A driver root without the device nodes.
	if _, err := advert.Build(inv, load(t, "", "--mig-strategy=mixed", "--device-list-strategy=cdi-cri"), advert.Env{SimulatedDriverRoot: t.TempDir()}); err == nil {
		t.Error("a CDI spec from an empty driver root: built")
	}
	// No inventory (NVML unavailable): nothing advertised, no error.
	a, err := advert.Build(nil, load(t, ""), advert.Env{})
	if err != nil || len(a.Resources) != 0 || a.CDISpecs != nil {
		t.Errorf("no inventory: %+v, %v", a, err)
	}
}

// TestIMEXChannelsChecked: a configured channel is used only when its
// device node exists (looked up under the container's driver root, the
// seam); a missing one is skipped with a reason, or fails when required.
func TestIMEXChannelsChecked(t *testing.T) {
	root := t.TempDir()
	load := func(args ...string) *config.Config {
		t.Helper()
		c, _, err := config.Load("gpu-plugin", append([]string{"--driver-root-ctr-path=" + root}, args...), func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// Missing: skipped, or fatal with imex.required.
	present, missing, err := advert.IMEXChannels(load("--imex-channel-ids=0"))
	if err != nil || len(present) != 0 || len(missing) != 1 || !strings.Contains(missing[0].Error(), "channel0") {
		t.Errorf("missing, not required: %v %v %v; want it skipped with a reason naming channel0", present, missing, err)
	}
	if got := advert.Respond(load("--imex-channel-ids=0"), advert.Env{}).IMEXChannels; len(got) != 0 {
		t.Errorf("a missing channel is injected: %v", got)
	}
	if _, _, err := advert.IMEXChannels(load("--imex-channel-ids=0", "--imex-required")); err == nil || !strings.Contains(err.Error(), "imex.required") {
		t.Errorf("missing and required: %v; want an error naming imex.required", err)
	}
	// Present as a character device (a link to /dev/null stands in for it).
	dir := filepath.Join(root, "dev", "nvidia-caps-imex-channels")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", filepath.Join(dir, "channel0")); err != nil {
		t.Fatal(err)
	}
	present, missing, err = advert.IMEXChannels(load("--imex-channel-ids=0", "--imex-required"))
	if err != nil || !slices.Equal(present, []int{0}) || len(missing) != 0 {
		t.Errorf("present: %v %v %v; want channel 0", present, missing, err)
	}
	if got := advert.Respond(load("--imex-channel-ids=0"), advert.Env{}).IMEXChannels; !slices.Equal(got, []int{0}) {
		t.Errorf("a present channel is not injected: %v", got)
	}
	// A regular file is not a channel.
	if err := os.Remove(filepath.Join(dir, "channel0")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "channel0"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := advert.IMEXChannels(load("--imex-channel-ids=0", "--imex-required")); err == nil || !strings.Contains(err.Error(), "not a character device") {
		t.Errorf("a regular file: %v", err)
	}
}

// TestRespondControlNodes: as NVIDIA's plugin, --pass-device-specs passes
// each control node only if it exists where the daemon sees the devices; a
// simulated node's are in its laid-out root unless --dev-root names another.
func TestRespondControlNodes(t *testing.T) {
	inv := testkit.Inventory(t, "pcie-l4x4")
	simRoot := testkit.DriverRoot(t, inv)
	devRoot := t.TempDir()
	if err := os.MkdirAll(filepath.Join(devRoot, "dev"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(devRoot, "dev", "nvidiactl"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		args    []string
		devRoot string
		nodes   []string
	}{
		{"laid-out root", nil, simRoot, []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"}},
		{"--dev-root", []string{"--dev-root=" + devRoot}, devRoot, []string{"/dev/nvidiactl"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := advert.Respond(load(t, "", append([]string{"--pass-device-specs"}, tc.args...)...), advert.Env{SimulatedDriverRoot: simRoot})
			if o.DevRoot != tc.devRoot || !slices.Equal(o.ControlNodes, tc.nodes) {
				t.Errorf("dev root %s, control nodes %v; want %s, %v", o.DevRoot, o.ControlNodes, tc.devRoot, tc.nodes)
			}
		})
	}
}
