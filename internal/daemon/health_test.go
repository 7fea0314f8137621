package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
)

func post(t testing.TB, url string) {
	t.Helper()
	resp, err := http.Post(url, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: %s", url, resp.Status)
	}
}

func debugDevices(t testing.TB, base string) daemon.DebugDevices {
	t.Helper()
	code, body := get(t, base+"/debug/devices")
	var doc daemon.DebugDevices
	if err := json.Unmarshal([]byte(body), &doc); err != nil || code != 200 {
		t.Fatalf("/debug/devices: %d %v", code, err)
	}
	return doc
}

func healthOf(k *fakekubelet.Kubelet, resource, id string) string {
	for _, d := range k.Devices(resource) {
		if d.ID == id {
			return d.Health
		}
	}
	return "absent"
}

// TestHealthThroughControlAPI drives the whole daemon through /sim: a
// skipped XID, a fatal one, recovery, a lost GPU across a kubelet restart,
// and what /debug/devices and /metrics say meanwhile.
func TestHealthThroughControlAPI(t *testing.T) {
	r := start(t, true, "--simulate=dgx-h100", "--health-probe-interval=20ms", "--health-quiet-period=300ms")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const res = "nvidia.com/gpu"
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8); err != nil {
		t.Fatal(err)
	}
	base := "http://" + r.d.Addr()
	gpus := r.d.Inventory().GPUs

	// XID 13 is an application error; XID 79 after it is fatal. The
	// monitor handles events in order, so once 79 shows, 13 was skipped.
	post(t, base+"/sim/gpus/3/xid?code=13")
	post(t, base+"/sim/gpus/5/xid?code=79")
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 7); err != nil {
		t.Fatal(err)
	}
	if h := healthOf(r.kubelet, res, gpus[3].UUID); h != pluginapi.Healthy {
		t.Errorf("GPU 3 after XID 13: %s, want Healthy", h)
	}
	if h := healthOf(r.kubelet, res, gpus[5].UUID); h != pluginapi.Unhealthy {
		t.Errorf("GPU 5 after XID 79: %s, want Unhealthy", h)
	}
	doc := debugDevices(t, base)
	if st := doc.Health[gpus[5].UUID]; st.Healthy || st.Reason != "lost: XID 79 (GPU has fallen off the bus)" {
		t.Errorf("/debug/devices health of GPU 5: %+v", st)
	}
	if doc.HealthMonitor == nil || doc.HealthMonitor.Mode != health.ModeEvents || len(doc.HealthMonitor.EventGPUs) == 0 {
		t.Errorf("/debug/devices healthMonitor: %+v", doc.HealthMonitor)
	}
	_, metrics := get(t, base+"/metrics")
	for _, want := range []string{
		fmt.Sprintf(`gpu_plugin_device_healthy{device=%q,reason="lost: XID 79 (GPU has fallen off the bus)",resource="nvidia.com/gpu"} 0`, gpus[5].UUID),
		fmt.Sprintf(`gpu_plugin_device_healthy{device=%q,reason="",resource="nvidia.com/gpu"} 1`, gpus[3].UUID),
		fmt.Sprintf(`gpu_plugin_xid_errors_total{gpu="3",uuid=%q,xid="13"} 1`, gpus[3].UUID),
		fmt.Sprintf(`gpu_plugin_xid_errors_total{gpu="5",uuid=%q,xid="79"} 1`, gpus[5].UUID),
		`gpu_plugin_health_monitor_mode{mode="events"} 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	// GPU 5 keeps answering NVML: back after the quiet period.
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8); err != nil {
		t.Fatalf("GPU 5 did not come back after the quiet period: %v", err)
	}
	if st := debugDevices(t, base).Health[gpus[5].UUID]; !st.Healthy || !strings.Contains(st.Reason, "recovered") {
		t.Errorf("GPU 5 after recovery: %+v", st)
	}

	// A GPU falls off the bus; health survives a kubelet restart.
	post(t, base+"/sim/gpus/2/lost")
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 7); err != nil {
		t.Fatal(err)
	}
	before := len(r.kubelet.Events())
	if err := r.kubelet.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 7); err != nil {
		t.Fatalf("after a kubelet restart: %v", err)
	}
	for _, e := range r.kubelet.Events()[before:] {
		if e.Kind == "devices" && e.Resource == res {
			if e.Healthy != 7 {
				t.Errorf("first device list after the kubelet restart: %d/%d healthy, want 7/8 (health must survive)", e.Healthy, e.Total)
			}
			break
		}
	}
	post(t, base+"/sim/gpus/2/recover")
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8); err != nil {
		t.Fatalf("lost GPU did not come back after recovering: %v", err)
	}
}

// TestHealthFallbackThroughControlAPI: failing event waits switch the
// daemon to probing, visibly, and lost GPUs are still found.
func TestHealthFallbackThroughControlAPI(t *testing.T) {
	r := start(t, true, "--simulate=dgx-h100", "--health-probe-interval=20ms")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	base := "http://" + r.d.Addr()
	post(t, base+"/sim/fault?call=EventSetWait&error=UNKNOWN")
	if err := r.d.HealthMonitor().WaitFor(ctx, func(s health.MonitorStatus) bool { return s.Mode == health.ModeProbing }); err != nil {
		t.Fatal(err)
	}
	doc := debugDevices(t, base)
	if m := doc.HealthMonitor; m.Mode != health.ModeProbing || !strings.Contains(m.LastError, "ERROR_UNKNOWN") || !strings.Contains(m.ModeReason, "event wait failed") {
		t.Errorf("/debug/devices healthMonitor: %+v", m)
	}
	if _, metrics := get(t, base+"/metrics"); !strings.Contains(metrics, `gpu_plugin_health_monitor_mode{mode="probing"} 1`) ||
		!strings.Contains(metrics, `gpu_plugin_health_monitor_errors_total{kind="event_wait"} 3`) {
		t.Errorf("/metrics does not show the fallback")
	}
	post(t, base+"/sim/gpus/6/lost")
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 8, 7); err != nil {
		t.Fatal(err)
	}
}

// TestHealthDisabled: DP_DISABLE_HEALTHCHECKS=all (here its flag twin)
// turns the monitor off, and says so; an explicitly enabled XID keeps it on.
func TestHealthDisabled(t *testing.T) {
	r := start(t, true, "--simulate=pcie-l4x4", "--disable-healthchecks=all")
	doc := debugDevices(t, "http://"+r.d.Addr())
	if doc.HealthMonitor == nil || doc.HealthMonitor.Policy != "disabled (DP_DISABLE_HEALTHCHECKS=all)" {
		t.Errorf("healthMonitor with all disabled: %+v", doc.HealthMonitor)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.d.HealthMonitor().WaitFor(ctx, func(s health.MonitorStatus) bool { return s.Mode == health.ModeDisabled }); err != nil {
		t.Fatal(err)
	}

	r2 := start(t, true, "--simulate=pcie-l4x4", "--disable-healthchecks=all", "--enable-healthchecks=48")
	base := "http://" + r2.d.Addr()
	if err := r2.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 4, 4); err != nil {
		t.Fatal(err)
	}
	if err := r2.d.HealthMonitor().WaitFor(ctx, func(s health.MonitorStatus) bool { return s.Mode == health.ModeEvents }); err != nil {
		t.Fatal(err)
	}
	post(t, base+"/sim/gpus/1/xid?code=79") // not enabled: ignored
	post(t, base+"/sim/gpus/2/xid?code=48") // enabled: fatal
	if err := r2.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 4, 3); err != nil {
		t.Fatal(err)
	}
	gpus := r2.d.Inventory().GPUs
	if h := healthOf(r2.kubelet, "nvidia.com/gpu", gpus[1].UUID); h != pluginapi.Healthy {
		t.Errorf("GPU 1 after XID 79 with all disabled but 48: %s", h)
	}
}

// TestHealthMIGThroughControlAPI: an XID aimed at one MIG instance takes
// that MIG device out of its resource and nothing else.
func TestHealthMIGThroughControlAPI(t *testing.T) {
	r := start(t, true, "--simulate=dgx-a100-mig", "--mig-strategy=mixed")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.d.HealthMonitor().WaitFor(ctx, func(s health.MonitorStatus) bool { return s.Mode == health.ModeEvents }); err != nil {
		t.Fatal(err)
	}
	g := r.d.Inventory().GPUs[2] // 3g.20gb, 3g.20gb
	m := g.MIGDevices[1]
	const res = "nvidia.com/mig-3g.20gb"
	if err := r.kubelet.WaitFor(ctx, func(k *fakekubelet.Kubelet) bool {
		c, a := r.kubelet.Capacity(res)
		return c > 0 && c == a
	}); err != nil {
		t.Fatal(err)
	}
	capacity, _ := r.kubelet.Capacity(res)
	post(t, fmt.Sprintf("http://%s/sim/gpus/2/xid?code=94&gi=%d&ci=%d", r.d.Addr(), m.GPUInstanceID, m.ComputeInstanceID))
	if err := r.kubelet.WaitForAllocatable(ctx, res, capacity, capacity-1); err != nil {
		t.Fatal(err)
	}
	if h := healthOf(r.kubelet, res, m.UUID); h != pluginapi.Unhealthy {
		t.Errorf("targeted MIG device: %s", h)
	}
	if h := healthOf(r.kubelet, res, g.MIGDevices[0].UUID); h != pluginapi.Healthy {
		t.Errorf("its sibling: %s", h)
	}
}
