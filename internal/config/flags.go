package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Option is one setting: its command-line flag and aliases, its environment
// variables, its default, and where it lands in Config. Every option has at
// least one environment twin.
type Option struct {
	Name    string
	Aliases []string
	Env     []string
	Default string
	Usage   string
	Group   string
	Bool    bool
	// Allowed, when set, lists the only accepted values (for lists: of each
	// element).
	Allowed []string
	// List marks a comma-separated list: a flag given twice keeps both
	// values, as NVIDIA's (urfave/cli) slice flags do.
	List bool
	// set stores a value taken from a flag, the environment or the default.
	set func(c *Config, v string) error
	// inFile reports whether the config file already set the option; a file
	// value beats the environment's absence and the default.
	inFile func(c *Config) bool
}

// Option groups, in --help order.
const (
	GroupDaemon    = "Daemon"
	GroupNVIDIA    = "NVIDIA device plugin (same names as NVIDIA's flags and config file)"
	GroupSharing   = "Sharing, reload and node labels"
	GroupHealth    = "Health checking"
	GroupTelemetry = "Telemetry (dcgm-exporter compatible metrics)"
	GroupDRA       = "Dynamic Resource Allocation (as NVIDIA's DRA driver, gpu.nvidia.com)"
)

// Options is the table of every setting, in --help order. Each capability
// keeps its options in its own file.
func Options() []Option {
	var all []Option
	for _, group := range [][]Option{daemonOptions(), nvidiaOptions(), sharingOptions(), healthOptions(), telemetryOptions(), draOptions()} {
		all = append(all, group...)
	}
	return all
}

