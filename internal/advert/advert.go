// Package advert derives everything a node publishes from one inventory and
// one configuration: the kubelet resources and their devices, how Allocate
// answers, the CDI specs, and the node labels. A start, a reload and a MIG
// re-scan all go through Build, and Compare is the one definition of what
// changed, so what is logged, re-sent to the kubelet and rewritten on disk
// cannot disagree. The daemon decides when to build and publishes the
// result; this package has no state.
package advert

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"

	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/labels"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Env is what an advertisement needs to know about where the daemon runs,
// besides the inventory and the config.
type Env struct {
	// SimulatedDriverRoot is the driver root laid out for a simulated
	// node: the CDI spec's files and the device nodes passed with
	// --pass-device-specs are there. Empty on a real node.
	SimulatedDriverRoot string
	Logger              *slog.Logger
	// DRAHeld and PluginHeld report whether a GPU or MIG device (by UUID)
	// is in use through DRA (a prepared claim) or through the device
	// plugin (a pod's allocation); nil: nothing is. They keep a device in
	// use where it is when the allocation mode changes (splitForDRA).
	DRAHeld, PluginHeld func(uuid string) bool
}

// Advertisement is what the node publishes for one inventory and config.
type Advertisement struct {
	Inventory *nvml.Inventory
	Resources []*sharing.Resource
	// Warnings say what could not be advertised as configured.
	Warnings []string
	Respond  plugin.ResponseOptions
	// CDISpecs are the specs to write; nil when no cdi-* strategy is on.
	CDISpecs []*specs.Spec
	// Labels are the node labels; nil when --node-labels is off.
	Labels labels.Labels
	// DRA are the GPUs (UUID; whole GPUs) and MIG devices (UUID) offered
	// through DRA, in inventory order; Resources hold none of them.
	DRA []string
	// Draining are devices moving between the device plugin and DRA that
	// are still in use through the API they leave: offered by neither.
	Draining []string
}

// Build computes the advertisement. An inventory of nil (NVML unavailable)
// advertises nothing. It fails when the config cannot be applied to these
// GPUs or the CDI spec cannot be generated; then the caller keeps what it
// published before.
func Build(inv *nvml.Inventory, cfg *config.Config, env Env) (*Advertisement, error) {
	a := &Advertisement{Inventory: inv, Respond: Respond(cfg, env)}
	if inv == nil {
		return a, nil
	}
	pluginInv := inv
	if cfg.UsesDRA() {
		a.DRA, a.Draining, pluginInv, a.Warnings = splitForDRA(inv, cfg, env)
	}
	p, err := sharing.NewPlan(pluginInv, sharing.OptionsFrom(cfg))
	if err != nil {
		return nil, err
	}
	a.Resources, a.Warnings = p.Resources, append(a.Warnings, p.Warnings...)
	if cfg.UsesCDI() || cfg.UsesDRA() {
		if a.CDISpecs, err = cdi.Generate(inv, CDIOptions(cfg, env)); err != nil {
			return nil, fmt.Errorf("generating the CDI spec: %w", err)
		}
	}
	if cfg.Daemon.NodeLabels {
		a.Labels = labels.Compute(inv, a.Resources, labels.OptionsFrom(cfg))
	}
	return a, nil
}

// Respond derives the Allocate options from the config.
func Respond(cfg *config.Config, env Env) plugin.ResponseOptions {
	b := func(p *bool) bool { return p != nil && *p }
	lists := cfg.DeviceListStrategies()
	o := plugin.ResponseOptions{
		Envvar:              slices.Contains(lists, config.ListEnvvar),
		VolumeMounts:        slices.Contains(lists, config.ListVolumeMounts),
		CDIAnnotations:      slices.Contains(lists, config.ListCDIAnnotations),
		CDICRI:              slices.Contains(lists, config.ListCDICRI),
		IndexIDs:            cfg.DeviceIDStrategy() == config.IDIndex,
		PassDeviceSpecs:     cfg.PassDeviceSpecs(),
		DevRoot:             cfg.DevRoot(),
		CDIAnnotationPrefix: cfg.CDIAnnotationPrefix(),
		GDRCopy:             b(cfg.Flags.GDRCopyEnabled),
		GDS:                 b(cfg.Flags.GDSEnabled),
		MOFED:               b(cfg.Flags.MOFEDEnabled),
		MPSRoot:             cfg.MPSRoot(),
	}
	o.IMEXChannels, _, _ = IMEXChannels(cfg)
	// A simulated node's device nodes are in its laid-out root, unless
	// --dev-root (or --driver-root) names another.
	seen := "/"
	if env.SimulatedDriverRoot != "" {
		seen = o.DevRoot
		if o.DevRoot == "/" {
			o.DevRoot, seen = env.SimulatedDriverRoot, env.SimulatedDriverRoot
		}
	}
	o.ControlNodes = controlNodes(seen)
	return o
}

