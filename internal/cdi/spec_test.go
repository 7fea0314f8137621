package cdi_test

import (
	"slices"
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
	// GPU 1's third MIG device is the simulator's GI 3, CI 0 on GPU minor
	// 1: caps 3+135+3*9 and one more, as the driver numbers them.
	migNodes := []string{"/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap165", "/dev/nvidia-caps/nvidia-cap166"}
	if !slices.Equal(mig.CapDevicePaths, migNodes[1:]) {
		t.Fatalf("inventory caps of GPU 1 MIG 2: %v, want %v", mig.CapDevicePaths, migNodes[1:])
	}
	for _, tc := range []struct {
		name  string
		nodes []string
	}{
		{"k8s.device-plugin.nvidia.com/gpu=" + inv.GPUs[7].UUID, []string{"/dev/nvidia7"}},
		{"k8s.device-plugin.nvidia.com/gpu=7", []string{"/dev/nvidia7"}},
		{"k8s.device-plugin.nvidia.com/gpu=" + mig.UUID, migNodes},
		{"k8s.device-plugin.nvidia.com/gpu=1:2", migNodes},
	} {
		d := cache.GetDevice(tc.name)
		if d == nil {
			t.Errorf("%s does not resolve", tc.name)
			continue
		}
		var paths, hostPaths []string
		for _, n := range d.ContainerEdits.DeviceNodes {
			paths = append(paths, n.Path)
			hostPaths = append(hostPaths, n.HostPath)
		}
		var wantHost []string
		for _, p := range tc.nodes {
			wantHost = append(wantHost, "/run/nvidia/driver"+p)
		}
		if !slices.Equal(paths, tc.nodes) || !slices.Equal(hostPaths, wantHost) {
			t.Errorf("%s device nodes %v (host %v), want %v (host %v)", tc.name, paths, hostPaths, tc.nodes, wantHost)
		}
	}
	if got := len(cache.ListDevices()); got != 2*(8+len(inv.GPUs[0].MIGDevices)+4+2+1+3) {
		t.Errorf("%d CDI devices, want two names per GPU and MIG device", got)
	}
}
