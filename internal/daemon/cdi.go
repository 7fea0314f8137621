package daemon

import (
	"errors"
	"fmt"
	"os"

	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/driverroot"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// layOutSimulatedDriverRoot gives a simulated node a driver root of
// placeholder libraries and binaries and real device nodes, in a temporary
// directory removed by Close, so that its CDI spec comes from the same
// generator as a real node's and the device nodes --pass-device-specs
// names exist. Device nodes need CAP_MKNOD and the directory a writable
// TMPDIR: without either (a non-root user; the chart's pod, which drops
// every capability and has a read-only root file system) the node runs
// without a driver root, unless a cdi-* strategy needs one.
func (d *Daemon) layOutSimulatedDriverRoot(inv *nvml.Inventory) error {
	dir, err := os.MkdirTemp("", "gpu-plugin-simulated-driver-root-")
	if err != nil && !d.needsCDISpec() {
		d.log.Debug("no simulated driver root: no writable temporary directory", "err", err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("laying out the simulated driver root for a cdi-* device list strategy: %w; set TMPDIR to a writable directory, or use --device-list-strategy=envvar", err)
	}
	var minors []byte
	if src, ok := d.node.NVML().(nvml.MIGMinorsSource); ok {
		minors = src.MIGMinors()
	}
	if err := driverroot.Create(dir, inv, minors); err != nil {
		os.RemoveAll(dir)
		if errors.Is(err, driverroot.ErrNoMknod) && !d.needsCDISpec() {
			d.log.Debug("no simulated driver root: device nodes cannot be created here", "err", err)
			return nil
		}
		if errors.Is(err, driverroot.ErrNoMknod) {
			return fmt.Errorf("a simulated node with a cdi-* device list strategy lays out device nodes for its CDI spec: %w; or use --device-list-strategy=envvar", err)
		}
		return err
	}
	d.simRoot = dir
	d.log.Info("simulated driver root laid out", "dir", dir)
	return nil
}

// SimDriverRoot is the driver root laid out for a simulated node ("" on a
// real node, or when it could not be laid out).
func (d *Daemon) SimDriverRoot() string { return d.simRoot }

// buildAdvertisement computes what the node publishes for inv under cfg.
func (d *Daemon) buildAdvertisement(inv *nvml.Inventory, cfg *config.Config) (*advert.Advertisement, error) {
	if cfg.UsesDRA() && d.dra == nil {
		// Its devices would leave the device plugin with nothing to
		// publish them.
		return nil, fmt.Errorf("dra.mode %s: this daemon was started in device-plugin mode, without the API access DRA needs; restart it with the new mode (the chart's dra.mode does)", cfg.AllocationMode())
	}
	return advert.Build(inv, cfg, d.draEnv(advert.Env{SimulatedDriverRoot: d.simRoot, Logger: d.log.With("component", "cdi")}))
}

// writeCDISpecs is the one writer of CDI specs: at start, and when a reload
// or a re-scan changed them.
func (d *Daemon) writeCDISpecs(cfg *config.Config, ss []*specs.Spec) error {
	if len(ss) == 0 {
		return nil
	}
	paths, err := cdi.WriteAll(cfg.Daemon.CDISpecDir, ss)
	if err != nil {
		return fmt.Errorf("writing the CDI spec: %w", err)
	}
	d.log.Info("CDI specs written", "paths", paths)
	return nil
}
