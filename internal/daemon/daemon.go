// Package daemon wires the daemon together: NVML (real or simulated), the
// inventory, the health table, the kubelet plugin servers and the HTTP
// listener. cmd/gpu-plugin parses flags and calls it; tests run it in
// process.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/dra"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/mps"
	"github.com/gpu-plugin/gpu-plugin/internal/nodehealth"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

// Daemon is one running gpu-plugin.
type Daemon struct {
	cfg     *config.Config
	log     *slog.Logger
	started time.Time

	node    *sim.Node     // the simulated node, nil on a real one
	lib     *nvml.Library // nil when NVML failed to start
	initErr error         // why NVML failed, when we stay up anyway

	inv       atomic.Pointer[nvml.Inventory]
	preferrer *plugin.TopologyPreferrer // placement over the current inventory's topology
	health    *health.State
	monitor   *health.Monitor // nil without NVML (health.go)
	// quarantineWarnings are the quarantine entries' warnings last logged
	// (applyQuarantine, health.go).
	quarantineWarnings []string
	plugins            *plugin.Manager
	mps                *mps.Manager // MPS control daemons for sharing.mps and DRA claims (mps.go)
	// mpsMu orders the MPS manager's Apply calls; mpsForPlugin are the
	// device plugin's daemons last applied.
	mpsMu        sync.Mutex
	mpsForPlugin []mps.Spec
	dra          *dra.Driver   // the DRA kubelet plugin; nil unless the allocation mode uses DRA (dra.go)
	draPublish   chan struct{} // holds the slice's first write until the device plugin's pods are known (dra.go)
	http         *httpServer
	rl           *reloader             // live config reloads, GPU re-scans, node labels (reload.go)
	simRoot      string                // a simulated node's laid-out driver root (cdi.go)
	adv          *advert.Advertisement // what the node publishes at start; the reloader owns it after

	tel *telemetryParts // sampler, pod attribution, DCGM_* metrics (telemetry.go)
	// nodeHealth publishes GPU health to the API server; nil unless
	// --node-health-condition (nodehealth.go).
	nodeHealth *nodehealth.Publisher
	// kube is the API client, nil unless an opt-in feature needs it
	// (--node-health-condition, --config-dir); events records Events
	// about the node for --config-dir, stopped by Close.
	kube       *kube.Client
	stopEvents func()
	// nodeFeature publishes the node labels as a NodeFeature object
	// instead of the file (--use-node-feature-api); nil otherwise.
	nodeFeature *nodeFeatureWriter
}

