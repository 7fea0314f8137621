package sim_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

func migNode(t *testing.T) (*sim.Node, *nvml.Library) {
	t.Helper()
	p, err := sim.LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	n := sim.NewNode(p, nil)
	lib, err := nvml.Open(n.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	return n, lib
}

func profiles(g nvml.GPU) []string {
	var out []string
	for _, m := range g.MIGDevices {
		out = append(out, m.Profile)
	}
	return out
}

// TestSetMIGLayout re-partitions GPUs and checks the production scanner
// sees the new layout, with new UUIDs, and the other GPUs unchanged.
func TestSetMIGLayout(t *testing.T) {
	n, lib := migNode(t)
	before, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.SetMIGLayout(3, true, []string{"3g.20gb", "3g.20gb"}); err != nil {
		t.Fatal(err)
	}
	if err := n.SetMIGLayout(5, true, []string{"7g.40gb"}); err != nil { // a whole GPU goes MIG
		t.Fatal(err)
	}
	if err := n.SetMIGLayout(0, false, nil); err != nil { // MIG off
		t.Fatal(err)
	}
	after, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := profiles(after.GPUs[3]); !slices.Equal(got, []string{"3g.20gb", "3g.20gb"}) {
		t.Errorf("GPU 3 after re-partition: %v", got)
	}
	if before.GPUs[3].MIGDevices[0].UUID == after.GPUs[3].MIGDevices[0].UUID {
		t.Errorf("a re-created MIG device kept its UUID %s", after.GPUs[3].MIGDevices[0].UUID)
	}
	if g := after.GPUs[5]; !g.MIGEnabled || !slices.Equal(profiles(g), []string{"7g.40gb"}) {
		t.Errorf("GPU 5 after enabling MIG: %+v", g)
	}
	if g := after.GPUs[0]; g.MIGEnabled || len(g.MIGDevices) != 0 {
		t.Errorf("GPU 0 after disabling MIG: %+v", g)
	}
	if !slices.Equal(profiles(after.GPUs[1]), profiles(before.GPUs[1])) || after.GPUs[1].MIGDevices[0].UUID != before.GPUs[1].MIGDevices[0].UUID {
		t.Errorf("GPU 1 changed although it was not touched")
	}
	st := n.State()
	if !st[3].MIGEnabled || !slices.Equal(st[3].MIGDevices, []string{"3g.20gb", "3g.20gb"}) || st[0].MIGEnabled {
		t.Errorf("State does not report the layout: %+v / %+v", st[3], st[0])
	}
	// A handle of the new device resolves by UUID, as the health monitor needs.
	if _, ret := n.NVML().DeviceGetHandleByUUID(after.GPUs[3].MIGDevices[1].UUID); ret != 0 {
		t.Errorf("DeviceGetHandleByUUID of a new MIG device: %v", ret)
	}
}

// TestMIGPlacements: GPU instances sit where the driver puts instances
// created without a placement (highest free start first, NVML's placement
// tables), and NVML reports the driver's profile IDs and those placements.
func TestMIGPlacements(t *testing.T) {
	n, lib := migNode(t)
	if err := n.SetMIGLayout(5, true, []string{"4g.20gb", "3g.20gb"}); err != nil {
		t.Fatal(err)
	}
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	type placed struct{ id, start, size int }
	for gpu, want := range map[int][]placed{
		0: {{19, 6, 1}, {19, 5, 1}, {19, 4, 1}, {19, 3, 1}, {19, 2, 1}, {19, 1, 1}, {19, 0, 1}}, // 7 × 1g.5gb
		1: {{9, 4, 4}, {14, 2, 2}, {19, 1, 1}, {19, 0, 1}},                                      // 3g.20gb, 2g.10gb, 2 × 1g.5gb
		4: {{5, 0, 4}, {14, 4, 2}, {20, 6, 1}},                                                  // 4g.20gb, 2g.10gb, 1g.5gb+me
		5: {{5, 0, 4}, {9, 4, 4}},                                                               // 4g can only start at 0
	} {
		var got []placed
		for _, m := range inv.GPUs[gpu].MIGDevices {
			got = append(got, placed{m.GPUInstanceProfileID, m.Placement.Start, m.Placement.Size})
		}
		if !slices.Equal(got, want) {
			t.Errorf("GPU %d (%v): profile IDs and placements %v, want %v", gpu, profiles(inv.GPUs[gpu]), got, want)
		}
	}
}

func TestSetMIGLayoutErrors(t *testing.T) {
	n, _ := migNode(t)
	for _, tc := range []struct {
		gpu      int
		enabled  bool
		profiles []string
		want     string
	}{
		{9, true, nil, "no GPU 9"},
		{0, true, []string{"1g.7gb"}, `devices[0]: unknown MIG profile "1g.7gb"`},
		{0, true, []string{"4g.20gb", "4g.20gb"}, "need 8 compute slices; A100-SXM4-40GB has 7"},
		{0, false, []string{"1g.5gb"}, "set enabled to true"},
		// 7 compute slices, but 9 of the 8 memory slices.
		{0, true, []string{"1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.5gb"}, "do not fit A100-SXM4-40GB's memory slices"},
	} {
		if err := n.SetMIGLayout(tc.gpu, tc.enabled, tc.profiles); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("SetMIGLayout(%d, %t, %v) = %v, want an error with %q", tc.gpu, tc.enabled, tc.profiles, err, tc.want)
		}
	}
	p, _ := sim.LoadProfile("pcie-l4x4")
	if err := sim.NewNode(p, nil).SetMIGLayout(0, true, nil); err == nil || !strings.Contains(err.Error(), "does not support MIG") {
		t.Errorf("MIG on an L4: %v", err)
	}
}

