package sim

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

func newTestNode(t *testing.T, profile string) (*Node, *httptest.Server) {
	t.Helper()
	p, err := LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	n := NewNode(p, nil)
	srv := httptest.NewServer(n.Handler())
	t.Cleanup(srv.Close)
	return n, srv
}

func do(t *testing.T, method, url, body string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	return resp.StatusCode, out
}

func TestControlAPIErrors(t *testing.T) {
	_, srv := newTestNode(t, "pcie-l4x4")
	tests := []struct {
		method, path, body string
		status             int
		want               string
	}{
		{"POST", "/sim/gpus/9/xid?code=79", "", 404, "GPUs 0..3"},
		{"POST", "/sim/gpus/x/lost", "", 404, `bad GPU index "x"`},
		{"POST", "/sim/gpus/0/xid", "", 400, "code=N"},
		{"POST", "/sim/gpus/0/xid?code=-1", "", 400, "code=N"},
		{"POST", "/sim/gpus/0/xid?code=79&gi=z", "", 400, "gi and ci"},
		{"PUT", "/sim/gpus/0/telemetry", `{"gpu_util": 101}`, 400, "gpu_util 101 is over 100"},
		{"PUT", "/sim/gpus/0/telemetry", `{"fb_used_mib": 999999}`, 400, "fb_used_mib"},
		{"PUT", "/sim/gpus/0/telemetry", `{"colour": 1}`, 400, "colour"},
		{"PUT", "/sim/gpus/0/telemetry", `not json`, 400, "telemetry body"},
		{"POST", "/sim/gpus/0/fault?call=GetTemperature&error=BOGUS", "", 400, "error=<UNKNOWN"},
	}
	for _, tc := range tests {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			status, body := do(t, tc.method, srv.URL+tc.path, tc.body)
			if status != tc.status {
				t.Errorf("status %d, want %d (body %v)", status, tc.status, body)
			}
			if msg, _ := body["error"].(string); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not mention %q", msg, tc.want)
			}
		})
	}
}

// TestControlAPIThroughNVML: every injection is visible through the
// simulated NVML, the way the daemon reads it.
func TestControlAPIThroughNVML(t *testing.T) {
	n, srv := newTestNode(t, "dgx-h100")
	lib := n.NVML()
	dev, _ := lib.DeviceGetHandleByIndex(2)

	// Telemetry through device calls.
	if status, body := do(t, "PUT", srv.URL+"/sim/gpus/2/telemetry",
		`{"gpu_util": 77, "mem_copy_util": 12, "fb_used_mib": 12345, "temperature_c": 71, "power_w": 412.5, "sm_clock_mhz": 1755}`); status != 200 {
		t.Fatalf("telemetry: %d %v", status, body)
	}
	util, _ := dev.GetUtilizationRates()
	mem, _ := dev.GetMemoryInfo_v2()
	temp, _ := dev.GetTemperature(gonvml.TEMPERATURE_GPU)
	power, _ := dev.GetPowerUsage()
	clock, _ := dev.GetClockInfo(gonvml.CLOCK_SM)
	if util.Gpu != 77 || util.Memory != 12 || mem.Used != 12345<<20 || temp != 71 || power != 412500 || clock != 1755 {
		t.Errorf("NVML reads util %+v used %d MiB temp %d power %d mW clock %d", util, mem.Used>>20, temp, power, clock)
	}
	if mem.Total != mem.Used+mem.Free+mem.Reserved {
		t.Errorf("memory does not add up: %+v", mem)
	}

	// An XID through the event set.
	set, _ := lib.EventSetCreate()
	if ret := dev.RegisterEvents(gonvml.EventTypeXidCriticalError, set); ret != gonvml.SUCCESS {
		t.Fatal(ret)
	}
	if status, body := do(t, "POST", srv.URL+"/sim/gpus/2/xid?code=79", ""); status != 200 || body["delivered"] != 1.0 {
		t.Fatalf("xid: %d %v", status, body)
	}
	e, ret := set.Wait(1000)
	if ret != gonvml.SUCCESS || e.EventData != 79 || e.Device != dev || e.GpuInstanceId != noInstance {
		t.Errorf("event: %+v ret %v", e, ret)
	}
	start := time.Now()
	if _, ret := set.Wait(50); ret != gonvml.ERROR_TIMEOUT || time.Since(start) < 40*time.Millisecond {
		t.Errorf("an empty event set must wait for its timeout, got %v after %v", ret, time.Since(start))
	}
	set.Free()

	// Lost and back.
	do(t, "POST", srv.URL+"/sim/gpus/2/lost", "")
	if _, ret := dev.GetUUID(); ret != gonvml.ERROR_GPU_IS_LOST {
		t.Errorf("lost GPU answers %v, want GPU_IS_LOST", ret)
	}
	if _, ret := lib.DeviceGetHandleByIndex(2); ret != gonvml.ERROR_GPU_IS_LOST {
		t.Errorf("lost GPU handle by index: %v, want GPU_IS_LOST", ret)
	}
	if _, ret := lib.DeviceGetHandleByIndex(3); ret != gonvml.SUCCESS {
		t.Errorf("another GPU is affected by GPU 2's loss: %v", ret)
	}
	do(t, "POST", srv.URL+"/sim/gpus/2/recover", "")
	if _, ret := dev.GetUUID(); ret != gonvml.SUCCESS {
		t.Errorf("recovered GPU answers %v", ret)
	}

	// A chosen call fails.
	do(t, "POST", srv.URL+"/sim/gpus/2/fault?call=GetTemperature&error=UNKNOWN", "")
	if _, ret := dev.GetTemperature(gonvml.TEMPERATURE_GPU); ret != gonvml.ERROR_UNKNOWN {
		t.Errorf("fault injection: %v, want ERROR_UNKNOWN", ret)
	}
	if _, ret := dev.GetPowerUsage(); ret != gonvml.SUCCESS {
		t.Errorf("a fault on GetTemperature broke GetPowerUsage: %v", ret)
	}
	do(t, "POST", srv.URL+"/sim/gpus/2/fault?call=GetTemperature&error=SUCCESS", "")
	if _, ret := dev.GetTemperature(gonvml.TEMPERATURE_GPU); ret != gonvml.SUCCESS {
		t.Errorf("cleared fault still fails: %v", ret)
	}

	resp, err := http.Get(srv.URL + "/sim/gpus")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var states []GPUState
	if err := json.NewDecoder(resp.Body).Decode(&states); err != nil || len(states) != 8 || states[2].XIDs != 1 || states[2].Telemetry.GPUUtil != 77 {
		t.Errorf("GET /sim/gpus: %v %+v", err, states)
	}
}

