package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

func TestPolicy(t *testing.T) {
	type want struct {
		code  uint64
		fatal bool
	}
	cases := []struct {
		name     string
		cfg      PolicyConfig
		xids     []want
		ecc      bool
		disabled bool
	}{
		{"default skips application XIDs", PolicyConfig{DoubleBitECC: true},
			[]want{{13, false}, {31, false}, {43, false}, {45, false}, {68, false}, {109, false}, {48, true}, {79, true}, {94, true}, {99999, true}},
			true, false},
		{"skip list adds", PolicyConfig{Skip: []uint64{94, 48}},
			[]want{{94, false}, {48, false}, {13, false}, {79, true}}, false, false},
		{"force list beats the default skip list", PolicyConfig{Fatal: []uint64{13}},
			[]want{{13, true}, {31, false}, {48, true}}, false, false},
		{"force list beats the user skip list", PolicyConfig{Skip: []uint64{48}, Fatal: []uint64{48}},
			[]want{{48, true}}, false, false},
		{"xids: every XID skipped, ECC still on", PolicyConfig{DisableXIDs: true, DoubleBitECC: true},
			[]want{{48, false}, {79, false}, {12345, false}}, true, false},
		{"xids with a forced XID", PolicyConfig{DisableXIDs: true, Fatal: []uint64{79}},
			[]want{{48, false}, {79, true}}, false, false},
		{"all: off altogether", PolicyConfig{DisableAll: true, DoubleBitECC: true},
			[]want{{48, false}, {79, false}}, false, true},
		{"all with an enabled XID keeps it fatal (upstream: everything off)", PolicyConfig{DisableAll: true, Fatal: []uint64{48}, DoubleBitECC: true},
			[]want{{48, true}, {79, false}, {13, false}}, false, false},
		{"enable all: every XID fatal", PolicyConfig{EnableAll: true},
			[]want{{13, true}, {31, true}, {48, true}}, false, false},
		{"enable all beats disable all", PolicyConfig{DisableAll: true, EnableAll: true},
			[]want{{13, true}}, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := NewPolicy(tc.cfg)
			for _, w := range tc.xids {
				if got := p.XIDFatal(w.code); got != w.fatal {
					t.Errorf("XIDFatal(%d) = %v, want %v (policy %s)", w.code, got, w.fatal, p)
				}
			}
			if p.ECCFatal() != tc.ecc {
				t.Errorf("ECCFatal = %v, want %v", p.ECCFatal(), tc.ecc)
			}
			if p.Disabled() != tc.disabled {
				t.Errorf("Disabled = %v, want %v", p.Disabled(), tc.disabled)
			}
		})
	}
}

func TestXIDReasons(t *testing.T) {
	for code, want := range map[uint64]string{
		79:    "lost: XID 79 (GPU has fallen off the bus)",
		48:    "XID 48 (double-bit ECC error)",
		54321: "XID 54321 (unknown XID: treated as fatal)",
	} {
		if got := XIDReason(code); got != want {
			t.Errorf("XIDReason(%d) = %q, want %q", code, got, want)
		}
	}
}

