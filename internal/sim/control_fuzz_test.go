package sim

import (
	"bytes"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// FuzzControlAPI sends one request of any method, path and body to the
// control API of a fresh simulated dgx-a100-mig (MIG-capable GPUs, some
// partitioned), in process. Properties:
//   - nothing panics;
//   - every input is the client's, so no answer is a 5xx: a mistake gets a
//     4xx with a message (the API's own errors are JSON {"error": "…"});
//     a success is JSON;
//   - a rejected request changes nothing: GPU state, faults and modes are
//     as before; an armed fault names a call that exists;
//   - whatever was accepted, the node stays consistent: every GPU is
//     listed once with telemetry in the ranges the API enforces, its
//     processes are valid (a PID once, percentages, memory within the
//     device's, on a current MIG device exactly when MIG is on, an MPS
//     client only without MIG), and
//     unless a GPU is lost or a fault is armed, the production scanner
//     sees exactly the MIG layout the state reports.
//
// The committed corpus is in testdata/fuzz/FuzzControlAPI.
func FuzzControlAPI(f *testing.F) {
	for _, s := range []struct{ method, target, body string }{
		{"GET", "/sim/gpus", ""},
		{"POST", "/sim/gpus/2/xid?code=79", ""},
		{"POST", "/sim/gpus/1/xid?code=94&gi=1&ci=0", ""},
		{"POST", "/sim/gpus/0/xid?code=0x1f&gi=4294967295", ""},
		{"POST", "/sim/gpus/3/lost", ""},
		{"POST", "/sim/gpus/3/recover", ""},
		{"PUT", "/sim/gpus/5/telemetry", `{"gpu_util": 66, "power_w": 250.5, "fb_used_mib": 4321, "sm_active": 12.5}`},
		{"PUT", "/sim/gpus/5/telemetry", `{"gpu_util": 101}`},
		{"PUT", "/sim/gpus/5/telemetry", `{"power_w": -1e308, "temperature_c": 4294967295}`},
		{"PUT", "/sim/gpus/5/telemetry", `{"gpu_util": 1} {"gpu_util": 200}`},
		{"PUT", "/sim/gpus/6/mig", `{"devices": ["3g.20gb", "3g.20gb"]}`},
		{"PUT", "/sim/gpus/0/mig", `{"enabled": false}`},
		{"PUT", "/sim/gpus/0/mig", `{"enabled": false, "devices": ["1g.5gb"]}`},
		{"PUT", "/sim/gpus/7/mig", `{"devices": ["7g.40gb", "1g.5gb"]}`},
		{"PUT", "/sim/gpus/7/mig", `{"devices": null, "enabled": true}`},
		{"POST", "/sim/gpus/4/fault?call=GetTemperature&error=UNKNOWN", ""},
		{"POST", "/sim/gpus/4/fault?call=*&error=ERROR_GPU_IS_LOST", ""},
		{"POST", "/sim/gpus/4/fault?call=GpuInstanceGetInfo&error=timeout", ""},
		{"POST", "/sim/gpus/4/fault?call=GetTemprature&error=UNKNOWN", ""},
		{"POST", "/sim/gpus/4/ecc?type=single&gi=1&ci=0", ""},
		{"POST", "/sim/gpus/4/ecc?type=triple", ""},
		{"POST", "/sim/fault?call=EventSetWait&error=UNKNOWN", ""},
		{"POST", "/sim/fault?call=DeviceGetCount&error=UNKNOWN", ""},
		{"POST", "/sim/events/wait-lost?on=true", ""},
		{"POST", "/sim/events/wait-lost?on=maybe", ""},
		{"DELETE", "/sim/gpus", ""},
		{"POST", "/sim/gpus/-1/lost", ""},
		{"POST", "/sim/gpus/99999999999999999999/lost", ""},
		{"POST", "/sim/gpus/+1/lost", ""},
		{"GET", "/sim/../sim/gpus", ""},
		{"POST", "/sim/gpus/%30/lost", ""},
		{"PUT", "/sim/gpus/6/processes", `[{"pid": 4242, "used_mib": 2048, "sm_util": 40, "mem_util": 3}, {"pid": 4243}]`},
		{"PUT", "/sim/gpus/1/processes", `[{"pid": 7, "used_mib": 100, "mig": 3}, {"pid": 8, "mig": "1"}]`},
		{"PUT", "/sim/gpus/1/processes", `[{"pid": 7}]`},
		{"PUT", "/sim/gpus/6/processes", `[{"pid": -1, "used_mib": 1e300}]`},
		{"PUT", "/sim/gpus/6/processes", `[{"pid": 9, "used_mib": 40960}, {"pid": 10, "used_mib": 1}]`},
		{"GET", "/sim/gpus/6/processes", ""},
		{"PUT", "/sim/gpus/6/processes", `[{"pid": 4242, "used_mib": 512, "sm_util": 20, "mps": true}, {"pid": 4243, "mps": false}]`},
		{"PUT", "/sim/gpus/1/processes", `[{"pid": 7, "mig": 3, "mps": true}]`},
		{"PUT", "/sim/gpus/6/processes", `[{"pid": 7, "mps": "true"}]`},
	} {
		f.Add(s.method, s.target, []byte(s.body))
	}
	profile, err := LoadProfile("dgx-a100-mig")
	if err != nil {
		f.Fatal(err)
	}
	epoch := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return epoch } // energy does not move between two reads

	f.Fuzz(func(t *testing.T, method, target string, body []byte) {
		if !strings.HasPrefix(target, "/") {
			target = "/sim/" + target
		}
		// What net/http's server would refuse to parse never reaches a
		// handler.
		req, err := http.NewRequest(method, "http://node.test"+target, bytes.NewReader(body))
		if err != nil || req.URL.Host != "node.test" {
			return
		}
		req.RequestURI = target
		n := NewNode(profile, clock)
		before := n.snapshot()
		rec := httptest.NewRecorder()
		n.Handler().ServeHTTP(rec, req)
		status, out := rec.Code, rec.Body.Bytes()
		what := method + " " + target
		isJSON := strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json")

		switch {
		case status >= 500:
			t.Fatalf("%s: %d %s: a client's request must not make a server error", what, status, out)
		case status >= 300 && status < 400:
			if rec.Header().Get("Location") == "" {
				t.Fatalf("%s: redirect %d without a Location", what, status)
			}
		case status >= 400:
			if isJSON {
				var e struct{ Error string }
				if err := json.Unmarshal(out, &e); err != nil || e.Error == "" {
					t.Fatalf("%s: %d with body %q, want {\"error\": \"…\"}", what, status, out)
				}
			} else if len(bytes.TrimSpace(out)) == 0 {
				t.Fatalf("%s: %d with no message", what, status)
			}
		case status == http.StatusOK:
			var v any
			if !isJSON || json.Unmarshal(out, &v) != nil {
				t.Fatalf("%s: 200 with a body that is not JSON: %q", what, out)
			}
		default:
			t.Fatalf("%s: unexpected status %d %s", what, status, out)
		}
		after := n.snapshot()
		if status != http.StatusOK && !reflect.DeepEqual(before, after) {
			t.Fatalf("%s was rejected (%d %s), yet changed the node:\nbefore %+v\nafter  %+v", what, status, out, before, after)
		}
		n.checkConsistent(t, what, after)
	})
}

