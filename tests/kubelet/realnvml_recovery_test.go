package kubelet

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// The recovery gate on the production NVML path: after XID 48 and the
// quiet period, a GPU whose driver reports a recovery action (field
// NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) or a pending or failed row remap
// (nvmlDeviceGetRemappedRows) stays out of the kubelet's allocatable set
// with a reason saying what the driver wants, and returns by itself once
// the fake library's control clears the condition. dgx1-v100 has no row
// remapper (NOT_SUPPORTED before Ampere): there the gate uses the field
// alone and the remap cases return after the quiet period. NVIDIA: never
// comes back, whatever the driver says.
func TestRealNVMLRecoveryGate(t *testing.T) {
	const quiet = 300 * time.Millisecond
	forEachProfile(t, func(t *testing.T, profile string) {
		remapper := profile != "dgx1-v100"
		cases := []struct {
			set, clear string // control commands; %d is the GPU
			held       string // "" when the GPU returns after the quiet period
			action     string // /debug/devices recoveryAction while set
		}{
			{"recovery %d gpu_reset", "recovery %d none", "needs GPU reset", "gpu_reset"},
			{"recovery %d node_reboot", "recovery %d none", "needs node reboot", "node_reboot"},
			{"recovery %d drain_p2p", "recovery %d none", "drain P2P traffic", "drain_p2p"},
			{"recovery %d drain_and_reset", "recovery %d none", "drain and reset", "drain_and_reset"},
			{"remap %d 0 1 1 0", "remap %d 0 1 0 0", map[bool]string{true: "row remap pending"}[remapper], "none"},
			{"remap %d 0 512 0 1", "remap %d 0 512 0 0", map[bool]string{true: "row remap failed"}[remapper], "none"},
		}
		k := startKubelet(t)
		d := startReal(t, realOptions{Profile: profile, Flags: []string{
			"--health-probe-interval=20ms", "--health-quiet-period=" + quiet.String()}})
		k.waitCapacity(gpuResource, healthy8)
		uuids := d.uuids()
		// One GPU per case: a GPU failing again within the hour waits
		// twice as long.
		for gpu, c := range cases {
			set := fmt.Sprintf(c.set, gpu)
			if reply, err := d.ctl(set); err != nil || (!strings.HasPrefix(reply, "ok") && remapper) {
				t.Fatalf("fake NVML control %q: %q %v", set, reply, err)
			}
			// The quiet period runs from the XID, which the kubelet sees
			// some milliseconds later: time from before the XID, or the
			// kubelet's lag on the way out shortens the measured period.
			xidAt := time.Now()
			d.xid(gpu, 48)
			k.waitCapacity(gpuResource, degraded8)
			if c.held == "" {
				k.waitCapacity(gpuResource, healthy8)
				if took := time.Since(xidAt); took < quiet {
					t.Errorf("%s: GPU %d returned after %s, before the %s quiet period", set, gpu, took, quiet)
				}
				if st := d.debugDevices().Health[uuids[gpu]]; !strings.Contains(st.Reason, "recovered") {
					t.Errorf("%s: GPU %d health %+v, want recovered", set, gpu, st)
				}
				continue
			}
			var last string
			if err := pollHTTP(func() bool {
				mon := d.debugDevices().HealthMonitor
				last = fmt.Sprintf("%+v", mon)
				for _, f := range mon.Faults {
					if f.Unit == uuids[gpu] && f.Held == c.held {
						return true
					}
				}
				return false
			}); err != nil {
				t.Fatalf("%s: GPU %d never held for %q past the quiet period: %v (monitor %s)", set, gpu, c.held, err, last)
			}
			if since := time.Since(xidAt); since < quiet {
				t.Errorf("%s: held after %s, before the quiet period was over", set, since)
			}
			if _, ok := k.devices(gpuResource)[uuids[gpu]]; ok {
				t.Errorf("%s: GPU %d allocatable while held", set, gpu)
			}
			doc := checkHealth(t, d, map[string]string{uuids[gpu]: "recovery held: " + c.held + " (was: XID 48"})
			if g := doc.HealthMonitor.GPUs[gpu]; g.RecoveryAction != c.action || g.RecoveryHold != c.held {
				t.Errorf("%s: /debug/devices GPU %d recoveryAction %q hold %q, want %q and %q", set, gpu, g.RecoveryAction, g.RecoveryHold, c.action, c.held)
			}
			d.mustCtl(fmt.Sprintf(c.clear, gpu))
			k.waitCapacity(gpuResource, healthy8)
			if st := d.debugDevices().Health[uuids[gpu]]; !strings.Contains(st.Reason, "recovered") {
				t.Errorf("%s cleared: GPU %d health %+v, want recovered", set, gpu, st)
			}
		}
		if !remapper {
			if g := d.debugDevices().HealthMonitor.GPUs[0]; g.RowRemap == nil || g.RowRemap.Supported {
				t.Errorf("dgx1-v100 GPU 0 row remap %+v, want reported as not supported", g.RowRemap)
			}
		}
		_, metrics := d.httpGet("/metrics")
		if want := fmt.Sprintf(`gpu_plugin_gpu_recovery_action{action="none",gpu="0",uuid=%q} 0`, uuids[0]); !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	})
}