// TestMonitorXIDPolicy feeds XIDs through a go-nvml mock event set and
// checks which ones make the GPU unhealthy.
func TestMonitorXIDPolicy(t *testing.T) {
	cases := []struct {
		name   string
		cfg    PolicyConfig
		code   uint64
		fatal  bool
		reason string
	}{
		{"13 skipped by default", PolicyConfig{}, 13, false, ""},
		{"109 skipped by default", PolicyConfig{}, 109, false, ""},
		{"48 fatal", PolicyConfig{}, 48, true, "XID 48 (double-bit ECC error)"},
		{"79 lost", PolicyConfig{}, 79, true, "lost: XID 79"},
		{"unknown XID fatal and named", PolicyConfig{}, 4242, true, "XID 4242 (unknown XID: treated as fatal)"},
		{"skip list", PolicyConfig{Skip: []uint64{48}}, 48, false, ""},
		{"force list", PolicyConfig{Fatal: []uint64{13}}, 13, true, "XID 13 (graphics engine exception"},
		{"all + enabled 48", PolicyConfig{DisableAll: true, Fatal: []uint64{48}}, 48, true, "XID 48"},
		{"all + enabled 48, 79 ignored", PolicyConfig{DisableAll: true, Fatal: []uint64{48}}, 79, false, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n := newMockNode(t)
			r := runMonitor(t, MonitorOptions{Lib: n.lib, Inventory: fixed(n.inv), Policy: NewPolicy(tc.cfg), Recovery: RecoverNever})
			r.waitStatus(t, "events armed", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
			n.xid(0, tc.code)
			// Events are handled in order on one goroutine, before the next
			// probe round: one round after the event was taken, it is applied.
			r.waitStatus(t, "event received", func(s MonitorStatus) bool { return s.Events >= 1 })
			r.rounds(t, 1)
			st := r.state.Status(n.uuid(0))
			if st.Healthy == tc.fatal {
				t.Fatalf("XID %d: healthy=%v, want fatal=%v (reason %q)", tc.code, st.Healthy, tc.fatal, st.Reason)
			}
			if tc.fatal && !strings.Contains(st.Reason, tc.reason) {
				t.Errorf("reason %q does not contain %q", st.Reason, tc.reason)
			}
			for i := 1; i < 8; i++ {
				if ok, reason := r.state.Check(n.uuid(i)); !ok {
					t.Errorf("GPU %d unhealthy (%s) after an XID on GPU 0", i, reason)
				}
			}
			c := r.m.Counters()
			if len(c.XIDs) != 1 || c.XIDs[0].GPU != 0 || c.XIDs[0].Code != strconv.FormatUint(tc.code, 10) || c.XIDs[0].Count != 1 {
				t.Errorf("XID counters %+v, want one XID %d on GPU 0", c.XIDs, tc.code)
			}
		})
	}
}

// TestMonitorDisabled: DP_DISABLE_HEALTHCHECKS=all without an enabled XID
// touches nothing, and says so.
func TestMonitorDisabled(t *testing.T) {
	n := newMockNode(t)
	n.lost[2].Store(true)
	r := runMonitor(t, MonitorOptions{Lib: n.lib, Inventory: fixed(n.inv), Policy: NewPolicy(PolicyConfig{DisableAll: true})})
	st := r.waitStatus(t, "disabled", func(s MonitorStatus) bool { return s.Mode == ModeDisabled })
	if !strings.Contains(st.ModeReason, "DP_DISABLE_HEALTHCHECKS=all") || !strings.Contains(st.Policy, "disabled") {
		t.Errorf("disabled status does not say why: %+v", st)
	}
	r.stop()
	if n.creates.Load() != 0 || len(r.state.Snapshot()) != 0 {
		t.Errorf("a disabled monitor created %d event sets and marked %v", n.creates.Load(), r.state.Snapshot())
	}
}

// TestMonitorMIGMatching: an event with GPU/compute instance IDs marks
// the matching MIG devices only; no IDs, or IDs that match nothing, mark
// the whole GPU.
func TestMonitorMIGMatching(t *testing.T) {
	node, lib, inv := simNode(t, "dgx-a100-mig")
	g := inv.GPUs[1] // 3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb
	if len(g.MIGDevices) != 4 {
		t.Fatalf("GPU 1 has %d MIG devices, want 4", len(g.MIGDevices))
	}
	target := g.MIGDevices[2]
	cases := []struct {
		name    string
		gi, ci  int
		want    []string // unhealthy units
		reasons string
	}{
		{"GI and CI match one MIG device", target.GPUInstanceID, target.ComputeInstanceID, []string{target.UUID}, "on MIG GI"},
		{"GI with every CI", target.GPUInstanceID, -1, []string{target.UUID}, "on MIG GI"},
		{"no instance: the whole GPU", -1, -1, []string{g.UUID}, "XID 48"},
		{"unknown GI: the whole GPU", 99, 0, []string{g.UUID}, "XID 48"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), Recovery: RecoverNever})
			r.waitStatus(t, "events armed", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
			if n, err := node.InjectXID(1, 48, tc.gi, tc.ci); err != nil || n != 1 {
				t.Fatalf("InjectXID delivered to %d sets: %v", n, err)
			}
			r.waitUnit(t, tc.want[0], false)
			r.rounds(t, 1)
			var got []string
			for unit, st := range r.state.Snapshot() {
				if !st.Healthy {
					got = append(got, unit)
					if !strings.Contains(st.Reason, tc.reasons) {
						t.Errorf("%s: reason %q lacks %q", unit, st.Reason, tc.reasons)
					}
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("unhealthy units %v, want %v", got, tc.want)
			}
		})
	}
}

