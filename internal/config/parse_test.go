package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config/nvidiacorpus"
)

// TestNVIDIAExamplesParseUnchanged reads every config NVIDIA documents, as
// data, and checks what each resolves to and which warnings it gives.
func TestNVIDIAExamplesParseUnchanged(t *testing.T) {
	tests := []struct {
		file     string
		check    func(t *testing.T, c *Config)
		warnings []string // substrings, one per expected warning
	}{
		{file: "readme-config0.yaml", check: func(t *testing.T, c *Config) {
			want(t, "migStrategy", c.MigStrategy(), MigNone)
			want(t, "deviceListStrategy", c.DeviceListStrategies(), []string{ListEnvvar})
			want(t, "driver root", c.DriverRoot(), "/")
		}},
		{file: "readme-config1-mixed.yaml", check: func(t *testing.T, c *Config) {
			want(t, "migStrategy", c.MigStrategy(), MigMixed)
		}},
		{file: "readme-time-slicing.yaml", check: func(t *testing.T, c *Config) {
			ts := c.Sharing.TimeSlicing
			want(t, "resources", len(ts.Resources), 1)
			want(t, "shared name", ts.SharedName(ts.Resources[0]), "nvidia.com/gpu")
			want(t, "replicas", ts.Resources[0].Replicas, 10)
		}},
		{file: "readme-time-slicing-rename.yaml", check: func(t *testing.T, c *Config) {
			ts := c.Sharing.TimeSlicing
			want(t, "shared name", ts.SharedName(ts.Resources[0]), "nvidia.com/gpu.shared")
		}},
		{file: "helm-mig-single.yaml", check: func(t *testing.T, c *Config) {
			want(t, "migStrategy", c.MigStrategy(), MigSingle)
		}},
		{file: "compat-typical.yaml", check: func(t *testing.T, c *Config) {
			want(t, "deviceListStrategy", c.DeviceListStrategies(), []string{ListEnvvar, ListCDICRI})
			want(t, "second resource", c.Sharing.TimeSlicing.Resources[1].Name, "nvidia.com/mig-1g.10gb")
			want(t, "failRequestsGreaterThanOne", *c.Sharing.TimeSlicing.FailRequestsGreaterThanOne, false)
		}},
		{file: "operator-time-slicing.yaml"},
		{file: "operator-mig-mixed-time-slicing.yaml", check: func(t *testing.T, c *Config) {
			want(t, "resources", len(c.Sharing.TimeSlicing.Resources), 4)
			want(t, "7g replicas", c.Sharing.TimeSlicing.Resources[3].Replicas, 7)
		}},
		{file: "gfd-flags.yaml", warnings: []string{
			"flags.gfd.oneshot", "flags.gfd.sleepInterval", "flags.gfd.outputFile",
		}, check: func(t *testing.T, c *Config) {
			// noTimestamp and machineTypeFile shape the node labels (internal/labels).
			want(t, "noTimestamp", *c.Flags.GFD.NoTimestamp, false)
			want(t, "machineTypeFile", *c.Flags.GFD.MachineTypeFile, "/sys/class/dmi/id/product_name")
			want(t, "driver root", c.DriverRoot(), "/run/nvidia/driver")
			want(t, "dev root defaults to the driver root", c.DevRoot(), "/run/nvidia/driver")
		}},
		{file: "json-config.json", check: func(t *testing.T, c *Config) {
			want(t, "deviceListStrategy", c.DeviceListStrategies(), []string{ListEnvvar, ListVolumeMounts})
			want(t, "deviceIDStrategy", c.DeviceIDStrategy(), IDIndex)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			path := filepath.Join("testdata", "nvidia", tc.file)
			c, _, err := Load("gpu-plugin", []string{"--config", path}, noEnv, nil)
			if err != nil {
				t.Fatalf("NVIDIA's documented config %s does not load: %v", tc.file, err)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
			got := c.Warnings()
			if len(got) != len(tc.warnings) {
				t.Errorf("warnings: got %d %q, want %d naming %q", len(got), got, len(tc.warnings), tc.warnings)
			}
			for _, w := range tc.warnings {
				if !slices.ContainsFunc(got, func(g string) bool { return strings.Contains(g, w) }) {
					t.Errorf("no warning names %q; got %q", w, got)
				}
			}
		})
	}
	// Every file in the directory is a case of the compatibility corpus
	// (cases.yaml), which cmd/gpu-plugin and internal/daemon run in full.
	if _, err := nvidiacorpus.Load(); err != nil {
		t.Error(err)
	}
}

func noEnv(string) string { return "" }

func want[T any](t *testing.T, what string, got, want T) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s: got %v, want %v", what, got, want)
	}
}