func daemonOptions() []Option {
	return []Option{
		{Name: "config", Aliases: []string{"config-file"}, Env: []string{"GPU_PLUGIN_CONFIG", "CONFIG_FILE"}, Group: GroupDaemon,
			Usage: "config file (YAML or JSON, NVIDIA's `version: v1` format); empty: flags and environment only",
			set:   func(c *Config, v string) error { c.Daemon.ConfigFile = v; return nil }},
		{Name: "config-dir", Env: []string{"GPU_PLUGIN_CONFIG_DIR"}, Group: GroupDaemon,
			Usage: "a directory of named config files (the chart's config.map): this node's file is the one named by its --config-label label, applied live when the label changes; instead of --config; needs get, list and watch on nodes",
			set:   func(c *Config, v string) error { c.Daemon.ConfigDir = v; return nil }},
		{Name: "config-label", Env: []string{"GPU_PLUGIN_CONFIG_LABEL", "NODE_LABEL"}, Default: "nvidia.com/device-plugin.config", Group: GroupDaemon,
			Usage: "with --config-dir: the node label that names this node's config file (NVIDIA's config-manager label)",
			set:   func(c *Config, v string) error { c.Daemon.ConfigLabel = v; return nil }},
		{Name: "default-config", Env: []string{"GPU_PLUGIN_DEFAULT_CONFIG", "DEFAULT_CONFIG"}, Group: GroupDaemon,
			Usage: "with --config-dir: the config file for a node without the label; empty: the only file in the directory if there is one, else no file (defaults), as NVIDIA's config-manager",
			set:   func(c *Config, v string) error { c.Daemon.DefaultConfig = v; return nil }},
		{Name: "simulate", Env: []string{"GPU_PLUGIN_SIMULATE"}, Group: GroupDaemon,
			Usage: "run on a simulated node instead of NVML: a built-in profile name or a profile file (see `gpu-plugin inventory --help`)",
			set:   func(c *Config, v string) error { c.Daemon.Simulate = v; return nil }},
		{Name: "nvml-library", Env: []string{"GPU_PLUGIN_NVML_LIBRARY"}, Group: GroupDaemon,
			Usage: "path of libnvidia-ml.so.1; default: looked up under --driver-root-ctr-path when --driver-root is not /, else the dynamic linker's search path",
			set:   func(c *Config, v string) error { c.Daemon.NVMLLibrary = v; return nil }},
		{Name: "kubelet-socket-dir", Env: []string{"GPU_PLUGIN_KUBELET_SOCKET_DIR"}, Default: "/var/lib/kubelet/device-plugins", Group: GroupDaemon,
			Usage: "directory holding kubelet.sock, where the plugin sockets are created",
			set:   func(c *Config, v string) error { c.Daemon.KubeletSocketDir = v; return nil }},
		{Name: "node-name", Env: []string{"NODE_NAME"}, Group: GroupDaemon,
			Usage: "name of this node (label values, logs); default: the host name",
			set:   func(c *Config, v string) error { c.Daemon.NodeName = v; return nil }},
		{Name: "pod-namespace", Env: []string{"POD_NAMESPACE"}, Group: GroupDaemon,
			Usage: "the daemon pod's namespace, where --use-node-feature-api writes its NodeFeature; default: the service account's namespace (the chart sets it)",
			set:   func(c *Config, v string) error { c.Daemon.PodNamespace = v; return nil }},
		{Name: "pod-name", Env: []string{"POD_NAME"}, Group: GroupDaemon,
			Usage: "the daemon pod's name: --use-node-feature-api makes its DaemonSet the NodeFeature's owner, so uninstalling removes it (the chart sets it)",
			set:   func(c *Config, v string) error { c.Daemon.PodName = v; return nil }},
		{Name: "kubeconfig", Env: []string{"KUBECONFIG"}, Group: GroupDaemon,
			Usage: "kubeconfig file for the API server, used only by the opt-in features that read or write API objects (--node-health-condition, --config-dir, --use-node-feature-api, --per-pod-usage, --allocation-mode dra or split); empty: the pod's service account (in-cluster)",
			set:   func(c *Config, v string) error { c.Daemon.Kubeconfig = v; return nil }},
		{Name: "metrics-address", Env: []string{"GPU_PLUGIN_METRICS_ADDRESS"}, Default: ":9400", Group: GroupDaemon,
			Usage: "listen address for /metrics, /healthz and /readyz (and /sim with --simulate); empty disables",
			set:   func(c *Config, v string) error { c.Daemon.MetricsAddress = v; return nil }},
		{Name: "web-config-file", Env: []string{"GPU_PLUGIN_WEB_CONFIG_FILE", "DCGM_EXPORTER_WEB_CONFIG_FILE"}, Group: GroupDaemon,
			Usage: "exporter-toolkit web config (TLS, basic auth) for the metrics listener; empty: plain HTTP",
			set:   func(c *Config, v string) error { c.Daemon.WebConfigFile = v; return nil }},
		{Name: "log-format", Env: []string{"GPU_PLUGIN_LOG_FORMAT"}, Default: "text", Group: GroupDaemon, Allowed: []string{"text", "json"},
			Usage: "log format: text or json",
			set:   func(c *Config, v string) error { c.Daemon.LogFormat = v; return nil }},
		{Name: "v", Aliases: []string{"verbosity"}, Env: []string{"GPU_PLUGIN_VERBOSITY"}, Default: "0", Group: GroupDaemon,
			Usage: "log verbosity: 0 state changes and problems, 1 lifecycle detail (debug), 2 every RPC",
			set: func(c *Config, v string) error {
				n, err := strconv.Atoi(v)
				if err != nil || n < 0 || n > 10 {
					return fmt.Errorf("want a number from 0 to 10")
				}
				c.Daemon.Verbosity = n
				return nil
			}},
		{Name: "sys-root", Env: []string{"GPU_PLUGIN_SYS_ROOT"}, Default: "/sys", Group: GroupDaemon,
			Usage: "where sysfs is mounted (NUMA node fallback)",
			set:   func(c *Config, v string) error { c.Daemon.SysRoot = v; return nil }},
		{Name: "cdi-spec-dir", Env: []string{"GPU_PLUGIN_CDI_SPEC_DIR"}, Default: "/var/run/cdi", Group: GroupDaemon,
			Usage: "where CDI spec files are written when a cdi-* device list strategy is on",
			set:   func(c *Config, v string) error { c.Daemon.CDISpecDir = v; return nil }},
	}
}

