package healthmetrics

import (
	"context"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

func TestCollectorDeviceHealth(t *testing.T) {
	state := health.NewState(nil, nil)
	mig := &nvml.MIGDevice{UUID: "MIG-1", GPUInstanceID: 1}
	shared := sharing.NewResource("nvidia.com/gpu", []sharing.Device{
		{ID: "GPU-a::0", Physical: "GPU-a", GPUUUID: "GPU-a", Replica: 0},
		{ID: "GPU-a::1", Physical: "GPU-a", GPUUUID: "GPU-a", Replica: 1},
		{ID: "GPU-b::0", Physical: "GPU-b", GPUUUID: "GPU-b", Replica: 0},
	})
	migs := sharing.NewResource("nvidia.com/mig-1g.5gb", []sharing.Device{
		{ID: "MIG-1", Physical: "MIG-1", GPUUUID: "GPU-c", MIG: mig, Replica: -1},
	})
	state.SetUnhealthy("GPU-a", health.XIDReason(48))
	state.SetUnhealthy("MIG-1", health.XIDReason(94)+" on MIG GI 1 CI 0")
	c := NewCollector(state, nil, func() []*sharing.Resource { return []*sharing.Resource{shared, migs} })
	want := `
# HELP gpu_plugin_device_healthy 1 if the advertised device is healthy, 0 if not; reason says why not.
# TYPE gpu_plugin_device_healthy gauge
gpu_plugin_device_healthy{device="GPU-a::0",reason="XID 48 (double-bit ECC error)",resource="nvidia.com/gpu"} 0
gpu_plugin_device_healthy{device="GPU-a::1",reason="XID 48 (double-bit ECC error)",resource="nvidia.com/gpu"} 0
gpu_plugin_device_healthy{device="GPU-b::0",reason="",resource="nvidia.com/gpu"} 1
gpu_plugin_device_healthy{device="MIG-1",reason="XID 94 (contained ECC error) on MIG GI 1 CI 0",resource="nvidia.com/mig-1g.5gb"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "gpu_plugin_device_healthy"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}

// TestCollectorMonitor runs a real monitor on a simulated node, delivers
// XIDs through its NVML event set, and reads the counters and the mode back
// as metrics once the monitor has stopped.
func TestCollectorMonitor(t *testing.T) {
	node, lib, inv := testkit.SimNode(t, "dgx-h100")
	state := health.NewState(nil, nil)
	m := health.NewMonitor(health.MonitorOptions{
		Lib: lib, Inventory: func() *nvml.Inventory { return inv }, State: state,
		Recovery: health.RecoverNever, ProbeInterval: 10 * time.Millisecond, WaitTimeout: 20 * time.Millisecond,
		Logger: slog.New(slog.DiscardHandler),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	stop := func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("monitor Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("monitor did not stop within 5 s of its context ending")
		}
	}
	defer func() {
		if ctx.Err() == nil {
			stop()
		}
	}()
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	if err := m.WaitFor(wctx, func(s health.MonitorStatus) bool {
		return s.Mode == health.ModeEvents && slices.Contains(s.EventGPUs, 1) && slices.Contains(s.EventGPUs, 4)
	}); err != nil {
		t.Fatalf("GPUs 1 and 4 armed for events: %v (status %+v)", err, m.Status())
	}
	for _, x := range []struct {
		gpu  int
		code uint64
	}{{1, 13}, {1, 13}, {4, 79}} {
		if n, err := node.InjectXID(x.gpu, x.code, -1, -1); err != nil || n != 1 {
			t.Fatalf("InjectXID(%d, %d) reached %d event sets: %v", x.gpu, x.code, n, err)
		}
	}
	// XID 79 on GPU 4, sent last, is fatal: once GPU 4 is unhealthy the
	// monitor has counted all three.
	for {
		ch := state.Changed()
		if ok, _ := state.Check(inv.GPUs[4].UUID); !ok {
			break
		}
		select {
		case <-ch:
		case <-wctx.Done():
			t.Fatalf("GPU 4 never became unhealthy (monitor %+v)", m.Status())
		}
	}
	stop()
	c := NewCollector(state, m, nil)
	want := `
# HELP gpu_plugin_health_monitor_mode 1 for the health monitor's current mode: events (NVML event set), probing (periodic probes only), disabled, starting, stopped.
# TYPE gpu_plugin_health_monitor_mode gauge
gpu_plugin_health_monitor_mode{mode="disabled"} 0
gpu_plugin_health_monitor_mode{mode="events"} 0
gpu_plugin_health_monitor_mode{mode="probing"} 0
gpu_plugin_health_monitor_mode{mode="starting"} 0
gpu_plugin_health_monitor_mode{mode="stopped"} 1
# HELP gpu_plugin_xid_errors_total XID critical errors received from NVML, fatal or skipped (xid="other" past 256 series).
# TYPE gpu_plugin_xid_errors_total counter
gpu_plugin_xid_errors_total{gpu="1",uuid="` + inv.GPUs[1].UUID + `",xid="13"} 2
gpu_plugin_xid_errors_total{gpu="4",uuid="` + inv.GPUs[4].UUID + `",xid="79"} 1
# HELP gpu_plugin_health_events_total NVML events received by the health monitor.
# TYPE gpu_plugin_health_events_total counter
gpu_plugin_health_events_total 3
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want),
		"gpu_plugin_health_monitor_mode", "gpu_plugin_xid_errors_total", "gpu_plugin_health_events_total"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}

