package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/mps"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// newMPS builds the MPS control daemon manager. It is always there, as a
// reload may turn sharing.mps on; it runs daemons only for resources
// shared through MPS.
func (d *Daemon) newMPS() {
	opts := mps.Options{
		Binary:  d.mpsBinary(),
		Health:  d.health,
		Logger:  d.log.With("component", "mps"),
		Prepare: d.prepareMPS,
	}
	if d.node == nil {
		opts.Env = d.driverRootEnv()
		opts.ComputeMode = d.setComputeMode
	} else {
		opts.InheritEnv = true
	}
	d.mps = mps.New(opts)
}

// mpsBinary is the nvidia-cuda-mps-control to run: --mps-control-binary,
// else the driver root's. A simulated node has none unless named.
func (d *Daemon) mpsBinary() string {
	const name = "nvidia-cuda-mps-control"
	if b := d.cfg.Daemon.MPSControlBinary; b != "" || d.node != nil {
		return b
	}
	if root := d.containerDriverRoot(); root != "" {
		return filepath.Join(root, "usr/bin", name)
	}
	return filepath.Join("/usr/bin", name)
}

// containerDriverRoot is where this process sees a driver root that is not
// its own root ("" when it is).
func (d *Daemon) containerDriverRoot() string {
	if r := d.cfg.DriverRoot(); r == "/" || r == "" {
		return ""
	}
	return config.Deref(d.cfg.Plugin().ContainerDriverRoot)
}

// driverRootEnv lets the driver root's programs find their helpers
// (nvidia-cuda-mps-server) and libraries when it is mounted elsewhere.
func (d *Daemon) driverRootEnv() []string {
	root := d.containerDriverRoot()
	if root == "" {
		return nil
	}
	return []string{
		"PATH=" + filepath.Join(root, "usr/bin") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LD_LIBRARY_PATH=" + filepath.Dir(nvmlLibraryPath(d.cfg)),
	}
}

// prepareMPS checks what a daemon needs before it starts: a binary, and
// the MPS root's shm directory being this process's /dev/shm, since the
// MPS server the daemon starts and its clients (which get <root>/shm as
// their /dev/shm) must share memory.
func (d *Daemon) prepareMPS(s mps.Spec) error {
	bin := d.mpsBinary()
	if bin == "" {
		return errors.New("a simulated node has no nvidia-cuda-mps-control: build the test fake (go build -o /tmp/nvidia-cuda-mps-control ./internal/testkit/fakempscontrol) and pass --mps-control-binary=/tmp/nvidia-cuda-mps-control")
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("the MPS control binary: %w (set --mps-control-binary, or check --driver-root and --driver-root-ctr-path)", err)
	}
	shm := filepath.Join(s.Root, "shm")
	if err := os.MkdirAll(shm, 0o755); err != nil {
		return fmt.Errorf("creating the MPS shared memory directory: %w", err)
	}
	if d.node != nil {
		return nil // simulated clients share nothing
	}
	a, errA := os.Stat(shm)
	b, errB := os.Stat("/dev/shm")
	if errA != nil || errB != nil || !os.SameFile(a, b) {
		return fmt.Errorf("this process's /dev/shm is not %s, which MPS clients get as /dev/shm, so they could not reach the MPS server: mount the host's %s at /dev/shm (the chart does with sharing.mps), or, running on the host, make %s a link to /dev/shm", shm, shm, shm)
	}
	return nil
}

// setComputeMode sets the GPUs' compute mode through NVML, as NVIDIA's
// MPS control daemon does with nvidia-smi.
func (d *Daemon) setComputeMode(_ context.Context, uuids []string, mode string) error {
	m := gonvml.COMPUTEMODE_DEFAULT
	if mode == "EXCLUSIVE_PROCESS" {
		m = gonvml.COMPUTEMODE_EXCLUSIVE_PROCESS
	}
	inv := d.inv.Load()
	for _, u := range uuids {
		h, ok := inv.Handle(u)
		if !ok {
			return fmt.Errorf("GPU %s: no NVML handle", u)
		}
		if err := nvml.Do(d.lib, "nvmlDeviceSetComputeMode", func() gonvml.Return { return h.SetComputeMode(m) }); err != nil {
			return fmt.Errorf("GPU %s: %w", u, err)
		}
	}
	return nil
}

// advertised leaves out the resources shared through MPS whose daemon has
// not been ready yet: a resource is offered only once it can be served.
func (d *Daemon) advertised(rs []*sharing.Resource) []*sharing.Resource {
	if !slices.ContainsFunc(rs, func(r *sharing.Resource) bool { return r.MPS }) {
		return rs
	}
	out := make([]*sharing.Resource, 0, len(rs))
	for _, r := range rs {
		if !r.MPS || d.mps.Advertisable(r.Name) {
			out = append(out, r)
		}
	}
	return out
}

// applyMPS asks for the daemons the advertisement needs, and those of the
// DRA claims shared through MPS.
func (d *Daemon) applyMPS(cfg *config.Config, a *advert.Advertisement) {
	d.mpsMu.Lock()
	defer d.mpsMu.Unlock()
	d.mpsForPlugin = mps.Specs(cfg.MPSRoot(), a.Resources, a.Inventory)
	d.mps.Apply(d.mpsSpecs())
}

// reapplyMPS asks again after the DRA claims' MPS daemons changed.
func (d *Daemon) reapplyMPS() {
	d.mpsMu.Lock()
	defer d.mpsMu.Unlock()
	d.mps.Apply(d.mpsSpecs())
}

// mpsSpecs are every daemon wanted. Call with mpsMu held.
func (d *Daemon) mpsSpecs() []mps.Spec {
	specs := slices.Clone(d.mpsForPlugin)
	if d.dra != nil {
		specs = append(specs, d.dra.MPSSpecs()...)
	}
	return specs
}

// MPS is the MPS control daemon manager.
func (d *Daemon) MPS() *mps.Manager { return d.mps }
