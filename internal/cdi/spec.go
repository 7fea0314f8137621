// Package cdi writes the Container Device Interface spec that the cdi-*
// device list strategies name devices from, through the CDI project's own
// library, with NVIDIA's plugin's vendor and class so existing runtime
// configurations keep working.
package cdi

import (
	"fmt"
	"path/filepath"
	"strconv"

	"tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Vendor and Class of the devices, as NVIDIA's device plugin names them.
const (
	Vendor = "k8s.device-plugin.nvidia.com"
	Class  = "gpu"
)

// Kind is the CDI kind of the spec.
const Kind = Vendor + "/" + Class

// BuildSpec describes every identified GPU and MIG device twice, under its
// UUID and under its index name ("0", "0:1"), so either device ID strategy
// resolves. Each device carries its /dev/nvidia<minor> node, a MIG device
// also its GPU and compute instances' /dev/nvidia-caps nodes; the control
// nodes every GPU container needs are common edits. Host paths are under
// devRoot.
//
// Driver libraries and utilities are not in this spec: the NVIDIA container
// toolkit (or its own `nvidia-ctk cdi generate` spec) injects them, as it
// does for envvar-based allocations.
func BuildSpec(inv *nvml.Inventory, devRoot string) (*specs.Spec, error) {
	node := func(path string) *specs.DeviceNode {
		return &specs.DeviceNode{Path: path, HostPath: filepath.Join(devRoot, path), Permissions: "rw"}
	}
	spec := &specs.Spec{
		Kind: Kind,
		ContainerEdits: specs.ContainerEdits{
			DeviceNodes: []*specs.DeviceNode{node("/dev/nvidiactl"), node("/dev/nvidia-uvm"), node("/dev/nvidia-uvm-tools")},
		},
	}
	add := func(names []string, g *nvml.GPU, caps []string) {
		edits := specs.ContainerEdits{}
		if g.Minor >= 0 {
			edits.DeviceNodes = []*specs.DeviceNode{node(fmt.Sprintf("/dev/nvidia%d", g.Minor))}
		}
		// A MIG device also needs its GPU and compute instances' caps.
		for _, c := range caps {
			edits.DeviceNodes = append(edits.DeviceNodes, node(c))
		}
		for _, n := range names {
			spec.Devices = append(spec.Devices, specs.Device{Name: n, ContainerEdits: edits})
		}
	}
	for i := range inv.GPUs {
		g := &inv.GPUs[i]
		if !g.Usable() {
			continue
		}
		add([]string{g.UUID, strconv.Itoa(g.Index)}, g, nil)
		for _, m := range g.MIGDevices {
			add([]string{m.UUID, fmt.Sprintf("%d:%d", g.Index, m.Index)}, g, m.CapDevicePaths)
		}
	}
	if len(spec.Devices) == 0 {
		return nil, fmt.Errorf("no devices to describe in a CDI spec")
	}
	v, err := cdi.MinimumRequiredVersion(spec)
	if err != nil {
		return nil, fmt.Errorf("choosing the CDI spec version: %w", err)
	}
	spec.Version = v
	return spec, nil
}

// Write stores spec in dir as <vendor>-<class>.json, atomically, after the
// CDI library has validated it. It returns the file's path.
func Write(dir string, spec *specs.Spec) (string, error) {
	cache, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	if err != nil {
		return "", fmt.Errorf("opening the CDI spec directory %s: %w", dir, err)
	}
	name := cdi.GenerateSpecName(Vendor, Class) + ".json"
	if err := cache.WriteSpec(spec, name); err != nil {
		return "", fmt.Errorf("writing the CDI spec to %s (--cdi-spec-dir): %w", dir, err)
	}
	return filepath.Join(dir, name), nil
}