func TestExtensionsParse(t *testing.T) {
	c, err := ReadFile(filepath.Join("testdata", "extended-rename-devices.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want(t, "gpus rule name qualified", c.Resources.GPUs[0].Name, "nvidia.com/h100")
	r := c.Sharing.TimeSlicing.Resources
	want(t, "devices[0]", r[0].Devices.List, []string{"0", "1"})
	want(t, "devices[1]", r[1].Devices.List, []string{"2", "GPU-00000000-0000-4000-8000-000000000003"})
	want(t, "rename", r[1].Rename, "nvidia.com/h100.shared")
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("supported extensions must not warn: %q", w)
	}
}

// TestParseErrors checks that every bad file fails with the field's path
// and what it accepts.
func TestParseErrors(t *testing.T) {
	ts := func(resources string) string {
		return "version: v1\nsharing:\n  timeSlicing:\n    resources:\n" + resources
	}
	tests := []struct {
		name string
		doc  string
		want []string // substrings of the error
	}{
		{"replicas below 2", ts("    - name: nvidia.com/gpu\n      replicas: 2\n    - name: nvidia.com/mig-1g.5gb\n      replicas: 1\n"),
			[]string{"sharing.timeSlicing.resources[1].replicas: 1 is not allowed", "2 or more"}},
		{"replicas missing", ts("    - name: nvidia.com/gpu\n"), []string{"sharing.timeSlicing.resources[0].replicas: 0 is not allowed"}},
		{"replicas as a string", ts("    - name: nvidia.com/gpu\n      replicas: \"4\"\n"),
			[]string{"sharing.timeSlicing.resources[0].replicas: wrong type", `"4"`, "whole number"}},
		{"replicas fractional", ts("    - name: nvidia.com/gpu\n      replicas: 2.5\n"), []string{"resources[0].replicas: 2.5 is not a whole number"}},
		{"name missing", ts("    - replicas: 2\n"), []string{"sharing.timeSlicing.resources[0].name: required"}},
		{"bad rename", ts("    - name: gpu\n      rename: Bad Name\n      replicas: 2\n"), []string{"resources[0].rename:", "the part after the '/'"}},
		{"kubernetes.io name", ts("    - name: kubernetes.io/gpu\n      replicas: 2\n"), []string{"resources[0].name:", "kubernetes.io"}},
		{"replicas past the bound", ts("    - name: gpu\n      replicas: 1000000000\n"),
			[]string{"sharing.timeSlicing.resources[0].replicas: 1000000000 is too many: at most 40000"}},
		{"replicas int64 max", ts("    - name: gpu\n      replicas: 9223372036854775807\n"),
			[]string{"sharing.timeSlicing.resources[0].replicas: 9223372036854775807 is too many"}},
		{"replicas past int64", ts("    - name: gpu\n      replicas: 9223372036854775808\n"),
			[]string{"sharing.timeSlicing.resources[0].replicas: 9223372036854775808 is not a whole number"}},
		{"replicas as a float", ts("    - name: gpu\n      replicas: 1e9\n"),
			[]string{"sharing.timeSlicing.resources[0].replicas: 1000000000 is too many"}},
		{"mps without resources", "version: v1\nsharing:\n  mps:\n    resources: []\n",
			[]string{"sharing.mps.resources: no resources listed"}},
		{"mps replicas 1", "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: gpu, replicas: 1}\n",
			[]string{"sharing.mps.resources[0].replicas: 1 is not allowed"}},
		{"time-slicing without resources", "version: v1\nsharing:\n  timeSlicing: {renameByDefault: true}\n",
			[]string{"sharing.timeSlicing.resources: no resources listed"}},
		{"imex two channels", "version: v1\nimex:\n  channelIDs: [0, 0]\n", []string{"imex.channelIDs: [0 0]: only one channel"}},
		{"a huge value is quoted cut", "version: v1\nflags:\n  migStrategy: " + strings.Repeat("x", 100000) + "\n",
			[]string{`flags.migStrategy: "` + strings.Repeat("x", 64) + `"… (100000 bytes) is not one of`}},
		{"larger than a ConfigMap", "version: v1\n#" + strings.Repeat("x", MaxFileSize) + "\n", []string{"larger than 1048576 bytes"}},
		{"unknown MIG strategy", "version: v1\nflags:\n  migStrategy: double\n", []string{`flags.migStrategy: "double" is not one of none, single, mixed`}},
		{"bad list strategy entry", "version: v1\nflags:\n  plugin:\n    deviceListStrategy: [envvar, env]\n",
			[]string{`flags.plugin.deviceListStrategy[1]: "env" is not one of envvar, volume-mounts, cdi-annotations, cdi-cri`}},
		{"bad allocation policy", "version: v1\nflags:\n  plugin:\n    sharedDevicesAllocationPolicy: spread\n",
			[]string{"flags.plugin.sharedDevicesAllocationPolicy", "distributed, packed"}},
		{"devices word", ts("    - name: gpu\n      replicas: 2\n      devices: some\n"), []string{"resources[0].devices:", `"some" is not allowed`, `"all"`}},
		{"devices zero count", ts("    - name: gpu\n      replicas: 2\n      devices: 0\n"), []string{"resources[0].devices: 0 is not allowed", "1 or more"}},
		{"devices bad entry", ts("    - name: gpu\n      replicas: 2\n      devices: [0, \"GPU-x\"]\n"),
			[]string{"sharing.timeSlicing.resources[0].devices[1]:", `"GPU-x" is not a GPU index`}},
		{"devices negative", ts("    - name: gpu\n      replicas: 2\n      devices: [-1]\n"), []string{"resources[0].devices[0]: -1 is not a GPU index"}},
		{"flags not a mapping", "version: v1\nflags: [a]\n", []string{"flags: wrong type: got a list, want a mapping"}},
		{"bool as string", "version: v1\nflags:\n  failOnInitError: \"yes\"\n", []string{"flags.failOnInitError: wrong type", "true or false"}},
		{"version", "version: v2\n", []string{`version: "v2" is not supported`}},
		{"imex channel", "version: v1\nimex:\n  channelIDs: [0, 2]\n", []string{"imex.channelIDs[1]: 2 is not supported"}},
		{"resources pattern missing", "version: v1\nresources:\n  gpus:\n  - name: a100\n", []string{"resources.gpus[0].pattern: required"}},
		{"health unknown field keeps one prefix", "version: v1\nhealth:\n  colour: red\n", []string{"health: unknown field"}},
		{"not YAML", "version: [v1\n", []string{"not valid YAML or JSON"}},
		{"a list at the top", "- a\n- b\n", []string{"want a mapping"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc))
			if err == nil {
				t.Fatalf("Parse accepted:\n%s", tc.doc)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "health: health:") {
				t.Errorf("error repeats its path: %q", err)
			}
		})
	}
}