func nvidiaOptions() []Option {
	return []Option{
		strOpt("mig-strategy", nil, []string{"MIG_STRATEGY"}, MigNone, "how MIG devices are advertised: none, single or mixed",
			[]string{MigNone, MigSingle, MigMixed}, func(c *Config) **string { return &c.Flags.MigStrategy }),
		boolOpt("fail-on-init-error", nil, []string{"FAIL_ON_INIT_ERROR"}, "true",
			"exit when NVML cannot start (false: stay up serving /healthz without registering)",
			func(c *Config) **bool { return &c.Flags.FailOnInitError }),
		strOpt("driver-root", []string{"nvidia-driver-root"}, []string{"NVIDIA_DRIVER_ROOT"}, "/",
			"host root of the NVIDIA driver installation (/run/nvidia/driver with the driver container)", nil,
			func(c *Config) **string { return &c.Flags.NvidiaDriverRoot }),
		strOpt("dev-root", []string{"nvidia-dev-root"}, []string{"NVIDIA_DEV_ROOT"}, "",
			"host root of the /dev/nvidia* nodes (default: the driver root)", nil,
			func(c *Config) **string { return &c.Flags.NvidiaDevRoot }),
		strOpt("mps-root", nil, []string{"MPS_ROOT"}, "",
			"host directory for the MPS control daemons (sharing.mps): <root>/<resource>/pipe and /log, and <root>/shm, which MPS clients get as /dev/shm; required with sharing.mps (the chart uses /run/nvidia/mps)", nil,
			func(c *Config) **string { return &c.Flags.MpsRoot }),
		boolOpt("gdrcopy-enabled", nil, []string{"GDRCOPY_ENABLED"}, "false", "add NVIDIA_GDRCOPY=enabled (CDI: gdrcopy=all) to allocations",
			func(c *Config) **bool { return &c.Flags.GDRCopyEnabled }),
		boolOpt("gds-enabled", nil, []string{"GDS_ENABLED"}, "false", "add NVIDIA_GDS=enabled (CDI: gds=all) to allocations",
			func(c *Config) **bool { return &c.Flags.GDSEnabled }),
		boolOpt("mofed-enabled", nil, []string{"MOFED_ENABLED"}, "false", "add NVIDIA_MOFED=enabled (CDI: mofed=all) to allocations",
			func(c *Config) **bool { return &c.Flags.MOFEDEnabled }),
		boolOpt("use-node-feature-api", nil, []string{"USE_NODE_FEATURE_API", "GFD_USE_NODE_FEATURE_API"}, "false",
			"publish the node labels as an NFD NodeFeature object (nvidia-features-for-<node> in --pod-namespace) instead of the features.d file, as GFD's useNodeFeatureAPI does; needs get, create and update on nodefeatures.nfd.k8s-sigs.io there (the chart's nodeFeatureAPI)",
			func(c *Config) **bool { return &c.Flags.UseNodeFeatureAPI }),
		strOpt("device-discovery-strategy", nil, []string{"DEVICE_DISCOVERY_STRATEGY"}, "auto",
			"how GPUs are found: auto or nvml (tegra is refused: not supported)", []string{"auto", "nvml"},
			func(c *Config) **string { return &c.Flags.DeviceDiscoveryStrategy }),
		boolOpt("pass-device-specs", nil, []string{"PASS_DEVICE_SPECS"}, "false",
			"return /dev/nvidia* device specs from Allocate (for the CPU manager's static policy)",
			func(c *Config) **bool { return &c.Plugin().PassDeviceSpecs }),
		{Name: "device-list-strategy", Env: []string{"DEVICE_LIST_STRATEGY"}, Default: ListEnvvar, Group: GroupNVIDIA, List: true,
			Allowed: []string{ListEnvvar, ListVolumeMounts, ListCDIAnnotations, ListCDICRI},
			Usage:   "how allocated devices reach the container, comma-separated and combinable: envvar, volume-mounts, cdi-annotations, cdi-cri",
			set: func(c *Config, v string) error {
				l := StringOrSlice(splitList(v))
				c.Plugin().DeviceListStrategy = &l
				return nil
			},
			inFile: func(c *Config) bool { return c.Flags.Plugin != nil && c.Flags.Plugin.DeviceListStrategy != nil }},
		strOpt("device-id-strategy", nil, []string{"DEVICE_ID_STRATEGY"}, IDUUID,
			"how devices are named to the container runtime: uuid or index", []string{IDUUID, IDIndex},
			func(c *Config) **string { return &c.Plugin().DeviceIDStrategy }),
		strOpt("cdi-annotation-prefix", nil, []string{"CDI_ANNOTATION_PREFIX"}, "cdi.k8s.io/",
			"prefix of the CDI annotation keys (cdi-annotations strategy)", nil,
			func(c *Config) **string { return &c.Plugin().CDIAnnotationPrefix }),
		strOpt("nvidia-cdi-hook-path", []string{"nvidia-ctk-path"}, []string{"NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"}, defaultCTKPath,
			"path of nvidia-cdi-hook on the host, for CDI specs", nil,
			func(c *Config) **string { return &c.Plugin().NvidiaCTKPath }),
		strOpt("driver-root-ctr-path", []string{"container-driver-root"}, []string{"DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"}, "/driver-root",
			"where the host driver root is mounted inside this container", nil,
			func(c *Config) **string { return &c.Plugin().ContainerDriverRoot }),
		strOpt("shared-devices-allocation-policy", nil, []string{"SHARED_DEVICES_ALLOCATION_POLICY"}, "distributed",
			"which replicas of shared GPUs are preferred: distributed (spread) or packed", []string{"distributed", "packed"},
			func(c *Config) **string { return &c.Plugin().SharedDevicesAllocationPolicy }),
		{Name: "imex-channel-ids", Env: []string{"IMEX_CHANNEL_IDS"}, Group: GroupNVIDIA, List: true,
			Usage: "IMEX channels injected into every allocation, comma-separated: none or 0 (imex.channelIDs)",
			set: func(c *Config, v string) error {
				if v == "" {
					return nil // not set anywhere: no channels
				}
				ids := []int{}
				for _, p := range splitList(v) {
					n, err := strconv.Atoi(p)
					if err != nil {
						return fmt.Errorf("%s is not a channel number; want a comma-separated list of channel numbers (only 0 is supported)", quote(p))
					}
					ids = append(ids, n)
				}
				c.IMEX.ChannelIDs = ids
				return nil
			},
			inFile: func(c *Config) bool { return c.IMEX.ChannelIDs != nil }},
		boolOpt("imex-required", nil, []string{"IMEX_REQUIRED"}, "false",
			"fail the start if an IMEX channel's device node (/dev/nvidia-caps-imex-channels/channel<N>) is missing; otherwise such a channel is skipped with a warning (imex.required)",
			func(c *Config) **bool { return &c.IMEX.Required }),
		{Name: "kubelet-socket", Env: []string{"KUBELET_SOCKET"}, Group: GroupNVIDIA,
			Usage: "the kubelet's registration socket, a full path; default: kubelet.sock in --kubelet-socket-dir; our sockets go in its directory unless --kubelet-socket-dir is set; empty (--kubelet-socket=): serve the plugin sockets without registering, as NVIDIA's plugin does",
			set:   func(c *Config, v string) error { c.Daemon.KubeletSocket = v; return nil }},
		{Name: "cdi-feature-flags", Env: []string{"CDI_FEATURE_FLAGS"}, Group: GroupNVIDIA, List: true,
			Usage: "nvcdi feature flags for CDI spec generation, comma-separated (e.g. disable-ipc-discoverer, enable-explicit-driver-libraries), as NVIDIA's plugin passes them",
			set:   func(c *Config, v string) error { c.Daemon.CDIFeatureFlags = splitList(v); return nil }},
		{Name: "cdi-disable-hooks", Env: []string{"CDI_DISABLE_HOOKS"}, Group: GroupNVIDIA, List: true,
			Usage: "nvidia-cdi-hook hooks to leave out of the CDI spec, comma-separated (create-symlinks, update-ldcache, enable-cuda-compat, disable-device-node-modification, …), or all",
			set:   func(c *Config, v string) error { c.Daemon.CDIDisableHooks = splitList(v); return nil }},
	}
}