// TestSetMIGLayoutConcurrent re-partitions while scans run (run with
// -race): the layout is swapped under the node's lock behind fixed mock
// funcs. Like real NVML, a scan that straddles a change may see slots of
// both layouts, but only devices that exist.
func TestSetMIGLayoutConcurrent(t *testing.T) {
	n, lib := migNode(t)
	layouts := [][]string{{"7g.40gb"}, {"3g.20gb", "3g.20gb"}, {"1g.5gb", "1g.5gb", "1g.5gb"}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 50; i++ {
			if err := n.SetMIGLayout(3, true, layouts[i%len(layouts)]); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := 0; i < 20; i++ {
		inv, err := nvml.Scan(lib, nvml.ScanOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range profiles(inv.GPUs[3]) {
			if !slices.ContainsFunc(layouts, func(l []string) bool { return slices.Contains(l, p) }) {
				t.Errorf("scan saw a MIG device that was never created: %s", p)
			}
		}
	}
	wg.Wait()
}

func TestControlAPIMIG(t *testing.T) {
	n, _ := migNode(t)
	srv := httptest.NewServer(n.Handler())
	t.Cleanup(srv.Close)
	put := func(index, body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPut, srv.URL+"/sim/gpus/"+index+"/mig", strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(raw)
	}
	for _, tc := range []struct {
		index, body string
		status      int
		want        string
	}{
		{"3", `{"devices": ["3g.20gb", "3g.20gb"]}`, 200, `"mig_devices":["3g.20gb","3g.20gb"]`},
		{"3", `{"enabled": false}`, 200, `"mig_enabled":false`},
		{"6", `{"enabled": true}`, 200, `"mig_enabled":true`},
		{"3", `{"devices": ["9g.99gb"]}`, 400, "unknown MIG profile"},
		{"3", `{"colour": 1}`, 400, "mig body"},
		{"12", `{}`, 404, "GPUs 0..7"},
	} {
		status, body := put(tc.index, tc.body)
		if status != tc.status || !strings.Contains(body, tc.want) {
			t.Errorf("PUT /sim/gpus/%s/mig %s: %d %s; want %d with %q", tc.index, tc.body, status, body, tc.status, tc.want)
		}
	}
}
