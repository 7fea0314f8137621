package main

import (
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/config/nvidiacorpus"
)

// advertisedRE matches a resource line of `config check --simulate`.
var advertisedRE = regexp.MustCompile(`(?m)^#   (\S+): (\d+)`)

// TestCompatCorpusConfigCheck runs every case of the NVIDIA compatibility
// corpus through `gpu-plugin config check --simulate=PROFILE` and compares
// the outcome and the advertised resource → count map with what NVIDIA's
// plugin v0.20 does (or the recorded deliberate difference), by default and
// with --resource-customization.
func TestCompatCorpusConfigCheck(t *testing.T) {
	cases, err := nvidiacorpus.Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		for _, optIn := range []bool{false, true} {
			want, args := tc.Want(), []string{"config", "check", tc.Path(), "--simulate=" + tc.Profile}
			if optIn {
				want, args = tc.WantOptIn(), append(args, "--resource-customization")
			}
			t.Run(fmt.Sprintf("%s/optIn=%t", tc.File, optIn), func(t *testing.T) {
				code, out, errOut := runCmd(t, tc.Env, args...)
				if !want.Accepted() {
					if code == 0 || !strings.Contains(errOut, want.Error) {
						t.Fatalf("exit %d, stderr %q; want a refusal naming %q", code, errOut, want.Error)
					}
					return
				}
				if code != 0 {
					t.Fatalf("exit %d; want accepted (NVIDIA: %s): %s", code, tc.NVIDIA.Outcome, errOut)
				}
				got := map[string]int{}
				for _, m := range advertisedRE.FindAllStringSubmatch(out, -1) {
					got[m[1]], _ = strconv.Atoi(m[2])
				}
				if !maps.Equal(got, want.Resources) {
					t.Errorf("advertises %v on %s; want %v", got, tc.Profile, want.Resources)
				}
				if optIn {
					return // the warnings are the default's
				}
				for _, w := range tc.Warnings {
					if !strings.Contains(errOut, "warning: "+w) {
						t.Errorf("no warning names %q; stderr:\n%s", w, errOut)
					}
				}
			})
		}
	}
}

// TestCompatCorpusWarnings checks that each case gives exactly the warnings
// the corpus lists (config only, no node), and that --strict fails on them.
func TestCompatCorpusWarnings(t *testing.T) {
	cases, err := nvidiacorpus.Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		if !tc.Want().Accepted() {
			continue
		}
		t.Run(tc.File, func(t *testing.T) {
			cfg, _, err := config.Load(name, []string{"--config", tc.Path()}, tc.Getenv, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			got := cfg.Warnings()
			if len(got) != len(tc.Warnings) {
				t.Errorf("warnings %q; want %d naming %q", got, len(tc.Warnings), tc.Warnings)
			}
			for _, w := range tc.Warnings {
				if !slices.ContainsFunc(got, func(g string) bool { return strings.HasPrefix(g, w) }) {
					t.Errorf("no warning starts with %q: %q", w, got)
				}
			}
			code, _, _ := runCmd(t, tc.Env, "config", "check", tc.Path(), "--strict")
			if wantCode := min(len(tc.Warnings), 1); code != wantCode {
				t.Errorf("config check --strict: exit %d; want %d (%d warnings)", code, wantCode, len(tc.Warnings))
			}
		})
	}
}

// nvidiaOption is one of NVIDIA's flags: its names, environment variables,
// file field, and three distinct values for file, environment and flag.
type nvidiaOption struct {
	flags              []string // name and aliases, without --
	env                []string
	file               string // YAML with one %s for the value; "" if the option is not in the file
	def                string // effective default
	fileV, envV, flagV string
	get                func(c *config.Config) string
}

