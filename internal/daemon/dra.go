package daemon

import (
	"fmt"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/dra"
)

// needsCDISpec reports whether the node's GPU CDI spec is generated: for a
// cdi-* device list strategy, and for DRA, whose claim specs are made
// from it.
func (d *Daemon) needsCDISpec() bool { return d.cfg.UsesCDI() || d.cfg.UsesDRA() }

// newDRA builds the DRA kubelet plugin when the starting config offers
// devices through DRA (--allocation-mode dra or split); nil otherwise. It
// loads the prepared claims before the first advertisement, so a device in
// a claim is never offered to the device plugin. Once built, the mode can
// change live (also to device-plugin, which empties the slice); a daemon
// started in device-plugin mode needs a restart to serve DRA, because only
// then does it talk to the API server.
func (d *Daemon) newDRA() error {
	if !d.cfg.UsesDRA() {
		return nil
	}
	drv, err := dra.New(dra.Options{
		NodeName:     d.cfg.Daemon.NodeName,
		RegistrarDir: d.cfg.Daemon.KubeletRegistrarDir,
		PluginsDir:   d.cfg.Daemon.KubeletPluginsDir,
		CDIDir:       d.cfg.Daemon.CDISpecDir,
		API:          d.kube,
		Health:       d.health,
		Logger:       d.log.With("component", "dra"),
		MPSRoot:      d.cfg.MPSRoot(),
		OnMPSChange:  d.reapplyMPS,
		MPSReady:     func(resource string) bool { return d.mps.Ready(resource) },
	})
	if err != nil {
		return fmt.Errorf("--allocation-mode=%s: %w", d.cfg.AllocationMode(), err)
	}
	d.dra = drv
	return nil
}

// draEnv adds what the DRA side holds to an advertisement's environment.
func (d *Daemon) draEnv(env advert.Env) advert.Env {
	if d.dra != nil {
		env.DRAHeld = d.dra.Held
		// A device a pod holds through the device plugin, as the kubelet's
		// pod-resources API lists it (the telemetry's cache).
		env.PluginHeld = func(uuid string) bool {
			if d.tel == nil || d.tel.pods == nil {
				return false
			}
			if st := d.tel.pods.Status(); st.Successes == 0 {
				// Not listed yet (a start): no device moves to DRA until
				// the kubelet says which its pods hold, unless it cannot
				// say (pod-resources failing): then none is known held.
				return st.Failures == 0
			}
			for _, h := range d.tel.pods.Snapshot().Holders(uuid) {
				if h.Resource != dra.DriverName {
					return true
				}
			}
			return false
		}
	}
	return env
}

// offerDRA hands the advertisement's DRA devices to the DRA plugin.
func (d *Daemon) offerDRA(a *advert.Advertisement) {
	if d.dra == nil {
		return
	}
	if len(a.DRA) > 0 && cdi.NodeSpec(a.CDISpecs) == nil {
		d.log.Error("no CDI spec of the node's GPUs: DRA claims cannot be prepared")
	}
	d.dra.Update(a.Inventory, a.DRA, cdi.NodeSpec(a.CDISpecs))
}

// drainCheckInterval is how often devices moving between the two APIs are
// checked for release by the device plugin's pods.
const drainCheckInterval = 5 * time.Second

// rebuild advertises the current inventory and config again, for a change
// that is neither a reload nor a re-scan (a DRA claim released).
func (r *reloader) rebuild(why string) {
	adv, err := r.build(r.adv.Inventory, r.config())
	if err != nil {
		r.log.Error("cannot re-advertise", "why", why, "err", err)
		return
	}
	diff := r.publish(adv, r.config())
	if !diff.Empty() {
		r.log.Info("re-advertised", "why", why, "added", diff.Added, "removed", diff.Removed, "changed", diff.Changed, "dra", diff.DRA)
	}
	if diff.Labels {
		r.writeLabels()
	}
}