// TestMonitorLostAndRecovery walks a GPU through lost, back, quiet period,
// healthy, and a second failure that doubles the quiet period.
func TestMonitorLostAndRecovery(t *testing.T) {
	node, lib, inv := simNode(t, "dgx-h100")
	clock := newFakeClock()
	const quiet = time.Minute
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), QuietPeriod: quiet, Now: clock.Now})
	r.waitStatus(t, "all 8 GPUs armed", func(s MonitorStatus) bool { return s.Mode == ModeEvents && len(s.EventGPUs) == 8 })
	uuid := inv.GPUs[3].UUID

	lose := func() {
		t.Helper()
		if err := node.SetLost(3, true); err != nil {
			t.Fatal(err)
		}
		st := r.waitUnit(t, uuid, false)
		if !strings.Contains(st.Reason, "lost") || !strings.Contains(st.Reason, "GPU_IS_LOST") {
			t.Errorf("lost GPU's reason %q names neither lost nor GPU_IS_LOST", st.Reason)
		}
		r.waitStatus(t, "GPU 3 out of the event set", func(s MonitorStatus) bool { return !slices.Contains(s.EventGPUs, 3) })
		for i, g := range inv.GPUs {
			if ok, reason := r.state.Check(g.UUID); i != 3 && !ok {
				t.Errorf("GPU %d unhealthy (%s) while only GPU 3 is lost", i, reason)
			}
		}
	}
	backAfter := func(wait time.Duration) {
		t.Helper()
		if err := node.SetLost(3, false); err != nil {
			t.Fatal(err)
		}
		r.waitStatus(t, "GPU 3 answers", func(s MonitorStatus) bool { return s.GPUs[3].Answering })
		r.rounds(t, 2)
		if r.state.Status(uuid).Healthy {
			t.Fatalf("GPU 3 healthy before its quiet period")
		}
		st := r.m.Status()
		if len(st.Faults) != 1 || st.Faults[0].Unit != uuid || st.Faults[0].QuietPeriod != wait.String() {
			t.Errorf("faults %+v, want GPU 3 waiting %s", st.Faults, wait)
		}
		clock.Advance(wait - time.Second)
		r.rounds(t, 2)
		if r.state.Status(uuid).Healthy {
			t.Fatalf("GPU 3 healthy 1 s before its quiet period of %s ended", wait)
		}
		clock.Advance(time.Second)
		st2 := r.waitUnit(t, uuid, true)
		if !strings.Contains(st2.Reason, "recovered") {
			t.Errorf("recovery reason %q", st2.Reason)
		}
		r.waitStatus(t, "GPU 3 back in the event set", func(s MonitorStatus) bool { return slices.Contains(s.EventGPUs, 3) })
	}

	lose()
	backAfter(quiet)
	lose() // fails again soon after recovering: twice the wait
	backAfter(2 * quiet)
}

