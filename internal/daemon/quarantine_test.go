package daemon

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
)

// debugDoc reads /debug/devices through the daemon's handler.
func debugDoc(t *testing.T, d *Daemon) DebugDevices {
	t.Helper()
	rec := httptest.NewRecorder()
	(&httpServer{d: d}).debugDevices(rec, httptest.NewRequest("GET", "/debug/devices", nil))
	var doc DebugDevices
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
		t.Fatalf("/debug/devices: %v\n%s", err, rec.Body)
	}
	return doc
}

// TestQuarantineLive: writing health.quarantine into the config file takes
// the GPUs out of the kubelet's allocatable count with the operator's
// reason, by index and by UUID; an entry that matches nothing is a warning,
// not an error; removing the key brings them back, without a restart.
func TestQuarantineLive(t *testing.T) {
	e := startReloadEnv(t, "dgx-h100", "version: v1\n")
	e.waitCapacity("nvidia.com/gpu", 8, 8)
	gpus := e.d.Inventory().GPUs
	uuid3, uuid5 := gpus[3].UUID, gpus[5].UUID

	e.write("version: v1\nhealth:\n  quarantine: [3, \"" + strings.ToLower(uuid5) + "\", \"GPU-no-such-gpu\", 42]\n")
	e.waitCapacity("nvidia.com/gpu", 8, 6)
	devs := e.k.Devices("nvidia.com/gpu")
	for i, g := range gpus {
		want := pluginapi.Healthy
		if i == 3 || i == 5 {
			want = pluginapi.Unhealthy
		}
		if got := healthOf(devs, g.UUID); got != want {
			t.Errorf("GPU %d (%s): kubelet sees %s; want %s", i, g.UUID, got, want)
		}
	}
	doc := debugDoc(t, e.d)
	for _, u := range []string{uuid3, uuid5} {
		if st := doc.Health[u]; st.Healthy || st.Reason != health.ReasonQuarantined {
			t.Errorf("/debug/devices health of %s: %+v; want reason %q", u, st, health.ReasonQuarantined)
		}
	}
	if st := e.d.ReloadStatus(); st.Failures != 0 || st.Successes != 1 {
		t.Errorf("reload status %+v; want one success: an unmatched entry is a warning", st)
	}
	logs := e.logs.String()
	for _, w := range []string{`\"GPU-no-such-gpu\" matches no GPU`, `\"42\" matches no GPU index`} {
		if !strings.Contains(logs, w) {
			t.Errorf("no warning containing %s in the log:\n%s", w, logs)
		}
	}
	if strings.Contains(logs, "take effect only after a restart") {
		t.Errorf("quarantine reported as needing a restart:\n%s", logs)
	}

	e.write("version: v1\n")
	e.waitCapacity("nvidia.com/gpu", 8, 8)
	doc = debugDoc(t, e.d)
	if st, ok := doc.Health[uuid3]; ok && !st.Healthy {
		t.Errorf("/debug/devices after release: %s is %+v", uuid3, st)
	}
}

// TestQuarantineFlag: --health-quarantine applies from the start, joins
// the file's list, and keeps its GPU out when the file's list is emptied.
func TestQuarantineFlag(t *testing.T) {
	e := startReloadEnv(t, "dgx-h100", "version: v1\nhealth:\n  quarantine: [1]\n", "--health-quarantine=0")
	e.waitCapacity("nvidia.com/gpu", 8, 6)
	e.write("version: v1\n")
	e.waitCapacity("nvidia.com/gpu", 8, 7)
	if got := e.d.Health().Quarantined(); len(got) != 1 || got[0] != e.d.Inventory().GPUs[0].UUID {
		t.Errorf("quarantined %v; want GPU 0 only", got)
	}
}
