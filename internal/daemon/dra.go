package daemon

import (
	"context"
	"fmt"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/dra"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
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
	opts := dra.Options{
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
		MPSChanged:   func() <-chan struct{} { return d.mps.Changed() },
	}
	if d.lib != nil {
		// The reloader opens it (publishDRA); without NVML it does not run,
		// and there are no devices to keep out.
		d.draPublish = make(chan struct{})
		opts.PublishAfter = d.draPublish
	}
	drv, err := dra.New(opts)
	if err != nil {
		return fmt.Errorf("--allocation-mode=%s: %w", d.cfg.AllocationMode(), err)
	}
	d.dra = drv
	return nil
}

// podHoldersWait bounds how long a daemon starting with DRA holds its
// first slice write for the pod-resources API's first answer.
const podHoldersWait = 10 * time.Second

// publishDRA lets the DRA plugin write its first slice once the devices
// the device plugin's pods hold are known. The advertisement at start is
// built before the telemetry (and its pod-resources cache) exists, so
// PluginHeld knows no holder then, and the slice would offer the GPUs of
// running device plugin pods (a daemon restarted in dra or split mode on a
// node with GPU pods) for the scheduler to give to a claim as well; found
// by the e2e node (scenario 4d). So the slice, and a previous daemon's,
// stay as they are until the first List (at most podHoldersWait); the
// advertisement is then built again, the devices held going to Draining
// until their pods end.
func (r *reloader) publishDRA(ctx context.Context) {
	d := r.d
	if d.draPublish == nil {
		return
	}
	defer close(d.draPublish)
	if d.tel == nil || d.tel.pods == nil {
		r.log.Warn("no pod-resources API (telemetry off, or --pod-resources-socket empty): devices that device plugin pods hold are not kept out of the DRA slice")
		return
	}
	wctx, cancel := context.WithTimeout(ctx, podHoldersWait)
	defer cancel()
	var st podresources.Status
	err := d.tel.pods.WaitFor(wctx, func(_ *podresources.Snapshot, s podresources.Status) bool {
		st = s
		return s.Successes+s.Failures > 0
	})
	if ctx.Err() != nil {
		return
	}
	switch {
	case err != nil:
		// PluginHeld counts every device held until the first answer.
		r.log.Warn("the kubelet's pod-resources API has not answered: no device is offered through DRA until it does", "waited", podHoldersWait)
	case !st.Up:
		r.log.Warn("the kubelet's pod-resources API fails: the DRA slice is published without knowing which devices the device plugin's pods hold", "err", st.LastError)
	}
	r.rebuild("the device plugin's pods are known")
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
