package sim

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

func TestProcessesControlAPIErrors(t *testing.T) {
	n, srv := newTestNode(t, "dgx-a100-mig")
	if mig := n.State()[1].MIGDevices; len(mig) != 4 {
		t.Fatalf("GPU 1's layout changed: %v", mig) // 3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb: GI 1..4
	}
	if status, body := do(t, "PUT", srv.URL+"/sim/gpus/5/processes", `[{"pid": 1, "used_mib": 1}]`); status != 200 {
		t.Fatalf("a valid list: %d %v", status, body)
	}
	many := make([]string, MaxProcesses+1)
	for k := range many {
		many[k] = fmt.Sprintf(`{"pid":%d}`, k+1)
	}
	tests := []struct {
		name, path, body string
		status           int
		want             string
	}{
		{"pid 0", "/sim/gpus/5/processes", `[{"pid": 0}]`, 400, "processes[0].pid 0: want 1..4194304"},
		{"negative pid", "/sim/gpus/5/processes", `[{"pid": 1}, {"pid": -4}]`, 400, "processes[1].pid -4"},
		{"huge pid", "/sim/gpus/5/processes", `[{"pid": 1e30}]`, 400, "processes[0]: json"},
		{"pid past Linux's limit", "/sim/gpus/5/processes", `[{"pid": 4194305}]`, 400, "processes[0].pid 4194305"},
		{"pid missing", "/sim/gpus/5/processes", `[{"used_mib": 5}]`, 400, "processes[0].pid is required"},
		{"pid twice", "/sim/gpus/5/processes", `[{"pid": 7}, {"pid": 7}]`, 400, "processes[1].pid 7 is also processes[0]"},
		{"negative memory", "/sim/gpus/5/processes", `[{"pid": 7, "used_mib": -1}]`, 400, "processes[0].used_mib -1"},
		{"more memory than the GPU", "/sim/gpus/5/processes", `[{"pid": 7, "used_mib": 40000}, {"pid": 8, "used_mib": 1000}]`, 400, "processes[1].used_mib 1000: the device has 40960 MiB"},
		{"more memory than the MIG device", "/sim/gpus/1/processes", `[{"pid": 7, "used_mib": 5000, "mig": 3}]`, 400, "processes[0].used_mib 5000: the device has 4864 MiB"},
		{"sm_util over 100", "/sim/gpus/5/processes", `[{"pid": 7, "sm_util": 101}]`, 400, "processes[0].sm_util 101: want 0..100"},
		{"mem_util negative", "/sim/gpus/5/processes", `[{"pid": 7, "mem_util": -3}]`, 400, "processes[0].mem_util -3"},
		{"unknown field", "/sim/gpus/5/processes", `[{"pid": 7, "name": "python"}]`, 400, `unknown field "name"`},
		{"not an array", "/sim/gpus/5/processes", `{"pid": 7}`, 400, "want a JSON array"},
		{"two documents", "/sim/gpus/5/processes", `[] []`, 400, "want one JSON array"},
		{"too many", "/sim/gpus/5/processes", "[" + strings.Join(many, ",") + "]", 400, "4097 processes: at most 4096"},
		{"mig on a GPU without MIG", "/sim/gpus/5/processes", `[{"pid": 7, "mig": "1"}]`, 400, "not in MIG mode: leave mig out"},
		{"unknown MIG device", "/sim/gpus/1/processes", `[{"pid": 7, "mig": "MIG-nope"}]`, 400, `processes[0].mig: "MIG-nope": no such MIG device on this GPU: want one of `},
		{"unknown GPU instance", "/sim/gpus/1/processes", `[{"pid": 7, "mig": 9}]`, 400, `"9": no such MIG device`},
		{"unknown MIG device, listed", "/sim/gpus/1/processes", `[{"pid": 7, "mig": "x"}]`, 400, "(GPU instance 4, 1g.5gb)"},
		{"mig of the wrong type", "/sim/gpus/1/processes", `[{"pid": 7, "mig": true}]`, 400, "want a MIG device's UUID or GPU instance ID"},
		{"no mig on a MIG GPU", "/sim/gpus/1/processes", `[{"pid": 7}]`, 400, "GPU 1 is in MIG mode: name the process's MIG device"},
		{"no such GPU", "/sim/gpus/8/processes", `[]`, 404, "GPUs 0..7"},
		{"mps on a MIG GPU", "/sim/gpus/1/processes", `[{"pid": 7, "mig": 3, "mps": true}]`, 400, "processes[0].mps: GPU 1 is in MIG mode: the simulator runs MPS clients on whole GPUs only"},
		{"mps on a MIG GPU, no mig", "/sim/gpus/1/processes", `[{"pid": 7, "mps": true}]`, 400, "processes[0].mps: GPU 1 is in MIG mode"},
		{"mps a string", "/sim/gpus/5/processes", `[{"pid": 7, "mps": "yes"}]`, 400, `processes[0].mps: "yes": want true or false`},
		{"mps a number", "/sim/gpus/5/processes", `[{"pid": 7}, {"pid": 8, "mps": 1}]`, 400, "processes[1].mps: 1: want true or false"},
		{"the MPS server's pid beside a client", "/sim/gpus/5/processes", fmt.Sprintf(`[{"pid": 8, "mps": true}, {"pid": %d}]`, n.MPSServerPID()), 400,
			fmt.Sprintf("processes[1].pid %d is the simulated MPS server's", n.MPSServerPID())},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := allProcesses(n)
			status, body := do(t, "PUT", srv.URL+tc.path, tc.body)
			if status != tc.status {
				t.Errorf("status %d, want %d (body %v)", status, tc.status, body)
			}
			if msg, _ := body["error"].(string); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not mention %q", msg, tc.want)
			}
			if after := allProcesses(n); !reflect.DeepEqual(before, after) {
				t.Errorf("a rejected request changed the node")
			}
		})
	}
}