func TestEventQueueBounded(t *testing.T) {
	n, _ := newTestNode(t, "pcie-l4x4")
	set, _ := n.NVML().EventSetCreate()
	dev, _ := n.NVML().DeviceGetHandleByIndex(0)
	dev.RegisterEvents(gonvml.EventTypeXidCriticalError, set)
	for i := 0; i < EventQueueSize+100; i++ {
		if _, err := n.InjectXID(0, 31, -1, -1); err != nil {
			t.Fatal(err)
		}
	}
	if _, dropped := n.EventStats(); dropped != 100 {
		t.Errorf("dropped %d events, want 100 beyond the queue of %d", dropped, EventQueueSize)
	}
}

func TestEnergyIntegratesPower(t *testing.T) {
	p, _ := LoadProfile("pcie-l4x4")
	now := time.Unix(1000, 0)
	n := NewNode(p, func() time.Time { return now })
	watts := 100.0
	if err := n.SetTelemetry(0, TelemetryPatch{PowerW: &watts}); err != nil {
		t.Fatal(err)
	}
	dev, _ := n.NVML().DeviceGetHandleByIndex(0)
	before, _ := dev.GetTotalEnergyConsumption()
	now = now.Add(10 * time.Second)
	after, _ := dev.GetTotalEnergyConsumption()
	if after-before != 1_000_000 { // 100 W × 10 s = 1000 J = 1e6 mJ
		t.Errorf("energy grew by %d mJ over 10 s at 100 W, want 1000000", after-before)
	}
}

// TestHandlesDoNotRecordCalls: a long-running simulated daemon must not
// grow with every NVML call (moq mocks record arguments forever).
func TestHandlesDoNotRecordCalls(t *testing.T) {
	n, _ := newTestNode(t, "dgx-h100")
	lib := n.NVML()
	for i := 0; i < 100; i++ {
		dev, _ := lib.DeviceGetHandleByIndex(i % 8)
		dev.GetTemperature(gonvml.TEMPERATURE_GPU)
		dev.GetClockInfo(gonvml.CLOCK_SM)
		dev.GetNvLinkState(0)
		peer, _ := lib.DeviceGetHandleByIndex((i + 1) % 8)
		dev.GetTopologyCommonAncestor(peer)
	}
	d := n.devices[0].(simDevice)
	if c := len(d.GetTemperatureCalls()) + len(d.GetClockInfoCalls()) + len(d.GetNvLinkStateCalls()) +
		len(d.GetTopologyCommonAncestorCalls()) + len(n.lib.DeviceGetHandleByIndexCalls()); c != 0 {
		t.Errorf("the mocks recorded %d calls; handles must bypass the recording", c)
	}
	set, _ := lib.EventSetCreate()
	set.Wait(1)
	if c := len(set.(simEventSet).WaitCalls()); c != 0 {
		t.Errorf("event set recorded %d waits", c)
	}
}
