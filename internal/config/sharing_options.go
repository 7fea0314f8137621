package config

import (
	"fmt"
	"strconv"
	"time"
)

// DefaultLabelsFile is where the node labels go: a file in the directory
// NFD's local source reads (node-feature-discovery's features.d). It is not
// NVIDIA's "gfd" file, so both can coexist during a migration.
const DefaultLabelsFile = "/etc/kubernetes/node-feature-discovery/features.d/gpu-plugin"

// sharingOptions are the flags of the sharing capability (group GroupSharing).
func sharingOptions() []Option {
	boolean := func(name, env, def, usage string, field func(c *Config) *bool) Option {
		return Option{Name: name, Env: []string{env}, Default: def, Usage: usage, Group: GroupSharing, Bool: true,
			set: func(c *Config, v string) error {
				b, err := strconv.ParseBool(v)
				if err != nil {
					return fmt.Errorf("want true or false")
				}
				*field(c) = b
				return nil
			}}
	}
	return []Option{
		{Name: "rescan-interval", Env: []string{"GPU_PLUGIN_RESCAN_INTERVAL"}, Default: "30s", Group: GroupSharing,
			Usage: "how often the GPUs are re-scanned, so a changed MIG layout (e.g. by mig-parted) is advertised without a restart; also re-checks the config file; 0 disables",
			set: func(c *Config, v string) error {
				d, err := time.ParseDuration(v)
				if err != nil || d < 0 || (d > 0 && d < 100*time.Millisecond) {
					return fmt.Errorf("want 0 (off) or a duration of at least 100ms, e.g. 30s or 5m")
				}
				c.Daemon.RescanInterval = d
				return nil
			}},
		boolean("watch-config", "GPU_PLUGIN_WATCH_CONFIG", "true",
			"reload the config file when it changes (a mounted ConfigMap's update included); SIGHUP always reloads",
			func(c *Config) *bool { return &c.Daemon.WatchConfig }),
		boolean("node-labels", "GPU_PLUGIN_NODE_LABELS", "true",
			"write GPU feature discovery compatible node labels (nvidia.com/gpu.product, …) to --labels-file for NFD",
			func(c *Config) *bool { return &c.Daemon.NodeLabels }),
		{Name: "resource-customization", Env: []string{"GPU_PLUGIN_RESOURCE_CUSTOMIZATION"}, Default: "false", Group: GroupSharing, Bool: true,
			Usage: "apply resources.gpus/mig and sharing.timeSlicing.resources[].rename/devices, which NVIDIA's plugin v0.20 ignores (off: ignore them too, with a warning); also extensions.resourceCustomization in the file",
			set: func(c *Config, v string) error {
				b, err := strconv.ParseBool(v)
				if err != nil {
					return fmt.Errorf("want true or false")
				}
				c.Extensions.ResourceCustomization = &b
				return nil
			},
			inFile: func(c *Config) bool { return c.Extensions.ResourceCustomization != nil }},
		{Name: "mps-control-binary", Env: []string{"GPU_PLUGIN_MPS_CONTROL_BINARY"}, Default: "", Group: GroupSharing,
			Usage: "the nvidia-cuda-mps-control run for each resource of sharing.mps (default: usr/bin/nvidia-cuda-mps-control under the driver root); a simulated node has none: build the test fake with go build -o /tmp/nvidia-cuda-mps-control ./internal/testkit/fakempscontrol and name it here",
			set:   func(c *Config, v string) error { c.Daemon.MPSControlBinary = v; return nil }},
		{Name: "labels-file", Env: []string{"GPU_PLUGIN_LABELS_FILE"}, Default: DefaultLabelsFile, Group: GroupSharing,
			Usage: "the node labels file, in a directory NFD's local source reads; written atomically, rewritten when the labels change",
			set:   func(c *Config, v string) error { c.Daemon.LabelsFile = v; return nil }},
	}
}
