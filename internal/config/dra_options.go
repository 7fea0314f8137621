package config

import (
	"fmt"
	"slices"
)

// Allocation modes: which API a GPU or MIG device is offered through.
const (
	// AllocationDevicePlugin offers every device through the device plugin
	// API only, as NVIDIA's device plugin does (the default).
	AllocationDevicePlugin = "device-plugin"
	// AllocationDRA offers every device through DRA only, as NVIDIA's DRA
	// driver does; no device plugin resource is registered.
	AllocationDRA = "dra"
	// AllocationSplit offers the devices named in dra.devices through DRA
	// and the rest through the device plugin.
	AllocationSplit = "split"
)

// Default kubelet directories of a DRA kubelet plugin.
const (
	DefaultKubeletRegistrarDir = "/var/lib/kubelet/plugins_registry"
	DefaultKubeletPluginsDir   = "/var/lib/kubelet/plugins"
)

// DRA is the `dra` section, this daemon's extension: how the node's
// devices are split between the device plugin API and Dynamic Resource
// Allocation (resource.k8s.io/v1, driver gpu.nvidia.com). It applies live
// on a reload; a device in use stays where it is until it is released.
//
//	dra:
//	  mode: split              # device-plugin (default), dra, or split
//	  devices: ["GPU-…", 3]    # split: the GPUs (UUID or index) and MIG devices (UUID) offered through DRA
type DRA struct {
	Mode    *string        `json:"mode,omitempty"`
	Devices QuarantineList `json:"devices,omitempty"`
}

// AllocationMode is the mode in force.
func (c *Config) AllocationMode() string {
	if m := Deref(c.DRA.Mode); m != "" {
		return m
	}
	return AllocationDevicePlugin
}

// UsesDRA reports whether some device may be offered through DRA.
func (c *Config) UsesDRA() bool { return c.AllocationMode() != AllocationDevicePlugin }

func draOptions() []Option {
	modes := []string{AllocationDevicePlugin, AllocationDRA, AllocationSplit}
	return []Option{
		{Name: "allocation-mode", Env: []string{"GPU_PLUGIN_ALLOCATION_MODE"}, Default: AllocationDevicePlugin, Group: GroupDRA, Allowed: modes,
			Usage:  "which API offers the GPUs: device-plugin (nvidia.com/gpu and the other resources, as NVIDIA's device plugin); dra (ResourceSlices of driver gpu.nvidia.com, as NVIDIA's DRA driver; no device plugin resource); split (--dra-devices through DRA, the rest through the device plugin; no device is offered by both). Needs the API server and a runtime with CDI; file dra.mode, applied live: a device in use stays with its API until released",
			set:    func(c *Config, v string) error { c.DRA.Mode = &v; return nil },
			inFile: func(c *Config) bool { return c.DRA.Mode != nil }},
		{Name: "dra-devices", Env: []string{"GPU_PLUGIN_DRA_DEVICES"}, Group: GroupDRA, List: true,
			Usage: "with --allocation-mode=split: the devices offered through DRA, comma-separated GPU UUIDs, GPU indexes or MIG device UUIDs (a GPU named brings its MIG devices); file dra.devices",
			set: func(c *Config, v string) error {
				l, err := ParseQuarantineList(v)
				if err != nil {
					return err
				}
				c.DRA.Devices = l
				return nil
			},
			inFile: func(c *Config) bool { return c.DRA.Devices != nil }},
		{Name: "kubelet-registrar-directory-path", Env: []string{"KUBELET_REGISTRAR_DIRECTORY_PATH"}, Default: DefaultKubeletRegistrarDir, Group: GroupDRA,
			Usage: "the kubelet's plugin registration directory, where the DRA plugin's gpu.nvidia.com-reg.sock goes (NVIDIA's DRA driver's flag)",
			set:   func(c *Config, v string) error { c.Daemon.KubeletRegistrarDir = v; return nil }},
		{Name: "kubelet-plugins-directory-path", Env: []string{"KUBELET_PLUGINS_DIRECTORY_PATH"}, Default: DefaultKubeletPluginsDir, Group: GroupDRA,
			Usage: "the kubelet's plugins directory: the DRA socket and the prepared-claims checkpoint go to gpu.nvidia.com/ in it (NVIDIA's DRA driver's flag)",
			set:   func(c *Config, v string) error { c.Daemon.KubeletPluginsDir = v; return nil }},
	}
}

// checkDRA validates the dra settings together.
func checkDRA(c *Config) error {
	mode := c.AllocationMode()
	if !slices.Contains([]string{AllocationDevicePlugin, AllocationDRA, AllocationSplit}, mode) {
		return fmt.Errorf("dra.mode: %s is not a mode: want device-plugin, dra or split (flag --allocation-mode, environment GPU_PLUGIN_ALLOCATION_MODE)", quote(mode))
	}
	switch {
	case mode == AllocationSplit && len(c.DRA.Devices) == 0:
		return fmt.Errorf("dra.devices: split mode needs the devices to offer through DRA: name GPUs (UUID or index) or MIG devices (UUID) in --dra-devices (GPU_PLUGIN_DRA_DEVICES) or the file's dra.devices; or use --allocation-mode=dra for all of them")
	case mode != AllocationSplit && len(c.DRA.Devices) > 0:
		return fmt.Errorf("dra.devices: %v is set but the allocation mode is %s: devices are named only in split mode (--allocation-mode=split)", []string(c.DRA.Devices), mode)
	}
	if mode != AllocationDevicePlugin && c.Daemon.KubeletPluginsDir == "" {
		return fmt.Errorf("kubelet-plugins-directory-path: empty, but the %s mode serves a DRA plugin there", mode)
	}
	if mode != AllocationDevicePlugin && c.Daemon.KubeletRegistrarDir == "" {
		return fmt.Errorf("kubelet-registrar-directory-path: empty, but the %s mode registers a DRA plugin there", mode)
	}
	return nil
}
