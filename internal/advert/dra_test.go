package advert_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// TestSplitForDRA: every device is offered by exactly one API, or by none
// while it moves and is still in use through the API it leaves.
func TestSplitForDRA(t *testing.T) {
	_, _, inv := testkit.SimNode(t, "dgx-a100-mig")
	_, _, h100 := testkit.SimNode(t, "dgx-h100")
	g0, g1 := inv.GPUs[0], inv.GPUs[1]
	mig := func(g int) []string {
		var out []string
		for _, m := range inv.GPUs[g].MIGDevices {
			out = append(out, m.UUID)
		}
		return out
	}
	held := func(uuids ...string) func(string) bool {
		return func(u string) bool { return slices.Contains(uuids, u) }
	}
	for _, tc := range []struct {
		name       string
		h100       bool
		args       []string
		env        advert.Env
		dra        []string
		draining   []string
		pluginGPUs int // GPUs left to the device plugin
		warning    string
	}{
		{name: "device-plugin", args: nil, pluginGPUs: 8},
		{name: "dra: every device", args: []string{"--allocation-mode=dra"}, dra: allUnits(inv), pluginGPUs: 0},
		{name: "split by GPU index", args: []string{"--allocation-mode=split", "--dra-devices=0"}, dra: mig(0), pluginGPUs: 7},
		{name: "split by MIG UUID", args: []string{"--allocation-mode=split", "--dra-devices=" + g1.MIGDevices[0].UUID}, dra: mig(1)[:1], pluginGPUs: 8},
		{name: "unknown entry", args: []string{"--allocation-mode=split", "--dra-devices=GPU-nope,0"}, dra: mig(0), pluginGPUs: 7, warning: `entry "GPU-nope" matches no GPU`},
		{name: "to DRA, still held by a device plugin pod", args: []string{"--allocation-mode=split", "--dra-devices=0"},
			env: advert.Env{PluginHeld: held(g0.MIGDevices[0].UUID)}, dra: mig(0)[1:], draining: mig(0)[:1], pluginGPUs: 7, warning: "offered by neither until the pod releases it"},
		{name: "to the device plugin, still in a claim", args: []string{"--allocation-mode=split", "--dra-devices=1"},
			env: advert.Env{DRAHeld: held(g0.MIGDevices[0].UUID)}, dra: mig(1), draining: mig(0)[:1], pluginGPUs: 7, warning: "offered by neither until the claim is released"},
		{name: "whole GPUs", h100: true, args: []string{"--allocation-mode=split", "--dra-devices=2,3"}, dra: []string{h100.GPUs[2].UUID, h100.GPUs[3].UUID}, pluginGPUs: 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			i := inv
			if tc.h100 {
				i = h100
			}
			tc.env.SimulatedDriverRoot = testkit.DriverRoot(t, i)
			a, err := advert.Build(i, load(t, "", append([]string{"--mig-strategy=mixed"}, tc.args...)...), tc.env)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(a.DRA, tc.dra) || !slices.Equal(a.Draining, tc.draining) {
				t.Errorf("DRA %v draining %v, want %v and %v", a.DRA, a.Draining, tc.dra, tc.draining)
			}
			// No device in both APIs: the resources' devices and the DRA
			// devices are disjoint, and together with the draining ones
			// they are every device of the node.
			var plugin []string
			gpus := map[string]bool{}
			for _, r := range a.Resources {
				for _, d := range r.Devices {
					plugin = append(plugin, d.Physical)
					gpus[d.GPUUUID] = true
				}
			}
			for _, u := range plugin {
				if slices.Contains(a.DRA, u) || slices.Contains(a.Draining, u) {
					t.Errorf("%s offered by the device plugin and also DRA or draining", u)
				}
			}
			if len(gpus) != tc.pluginGPUs {
				t.Errorf("the device plugin offers devices of %d GPUs, want %d", len(gpus), tc.pluginGPUs)
			}
			if tc.warning != "" && !slices.ContainsFunc(a.Warnings, func(w string) bool { return strings.Contains(w, tc.warning) }) {
				t.Errorf("warnings %q, want one with %q", a.Warnings, tc.warning)
			}
		})
	}
}

// allUnits are every allocatable unit: MIG devices of MIG-enabled GPUs,
// the other GPUs whole.
func allUnits(inv *nvml.Inventory) []string {
	var out []string
	for _, g := range inv.GPUs {
		if !g.MIGEnabled {
			out = append(out, g.UUID)
		}
		for _, m := range g.MIGDevices {
			out = append(out, m.UUID)
		}
	}
	return out
}
