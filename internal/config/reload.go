package config

import (
	"encoding/json"
	"errors"
	"io"
)

// origin is what Load was given.
type origin struct {
	name   string
	args   []string
	getenv func(string) string // what Load reads: base, with the selected file for a Select
	base   func(string) string // the process environment as Load was given it
	// selected: the config file comes from --config-dir (Select).
	selected bool
}

// ErrNotReloadable is returned by Reload for a Config that Load did not
// build.
var ErrNotReloadable = errors.New("config: not built by Load, so it cannot be reloaded")

// Reload resolves the configuration again from the same flags and
// environment, re-reading the config file, as on a live reload. The
// receiver is not changed.
func (c *Config) Reload() (*Config, error) {
	if c.origin == nil {
		return nil, ErrNotReloadable
	}
	n, _, err := load(c.origin, io.Discard)
	return n, err
}

// Select resolves the configuration again with file, one of --config-dir's
// files as the node label picks it ("": none, flags and defaults only),
// as the config file. Later Reloads re-read that file. The receiver is
// not changed.
func (c *Config) Select(file string) (*Config, error) {
	if c.origin == nil {
		return nil, ErrNotReloadable
	}
	o := *c.origin
	o.selected = true
	base := o.base
	o.getenv = func(k string) string {
		switch k {
		case "GPU_PLUGIN_CONFIG":
			return file
		case "CONFIG_FILE":
			return ""
		}
		return base(k)
	}
	n, _, err := load(&o, io.Discard)
	return n, err
}

// FileSum is the SHA-256 of the config file content this config was read
// from (zero without a file), so a watcher can tell whether the file on disk
// is still what is in force.
func (c *Config) FileSum() [32]byte { return c.fileSum }

// RestartRequired lists the settings that differ between c and next but
// take effect only when the daemon restarts; everything else applies live.
func (c *Config) RestartRequired(next *Config) []string {
	var out []string
	diff := func(name string, a, b any) {
		ja, _ := json.Marshal(a)
		jb, _ := json.Marshal(b)
		if string(ja) != string(jb) {
			out = append(out, name)
		}
	}
	diff("flags.failOnInitError", c.Flags.FailOnInitError, next.Flags.FailOnInitError)
	diff("flags.nvidiaDriverRoot", c.Flags.NvidiaDriverRoot, next.Flags.NvidiaDriverRoot)
	diff("flags.deviceDiscoveryStrategy", c.Flags.DeviceDiscoveryStrategy, next.Flags.DeviceDiscoveryStrategy)
	diff("flags.plugin.containerDriverRoot", c.Plugin().ContainerDriverRoot, next.Plugin().ContainerDriverRoot)
	diff("flags.useNodeFeatureAPI", c.UseNodeFeatureAPI(), next.UseNodeFeatureAPI())
	// health.quarantine applies live (the daemon re-reads it on a reload).
	ch, nh := c.Health, next.Health
	ch.Quarantine, nh.Quarantine = nil, nil
	diff("health", ch, nh)
	return out
}

// UseNodeFeatureAPI reports whether the node labels go to an NFD
// NodeFeature object instead of the features.d file (GFD's
// useNodeFeatureAPI).
func (c *Config) UseNodeFeatureAPI() bool {
	return c.Flags.UseNodeFeatureAPI != nil && *c.Flags.UseNodeFeatureAPI
}