func strOpt(name string, aliases, env []string, def, usage string, allowed []string, field func(c *Config) **string) Option {
	return Option{Name: name, Aliases: aliases, Env: env, Default: def, Usage: usage, Group: GroupNVIDIA, Allowed: allowed,
		set:    func(c *Config, v string) error { *field(c) = &v; return nil },
		inFile: func(c *Config) bool { return *field(c) != nil }}
}

func boolOpt(name string, aliases, env []string, def, usage string, field func(c *Config) **bool) Option {
	return Option{Name: name, Aliases: aliases, Env: env, Default: def, Usage: usage, Group: GroupNVIDIA, Bool: true,
		set: func(c *Config, v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return fmt.Errorf("want true or false")
			}
			*field(c) = &b
			return nil
		},
		inFile: func(c *Config) bool { return *field(c) != nil }}
}

// rawValue records a flag's text; it is applied after the file is read.
// A list flag given more than once keeps every value, comma-joined.
type rawValue struct {
	value  string
	isBool bool
	isList bool
	seen   bool
}

func (v *rawValue) String() string { return v.value }
func (v *rawValue) Set(s string) error {
	if v.isList && v.seen && s != "" {
		if v.value != "" {
			s = v.value + "," + s
		}
	}
	v.value, v.seen = s, true
	return nil
}
func (v *rawValue) IsBoolFlag() bool { return v.isBool }

