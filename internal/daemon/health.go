package daemon

import (
	"fmt"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/healthmetrics"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// newHealthMonitor builds the node's health monitor from the resolved
// config. Without NVML there is nothing to watch and no monitor.
//
// The monitor writes d.health, which the daemon owns: kubelet restarts and
// config reloads replace plugin servers, never the health table. When a GPU
// that the inventory lists as lost or unidentified answers again, the
// monitor logs it once, lists it in /debug/devices (healthMonitor.
// rescanNeeded) and closes HealthMonitor().Rescan(): a re-scan of the
// inventory (d.inv) then advertises it; the monitor picks the new inventory
// up by itself.
func (d *Daemon) newHealthMonitor() error {
	s, err := d.cfg.HealthSettings()
	if err != nil {
		return err
	}
	if d.lib == nil {
		return nil
	}
	d.monitor = health.NewMonitor(health.MonitorOptions{
		Lib:           d.lib,
		Inventory:     d.inv.Load,
		State:         d.health,
		Policy:        health.NewPolicy(policyConfig(s)),
		Recovery:      health.Recovery(s.Recovery),
		QuietPeriod:   s.QuietPeriod,
		ProbeInterval: s.ProbeInterval,
		Logger:        d.log.With("component", "health-monitor"),
	})
	return nil
}

// policyConfig maps the settings onto the XID policy: the DP_* numbers and
// the file's lists join the skip and fatal sets.
func policyConfig(s config.HealthSettings) health.PolicyConfig {
	return health.PolicyConfig{
		DisableAll:   s.Disable.All,
		DisableXIDs:  s.Disable.XIDs,
		Skip:         append(slices.Clone(s.Disable.List), s.SkipXIDs...),
		EnableAll:    s.Enable.All,
		Fatal:        append(slices.Clone(s.Enable.List), s.FatalXIDs...),
		DoubleBitECC: s.DoubleBitECC,
	}
}

// HealthMonitor is the node's health monitor, or nil without NVML.
func (d *Daemon) HealthMonitor() *health.Monitor { return d.monitor }

// healthCollector exports device health (by advertised resource and device
// ID), XID counters and the monitor's mode.
func (d *Daemon) healthCollector() prometheus.Collector {
	return healthmetrics.NewCollector(d.health, d.monitor, func() []*sharing.Resource {
		if d.plugins == nil {
			return nil
		}
		return d.plugins.Resources()
	})
}

// healthMonitorStatus is the monitor's part of /debug/devices.
func (d *Daemon) healthMonitorStatus() *health.MonitorStatus {
	if d.monitor == nil {
		return nil
	}
	st := d.monitor.Status()
	return &st
}

// applyQuarantine makes the health table's quarantine what cfg lists
// (--health-quarantine and the file's health.quarantine), resolved against
// inv: a GPU index or UUID quarantines the GPU (and with it every device it
// backs), a MIG UUID that MIG device. An entry that matches nothing is
// logged as a warning once per change of the set of such entries. It runs
// in New and then only on the reloader's goroutine (after a config reload
// or a re-scan that changed the GPUs).
func (d *Daemon) applyQuarantine(cfg *config.Config, inv *nvml.Inventory) {
	if inv == nil {
		return
	}
	s, err := cfg.HealthSettings()
	if err != nil {
		return // validated when cfg was accepted
	}
	units, warnings := resolveQuarantine(inv, s.Quarantine)
	if !slices.Equal(warnings, d.quarantineWarnings) {
		for _, w := range warnings {
			if !slices.Contains(d.quarantineWarnings, w) {
				d.log.Warn("config setting accepted but not applied", "warning", w)
			}
		}
		d.quarantineWarnings = warnings
	}
	d.health.Quarantine(units)
}

// resolveQuarantine maps quarantine entries onto health units (GPU and MIG
// UUIDs as the inventory spells them), with a warning for each entry that
// matches none.
func resolveQuarantine(inv *nvml.Inventory, entries []string) (units, warnings []string) {
	for _, e := range entries {
		unit, why := inv.ResolveDevice(e)
		if unit == "" {
			warnings = append(warnings, fmt.Sprintf("health.quarantine / --health-quarantine entry %q %s; nothing quarantined for it", e, why))
			continue
		}
		units = append(units, unit)
	}
	return units, warnings
}
