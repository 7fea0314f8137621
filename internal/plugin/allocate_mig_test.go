package plugin_test

import (
	"context"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// With passDeviceSpecs, a MIG device's container gets its parent's
// /dev/nvidia<minor> and its GPU and compute instances' /dev/nvidia-caps
// nodes (issue 16), each once, under the host's /dev root; a whole GPU gets
// no caps.
func TestAllocateMIGCapsWithPassDeviceSpecs(t *testing.T) {
	inv := inventory(t, "dgx-a100-mig")
	dir := shortTempDir(t)
	k, err := fakekubelet.Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	mgr := plugin.NewManager(plugin.Options{
		SocketDir: dir, Health: health.NewState(nil, nil),
		Respond: plugin.ResponseOptions{Envvar: true,
			PassDeviceSpecs: true, DevRoot: "/run/nvidia/driver", ControlNodes: []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}},
		PollInterval: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, StreamGrace: 50 * time.Millisecond,
		Logger: slog.New(slog.DiscardHandler),
	})
	resources, err := sharing.Build(inv, sharing.Options{MigStrategy: config.MigMixed})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Run(ctx, resources) }()
	t.Cleanup(func() { cancel(); <-done })

	const mig1g = "nvidia.com/mig-1g.5gb"
	if err := k.WaitForAllocatable(waitCtx(t), mig1g, 9, 9); err != nil {
		t.Fatal(err)
	}
	if err := k.WaitForAllocatable(waitCtx(t), gpuResource, 3, 3); err != nil {
		t.Fatal(err)
	}
	// GPU 1's two 1g.5gb devices (GI 3 and 4 in the simulator, CI 0): the
	// driver's minors 3+135+9*GI and the next.
	g1 := inv.GPUs[1]
	a, b := g1.MIGDevices[2], g1.MIGDevices[3]
	resp, err := k.Allocate(waitCtx(t), mig1g, a.UUID, b.UUID)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range resp.Devices {
		got = append(got, d.ContainerPath+"="+d.HostPath+":"+d.Permissions)
	}
	want := []string{
		"/dev/nvidiactl=/run/nvidia/driver/dev/nvidiactl:rw",
		"/dev/nvidia-uvm=/run/nvidia/driver/dev/nvidia-uvm:rw",
		"/dev/nvidia-uvm-tools=/run/nvidia/driver/dev/nvidia-uvm-tools:rw",
		"/dev/nvidia1=/run/nvidia/driver/dev/nvidia1:rw",
		"/dev/nvidia-caps/nvidia-cap165=/run/nvidia/driver/dev/nvidia-caps/nvidia-cap165:rw",
		"/dev/nvidia-caps/nvidia-cap166=/run/nvidia/driver/dev/nvidia-caps/nvidia-cap166:rw",
		"/dev/nvidia-caps/nvidia-cap174=/run/nvidia/driver/dev/nvidia-caps/nvidia-cap174:rw",
		"/dev/nvidia-caps/nvidia-cap175=/run/nvidia/driver/dev/nvidia-caps/nvidia-cap175:rw",
	}
	if !slices.Equal(got, want) {
		t.Errorf("device specs for %s and %s:\n got  %v\n want %v", a.UUID, b.UUID, got, want)
	}

	// A whole GPU (MIG off) gets only its own node.
	resp, err = k.Allocate(waitCtx(t), gpuResource, inv.GPUs[6].UUID)
	if err != nil {
		t.Fatal(err)
	}
	got = nil
	for _, d := range resp.Devices {
		got = append(got, d.ContainerPath)
	}
	if want := []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia6"}; !slices.Equal(got, want) {
		t.Errorf("device specs for GPU 6: %v, want %v", got, want)
	}
}