// TestCollectorRecoveryGate: the recovery action, the row remapper and the
// gate's hold of each GPU, as the monitor's last probe read them on a
// simulated node.
func TestCollectorRecoveryGate(t *testing.T) {
	node, lib, inv := testkit.SimNode(t, "dgx-h100")
	if err := node.SetRecoveryAction(3, 1); err != nil { // GPU_RECOVERY_ACTION_GPU_RESET
		t.Fatal(err)
	}
	if err := node.SetRowRemap(5, sim.RowRemap{Uncorrectable: 1, Pending: true}); err != nil {
		t.Fatal(err)
	}
	if err := node.SetRowRemap(6, sim.RowRemap{Uncorrectable: 512, Failure: true}); err != nil {
		t.Fatal(err)
	}
	if err := node.SetFault(7, "GetFieldValues", 3); err != nil { // NOT_SUPPORTED: a driver without the field
		t.Fatal(err)
	}
	m := health.NewMonitor(health.MonitorOptions{
		Lib: lib, Inventory: func() *nvml.Inventory { return inv }, State: health.NewState(nil, nil),
		ProbeInterval: 10 * time.Millisecond, WaitTimeout: 20 * time.Millisecond, Logger: slog.New(slog.DiscardHandler),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	err := m.WaitFor(wctx, func(s health.MonitorStatus) bool { return s.ProbeRounds > 0 })
	cancel()
	<-done
	if err != nil {
		t.Fatal(err)
	}
	var action, pending, failure, held strings.Builder
	for i, g := range inv.GPUs {
		id := `gpu="` + strconv.Itoa(i) + `",uuid="` + g.UUID + `"`
		switch i {
		case 3:
			action.WriteString(`gpu_plugin_gpu_recovery_action{action="gpu_reset",` + id + "} 1\n")
		case 7:
		default:
			action.WriteString(`gpu_plugin_gpu_recovery_action{action="none",` + id + "} 0\n")
		}
		pending.WriteString(`gpu_plugin_row_remap_pending{` + id + "} " + map[bool]string{true: "1", false: "0"}[i == 5] + "\n")
		failure.WriteString(`gpu_plugin_row_remap_failure{` + id + "} " + map[bool]string{true: "1", false: "0"}[i == 6] + "\n")
		reason := map[int]string{3: "needs GPU reset", 5: "row remap pending", 6: "row remap failed"}[i]
		held.WriteString(`gpu_plugin_gpu_recovery_held{gpu="` + strconv.Itoa(i) + `",reason="` + reason + `",uuid="` + g.UUID + `"} ` +
			map[bool]string{true: "1", false: "0"}[reason != ""] + "\n")
	}
	want := `
# HELP gpu_plugin_gpu_recovery_action NVML's recovery action for the GPU as a number (0 none, 1 gpu_reset, 2 node_reboot, 3 drain_p2p, 4 drain_and_reset, 5 recover_imex_domain, 6 bus_reset, 7 system_reboot); action names it. Absent where the driver lacks the field.
# TYPE gpu_plugin_gpu_recovery_action gauge
` + action.String() + `# HELP gpu_plugin_row_remap_pending 1 while a row remap waits for a GPU reset. Absent where the GPU reports no row remapping (before Ampere, MIG on).
# TYPE gpu_plugin_row_remap_pending gauge
` + pending.String() + `# HELP gpu_plugin_row_remap_failure 1 if row remapping failed on the GPU. Absent where the GPU reports no row remapping (before Ampere, MIG on).
# TYPE gpu_plugin_row_remap_failure gauge
` + failure.String() + `# HELP gpu_plugin_gpu_recovery_held 1 if the driver wants something done before the GPU's unhealthy devices may return (reason says what), 0 if not.
# TYPE gpu_plugin_gpu_recovery_held gauge
` + held.String()
	c := NewCollector(health.NewState(nil, nil), m, nil)
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "gpu_plugin_gpu_recovery_action",
		"gpu_plugin_row_remap_pending", "gpu_plugin_row_remap_failure", "gpu_plugin_gpu_recovery_held"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}
