package advert

import (
	"fmt"
	"slices"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// draUnits are the allocatable units of a GPU: its MIG devices when MIG
// is on, else the GPU itself.
func draUnits(g *nvml.GPU) []string {
	if g.MIGEnabled {
		var out []string
		for _, m := range g.MIGDevices {
			if m.UUID != "" {
				out = append(out, m.UUID)
			}
		}
		return out
	}
	return []string{g.UUID}
}

// SplitForDRA is splitForDRA for a config check: which units go to DRA,
// and the inventory left to the device plugin, with no device in use.
func SplitForDRA(inv *nvml.Inventory, cfg *config.Config) (dra []string, left *nvml.Inventory, warnings []string) {
	dra, _, left, warnings = splitForDRA(inv, cfg, Env{})
	return dra, left, warnings
}

// splitForDRA decides which units the node offers through DRA under cfg's
// allocation mode, and returns the inventory left to the device plugin.
// A unit prepared in a claim (env.DRAHeld) is never offered to the device
// plugin, and a unit a pod holds through the device plugin
// (env.PluginHeld) is never published to DRA: a unit moving between the
// two APIs is in neither until it is released, so no running pod loses its
// device and no device is offered twice.
func splitForDRA(inv *nvml.Inventory, cfg *config.Config, env Env) (dra, draining []string, left *nvml.Inventory, warnings []string) {
	wanted := map[string]bool{}
	switch cfg.AllocationMode() {
	case config.AllocationDRA:
		for i := range inv.GPUs {
			if inv.GPUs[i].Usable() {
				for _, u := range draUnits(&inv.GPUs[i]) {
					wanted[u] = true
				}
			}
		}
	case config.AllocationSplit:
		for _, e := range cfg.DRA.Devices {
			uuid, why := inv.ResolveDevice(e)
			if uuid == "" {
				warnings = append(warnings, fmt.Sprintf("dra.devices / --dra-devices entry %q %s; nothing offered through DRA for it", e, why))
				continue
			}
			if g, ok := inv.GPUByUUID(uuid); ok {
				for _, u := range draUnits(g) {
					wanted[u] = true
				}
				continue
			}
			wanted[uuid] = true
		}
	}
	held := func(f func(string) bool, u string) bool { return f != nil && f(u) }
	out := *inv
	out.GPUs = nil
	for _, g := range inv.GPUs {
		units := draUnits(&g)
		if !g.Usable() || len(units) == 0 {
			out.GPUs = append(out.GPUs, g)
			continue
		}
		keep := map[string]bool{}
		for _, u := range units {
			switch {
			case wanted[u] && held(env.PluginHeld, u):
				warnings = append(warnings, fmt.Sprintf("%s is to be offered through DRA but a pod holds it through the device plugin: it is offered by neither until the pod releases it", u))
				draining = append(draining, u)
			case wanted[u]:
				dra = append(dra, u)
			case held(env.DRAHeld, u):
				warnings = append(warnings, fmt.Sprintf("%s is to be offered through the device plugin but a prepared claim holds it: it is offered by neither until the claim is released", u))
				draining = append(draining, u)
			default:
				keep[u] = true
			}
		}
		switch {
		case len(keep) == len(units):
			out.GPUs = append(out.GPUs, g)
		case len(keep) > 0 && g.MIGEnabled:
			g.MIGDevices = slices.DeleteFunc(slices.Clone(g.MIGDevices), func(m nvml.MIGDevice) bool { return !keep[m.UUID] })
			out.GPUs = append(out.GPUs, g)
		}
	}
	return dra, draining, &out, warnings
}