func nvidiaOptionTable() []nvidiaOption {
	str := config.Deref
	boolean := func(p *bool) string { return strconv.FormatBool(p != nil && *p) }
	list := func(l []string) string { return strings.Join(l, ",") }
	return []nvidiaOption{
		{[]string{"mig-strategy"}, []string{"MIG_STRATEGY"}, "flags: {migStrategy: %s}", "none", "single", "mixed", "none",
			func(c *config.Config) string { return c.MigStrategy() }},
		{[]string{"fail-on-init-error"}, []string{"FAIL_ON_INIT_ERROR"}, "flags: {failOnInitError: %s}", "true", "false", "true", "false",
			func(c *config.Config) string { return boolean(c.Flags.FailOnInitError) }},
		{[]string{"driver-root", "nvidia-driver-root"}, []string{"NVIDIA_DRIVER_ROOT"}, "flags: {nvidiaDriverRoot: %s}", "/", "/file", "/env", "/flag",
			func(c *config.Config) string { return c.DriverRoot() }},
		{[]string{"dev-root", "nvidia-dev-root"}, []string{"NVIDIA_DEV_ROOT"}, "flags: {nvidiaDevRoot: %s}", "", "/file", "/env", "/flag",
			func(c *config.Config) string { return str(c.Flags.NvidiaDevRoot) }},
		{[]string{"mps-root"}, []string{"MPS_ROOT"}, "flags: {mpsRoot: %s}", "", "/file", "/env", "/flag",
			func(c *config.Config) string { return str(c.Flags.MpsRoot) }},
		{[]string{"gdrcopy-enabled"}, []string{"GDRCOPY_ENABLED"}, "flags: {gdrcopyEnabled: %s}", "false", "true", "false", "true",
			func(c *config.Config) string { return boolean(c.Flags.GDRCopyEnabled) }},
		{[]string{"gds-enabled"}, []string{"GDS_ENABLED"}, "flags: {gdsEnabled: %s}", "false", "true", "false", "true",
			func(c *config.Config) string { return boolean(c.Flags.GDSEnabled) }},
		{[]string{"mofed-enabled"}, []string{"MOFED_ENABLED"}, "flags: {mofedEnabled: %s}", "false", "true", "false", "true",
			func(c *config.Config) string { return boolean(c.Flags.MOFEDEnabled) }},
		{[]string{"device-discovery-strategy"}, []string{"DEVICE_DISCOVERY_STRATEGY"}, "flags: {deviceDiscoveryStrategy: %s}", "auto", "nvml", "auto", "nvml",
			func(c *config.Config) string { return str(c.Flags.DeviceDiscoveryStrategy) }},
		{[]string{"pass-device-specs"}, []string{"PASS_DEVICE_SPECS"}, "flags: {plugin: {passDeviceSpecs: %s}}", "false", "true", "false", "true",
			func(c *config.Config) string { return strconv.FormatBool(c.PassDeviceSpecs()) }},
		{[]string{"device-list-strategy"}, []string{"DEVICE_LIST_STRATEGY"}, "flags: {plugin: {deviceListStrategy: %s}}", "envvar", "volume-mounts", "cdi-annotations,envvar", "cdi-cri",
			func(c *config.Config) string { return list(c.DeviceListStrategies()) }},
		{[]string{"device-id-strategy"}, []string{"DEVICE_ID_STRATEGY"}, "flags: {plugin: {deviceIDStrategy: %s}}", "uuid", "index", "uuid", "index",
			func(c *config.Config) string { return c.DeviceIDStrategy() }},
		{[]string{"cdi-annotation-prefix"}, []string{"CDI_ANNOTATION_PREFIX"}, "flags: {plugin: {cdiAnnotationPrefix: %s}}", "cdi.k8s.io/", "file.example/", "env.example/", "flag.example/",
			func(c *config.Config) string { return c.CDIAnnotationPrefix() }},
		{[]string{"nvidia-cdi-hook-path", "nvidia-ctk-path"}, []string{"NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"}, "flags: {plugin: {nvidiaCTKPath: %s}}", "/usr/bin/nvidia-ctk", "/file", "/env", "/flag",
			func(c *config.Config) string { return str(c.Plugin().NvidiaCTKPath) }},
		{[]string{"driver-root-ctr-path", "container-driver-root"}, []string{"DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"}, "flags: {plugin: {containerDriverRoot: %s}}", "/driver-root", "/file", "/env", "/flag",
			func(c *config.Config) string { return str(c.Plugin().ContainerDriverRoot) }},
		{[]string{"shared-devices-allocation-policy"}, []string{"SHARED_DEVICES_ALLOCATION_POLICY"}, "flags: {plugin: {sharedDevicesAllocationPolicy: %s}}", "distributed", "packed", "distributed", "packed",
			func(c *config.Config) string { return str(c.Plugin().SharedDevicesAllocationPolicy) }},
		{[]string{"imex-channel-ids"}, []string{"IMEX_CHANNEL_IDS"}, "imex: {channelIDs: [%s]}", "", "", "0", "0",
			func(c *config.Config) string { return fmt.Sprint(c.IMEX.ChannelIDs) }},
		{[]string{"imex-required"}, []string{"IMEX_REQUIRED"}, "imex: {required: %s}", "false", "true", "false", "true",
			func(c *config.Config) string { return boolean(c.IMEX.Required) }},
		{[]string{"kubelet-socket"}, []string{"KUBELET_SOCKET"}, "", "/var/lib/kubelet/device-plugins/kubelet.sock", "", "/env/kubelet.sock", "/flag/kubelet.sock",
			func(c *config.Config) string {
				if c.Daemon.KubeletSocket == "" {
					return filepath.Join(c.Daemon.KubeletSocketDir, "kubelet.sock")
				}
				return c.Daemon.KubeletSocket
			}},
		{[]string{"config-file"}, []string{"CONFIG_FILE"}, "", "", "", "/dev/null", "/dev/null",
			func(c *config.Config) string { return c.Daemon.ConfigFile }},
		{[]string{"cdi-feature-flags"}, []string{"CDI_FEATURE_FLAGS"}, "", "", "", "a,b", "c",
			func(c *config.Config) string { return list(c.Daemon.CDIFeatureFlags) }},
		{[]string{"cdi-disable-hooks"}, []string{"CDI_DISABLE_HOOKS"}, "", "", "", "all", "update-ldcache",
			func(c *config.Config) string { return list(c.Daemon.CDIDisableHooks) }},
	}
}

