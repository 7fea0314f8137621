package config

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Telemetry defaults.
const (
	DefaultCollectInterval      = time.Second
	DefaultPodResourcesSocket   = "/var/lib/kubelet/pod-resources/kubelet.sock"
	DefaultPodResourcesInterval = 5 * time.Second
)

// Telemetry backends (--telemetry-backend).
const (
	TelemetryAuto = "auto"
	TelemetryNVML = "nvml"
	TelemetryDCGM = "dcgm"
	TelemetryNone = "none"
)

// Telemetry holds the telemetry exporter's settings (flags and environment
// only; dcgm-exporter's environment names are accepted as twins).
type Telemetry struct {
	// CollectInterval is how often every GPU is sampled.
	CollectInterval time.Duration `json:"collectInterval"`
	// Backend is auto (DCGM if it initialises, else NVML), nvml, dcgm or
	// none (no DCGM_* metrics).
	Backend string `json:"backend"`
	// DCGMAddress is a remote nv-hostengine (host:port or
	// unix:///path); empty embeds DCGM in the process.
	DCGMAddress string `json:"dcgmAddress"`
	// Collectors is a dcgm-exporter counters CSV; empty: the default set.
	Collectors string `json:"collectors"`
	// PodResourcesSocket is the kubelet's pod-resources socket; empty
	// turns pod attribution off.
	PodResourcesSocket   string        `json:"podResourcesSocket"`
	PodResourcesInterval time.Duration `json:"podResourcesInterval"`
	// NoHostname omits the Hostname label (dcgm-exporter's --no-hostname).
	NoHostname bool `json:"noHostname"`
	// ReplaceBlanksInModelName writes modelName with dashes for blanks.
	ReplaceBlanksInModelName bool `json:"replaceBlanksInModelName"`
	// PerPodUsage turns on per-pod accounting: each GPU's processes,
	// joined to pods through their cgroups. Needs hostPID, and pods
	// readable through the API server.
	PerPodUsage bool `json:"perPodUsage"`
	// PerPodDCGMSeries adds per-pod DCGM_FI_DEV_FB_USED and GPU_UTIL
	// series beside the device series (dcgm-exporter's per-pod shape).
	PerPodDCGMSeries bool `json:"perPodDCGMSeries"`
	// KubernetesVirtualGPUs serves dcgm-exporter's --kubernetes-virtual-gpus
	// series shape: each DCGM series of a device containers hold is
	// replaced by one copy per holding container and replica (labels pod,
	// namespace, container, vgpu), and DCGM_FI_DEV_FB_USED and GPU_UTIL
	// keep the device series and add per-pod ones. Needs PerPodUsage;
	// supersedes PerPodDCGMSeries.
	KubernetesVirtualGPUs bool `json:"kubernetesVirtualGPUs"`
	// ProcRoot is where the host's /proc is (tests point it elsewhere).
	ProcRoot string `json:"-"`
}

// parseCollectInterval accepts a Go duration ("1s", "500ms") or, as
// dcgm-exporter's --collect-interval and DCGM_EXPORTER_INTERVAL do, a
// plain number of milliseconds ("30000").
func parseCollectInterval(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if n, nerr := strconv.ParseInt(strings.TrimSpace(v), 10, 64); nerr == nil {
		d, err = time.Duration(n)*time.Millisecond, nil
	}
	if err != nil {
		return 0, fmt.Errorf("want a duration (e.g. 1s, 500ms) or a number of milliseconds as dcgm-exporter takes it (e.g. 30000)")
	}
	if d < 100*time.Millisecond || d > time.Hour {
		return 0, fmt.Errorf("%s is out of range: sample at least every hour and at most every 100ms (a plain number is milliseconds: 1000 = 1s)", d)
	}
	return d, nil
}