// ErrHelp is returned by Load for -h/--help; the usage has been printed.
var ErrHelp = flag.ErrHelp

// Load resolves the configuration: it parses args (flags only, the first
// non-flag argument ends them and is returned with the rest), then reads the
// config file if one is named, then applies flag > environment > file >
// default to every option. Usage goes to out on --help or a bad flag.
func Load(name string, args []string, getenv func(string) string, out io.Writer) (*Config, []string, error) {
	return load(&origin{name: name, args: slices.Clone(args), getenv: getenv, base: getenv}, out)
}

func load(o *origin, out io.Writer) (*Config, []string, error) {
	name, args, getenv := o.name, o.args, o.getenv
	opts := Options()
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	raws := make([]*rawValue, len(opts))
	for i, o := range opts {
		raws[i] = &rawValue{isBool: o.Bool, isList: o.List}
		for _, n := range append([]string{o.Name}, o.Aliases...) {
			fs.Var(raws[i], n, o.Usage)
		}
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			PrintUsage(out, name)
			return nil, nil, ErrHelp
		}
		return nil, nil, fmt.Errorf("%v (run %s --help for the list of flags)", err, name)
	}
	onCommandLine := map[*rawValue]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Value.(*rawValue)] = true })

	// The config file's own location follows the same precedence.
	c := &Config{Version: Version}
	path := ""
	if onCommandLine[raws[0]] {
		path = raws[0].value
	} else if v, _, ok := fromEnv(opts[0], getenv); ok {
		path = v
	}
	if path != "" && !o.selected {
		for i, opt := range opts {
			if opt.Name != "config-dir" {
				continue
			}
			if _, _, inEnv := fromEnv(opt, getenv); onCommandLine[raws[i]] || inEnv {
				return nil, nil, fmt.Errorf("config-dir: --config-dir and --config are both set: with --config-dir the node label picks the file; drop --config (CONFIG_FILE)")
			}
		}
	}
	if path != "" {
		fileCfg, err := ReadFile(path)
		if err != nil {
			return nil, nil, err
		}
		c = fileCfg
	}

	for i, o := range opts {
		var v, source string
		switch env, envName, ok := fromEnv(o, getenv); {
		case onCommandLine[raws[i]]:
			v, source = raws[i].value, "--"+o.Name
		case ok:
			v, source = env, envName
		case o.inFile != nil && o.inFile(c):
			continue
		default:
			v, source = o.Default, "default"
		}
		if err := o.set(c, v); err != nil {
			return nil, nil, fmt.Errorf("%s=%s: %v", source, quote(v), err)
		}
	}
	// --kubelet-socket names the kubelet's socket in full, as NVIDIA's flag
	// does; given empty, nothing registers (NVIDIA's meaning). The plugin
	// sockets go next to the kubelet's unless --kubelet-socket-dir is set.
	explicit := func(name string) bool {
		for i, o := range opts {
			if o.Name == name {
				_, _, inEnv := fromEnv(o, getenv)
				return onCommandLine[raws[i]] || inEnv
			}
		}
		return false
	}
	for i, o := range opts {
		if o.Name == "kubelet-socket" && onCommandLine[raws[i]] && raws[i].value == "" {
			c.Daemon.SkipRegistration = true
		}
	}
	if s := c.Daemon.KubeletSocket; s != "" {
		if !filepath.IsAbs(s) {
			return nil, nil, fmt.Errorf("kubelet-socket: %s is not an absolute path; want the kubelet's socket, e.g. /var/lib/kubelet/device-plugins/kubelet.sock (flag --kubelet-socket, environment KUBELET_SOCKET)", quote(s))
		}
		if !explicit("kubelet-socket-dir") {
			c.Daemon.KubeletSocketDir = filepath.Dir(s)
		}
	}
	if err := c.validateOptions(opts); err != nil {
		return nil, nil, err
	}
	if err := c.applyNVIDIASemantics(); err != nil {
		return nil, nil, err
	}
	if err := c.checkMPS(); err != nil {
		return nil, nil, err
	}
	c.origin = o
	return c, fs.Args(), nil
}