// TestNVIDIAFlagsAndEnv checks every flag and environment variable of
// NVIDIA's plugin v0.20: it is accepted, lands in the effective config, and
// follows flag > environment > file > default.
func TestNVIDIAFlagsAndEnv(t *testing.T) {
	dir := t.TempDir()
	load := func(t *testing.T, args []string, env map[string]string) *config.Config {
		t.Helper()
		cfg, _, err := config.Load(name, args, func(k string) string { return env[k] }, io.Discard)
		if err != nil {
			t.Fatalf("%v (env %v): %v", args, env, err)
		}
		return cfg
	}
	for _, o := range nvidiaOptionTable() {
		t.Run(o.flags[0], func(t *testing.T) {
			if got := o.get(load(t, nil, nil)); got != o.def && o.flags[0] != "imex-channel-ids" {
				t.Errorf("default: %q, want %q", got, o.def)
			}
			var base []string
			if o.file != "" {
				// /dev/null as a config file is refused (not a regular file),
				// so config-file's values are only checked as names below.
				path := filepath.Join(dir, o.flags[0]+".yaml")
				if err := os.WriteFile(path, []byte("version: v1\n"+fmt.Sprintf(o.file, o.fileV)+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				base = []string{"--config=" + path}
				if got, want := o.get(load(t, base, nil)), o.fileV; got != want && !(o.flags[0] == "imex-channel-ids" && got == "[]") {
					t.Errorf("file: %q, want %q", got, want)
				}
			}
			if o.flags[0] == "config-file" {
				return // a file named by both would be read; covered by the other rows
			}
			want := func(v string) string {
				if o.flags[0] == "imex-channel-ids" {
					return "[" + v + "]"
				}
				return v
			}
			for _, env := range o.env {
				e := map[string]string{env: o.envV}
				if got := o.get(load(t, base, e)); got != want(o.envV) {
					t.Errorf("%s over the file: %q, want %q", env, got, want(o.envV))
				}
				for _, f := range o.flags {
					if got := o.get(load(t, append([]string{"--" + f + "=" + o.flagV}, base...), e)); got != want(o.flagV) {
						t.Errorf("--%s over %s and the file: %q, want %q", f, env, got, want(o.flagV))
					}
				}
			}
		})
	}
}

func TestRepeatedListFlagsAccumulate(t *testing.T) {
	for _, tc := range []struct {
		args []string
		get  func(c *config.Config) []string
		want []string
	}{
		{[]string{"--device-list-strategy=envvar", "--device-list-strategy=cdi-annotations"},
			(*config.Config).DeviceListStrategies, []string{"envvar", "cdi-annotations"}},
		{[]string{"--device-list-strategy", "envvar,volume-mounts", "--device-list-strategy", "cdi-cri"},
			(*config.Config).DeviceListStrategies, []string{"envvar", "volume-mounts", "cdi-cri"}},
		{[]string{"--cdi-feature-flags=a", "--cdi-feature-flags=b"},
			func(c *config.Config) []string { return c.Daemon.CDIFeatureFlags }, []string{"a", "b"}},
		{[]string{"--cdi-disable-hooks=x", "--cdi-disable-hooks=y,z"},
			func(c *config.Config) []string { return c.Daemon.CDIDisableHooks }, []string{"x", "y", "z"}},
		{[]string{"--mig-strategy=single", "--mig-strategy=mixed"}, // not a list: the last wins
			func(c *config.Config) []string { return []string{c.MigStrategy()} }, []string{"mixed"}},
	} {
		cfg, _, err := config.Load(name, tc.args, func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if got := tc.get(cfg); !slices.Equal(got, tc.want) {
			t.Errorf("%v: %q, want %q", tc.args, got, tc.want)
		}
	}
}

func TestVersionFlagLikeNVIDIA(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		version bool
	}{
		{[]string{"-v"}, true},
		{[]string{"--v"}, true},
		{[]string{"--version"}, true},
		{[]string{"--mig-strategy=mixed", "-v"}, true},
		{[]string{"-v", "--mig-strategy=mixed"}, true},
		{[]string{"-v", "2"}, false},
		{[]string{"-v=2"}, false},
		{[]string{"--v=1"}, false},
		{[]string{"--verbosity", "2"}, false},
		{[]string{"--", "-v"}, false},
	} {
		if got := wantsVersion(tc.args); got != tc.version {
			t.Errorf("%q: version %t, want %t", tc.args, got, tc.version)
		}
	}
	code, out, _ := runCmd(t, nil, "-v")
	if code != 0 || !strings.HasPrefix(out, "gpu-plugin ") {
		t.Errorf("-v: exit %d, %q; want the version", code, out)
	}
	cfg, _, err := config.Load(name, []string{"-v", "2"}, func(string) string { return "" }, io.Discard)
	if err != nil || cfg.Daemon.Verbosity != 2 {
		t.Errorf("-v 2: %v; want verbosity 2", err)
	}
}

func TestTegraRefusedAlsoSimulated(t *testing.T) {
	code, _, errOut := runCmd(t, nil, "--simulate=dgx-h100", "--device-discovery-strategy=tegra", "--metrics-address=")
	if code == 0 || !strings.Contains(errOut, "tegra is not supported") {
		t.Errorf("exit %d, %q; want a refusal naming tegra", code, errOut)
	}
}