// telemetryOptions are the flags of the telemetry capability (group GroupTelemetry).
func telemetryOptions() []Option {
	boolean := func(name string, env []string, usage string, field func(c *Config) *bool) Option {
		return Option{Name: name, Env: env, Default: "false", Usage: usage, Group: GroupTelemetry, Bool: true,
			set: func(c *Config, v string) error {
				b, err := strconv.ParseBool(v)
				if err != nil {
					return fmt.Errorf("want true or false")
				}
				*field(c) = b
				return nil
			}}
	}
	backends := []string{TelemetryAuto, TelemetryNVML, TelemetryDCGM, TelemetryNone}
	return []Option{
		{Name: "collect-interval", Env: []string{"GPU_PLUGIN_COLLECT_INTERVAL", "DCGM_EXPORTER_INTERVAL"}, Default: DefaultCollectInterval.String(), Group: GroupTelemetry,
			Usage: "how often every GPU and MIG device is sampled; scrapes serve the latest sample (a plain number is milliseconds, as dcgm-exporter's)",
			set: func(c *Config, v string) error {
				d, err := parseCollectInterval(v)
				if err != nil {
					return err
				}
				c.Telemetry.CollectInterval = d
				return nil
			}},
		{Name: "telemetry-backend", Env: []string{"GPU_PLUGIN_TELEMETRY_BACKEND"}, Default: TelemetryAuto, Group: GroupTelemetry, Allowed: backends,
			Usage: "where GPU telemetry comes from: auto (DCGM if it initialises, else NVML), nvml, dcgm (falls back to NVML while DCGM is unreachable) or none (no DCGM_* metrics)",
			set: func(c *Config, v string) error {
				v = strings.ToLower(strings.TrimSpace(v))
				if !slices.Contains(backends, v) {
					return fmt.Errorf("want one of %s", strings.Join(backends, ", "))
				}
				c.Telemetry.Backend = v
				return nil
			}},
		{Name: "dcgm-address", Aliases: []string{"remote-hostengine-info"}, Env: []string{"GPU_PLUGIN_DCGM_ADDRESS", "DCGM_REMOTE_HOSTENGINE_INFO"}, Group: GroupTelemetry,
			Usage: "a remote nv-hostengine, host:port (the GPU Operator's listens on 5555) or unix:///path; empty embeds DCGM (libdcgm.so.4) in this process",
			set:   func(c *Config, v string) error { c.Telemetry.DCGMAddress = strings.TrimSpace(v); return nil }},
		{Name: "collectors", Env: []string{"GPU_PLUGIN_COLLECTORS", "DCGM_EXPORTER_COLLECTORS"}, Group: GroupTelemetry,
			Usage: "dcgm-exporter counters file (CSV: field name, gauge|counter|label, help) choosing the DCGM_* metrics; empty: dcgm-exporter's default set",
			set:   func(c *Config, v string) error { c.Telemetry.Collectors = v; return nil }},
		{Name: "pod-resources-socket", Aliases: []string{"pod-resources-kubelet-socket"}, Env: []string{"GPU_PLUGIN_POD_RESOURCES_SOCKET", "DCGM_POD_RESOURCES_KUBELET_SOCKET"},
			Default: DefaultPodResourcesSocket, Group: GroupTelemetry,
			Usage: "the kubelet's pod-resources socket, for pod, namespace and container labels on GPU metrics; empty turns attribution off",
			set:   func(c *Config, v string) error { c.Telemetry.PodResourcesSocket = v; return nil }},
		{Name: "pod-resources-interval", Env: []string{"GPU_PLUGIN_POD_RESOURCES_INTERVAL"}, Default: DefaultPodResourcesInterval.String(), Group: GroupTelemetry,
			Usage: "how often pod attribution is refreshed from the kubelet (also right after each Allocate)",
			set: func(c *Config, v string) error {
				d, err := time.ParseDuration(v)
				if err != nil || d < 100*time.Millisecond || d > time.Hour {
					return fmt.Errorf("want a duration between 100ms and 1h, e.g. 5s")
				}
				c.Telemetry.PodResourcesInterval = d
				return nil
			}},
		boolean("no-hostname", []string{"GPU_PLUGIN_NO_HOSTNAME", "DCGM_EXPORTER_NO_HOSTNAME"},
			"omit the Hostname label from DCGM_* metrics, as dcgm-exporter's --no-hostname",
			func(c *Config) *bool { return &c.Telemetry.NoHostname }),
		boolean("replace-blanks-in-model-name", []string{"GPU_PLUGIN_REPLACE_BLANKS_IN_MODEL_NAME", "DCGM_EXPORTER_REPLACE_BLANKS_IN_MODEL_NAME"},
			"write the modelName label with dashes instead of blanks, as dcgm-exporter's option of that name",
			func(c *Config) *bool { return &c.Telemetry.ReplaceBlanksInModelName }),
		boolean("per-pod-usage", []string{"GPU_PLUGIN_PER_POD_USAGE"},
			"per-pod GPU memory and SM use, also on shared (time-sliced) GPUs: each GPU's processes are joined to their pods through /proc/<pid>/cgroup; needs hostPID: true and get/list/watch on pods (the chart's perPodUsage.enabled sets both); adds the gpu_plugin_pod_gpu_* and gpu_plugin_gpu_unattributed_* families",
			func(c *Config) *bool { return &c.Telemetry.PerPodUsage }),
		boolean("per-pod-dcgm-series", []string{"GPU_PLUGIN_PER_POD_DCGM_SERIES"},
			"with --per-pod-usage: also one DCGM_FI_DEV_FB_USED and DCGM_FI_DEV_GPU_UTIL series per pod (labelled pod_uid) beside each device series, the per-pod series of dcgm-exporter's --kubernetes-virtual-gpus (without its vgpu copies); sums over those families must then filter on pod_uid",
			func(c *Config) *bool { return &c.Telemetry.PerPodDCGMSeries }),
		kubernetesVirtualGPUs(boolean("kubernetes-virtual-gpus", []string{"GPU_PLUGIN_KUBERNETES_VIRTUAL_GPUS", "KUBERNETES_VIRTUAL_GPUS"},
			"dcgm-exporter's --kubernetes-virtual-gpus series shape, for dashboards written for it: every DCGM_* series of a GPU or MIG device that containers hold is replaced by one copy per holding container and replica, labelled pod, namespace, container and vgpu (the replica number of a time-sliced or MPS device ID <uuid>::<n>); DCGM_FI_DEV_FB_USED and DCGM_FI_DEV_GPU_UTIL keep the device series and add one per pod with its own value (labelled pod_uid too), so sums over any DCGM_* family must then filter; needs --per-pod-usage; supersedes --per-pod-dcgm-series",
			func(c *Config) *bool { return &c.Telemetry.KubernetesVirtualGPUs })),
	}
}

