package health

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

func TestCollectorDeviceHealth(t *testing.T) {
	state := NewState(nil, nil)
	mig := &nvml.MIGDevice{UUID: "MIG-1", GPUInstanceID: 1}
	shared := sharing.NewResource("nvidia.com/gpu", []sharing.Device{
		{ID: "GPU-a::0", Physical: "GPU-a", GPUUUID: "GPU-a", Replica: 0},
		{ID: "GPU-a::1", Physical: "GPU-a", GPUUUID: "GPU-a", Replica: 1},
		{ID: "GPU-b::0", Physical: "GPU-b", GPUUUID: "GPU-b", Replica: 0},
	})
	migs := sharing.NewResource("nvidia.com/mig-1g.5gb", []sharing.Device{
		{ID: "MIG-1", Physical: "MIG-1", GPUUUID: "GPU-c", MIG: mig, Replica: -1},
	})
	state.SetUnhealthy("GPU-a", XIDReason(48))
	state.SetUnhealthy("MIG-1", XIDReason(94)+" on MIG GI 1 CI 0")
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

func TestCollectorMonitor(t *testing.T) {
	n := newMockNode(t)
	r := runMonitor(t, MonitorOptions{Lib: n.lib, Inventory: fixed(n.inv), Recovery: RecoverNever})
	r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	n.xid(1, 13)
	n.xid(1, 13)
	n.xid(4, 79)
	r.waitUnit(t, n.uuid(4), false)
	r.stop()
	c := NewCollector(r.state, r.m, nil)
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
gpu_plugin_xid_errors_total{gpu="1",uuid="` + n.uuid(1) + `",xid="13"} 2
gpu_plugin_xid_errors_total{gpu="4",uuid="` + n.uuid(4) + `",xid="79"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "gpu_plugin_health_monitor_mode", "gpu_plugin_xid_errors_total"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}