// New opens NVML (or the simulated node), scans the inventory and builds
// the components. With failOnInitError=false an NVML failure is not an
// error: the daemon then serves /healthz, reports why on /readyz, and
// registers nothing.
func New(cfg *config.Config, log *slog.Logger) (*Daemon, error) {
	d := &Daemon{cfg: cfg, log: log, started: time.Now(), health: health.NewState(log.With("component", "health"), nil)}
	if err := d.newKubeClient(); err != nil {
		return nil, err
	}
	started := false
	defer func() {
		// A failed start stops the Event recorder it may have begun.
		if !started && d.stopEvents != nil {
			d.stopEvents()
		}
	}()
	var start *nodeConfigStart
	if cfg.Daemon.ConfigDir != "" {
		var err error
		if start, err = d.selectStartConfig(); err != nil {
			return nil, err
		}
		cfg = d.cfg
	}
	if cfg.UseNodeFeatureAPI() && cfg.Daemon.NodeLabels {
		var err error
		if d.nodeFeature, err = d.newNodeFeatureWriter(); err != nil {
			return nil, err
		}
	}
	d.rl = newReloader(d)
	if start != nil {
		d.rl.startNodeConfig(start)
	}
	d.preferrer = plugin.NewTopologyPreferrer(log.With("component", "placement"))
	iface, err := d.openInterface()
	if err != nil {
		return nil, err
	}
	if iface != nil {
		d.lib, err = nvml.Open(iface)
	}
	if err != nil {
		if cfg.FailOnInitError() {
			return nil, fmt.Errorf("%w (to keep the daemon up without GPUs instead, set --fail-on-init-error=false)", err)
		}
		d.initErr = err
		log.Error("NVML unavailable: staying up without registering any resource (failOnInitError=false)", "err", err)
	}
	if d.lib != nil {
		if err := d.rescan(); err != nil {
			d.lib.Close()
			return nil, err
		}
		if d.node != nil {
			if err := d.layOutSimulatedDriverRoot(d.inv.Load()); err != nil {
				d.Close()
				return nil, err
			}
		}
	}
	if err := d.newDRA(); err != nil {
		d.Close()
		return nil, err
	}
	if d.adv, err = d.buildAdvertisement(d.inv.Load(), cfg); err != nil {
		d.Close()
		return nil, err
	}
	for _, w := range d.adv.Warnings {
		log.Warn("resource not advertised as configured", "warning", w)
	}
	if err := d.writeCDISpecs(cfg, d.adv.CDISpecs); err != nil {
		d.Close()
		return nil, err
	}
	d.newMPS()
	d.applyMPS(cfg, d.adv)
	d.offerDRA(d.adv)
	if err := d.newHealthMonitor(); err != nil {
		d.Close()
		return nil, err
	}
	d.applyQuarantine(cfg, d.inv.Load())
	if err := d.newTelemetry(); err != nil {
		d.Close()
		return nil, err
	}
	if cfg.Daemon.MetricsAddress != "" {
		// Bind now, so a taken port fails the start at once.
		if d.http, err = d.newHTTPServer(); err != nil {
			d.Close()
			return nil, err
		}
	}
	if d.nodeHealth, err = d.newNodeHealth(); err != nil {
		d.Close()
		return nil, err
	}
	d.plugins = plugin.NewManager(d.pluginOptions())
	started = true
	return d, nil
}

// pluginOptions configure the kubelet side. Registration backoff keeps the
// manager's defaults (10 ms doubling to 5 s): a kubelet that appears after
// minutes away is registered with at once (its socket's creation starts an
// attempt), and within 5 s even if that event were missed.
func (d *Daemon) pluginOptions() plugin.Options {
	return plugin.Options{
		SocketDir: d.cfg.Daemon.KubeletSocketDir,
		Health:    d.health,
		Respond:   d.adv.Respond,
		Preferrer: d.preferrer,
		Events:    d.pluginEvents(), // refreshes pod attribution (telemetry.go)
		Logger:    d.log.With("component", "plugin"),

		// --kubelet-socket, NVIDIA's flag: the kubelet's socket in full.
		KubeletSocket:    d.cfg.Daemon.KubeletSocket,
		SkipRegistration: d.cfg.Daemon.SkipRegistration,
	}
}

// openInterface returns the simulated NVML, or the real library found under
// the driver root.
func (d *Daemon) openInterface() (gonvml.Interface, error) {
	if name := d.cfg.Daemon.Simulate; name != "" {
		p, err := sim.LoadProfile(name)
		if err != nil {
			return nil, err
		}
		d.node = sim.NewNode(p, nil)
		d.log.Info("running on a simulated node", "profile", p.Name, "gpus", d.node.GPUCount())
		return d.node.NVML(), nil
	}
	if s := config.Deref(d.cfg.Flags.DeviceDiscoveryStrategy); s == "tegra" {
		return nil, errors.New("device-discovery-strategy tegra is not supported: use auto or nvml")
	}
	path := nvmlLibraryPath(d.cfg)
	d.log.Debug("loading NVML", "library", path)
	return gonvml.New(gonvml.WithLibraryPath(path)), nil
}