// nodeSnapshot is everything the control API can change.
type nodeSnapshot struct {
	gpus      []GPUState
	faults    map[faultKey]gonvml.Return
	libFaults map[string]gonvml.Return
	waitLost  bool
}

func (n *Node) snapshot() nodeSnapshot {
	gpus := n.State()
	n.mu.Lock()
	defer n.mu.Unlock()
	return nodeSnapshot{gpus: gpus, faults: maps.Clone(n.faults), libFaults: maps.Clone(n.libFaults), waitLost: n.waitLost}
}

// checkProcesses asserts a GPU's processes are what SetProcesses accepts.
func (n *Node) checkProcesses(t *testing.T, what string, i int, g GPUState) {
	t.Helper()
	capMiB := map[string]uint64{"": n.spec.gpus[i].memoryMiB}
	for _, m := range n.migLayoutOf(i).migs {
		capMiB[m.uuid] = m.memoryMiB
	}
	used := map[string]uint64{}
	pids := map[uint32]bool{}
	for _, p := range g.Processes {
		_, known := capMiB[p.MIG]
		if p.PID == 0 || p.PID > maxPID || pids[p.PID] || p.SMUtil > 100 || p.MemUtil > 100 ||
			!known || (p.MIG == "") == g.MIGEnabled || (p.MPS && g.MIGEnabled) {
			t.Fatalf("after %s: GPU %d (MIG %v) has an invalid process %+v", what, i, g.MIGEnabled, p)
		}
		pids[p.PID] = true
		if used[p.MIG] += p.UsedMiB; used[p.MIG] > capMiB[p.MIG] {
			t.Fatalf("after %s: GPU %d's processes use %d MiB of %q's %d", what, i, used[p.MIG], p.MIG, capMiB[p.MIG])
		}
	}
}