func TestParseAcceptsAndNormalises(t *testing.T) {
	c, err := Parse([]byte(`version: v1
flags:
  MigStrategy: mixed
sharing:
  timeSlicing:
    resources:
    - name: gpu
      rename: gpu-shared
      replicas: 3
      devices: [0, "1", "0:2", "MIG-GPU-5c8e8f7a-1b2c-4d3e-8f90-0123456789ab/1/0"]
`))
	if err != nil {
		t.Fatal(err)
	}
	want(t, "case-insensitive key, as encoding/json (and NVIDIA's parser) accept", c.MigStrategy(), MigMixed)
	r := c.Sharing.TimeSlicing.Resources[0]
	want(t, "qualified name", r.Name, "nvidia.com/gpu")
	want(t, "qualified rename", r.Rename, "nvidia.com/gpu-shared")
	want(t, "devices", r.Devices.List, []string{"0", "1", "0:2", "MIG-GPU-5c8e8f7a-1b2c-4d3e-8f90-0123456789ab/1/0"})
	if w := c.Warnings(); len(w) != 1 || !strings.Contains(w[0], "flags.MigStrategy: accepted as flags.migStrategy") {
		t.Errorf("a key in the wrong case must be named in a warning: %q", w)
	}
	empty, err := Parse([]byte("  \n"))
	if err != nil || empty.Version != Version {
		t.Errorf("an empty file is an empty v1 config: %v %v", empty, err)
	}
}

func TestDevicesRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		in, out string
	}{
		{`"all"`, `"all"`}, {`3`, `3`}, {`[0, "1:2"]`, `["0","1:2"]`},
	} {
		var d Devices
		if err := d.UnmarshalJSON([]byte(tc.in)); err != nil {
			t.Fatalf("%s: %v", tc.in, err)
		}
		b, err := d.MarshalJSON()
		if err != nil || string(b) != tc.out {
			t.Errorf("%s: marshalled to %s (%v), want %s", tc.in, b, err, tc.out)
		}
	}
}

func TestReloadReadsTheFileAgain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("version: v1\nflags:\n  migStrategy: mixed\n")
	env := map[string]string{"DEVICE_ID_STRATEGY": "index"}
	c, _, err := Load("gpu-plugin", []string{"--config", path, "--rescan-interval=5s"}, func(k string) string { return env[k] }, nil)
	if err != nil {
		t.Fatal(err)
	}
	write("version: v1\nflags:\n  migStrategy: single\n  nvidiaDriverRoot: /run/nvidia/driver\n")
	n, err := c.Reload()
	if err != nil {
		t.Fatal(err)
	}
	want(t, "file value re-read", n.MigStrategy(), MigSingle)
	want(t, "environment kept", n.DeviceIDStrategy(), IDIndex)
	want(t, "flag kept", n.Daemon.RescanInterval.String(), "5s")
	want(t, "receiver unchanged", c.MigStrategy(), MigMixed)
	want(t, "restart-required settings", c.RestartRequired(n), []string{"flags.nvidiaDriverRoot"})

	write("version: v1\nflags:\n  migStrategy: sideways\n")
	if _, err := c.Reload(); err == nil || !strings.Contains(err.Error(), "flags.migStrategy") {
		t.Errorf("a bad file on reload: %v", err)
	}
	if _, err := (&Config{}).Reload(); !errors.Is(err, ErrNotReloadable) {
		t.Errorf("a hand-built config: %v, want ErrNotReloadable", err)
	}
}

func TestSharingOptions(t *testing.T) {
	c, _, err := Load("gpu-plugin", nil, noEnv, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := c.Daemon
	if d.RescanInterval.String() != "30s" || !d.WatchConfig || !d.NodeLabels || d.LabelsFile != DefaultLabelsFile {
		t.Errorf("defaults: %+v", d)
	}
	env := map[string]string{"GPU_PLUGIN_NODE_LABELS": "false", "GPU_PLUGIN_RESCAN_INTERVAL": "0"}
	c, _, err = Load("gpu-plugin", []string{"--labels-file=/tmp/x", "--watch-config=false"}, func(k string) string { return env[k] }, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := c.Daemon; d.RescanInterval != 0 || d.WatchConfig || d.NodeLabels || d.LabelsFile != "/tmp/x" {
		t.Errorf("flags and environment: %+v", d)
	}
	for _, bad := range []string{"--rescan-interval=10ms", "--rescan-interval=-1s", "--rescan-interval=soon", "--node-labels=perhaps"} {
		if _, _, err := Load("gpu-plugin", []string{bad}, noEnv, nil); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

// TestCDIFlagsApplied: the CDI generator's flags are taken as given, with
// no "ignored" warning now that the spec is generated by nvcdi.
func TestCDIFlagsApplied(t *testing.T) {
	c, _, err := Load("gpu-plugin", []string{"--nvidia-cdi-hook-path=/opt/nvidia-cdi-hook", "--cdi-disable-hooks=update-ldcache", "--cdi-feature-flags=disable-ipc-discoverer"}, noEnv, nil)
	if err != nil {
		t.Fatal(err)
	}
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("warnings %q, want none", w)
	}
	if Deref(c.Plugin().NvidiaCTKPath) != "/opt/nvidia-cdi-hook" || !slices.Equal(c.Daemon.CDIDisableHooks, []string{"update-ldcache"}) || !slices.Equal(c.Daemon.CDIFeatureFlags, []string{"disable-ipc-discoverer"}) {
		t.Errorf("CDI settings %q %q %q", Deref(c.Plugin().NvidiaCTKPath), c.Daemon.CDIDisableHooks, c.Daemon.CDIFeatureFlags)
	}
	if c, _, _ = Load("gpu-plugin", nil, noEnv, nil); len(c.Warnings()) != 0 {
		t.Errorf("defaults warn: %q", c.Warnings())
	}
}