// kubernetesVirtualGPUs refuses --kubernetes-virtual-gpus without
// --per-pod-usage, whose accounting gives the per-pod FB_USED and
// GPU_UTIL values: dcgm-exporter serves them as 0 when it cannot read the
// processes, which looks like idle pods. The check runs when the option is
// set, which Load does after per-pod-usage (the table's order; telemetry
// options are flags and environment only, so every one is set every
// time); TestTelemetryOptions pins that.
func kubernetesVirtualGPUs(o Option) Option {
	set := o.set
	o.set = func(c *Config, v string) error {
		if err := set(c, v); err != nil {
			return err
		}
		if c.Telemetry.KubernetesVirtualGPUs && !c.Telemetry.PerPodUsage {
			return fmt.Errorf("needs --per-pod-usage (GPU_PLUGIN_PER_POD_USAGE=true, chart perPodUsage.enabled), whose per-process accounting gives each pod's own DCGM_FI_DEV_FB_USED and DCGM_FI_DEV_GPU_UTIL; turn it on, or drop --kubernetes-virtual-gpus")
		}
		return nil
	}
	return o
}

// TelemetrySettings returns the telemetry settings with defaults filled
// in, so a Config built by hand works too.
func (c *Config) TelemetrySettings() Telemetry {
	t := c.Telemetry
	if t.CollectInterval <= 0 {
		t.CollectInterval = DefaultCollectInterval
	}
	if t.Backend == "" {
		t.Backend = TelemetryAuto
	}
	if t.ProcRoot == "" {
		t.ProcRoot = "/proc"
	}
	if t.PodResourcesInterval <= 0 {
		t.PodResourcesInterval = DefaultPodResourcesInterval
	}
	return t
}