func allProcesses(n *Node) [][]Process {
	var out [][]Process
	for i := range n.GPUCount() {
		p, _ := n.Processes(i)
		out = append(out, p)
	}
	return out
}

func getProcesses(t *testing.T, url string) []Process {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out []Process
	if resp.StatusCode != 200 || json.Unmarshal(raw, &out) != nil {
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, raw)
	}
	return out
}

// TestProcessesThroughNVML: processes set through the control API are what
// the simulated NVML lists and samples, as the driver would.
func TestProcessesThroughNVML(t *testing.T) {
	p, err := LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	n := NewNode(p, func() time.Time { return now })
	srv := httptest.NewServer(n.Handler())
	t.Cleanup(srv.Close)
	lib := n.NVML()

	// A GPU without MIG: every process, utilization samples for the busy.
	put := func(gpu int, body string) {
		t.Helper()
		if status, out := do(t, "PUT", fmt.Sprintf("%s/sim/gpus/%d/processes", srv.URL, gpu), body); status != 200 {
			t.Fatalf("PUT processes on GPU %d: %d %v", gpu, status, out)
		}
	}
	put(5, `[{"pid": 100, "used_mib": 2048, "sm_util": 40, "mem_util": 5}, {"pid": 101, "used_mib": 512}]`)
	want := []Process{{PID: 100, UsedMiB: 2048, SMUtil: 40, MemUtil: 5}, {PID: 101, UsedMiB: 512}}
	if got := getProcesses(t, srv.URL+"/sim/gpus/5/processes"); !reflect.DeepEqual(got, want) {
		t.Errorf("GET processes: %+v, want %+v", got, want)
	}
	if got := n.State()[5].Processes; !reflect.DeepEqual(got, want) {
		t.Errorf("state: %+v, want %+v", got, want)
	}
	d5, _ := lib.DeviceGetHandleByIndex(5)
	infos, ret := d5.GetComputeRunningProcesses()
	wantInfos := []gonvml.ProcessInfo{
		{Pid: 100, UsedGpuMemory: 2048 << 20, GpuInstanceId: noInstance, ComputeInstanceId: noInstance},
		{Pid: 101, UsedGpuMemory: 512 << 20, GpuInstanceId: noInstance, ComputeInstanceId: noInstance},
	}
	if ret != gonvml.SUCCESS || !reflect.DeepEqual(infos, wantInfos) {
		t.Errorf("GetComputeRunningProcesses: %+v %v, want %+v", infos, ret, wantInfos)
	}
	if mem, _ := d5.GetMemoryInfo_v2(); mem.Used != 2560<<20 {
		t.Errorf("memory used %d MiB, want the processes' 2560", mem.Used>>20)
	}
	s, ret := d5.GetProcessUtilization(0)
	if ret != gonvml.SUCCESS || len(s) != 1 || s[0].Pid != 100 || s[0].SmUtil != 40 || s[0].MemUtil != 5 {
		t.Fatalf("GetProcessUtilization(0): %+v %v, want one sample of pid 100", s, ret)
	}
	if _, ret := d5.GetProcessUtilization(s[0].TimeStamp); ret != gonvml.ERROR_NOT_FOUND {
		t.Errorf("no time passed: %v, want NOT_FOUND", ret)
	}
	now = now.Add(time.Second)
	s2, ret := d5.GetProcessUtilization(s[0].TimeStamp)
	if ret != gonvml.SUCCESS || len(s2) != 1 || s2[0].TimeStamp <= s[0].TimeStamp {
		t.Errorf("a second later: %+v %v, want a newer sample than %d", s2, ret, s[0].TimeStamp)
	}
	// A change is sampled at once, newer than anything seen, even at the
	// same instant.
	put(5, `[{"pid": 100, "used_mib": 2048, "sm_util": 90}]`)
	s3, ret := d5.GetProcessUtilization(s2[0].TimeStamp)
	if ret != gonvml.SUCCESS || len(s3) != 1 || s3[0].SmUtil != 90 {
		t.Errorf("after a change: %+v %v, want sm_util 90", s3, ret)
	}
	put(5, `[]`)
	if infos, ret := d5.GetComputeRunningProcesses(); ret != gonvml.SUCCESS || len(infos) != 0 {
		t.Errorf("no processes: %+v %v", infos, ret)
	}

	// A MIG GPU: by UUID or GPU instance ID; memory per MIG device; no
	// utilization.
	migs := n.State()[1].MIGDevices
	d1, _ := lib.DeviceGetHandleByIndex(1)
	m0, _ := d1.GetMigDeviceHandleByIndex(0) // 3g.20gb, GI 1
	m2, _ := d1.GetMigDeviceHandleByIndex(2) // 1g.5gb, GI 3
	uuid0, _ := m0.GetUUID()
	put(1, fmt.Sprintf(`[{"pid": 200, "used_mib": 1000, "sm_util": 30, "mig": %q}, {"pid": 201, "used_mib": 300, "mig": 3}, {"pid": 202, "used_mib": 20, "mig": "1"}]`, uuid0))
	uuid2, _ := m2.GetUUID()
	if got := getProcesses(t, srv.URL+"/sim/gpus/1/processes"); len(got) != 3 || got[1].MIG != uuid2 || got[2].MIG != uuid0 {
		t.Errorf("MIG references are reported as UUIDs: %+v (MIG devices %v)", got, migs)
	}
	all, _ := d1.GetComputeRunningProcesses()
	if len(all) != 3 || all[0].GpuInstanceId != 1 || all[1].GpuInstanceId != 3 || all[0].ComputeInstanceId != 0 {
		t.Errorf("GPU handle: %+v, want all three with GI/CI IDs", all)
	}
	on0, _ := m0.GetComputeRunningProcesses()
	on2, _ := m2.GetComputeRunningProcesses()
	if len(on0) != 2 || on0[0].Pid != 200 || on0[1].Pid != 202 || len(on2) != 1 || on2[0].Pid != 201 {
		t.Errorf("MIG handles: %+v and %+v", on0, on2)
	}
	if mem, _ := m0.GetMemoryInfo_v2(); mem.Used != 1020<<20 || mem.Free != mem.Total-mem.Used {
		t.Errorf("MIG memory %+v, want 1020 MiB used", mem)
	}
	if _, ret := d1.GetProcessUtilization(0); ret != gonvml.ERROR_NOT_SUPPORTED {
		t.Errorf("utilization on a MIG GPU: %v, want NOT_SUPPORTED", ret)
	}
	if _, ret := m0.GetProcessUtilization(0); ret != gonvml.ERROR_NOT_SUPPORTED {
		t.Errorf("utilization on a MIG device: %v, want NOT_SUPPORTED", ret)
	}

	// Faults and loss reach the process calls; a re-layout ends them.
	if err := n.SetFault(1, "GetComputeRunningProcesses", gonvml.ERROR_UNKNOWN); err != nil {
		t.Fatal(err)
	}
	if _, ret := m0.GetComputeRunningProcesses(); ret != gonvml.ERROR_UNKNOWN {
		t.Errorf("fault on the parent: %v, want UNKNOWN on its MIG device", ret)
	}
	n.SetFault(1, "GetComputeRunningProcesses", gonvml.SUCCESS)
	n.SetLost(5, true)
	if _, ret := d5.GetProcessUtilization(0); ret != gonvml.ERROR_GPU_IS_LOST {
		t.Errorf("lost GPU: %v", ret)
	}
	n.SetLost(5, false)
	if err := n.SetMIGLayout(1, true, []string{"7g.40gb"}); err != nil {
		t.Fatal(err)
	}
	if got, _ := n.Processes(1); len(got) != 0 {
		t.Errorf("processes survived a re-layout: %+v", got)
	}
}