// nvmlLibraryPath finds libnvidia-ml.so.1 under the driver root as mounted
// in this container; with the host's own root ("/") the dynamic linker's
// search (LD_LIBRARY_PATH, ld.so.cache) decides.
func nvmlLibraryPath(cfg *config.Config) string {
	const lib = "libnvidia-ml.so.1"
	if cfg.Daemon.NVMLLibrary != "" {
		return cfg.Daemon.NVMLLibrary
	}
	if cfg.DriverRoot() == "/" || cfg.DriverRoot() == "" {
		return lib
	}
	root := config.Deref(cfg.Plugin().ContainerDriverRoot)
	for _, dir := range []string{"usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib64", "usr/lib", "lib"} {
		p := filepath.Join(root, dir, lib)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return lib
}

// rescan rebuilds the inventory and reports GPUs that could not be
// identified.
func (d *Daemon) rescan() error {
	inv, err := nvml.Scan(d.lib, nvml.ScanOptions{SysRoot: d.sysRoot(), Logger: d.log.With("component", "inventory")})
	if err != nil {
		return fmt.Errorf("scanning GPUs: %w", err)
	}
	d.setInventory(inv)
	for _, g := range inv.GPUs {
		if g.Lost && g.Usable() {
			d.health.SetUnhealthy(g.UUID, "lost: the GPU fell off the bus (GPU_IS_LOST during discovery)")
		}
	}
	d.log.Info("inventory", "gpus", len(inv.GPUs), "driver", inv.DriverVersion, "cuda", inv.CUDADriverVersion)
	return nil
}

// setInventory publishes a (re-)scanned inventory and precomputes its
// topology for placement.
func (d *Daemon) setInventory(inv *nvml.Inventory) {
	if err := d.preferrer.SetInventory(inv); err != nil {
		d.log.Error("topology-aware placement unavailable; GetPreferredAllocation answers first-fit", "err", err)
	}
	d.inv.Store(inv)
}

func (d *Daemon) sysRoot() string {
	if d.node != nil {
		return "" // a simulated node has no sysfs
	}
	return d.cfg.Daemon.SysRoot
}

// Inventory returns the current inventory (nil without NVML).
func (d *Daemon) Inventory() *nvml.Inventory { return d.inv.Load() }

// Health is the node's health table.
func (d *Daemon) Health() *health.State { return d.health }

// Plugins is the kubelet side.
func (d *Daemon) Plugins() *plugin.Manager { return d.plugins }

// SimNode is the simulated node, or nil.
func (d *Daemon) SimNode() *sim.Node { return d.node }

// Addr is the metrics listener's address once Run has bound it.
func (d *Daemon) Addr() string {
	if d.http == nil {
		return ""
	}
	return d.http.addr()
}

// Run serves until ctx ends. Bind errors return at once; a component
// failing later cancels the rest and is returned.
func (d *Daemon) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	// A resource shared through MPS is offered once its daemon is ready
	// (the reloader re-advertises then).
	resources := d.advertised(d.adv.Resources)

	var wg sync.WaitGroup
	run := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx); err != nil && !errors.Is(err, context.Canceled) {
				cancel(fmt.Errorf("%s: %w", name, err))
			}
		}()
	}
	if d.http != nil {
		run("metrics listener", d.http.run)
	}
	if d.lib != nil {
		run("kubelet plugins", func(ctx context.Context) error { return d.plugins.Run(ctx, resources) })
	}
	if d.monitor != nil {
		run("health monitor", d.monitor.Run)
	}
	if d.lib != nil {
		run("MPS control daemons", d.mps.Run)
	}
	if d.dra != nil {
		run("DRA plugin", d.dra.Run)
	}
	if d.nodeHealth != nil {
		run("node health publisher", d.nodeHealth.Run)
	}
	if d.cfg.Daemon.ConfigDir != "" && d.lib != nil {
		run("node config label watch", d.watchConfigLabel)
	}
	d.runTelemetry(run)
	if d.lib != nil {
		run("config reload and GPU re-scan", func(ctx context.Context) error { return d.rl.run(ctx, d.adv) })
	}
	d.log.Info("gpu-plugin running", "resources", resourceNames(resources), "metrics", d.Addr(), "startup", time.Since(d.started).Round(time.Millisecond))
	<-ctx.Done()
	wg.Wait()
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	return nil
}

// Close releases the listener and NVML. Call it after Run returns, or
// instead of Run.
func (d *Daemon) Close() error {
	if d.simRoot != "" {
		os.RemoveAll(d.simRoot)
	}
	if d.stopEvents != nil {
		d.stopEvents()
	}
	if d.http != nil {
		d.http.lis.Close()
	}
	if d.lib != nil {
		return d.lib.Close()
	}
	return nil
}

func resourceNames(rs []*sharing.Resource) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = fmt.Sprintf("%s=%d", r.Name, len(r.Devices))
	}
	return out
}