// checkConsistent asserts the invariants the control API must keep.
func (n *Node) checkConsistent(t *testing.T, what string, s nodeSnapshot) {
	t.Helper()
	if len(s.gpus) != n.GPUCount() {
		t.Fatalf("after %s: state lists %d GPUs, want %d", what, len(s.gpus), n.GPUCount())
	}
	for k := range s.faults {
		if !faultCall(k.op) {
			t.Fatalf("after %s: a fault is armed on %q, which no simulated call is named: it can never fire", what, k.op)
		}
	}
	broken := len(s.faults) > 0
	for i, g := range s.gpus {
		tel := g.Telemetry
		if g.Index != i || tel.GPUUtil > 100 || tel.MemCopyUtil > 100 || tel.EncUtil > 100 || tel.DecUtil > 100 ||
			tel.TemperatureC > 200 || tel.MemoryTempC > 200 || !(tel.PowerW >= 0 && tel.PowerW <= 5000) ||
			tel.FBUsedMiB > n.spec.gpus[i].memoryMiB {
			t.Fatalf("after %s: GPU %d state out of range: %+v", what, i, g)
		}
		for _, v := range []float64{tel.GREngineActive, tel.SMActive, tel.SMOccupancy, tel.TensorActive, tel.DRAMActive} {
			if !(v >= 0 && v <= 100) {
				t.Fatalf("after %s: GPU %d GPM value %v out of 0..100", what, i, v)
			}
		}
		if !g.MIGEnabled && len(g.MIGDevices) > 0 {
			t.Fatalf("after %s: GPU %d has MIG devices %v with MIG off", what, i, g.MIGDevices)
		}
		n.checkProcesses(t, what, i, g)
		broken = broken || g.Lost
	}
	if broken {
		return // a lost GPU or an armed fault makes the scan fail on purpose
	}
	lib, err := nvml.Open(n.NVML())
	if err != nil {
		t.Fatalf("after %s: NVML: %v", what, err)
	}
	defer lib.Close()
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatalf("after %s: the production scanner fails on a healthy node: %v", what, err)
	}
	for i, g := range s.gpus {
		sc := inv.GPUs[i]
		if sc.UUID != g.UUID || sc.MIGEnabled != g.MIGEnabled || len(sc.MIGDevices) != len(g.MIGDevices) {
			t.Fatalf("after %s: GPU %d scans as %s MIG %v with %d MIG devices; the state says %s MIG %v %v",
				what, i, sc.UUID, sc.MIGEnabled, len(sc.MIGDevices), g.UUID, g.MIGEnabled, g.MIGDevices)
		}
	}
}