// controlNodes are the control device nodes passed with
// --pass-device-specs: as NVIDIA's plugin does, each only if it exists
// where this process sees the devices (on a real node, its own /dev).
func controlNodes(root string) []string {
	var out []string
	for _, p := range []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"} {
		if _, err := os.Stat(filepath.Join(root, p)); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// CDIOptions say where the driver's files are for the CDI spec. On a real
// node the daemon sees the host's driver root at --driver-root-ctr-path
// when it runs in a container (the chart mounts it there) and at
// --driver-root itself when it runs on the host; the spec always names the
// host's paths. A simulated node's laid-out root is both.
func CDIOptions(cfg *config.Config, env Env) cdi.Options {
	b := func(p *bool) bool { return p != nil && *p }
	o := cdi.Options{
		HookPath:      config.Deref(cfg.Plugin().NvidiaCTKPath),
		FeatureFlags:  cfg.Daemon.CDIFeatureFlags,
		DisabledHooks: cfg.Daemon.CDIDisableHooks,
		GDS:           b(cfg.Flags.GDSEnabled),
		MOFED:         b(cfg.Flags.MOFEDEnabled),
		GDRCopy:       b(cfg.Flags.GDRCopyEnabled),
		Logger:        env.Logger,
	}
	o.IMEXChannels, _, _ = IMEXChannels(cfg)
	if env.SimulatedDriverRoot != "" {
		o.DriverRoot, o.HostDriverRoot = env.SimulatedDriverRoot, env.SimulatedDriverRoot
		o.DevRoot, o.HostDevRoot = env.SimulatedDriverRoot, env.SimulatedDriverRoot
		if dev := cfg.DevRoot(); dev != "/" {
			// --dev-root names where the runtime finds the device nodes:
			// look for them there, as on a real node.
			o.DevRoot, o.HostDevRoot = dev, dev
		}
		return o
	}
	o.HostDriverRoot, o.HostDevRoot = cfg.DriverRoot(), cfg.DevRoot()
	o.DriverRoot = o.HostDriverRoot
	if ctr := config.Deref(cfg.Plugin().ContainerDriverRoot); ctr != "" {
		if fi, err := os.Stat(ctr); err == nil && fi.IsDir() {
			o.DriverRoot = ctr
		}
	}
	o.DevRoot = o.HostDevRoot
	if o.HostDevRoot == o.HostDriverRoot {
		o.DevRoot = o.DriverRoot
	}
	return o
}

// IMEXChannels checks the configured IMEX channels (imex.channelIDs) as
// NVIDIA's plugin does at start: a channel is used only if its device node
// exists as a character device, looked up under the driver root as mounted
// in this container (--driver-root-ctr-path, when it has a dev directory)
// and at /dev. It returns the channels found and one error per channel
// missing; with imex.required, a missing channel is an error that must stop
// the start.
func IMEXChannels(c *config.Config) (present []int, missing []error, err error) {
	root := config.Deref(c.Plugin().ContainerDriverRoot)
	if fi, statErr := os.Stat(filepath.Join(root, "dev")); root == "" || statErr != nil || !fi.IsDir() {
		root = "/"
	}
	for _, ch := range c.IMEX.ChannelIDs {
		path := cdi.IMEXChannelPath(ch)
		if e := charDevice(filepath.Join(root, path), path); e != nil {
			if c.IMEX.Required != nil && *c.IMEX.Required {
				return nil, nil, fmt.Errorf("imex.required: IMEX channel %d is required but %v; create the channel (the driver's nvidia-caps-imex-channels), or set imex.required: false (--imex-required=false) to start without it", ch, e)
			}
			missing = append(missing, fmt.Errorf("IMEX channel %d is not injected: %w", ch, e))
			continue
		}
		present = append(present, ch)
	}
	return present, missing, nil
}

// charDevice reports why none of paths is a character device, or nil.
func charDevice(paths ...string) error {
	var why []string
	for _, p := range slices.Compact(paths) {
		fi, err := os.Stat(p)
		switch {
		case err != nil:
			why = append(why, err.Error())
		case fi.Mode()&os.ModeCharDevice == 0:
			why = append(why, p+" is not a character device")
		default:
			return nil
		}
	}
	return errors.New(strings.Join(why, "; "))
}

// Diff is what changed from one advertisement to the next.
type Diff struct {
	// Added, Removed and Changed name resources (sharing.Resource.Equal
	// decides "changed").
	Added, Removed, Changed []string
	Respond                 bool // how Allocate answers
	CDI                     bool // the CDI specs' content
	Labels                  bool // the node labels
	DRA                     bool // the devices offered through DRA
}

// Resources reports whether any resource was added, removed or changed.
func (d Diff) Resources() bool { return len(d.Added)+len(d.Removed)+len(d.Changed) > 0 }

// Empty reports whether nothing changed.
func (d Diff) Empty() bool { return !d.Resources() && !d.Respond && !d.CDI && !d.Labels && !d.DRA }

// Compare says what changed from old to next; a nil old is an empty
// advertisement.
func Compare(old, next *Advertisement) Diff {
	if old == nil {
		old = &Advertisement{}
	}
	var d Diff
	byName := map[string]*sharing.Resource{}
	for _, r := range old.Resources {
		byName[r.Name] = r
	}
	for _, r := range next.Resources {
		o, ok := byName[r.Name]
		switch {
		case !ok:
			d.Added = append(d.Added, r.Name)
		case !o.Equal(r):
			d.Changed = append(d.Changed, r.Name)
		}
		delete(byName, r.Name)
	}
	d.Removed = slices.Sorted(maps.Keys(byName))
	d.Respond = !reflect.DeepEqual(old.Respond, next.Respond)
	d.CDI = !sameSpecs(old.CDISpecs, next.CDISpecs)
	d.Labels = !labels.Equal(old.Labels, next.Labels) // a new timestamp alone is no change
	d.DRA = !slices.Equal(old.DRA, next.DRA) || !slices.Equal(old.Draining, next.Draining)
	return d
}

func sameSpecs(a, b []*specs.Spec) bool {
	if len(a) != len(b) {
		return false
	}
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}