func TestMonitorRecoveryNever(t *testing.T) {
	node, lib, inv := simNode(t, "dgx-h100")
	clock := newFakeClock()
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), Recovery: RecoverNever, QuietPeriod: time.Second, Now: clock.Now})
	r.waitStatus(t, "events armed", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	if _, err := node.InjectXID(5, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	r.waitUnit(t, inv.GPUs[5].UUID, false)
	clock.Advance(time.Hour)
	r.rounds(t, 3)
	if st := r.state.Status(inv.GPUs[5].UUID); st.Healthy {
		t.Errorf("recovery=never brought GPU 5 back: %+v", st)
	}
}

// TestMonitorXIDRecovery: a GPU that keeps answering after a fatal XID
// comes back once no fatal event has come for the quiet period; a new XID
// restarts the wait.
func TestMonitorXIDRecovery(t *testing.T) {
	node, lib, inv := simNode(t, "dgx-h100")
	clock := newFakeClock()
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), QuietPeriod: time.Minute, Now: clock.Now})
	r.waitStatus(t, "events armed", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	uuid := inv.GPUs[6].UUID
	if _, err := node.InjectXID(6, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	r.waitUnit(t, uuid, false)
	// After XID 79 the quiet period counts from the GPU's next answer.
	r.rounds(t, 1)
	clock.Advance(50 * time.Second)
	if _, err := node.InjectXID(6, 94, -1, -1); err != nil {
		t.Fatal(err)
	}
	r.waitStatus(t, "second event", func(s MonitorStatus) bool { return s.Events >= 2 })
	clock.Advance(50 * time.Second) // 100 s after the first, 50 s after the last
	r.rounds(t, 2)
	if st := r.state.Status(uuid); st.Healthy || !strings.Contains(st.Reason, "XID 94") {
		t.Fatalf("after a second XID: %+v, want unhealthy with the latest reason", st)
	}
	clock.Advance(10 * time.Second)
	r.waitUnit(t, uuid, true)
}

func TestMonitorFallbackToProbing(t *testing.T) {
	t.Run("event set cannot be created, then can", func(t *testing.T) {
		node, lib, inv := simNode(t, "dgx-h100")
		if err := node.SetLibraryFault("EventSetCreate", gonvml.ERROR_UNKNOWN); err != nil {
			t.Fatal(err)
		}
		r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), ArmRetry: 30 * time.Millisecond})
		st := r.waitStatus(t, "probing", func(s MonitorStatus) bool { return s.Mode == ModeProbing })
		if !strings.Contains(st.LastError, "event_set_create") || !strings.Contains(st.ModeReason, "ERROR_UNKNOWN") {
			t.Errorf("probing mode does not say why: %+v", st)
		}
		if err := node.SetLost(4, true); err != nil {
			t.Fatal(err)
		}
		r.waitUnit(t, inv.GPUs[4].UUID, false) // found by probing
		if err := node.SetLibraryFault("EventSetCreate", gonvml.SUCCESS); err != nil {
			t.Fatal(err)
		}
		st = r.waitStatus(t, "events again", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
		if len(st.EventGPUs) != 7 {
			t.Errorf("armed %v, want the 7 answering GPUs", st.EventGPUs)
		}
	})
	t.Run("waits keep failing", func(t *testing.T) {
		node, lib, inv := simNode(t, "dgx-h100")
		r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), ArmRetry: time.Hour})
		r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
		if err := node.SetLibraryFault("EventSetWait", gonvml.ERROR_UNKNOWN); err != nil {
			t.Fatal(err)
		}
		st := r.waitStatus(t, "probing", func(s MonitorStatus) bool { return s.Mode == ModeProbing })
		if st.WaitErrors != maxWaitFailures || !strings.Contains(st.ModeReason, "3 times in a row") {
			t.Errorf("fell back after %d wait errors (%q), want %d", st.WaitErrors, st.ModeReason, maxWaitFailures)
		}
		if sets, _ := node.EventStats(); sets != 0 {
			t.Errorf("%d event sets still open after the fallback", sets)
		}
		if err := node.SetLost(1, true); err != nil {
			t.Fatal(err)
		}
		r.waitUnit(t, inv.GPUs[1].UUID, false)
		r.rounds(t, 3)
		if got := r.m.Status().WaitErrors; got != maxWaitFailures {
			t.Errorf("%d wait errors after falling back: the monitor still waits", got)
		}
	})
	t.Run("go-nvml mock without event sets", func(t *testing.T) {
		srv := dgxa100.New() // EventSetCreate unset: the mock panics
		for _, d := range srv.Devices {
			d.(*server.Device).GetPerformanceStateFunc = func() (gonvml.Pstates, gonvml.Return) { return 0, gonvml.SUCCESS }
		}
		lib, err := nvml.Open(srv)
		if err != nil {
			t.Fatal(err)
		}
		defer lib.Close()
		inv, err := nvml.Scan(lib, nvml.ScanOptions{})
		if err != nil {
			t.Fatal(err)
		}
		r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv)})
		st := r.waitStatus(t, "probing", func(s MonitorStatus) bool { return s.Mode == ModeProbing && s.ProbeRounds > 0 })
		if !strings.Contains(st.LastError, "nvmlEventSetCreate") {
			t.Errorf("last error %q does not name the failed call", st.LastError)
		}
	})
	t.Run("wait says GPU_IS_LOST: only that GPU, no spin", func(t *testing.T) {
		node, lib, inv := simNode(t, "dgx-h100")
		node.SetWaitLost(true)
		r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), ProbeInterval: time.Hour})
		r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
		if err := node.SetLost(2, true); err != nil {
			t.Fatal(err)
		}
		// With an hour between probes, only the failed wait can find it.
		r.waitUnit(t, inv.GPUs[2].UUID, false)
		st := r.waitStatus(t, "re-armed without GPU 2", func(s MonitorStatus) bool {
			return s.Mode == ModeEvents && len(s.EventGPUs) == 7 && !slices.Contains(s.EventGPUs, 2)
		})
		if st.WaitErrors > 2 {
			t.Errorf("%d wait errors, want at most 2 (no busy loop)", st.WaitErrors)
		}
		for i, g := range inv.GPUs {
			if ok, _ := r.state.Check(g.UUID); ok == (i == 2) {
				t.Errorf("GPU %d healthy=%v; only GPU 2 is lost", i, ok)
			}
		}
		// Events still flow for the others.
		if _, err := node.InjectXID(5, 48, -1, -1); err != nil {
			t.Fatal(err)
		}
		r.waitUnit(t, inv.GPUs[5].UUID, false)
		waits := r.m.Status().WaitErrors
		if waits > 2 {
			t.Errorf("%d wait errors after re-arming", waits)
		}
	})
	t.Run("mock event set create fails", func(t *testing.T) {
		n := newMockNode(t)
		n.createErr.Store(int32(gonvml.ERROR_NOT_SUPPORTED))
		r := runMonitor(t, MonitorOptions{Lib: n.lib, Inventory: fixed(n.inv)})
		r.waitStatus(t, "probing", func(s MonitorStatus) bool { return s.Mode == ModeProbing })
		n.lost[6].Store(true)
		st := r.waitUnit(t, n.uuid(6), false)
		if !strings.Contains(st.Reason, "nvmlDeviceGetPerformanceState") {
			t.Errorf("reason %q does not name the probe", st.Reason)
		}
	})
}