// TestProcessUtilizationNotRecorded: the utilization call takes an
// argument, so the handle must bypass the mock's call recording.
func TestProcessUtilizationNotRecorded(t *testing.T) {
	n, _ := newTestNode(t, "pcie-l4x4")
	dev, _ := n.NVML().DeviceGetHandleByIndex(0)
	for range 10 {
		dev.GetProcessUtilization(0)
	}
	if c := len(n.devices[0].(simDevice).GetProcessUtilizationCalls()); c != 0 {
		t.Errorf("the mock recorded %d calls", c)
	}
}

// TestMPSThroughNVML: MPS clients are on NVML's MPS list and not on the
// compute list, which has the MPS server instead while a client runs; a
// client's memory and utilization are reported as any process's.
func TestMPSThroughNVML(t *testing.T) {
	p, err := LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	n := NewNode(p, func() time.Time { return now })
	srv := httptest.NewServer(n.Handler())
	t.Cleanup(srv.Close)
	lib := n.NVML()
	d5, _ := lib.DeviceGetHandleByIndex(5)
	server := n.MPSServerPID()
	// PIDs far from a test binary's, which is the simulated MPS server.
	const plain, c1, c2, c3 = 4_000_100, 4_000_200, 4_000_201, 4_000_300
	info := func(pid uint32, mib uint64) gonvml.ProcessInfo {
		return gonvml.ProcessInfo{Pid: pid, UsedGpuMemory: mib << 20, GpuInstanceId: noInstance, ComputeInstanceId: noInstance}
	}
	for _, step := range []struct {
		name, body   string
		compute, mps []gonvml.ProcessInfo
		usedMiB      uint64
		wantGET      []Process
		sampled      []uint32 // PIDs with a utilization sample
	}{
		{
			name:    "two clients and a plain process",
			body:    `[{"pid": %[1]d, "used_mib": 1024}, {"pid": %[3]d, "used_mib": 256, "mps": true}, {"pid": %[2]d, "used_mib": 512, "sm_util": 30, "mps": true}]`,
			compute: []gonvml.ProcessInfo{info(plain, 1024), info(server, 0)},
			mps:     []gonvml.ProcessInfo{info(c2, 256), info(c1, 512)},
			usedMiB: 1792,
			wantGET: []Process{{PID: plain, UsedMiB: 1024}, {PID: c2, UsedMiB: 256, MPS: true}, {PID: c1, UsedMiB: 512, SMUtil: 30, MPS: true}},
			sampled: []uint32{c1},
		},
		{
			name:    "mps false is a plain process",
			body:    `[{"pid": %[1]d, "used_mib": 1024, "mps": false}, {"pid": %[2]d, "used_mib": 512, "sm_util": 30, "mps": null}]`,
			compute: []gonvml.ProcessInfo{info(plain, 1024), info(c1, 512)},
			mps:     []gonvml.ProcessInfo{},
			usedMiB: 1536,
			wantGET: []Process{{PID: plain, UsedMiB: 1024}, {PID: c1, UsedMiB: 512, SMUtil: 30}},
			sampled: []uint32{c1},
		},
		{
			name:    "the server stays while a client does",
			body:    `[{"pid": %[4]d, "used_mib": 64, "sm_util": 5, "mps": true}]`,
			compute: []gonvml.ProcessInfo{info(server, 0)},
			mps:     []gonvml.ProcessInfo{info(c3, 64)},
			usedMiB: 64,
			wantGET: []Process{{PID: c3, UsedMiB: 64, SMUtil: 5, MPS: true}},
			sampled: []uint32{c3},
		},
		{
			name:    "the last client goes, and the server with it",
			body:    `[]`,
			compute: []gonvml.ProcessInfo{},
			mps:     []gonvml.ProcessInfo{},
			wantGET: []Process{},
		},
	} {
		t.Run(step.name, func(t *testing.T) {
			body := step.body
			if strings.Contains(body, "%") {
				body = fmt.Sprintf(body, plain, c1, c2, c3)
			}
			if status, out := do(t, "PUT", srv.URL+"/sim/gpus/5/processes", body); status != 200 {
				t.Fatalf("PUT: %d %v", status, out)
			}
			if got := getProcesses(t, srv.URL+"/sim/gpus/5/processes"); !reflect.DeepEqual(got, step.wantGET) {
				t.Errorf("GET: %+v, want %+v (no server: it is NVML's, not set)", got, step.wantGET)
			}
			if got, ret := d5.GetComputeRunningProcesses(); ret != gonvml.SUCCESS || !reflect.DeepEqual(got, step.compute) {
				t.Errorf("GetComputeRunningProcesses: %+v %v, want %+v", got, ret, step.compute)
			}
			if got, ret := d5.GetMPSComputeRunningProcesses(); ret != gonvml.SUCCESS || !reflect.DeepEqual(got, step.mps) {
				t.Errorf("GetMPSComputeRunningProcesses: %+v %v, want %+v", got, ret, step.mps)
			}
			if mem, _ := d5.GetMemoryInfo_v2(); mem.Used != step.usedMiB<<20 {
				t.Errorf("memory used %d MiB, want %d", mem.Used>>20, step.usedMiB)
			}
			s, _ := d5.GetProcessUtilization(0)
			var sampled []uint32
			for _, x := range s {
				sampled = append(sampled, x.Pid)
			}
			if !reflect.DeepEqual(sampled, step.sampled) {
				t.Errorf("utilization samples of %v, want %v", sampled, step.sampled)
			}
		})
	}

	// MIG devices have an MPS list, always empty here; faults and loss
	// reach the MPS call as any other.
	d1, _ := lib.DeviceGetHandleByIndex(1)
	m0, _ := d1.GetMigDeviceHandleByIndex(0)
	if got, ret := m0.GetMPSComputeRunningProcesses(); ret != gonvml.SUCCESS || len(got) != 0 {
		t.Errorf("MIG device's MPS list: %+v %v, want empty", got, ret)
	}
	if got, ret := d1.GetMPSComputeRunningProcesses(); ret != gonvml.SUCCESS || len(got) != 0 {
		t.Errorf("MIG GPU's MPS list: %+v %v, want empty", got, ret)
	}
	if status, out := do(t, "POST", srv.URL+"/sim/gpus/1/fault?call=GetMPSComputeRunningProcesses&error=NOT_SUPPORTED", ""); status != 200 {
		t.Fatalf("fault: %d %v", status, out)
	}
	if _, ret := m0.GetMPSComputeRunningProcesses(); ret != gonvml.ERROR_NOT_SUPPORTED {
		t.Errorf("fault on the parent: %v, want NOT_SUPPORTED on its MIG device", ret)
	}
	n.SetLost(5, true)
	if _, ret := d5.GetMPSComputeRunningProcesses(); ret != gonvml.ERROR_GPU_IS_LOST {
		t.Errorf("lost GPU: %v", ret)
	}
}