func fromEnv(o Option, getenv func(string) string) (value, name string, ok bool) {
	for _, e := range o.Env {
		if v := getenv(e); v != "" {
			return v, e, true
		}
	}
	return "", "", false
}

// validateOptions checks enumerated options whatever their source.
func (c *Config) validateOptions(opts []Option) error {
	check := func(o Option, vals []string) error {
		for _, v := range vals {
			if !slices.Contains(o.Allowed, v) {
				return fmt.Errorf("%s: %s is not one of %s (flag --%s, environment %s)",
					o.Name, quote(v), strings.Join(o.Allowed, ", "), o.Name, strings.Join(o.Env, " or "))
			}
		}
		return nil
	}
	for _, o := range opts {
		if len(o.Allowed) == 0 {
			continue
		}
		var vals []string
		switch o.Name {
		case "log-format":
			vals = []string{c.Daemon.LogFormat}
		case "device-list-strategy":
			vals = c.DeviceListStrategies()
			if len(vals) == 0 {
				return fmt.Errorf("device-list-strategy: empty; choose at least one of %s", strings.Join(o.Allowed, ", "))
			}
		case "mig-strategy":
			vals = []string{c.MigStrategy()}
		case "device-id-strategy":
			vals = []string{c.DeviceIDStrategy()}
		case "shared-devices-allocation-policy":
			vals = []string{Deref(c.Plugin().SharedDevicesAllocationPolicy)}
		case "device-discovery-strategy":
			if s := Deref(c.Flags.DeviceDiscoveryStrategy); s == "tegra" {
				return fmt.Errorf("device-discovery-strategy: tegra is not supported (this daemon does not handle Tegra/Jetson GPUs); use auto or nvml (flag --device-discovery-strategy, environment DEVICE_DISCOVERY_STRATEGY, file flags.deviceDiscoveryStrategy)")
			}
			vals = []string{Deref(c.Flags.DeviceDiscoveryStrategy)}
		}
		if err := check(o, vals); err != nil {
			return err
		}
	}
	if c.Telemetry.PerPodDCGMSeries && !c.Telemetry.PerPodUsage {
		return fmt.Errorf("per-pod-dcgm-series: needs --per-pod-usage (GPU_PLUGIN_PER_POD_USAGE=true), which measures what each pod uses")
	}
	if c.Telemetry.PerPodUsage && c.Telemetry.PodResourcesSocket == "" {
		return fmt.Errorf("per-pod-usage: needs the kubelet's pod-resources socket (--pod-resources-socket, GPU_PLUGIN_POD_RESOURCES_SOCKET) to know which pods were allocated each GPU; it is empty")
	}
	if err := checkDRA(c); err != nil {
		return err
	}
	if c.Health.NodeTaint && !c.Health.NodeCondition {
		return fmt.Errorf("node-health-taint: needs --node-health-condition (GPU_PLUGIN_NODE_HEALTH_CONDITION=true): the taint is written with the condition, under the same permissions")
	}
	// NVIDIA's plugin accepts only [] or [0].
	for i, ch := range c.IMEX.ChannelIDs {
		if ch != 0 {
			return fmt.Errorf("imex.channelIDs[%d]: %d is not supported: only channel 0 ([0]) or none ([]) (file imex.channelIDs, flag --imex-channel-ids, environment IMEX_CHANNEL_IDS)", i, ch)
		}
	}
	if len(c.IMEX.ChannelIDs) > 1 {
		return fmt.Errorf("imex.channelIDs: %v: only one channel, 0, is supported (file imex.channelIDs, flag --imex-channel-ids, environment IMEX_CHANNEL_IDS)", c.IMEX.ChannelIDs)
	}
	return nil
}