// TestMonitorProbeFailing: errors other than GPU_IS_LOST count; three in a
// row make the GPU unhealthy with the error as the reason.
func TestMonitorProbeFailing(t *testing.T) {
	node, lib, inv := simNode(t, "dgx-h100")
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), QuietPeriod: time.Millisecond})
	r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	if err := node.SetFault(7, "GetPerformanceState", gonvml.ERROR_UNKNOWN); err != nil {
		t.Fatal(err)
	}
	st := r.waitUnit(t, inv.GPUs[7].UUID, false)
	if !strings.Contains(st.Reason, "probe failing") || !strings.Contains(st.Reason, "ERROR_UNKNOWN") {
		t.Errorf("reason %q", st.Reason)
	}
	if err := node.SetFault(7, "GetPerformanceState", gonvml.SUCCESS); err != nil {
		t.Fatal(err)
	}
	r.waitUnit(t, inv.GPUs[7].UUID, true)
}

// TestMonitorLostAtStart: a GPU the inventory could not identify is probed
// by index; when it answers, a re-scan is requested once, and the next
// inventory is adopted.
func TestMonitorLostAtStart(t *testing.T) {
	profile := filepath.Join(t.TempDir(), "lost.yaml")
	if err := os.WriteFile(profile, []byte(`name: lost
gpus:
  - {model: H100-SXM5-80GB, count: 3, numaNode: 0}
  - {model: H100-SXM5-80GB, numaNode: 0, lost: true}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	node, lib, inv := simNode(t, profile)
	if inv.GPUs[3].Usable() {
		t.Fatalf("GPU 3 identified despite being lost: %+v", inv.GPUs[3])
	}
	var current atomic.Pointer[nvml.Inventory]
	current.Store(inv)
	returned := make(chan int, 4)
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: current.Load, GPUReturned: func(i int) { returned <- i }})
	rescan := r.m.Rescan()
	r.rounds(t, 2)
	if st := r.m.Status(); len(st.RescanNeeded) != 0 || st.GPUs[3].Answering || st.GPUs[3].LastProbeError == "" {
		t.Errorf("while GPU 3 is lost: %+v", st.GPUs[3])
	}
	if err := node.SetLost(3, false); err != nil {
		t.Fatal(err)
	}
	select {
	case <-rescan:
	case <-time.After(10 * time.Second):
		t.Fatal("no re-scan request after the lost GPU answered")
	}
	if i := <-returned; i != 3 {
		t.Errorf("GPUReturned(%d), want 3", i)
	}
	r.rounds(t, 3)
	if st := r.m.Status(); !slices.Equal(st.RescanNeeded, []int{3}) {
		t.Errorf("RescanNeeded %v, want [3]", st.RescanNeeded)
	}
	if len(returned) != 0 {
		t.Errorf("GPUReturned called again for the same return")
	}

	inv2, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	current.Store(inv2)
	r.waitStatus(t, "new inventory adopted", func(s MonitorStatus) bool {
		return len(s.RescanNeeded) == 0 && s.GPUs[3].UUID != "" && slices.Contains(s.EventGPUs, 3)
	})
}

// TestMonitorReportError: GPU_IS_LOST seen by another NVML user makes the
// unit unhealthy at once; the monitor then brings it back like its own.
func TestMonitorReportError(t *testing.T) {
	_, lib, inv := simNode(t, "dgx-h100")
	clock := newFakeClock()
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), QuietPeriod: time.Minute, Now: clock.Now})
	uuid := inv.GPUs[0].UUID
	r.m.ReportError(uuid, errors.New("nvmlDeviceGetTemperature: ERROR_UNKNOWN"))
	r.m.ReportError("GPU-not-on-this-node", &nvml.Error{Op: "nvmlDeviceGetTemperature", Return: gonvml.ERROR_GPU_IS_LOST})
	if snap := r.state.Snapshot(); len(snap) != 0 {
		t.Fatalf("ignored reports changed the table: %v", snap)
	}
	r.m.ReportError(uuid, &nvml.Error{Op: "nvmlDeviceGetTemperature", Return: gonvml.ERROR_GPU_IS_LOST})
	if st := r.state.Status(uuid); st.Healthy || !strings.Contains(st.Reason, "nvmlDeviceGetTemperature") {
		t.Fatalf("after a reported GPU_IS_LOST: %+v", st)
	}
	r.waitStatus(t, "fault adopted", func(s MonitorStatus) bool { return len(s.Faults) == 1 })
	first := r.m.Status().Faults[0].LastBad

	// Reported again 30 s later: the quiet period starts over from then.
	clock.Advance(30 * time.Second)
	r.m.ReportError(uuid, &nvml.Error{Op: "nvmlDeviceGetTemperature", Return: gonvml.ERROR_GPU_IS_LOST})
	r.waitStatus(t, "the repeat report adopted", func(s MonitorStatus) bool {
		return len(s.Faults) == 1 && s.Faults[0].LastBad.After(first)
	})
	clock.Advance(40 * time.Second) // 70 s after the first report, 40 s after the last
	r.rounds(t, 2)                  // probe rounds (which recover what is due) after the advance
	if st := r.state.Status(uuid); st.Healthy {
		t.Fatalf("healthy 40 s after a repeated GPU_IS_LOST report, quiet period 1 min: %+v", st)
	}
	clock.Advance(20 * time.Second)
	r.waitUnit(t, uuid, true)
}

// countingHandler counts log records by message.
type countingHandler struct {
	mu     sync.Mutex
	counts map[string]int
	total  int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.counts == nil {
		h.counts = map[string]int{}
	}
	h.counts[r.Message]++
	h.total++
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

func (h *countingHandler) get() (map[string]int, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.counts), h.total
}

// TestMonitorXIDStorm: 10 000 events, fatal, skipped and of random codes,
// give one transition and one log line per device, bounded counters.
func TestMonitorXIDStorm(t *testing.T) {
	n := newMockNode(t)
	logs := &countingHandler{}
	state := NewState(slog.New(logs), nil)
	r := runMonitor(t, MonitorOptions{Lib: n.lib, Inventory: fixed(n.inv), State: state, Logger: slog.New(logs), Recovery: RecoverNever})
	r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	const storm = 10000
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < storm; i++ {
		switch i % 3 {
		case 0:
			n.xid(0, 48)
		case 1:
			n.xid(0, 13)
		default:
			n.xid(1, rng.Uint64N(1_000_000)+200)
		}
	}
	r.waitStatus(t, "storm drained", func(s MonitorStatus) bool { return s.Events >= storm })
	r.rounds(t, 1)
	// The State logs once per transition: two lines are two transitions.
	counts, total := logs.get()
	if counts["device unhealthy"] != 2 || total != 2 {
		t.Errorf("log lines %v (total %d), want exactly 2 'device unhealthy' (GPU 0 and GPU 1 once each)", counts, total)
	}
	c := r.m.Counters()
	if len(c.XIDs) > maxXIDSeries+1 {
		t.Errorf("%d XID series, want at most %d", len(c.XIDs), maxXIDSeries+1)
	}
	var sum uint64
	for _, x := range c.XIDs {
		sum += x.Count
	}
	if sum != storm || c.Events != storm {
		t.Errorf("counted %d XIDs and %d events, want %d", sum, c.Events, storm)
	}
	if len(r.m.Status().Faults) != 2 {
		t.Errorf("faults %+v, want 2", r.m.Status().Faults)
	}
}

// TestMonitorStops: Run returns promptly, frees its event set and leaves
// no goroutine behind.
func TestMonitorStops(t *testing.T) {
	before := runtime.NumGoroutine()
	n := newMockNode(t)
	r := runMonitor(t, MonitorOptions{Lib: n.lib, Inventory: fixed(n.inv), WaitTimeout: 500 * time.Millisecond})
	r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	start := time.Now()
	r.stop()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("stopping took %s, want under a wait timeout", d)
	}
	if n.frees.Load() != n.creates.Load() {
		t.Errorf("%d event sets created, %d freed", n.creates.Load(), n.frees.Load())
	}
	if got := r.m.Status().Mode; got != ModeStopped {
		t.Errorf("mode after stop %q", got)
	}
	deadline := time.After(5 * time.Second)
	for runtime.NumGoroutine() > before {
		select {
		case <-deadline:
			t.Fatalf("%d goroutines after stop, %d before", runtime.NumGoroutine(), before)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestMonitorRescanUnchanged: a re-scan that finds the same GPUs keeps the
// event set (no event lost to re-arming); faults stay.
func TestMonitorRescanUnchanged(t *testing.T) {
	n := newMockNode(t)
	var current atomic.Pointer[nvml.Inventory]
	current.Store(n.inv)
	r := runMonitor(t, MonitorOptions{Lib: n.lib, Inventory: current.Load, Recovery: RecoverNever})
	r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
	n.xid(2, 48)
	r.waitUnit(t, n.uuid(2), false)
	inv2, err := nvml.Scan(n.lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	current.Store(inv2)
	r.rounds(t, 2)
	if got := n.creates.Load(); got != 1 {
		t.Errorf("%d event sets created across an unchanged re-scan, want 1", got)
	}
	if st := r.m.Status(); st.Mode != ModeEvents || len(st.EventGPUs) != 8 || len(st.Faults) != 1 {
		t.Errorf("after the re-scan: mode %s, armed %v, faults %+v", st.Mode, st.EventGPUs, st.Faults)
	}
	n.xid(5, 48) // still delivered
	r.waitUnit(t, n.uuid(5), false)
}

// TestMonitorDoubleBitECC: a double-bit ECC event, injected through the
// simulator's control API, is fatal when configured; single-bit ones never.
func TestMonitorDoubleBitECC(t *testing.T) {
	for _, fatal := range []bool{true, false} {
		t.Run(fmt.Sprintf("doubleBitECC=%v", fatal), func(t *testing.T) {
			node, lib, inv := simNode(t, "dgx-h100")
			api := httptest.NewServer(node.Handler())
			defer api.Close()
			r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: fixed(inv), Recovery: RecoverNever,
				Policy: NewPolicy(PolicyConfig{DoubleBitECC: fatal})})
			r.waitStatus(t, "events", func(s MonitorStatus) bool { return s.Mode == ModeEvents })
			for _, q := range []string{"/sim/gpus/4/ecc?type=single", "/sim/gpus/4/ecc?type=double", "/sim/gpus/6/xid?code=48"} {
				resp, err := http.Post(api.URL+q, "", nil)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("POST %s: %s", q, resp.Status)
				}
			}
			r.waitUnit(t, inv.GPUs[6].UUID, false) // events are handled in order
			st := r.state.Status(inv.GPUs[4].UUID)
			if st.Healthy == fatal {
				t.Errorf("GPU 4 after a double-bit ECC event: %+v, want healthy=%v", st, !fatal)
			}
			if fatal && st.Reason != "double-bit ECC error (uncorrectable memory error)" {
				t.Errorf("reason %q", st.Reason)
			}
			if c := r.m.Counters(); len(c.DoubleBitECC) != 1 || c.DoubleBitECC[0].GPU != 4 || c.DoubleBitECC[0].Count != 1 {
				t.Errorf("double-bit counters %+v", c.DoubleBitECC)
			}
		})
	}
}

// TestMonitorRescanWhileLost: a re-scan while a GPU is lost cannot
// identify it; its fault is kept, and after the GPU returns and is scanned
// again it still comes back only through the quiet period.
func TestMonitorRescanWhileLost(t *testing.T) {
	node, lib, inv := simNode(t, "dgx-h100")
	clock := newFakeClock()
	var current atomic.Pointer[nvml.Inventory]
	current.Store(inv)
	r := runMonitor(t, MonitorOptions{Lib: lib, Inventory: current.Load, QuietPeriod: time.Minute, Now: clock.Now})
	uuid := inv.GPUs[2].UUID
	rescan := func() {
		t.Helper()
		next, err := nvml.Scan(lib, nvml.ScanOptions{})
		if err != nil {
			t.Fatal(err)
		}
		current.Store(next)
	}
	if err := node.SetLost(2, true); err != nil {
		t.Fatal(err)
	}
	r.waitUnit(t, uuid, false)
	rescan()
	st := r.waitStatus(t, "adopted the scan without GPU 2", func(s MonitorStatus) bool { return s.GPUs[2].UUID == "" })
	if len(st.Faults) != 1 || st.Faults[0].Unit != uuid || st.Faults[0].GPU != -1 {
		t.Fatalf("faults after a scan that could not identify GPU 2: %+v", st.Faults)
	}
	returned := r.m.Rescan()
	if err := node.SetLost(2, false); err != nil {
		t.Fatal(err)
	}
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("no re-scan request when GPU 2 answered")
	}
	rescan()
	r.waitStatus(t, "GPU 2 identified again", func(s MonitorStatus) bool {
		return s.GPUs[2].UUID == uuid && len(s.Faults) == 1 && s.Faults[0].GPU == 2
	})
	r.rounds(t, 2)
	if r.state.Status(uuid).Healthy {
		t.Fatal("GPU 2 healthy before its quiet period")
	}
	clock.Advance(time.Minute)
	r.waitUnit(t, uuid, true)
}
