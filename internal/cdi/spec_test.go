package cdi_test

import (
	"strings"
	"testing"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

// TestWrittenSpecResolves writes the spec for a MIG node and reads it back
// with the CDI library, as a container runtime would, resolving the names
// Allocate returns under both ID strategies.
func TestWrittenSpecResolves(t *testing.T) {
	p, err := sim.LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvml.Open(sim.NewNode(p, nil).NVML())
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Close()
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	spec, err := cdi.BuildSpec(inv, "/run/nvidia/driver")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path, err := cdi.Write(dir, spec)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(path, "k8s.device-plugin.nvidia.com-gpu.json") {
		t.Errorf("spec file %s", path)
	}

	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(dir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if errs := cache.GetErrors(); len(errs) > 0 {
		t.Fatalf("the runtime's CDI library rejects the spec: %v", errs)
	}
	mig := inv.GPUs[1].MIGDevices[2]
	for _, name := range []string{
		"k8s.device-plugin.nvidia.com/gpu=" + inv.GPUs[7].UUID,
		"k8s.device-plugin.nvidia.com/gpu=7",
		"k8s.device-plugin.nvidia.com/gpu=" + mig.UUID,
		"k8s.device-plugin.nvidia.com/gpu=1:2",
	} {
		d := cache.GetDevice(name)
		if d == nil {
			t.Errorf("%s does not resolve", name)
			continue
		}
		nodes := d.ContainerEdits.DeviceNodes
		if len(nodes) != 1 || !strings.HasPrefix(nodes[0].HostPath, "/run/nvidia/driver/dev/nvidia") {
			t.Errorf("%s device nodes %+v", name, nodes)
		}
	}
	if got := len(cache.ListDevices()); got != 2*(8+len(inv.GPUs[0].MIGDevices)+4+2+1+3) {
		t.Errorf("%d CDI devices, want two names per GPU and MIG device", got)
	}
}
