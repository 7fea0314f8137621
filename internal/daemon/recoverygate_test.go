package daemon_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
)

// TestRecoveryGateThroughControlAPI: GPUs whose driver wants a reset or has
// a row remap pending stay out after the quiet period, saying why in the
// kubelet-facing health, /debug/devices and /metrics, and return by
// themselves once /sim clears the condition.
func TestRecoveryGateThroughControlAPI(t *testing.T) {
	r := start(t, true, "--simulate=dgx-h100", "--health-probe-interval=20ms", "--health-quiet-period=200ms")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const res = "nvidia.com/gpu"
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8); err != nil {
		t.Fatal(err)
	}
	base := "http://" + r.d.Addr()
	gpus := r.d.Inventory().GPUs

	post(t, base+"/sim/gpus/4/recovery?action=gpu_reset")
	post(t, base+"/sim/gpus/6/remap?uncorr=1&pending=true")
	post(t, base+"/sim/gpus/4/xid?code=48")
	post(t, base+"/sim/gpus/6/xid?code=48")
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 6); err != nil {
		t.Fatal(err)
	}
	held := func(s health.MonitorStatus) map[string]string {
		out := map[string]string{}
		for _, f := range s.Faults {
			if f.Held != "" {
				out[f.Unit] = f.Held
			}
		}
		return out
	}
	if err := r.d.HealthMonitor().WaitFor(ctx, func(s health.MonitorStatus) bool { return len(held(s)) == 2 }); err != nil {
		t.Fatalf("GPUs 4 and 6 never held past the quiet period: %v (%+v)", err, r.d.HealthMonitor().Status())
	}
	if got := held(r.d.HealthMonitor().Status()); got[gpus[4].UUID] != "needs GPU reset" || got[gpus[6].UUID] != "row remap pending" {
		t.Errorf("held %v, want GPU 4 needs GPU reset, GPU 6 row remap pending", got)
	}
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 6); err != nil {
		t.Fatalf("held GPUs must stay out: %v", err)
	}

	doc := debugDevices(t, base)
	for i, want := range map[int]string{4: "recovery held: needs GPU reset (was: XID 48", 6: "recovery held: row remap pending (was: XID 48"} {
		if st := doc.Health[gpus[i].UUID]; st.Healthy || !strings.HasPrefix(st.Reason, want) {
			t.Errorf("/debug/devices health of GPU %d: %+v, want reason %q…", i, st, want)
		}
	}
	if doc.HealthMonitor == nil || len(doc.HealthMonitor.GPUs) != 8 {
		t.Fatalf("/debug/devices healthMonitor: %+v", doc.HealthMonitor)
	}
	if g := doc.HealthMonitor.GPUs[4]; g.RecoveryAction != "gpu_reset" || g.RecoveryHold != "needs GPU reset" {
		t.Errorf("/debug/devices GPU 4: %+v", g)
	}
	if g := doc.HealthMonitor.GPUs[6]; g.RowRemap == nil || !g.RowRemap.Pending || g.RowRemap.Uncorrectable != 1 || g.RecoveryAction != "none" {
		t.Errorf("/debug/devices GPU 6: %+v (row remap %+v)", g, g.RowRemap)
	}
	_, metrics := get(t, base+"/metrics")
	for _, want := range []string{
		fmt.Sprintf(`gpu_plugin_gpu_recovery_action{action="gpu_reset",gpu="4",uuid=%q} 1`, gpus[4].UUID),
		fmt.Sprintf(`gpu_plugin_gpu_recovery_action{action="none",gpu="6",uuid=%q} 0`, gpus[6].UUID),
		fmt.Sprintf(`gpu_plugin_row_remap_pending{gpu="6",uuid=%q} 1`, gpus[6].UUID),
		fmt.Sprintf(`gpu_plugin_row_remap_failure{gpu="6",uuid=%q} 0`, gpus[6].UUID),
		fmt.Sprintf(`gpu_plugin_gpu_recovery_held{gpu="4",reason="needs GPU reset",uuid=%q} 1`, gpus[4].UUID),
		fmt.Sprintf(`gpu_plugin_gpu_recovery_held{gpu="0",reason="",uuid=%q} 0`, gpus[0].UUID),
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	// The operator resets the GPUs: the driver is content again.
	post(t, base+"/sim/gpus/4/recovery?action=none")
	post(t, base+"/sim/gpus/6/remap?uncorr=1")
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8); err != nil {
		t.Fatalf("GPUs did not return once the condition cleared: %v", err)
	}
	if st := debugDevices(t, base).Health[gpus[4].UUID]; !st.Healthy || !strings.Contains(st.Reason, "recovered") {
		t.Errorf("GPU 4 after the reset: %+v", st)
	}
}