// PrintUsage writes the flag reference: every flag with its aliases,
// environment variables and default.
func PrintUsage(w io.Writer, name string) {
	fmt.Fprintf(w, `Usage: %[1]s [flags]                 run the daemon
       %[1]s inventory [flags]       print the GPUs, MIG devices and topology (--help for more)
       %[1]s health [--from URL]     ask the running daemon: one line per GPU, exit 0 all healthy, 1 not, 2 unknown
       %[1]s config check FILE       validate a config file and print the effective config
       %[1]s demo [--once] [flags]   run on a simulated node against a stand-in kubelet
       %[1]s --version

Every flag can also be set through the environment variable(s) listed with it.
Precedence: flag > environment > config file > default.
`, name)
	opts := Options()
	for _, group := range []string{GroupDaemon, GroupNVIDIA, GroupSharing, GroupHealth, GroupTelemetry, GroupDRA} {
		header := false
		for _, o := range opts {
			if o.Group != group {
				continue
			}
			if !header {
				fmt.Fprintf(w, "\n%s:\n", group)
				header = true
			}
			names := "--" + o.Name
			for _, a := range o.Aliases {
				names += ", --" + a
			}
			extra := []string{"env " + strings.Join(o.Env, ", ")}
			if o.Default != "" {
				extra = append(extra, fmt.Sprintf("default %q", o.Default))
			}
			fmt.Fprintf(w, "  %s  (%s)\n        %s\n", names, strings.Join(extra, "; "), o.Usage)
		}
	}
}
