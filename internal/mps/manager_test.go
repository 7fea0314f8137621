package mps_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/mps"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

const gib = 1 << 30

func TestLimits(t *testing.T) {
	for _, tc := range []struct {
		memGiB    uint64
		replicas  int
		wantLimit string
		wantPct   int
	}{
		{16, 2, "8192M", 50}, {16, 4, "4096M", 25}, {16, 10, "1638M", 10},
		{80, 2, "40960M", 50}, {80, 4, "20480M", 25}, {80, 10, "8192M", 10},
	} {
		s := mps.Spec{Resource: "nvidia.com/gpu", Replicas: tc.replicas, GPUs: []mps.GPU{
			{Index: 0, UUID: "GPU-a", MemoryBytes: tc.memGiB * gib}, {Index: 3, UUID: "GPU-b", MemoryBytes: tc.memGiB * gib}}}
		want := []mps.Limit{{Device: "0", Value: tc.wantLimit}, {Device: "1", Value: tc.wantLimit}}
		if got := s.PinnedLimits(); !slices.Equal(got, want) {
			t.Errorf("%d GiB × %d replicas: limits %v, want %v", tc.memGiB, tc.replicas, got, want)
		}
		if got := s.ThreadPercentage(); got != tc.wantPct {
			t.Errorf("%d replicas: thread percentage %d, want %d", tc.replicas, got, tc.wantPct)
		}
		if got := s.VisibleDevices(); got != "GPU-a,GPU-b" {
			t.Errorf("CUDA_VISIBLE_DEVICES %q", got)
		}
	}
}

// harness runs a Manager over the fake control binary in a short root (the
// pipe's socket path must fit in 108 bytes).
type harness struct {
	t      *testing.T
	bin    string
	root   string
	health *health.State
	m      *mps.Manager
	cancel context.CancelFunc
	done   chan error

	mu    sync.Mutex
	modes []string // compute mode changes: "<mode> <uuids>"
}

func newHarness(t *testing.T, env ...string) *harness {
	t.Helper()
	root, err := os.MkdirTemp("/tmp", "mps")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, bin: testkit.FakeMPSControl(t), root: root, health: health.NewState(nil, nil), done: make(chan error, 1)}
	h.m = mps.New(mps.Options{
		Binary: h.bin, Env: env, Health: h.health,
		ComputeMode: func(_ context.Context, uuids []string, mode string) error {
			h.mu.Lock()
			defer h.mu.Unlock()
			h.modes = append(h.modes, mode+" "+strings.Join(uuids, ","))
			return nil
		},
		ReadyTimeout: 10 * time.Second, ProbeInterval: 200 * time.Millisecond,
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
	})
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- h.m.Run(ctx) }()
	t.Cleanup(func() {
		h.stop()
		for _, d := range []string{"nvidia.com/gpu", "nvidia.com/gpu.shared"} {
			_ = testkit.KillFakeMPS(mps.DirsOf(root, d).Pipe)
		}
		os.RemoveAll(root)
	})
	return h
}

func (h *harness) stop() {
	if h.cancel != nil {
		h.cancel()
		h.cancel = nil
		select {
		case err := <-h.done:
			if err != nil {
				h.t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			h.t.Fatal("Run did not return 30 s after its context ended")
		}
	}
}

// waitFor waits until cond holds for the daemon's status.
func (h *harness) waitFor(what string, cond func(st mps.Status, ok bool) bool) mps.Status {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ch := h.m.Changed()
		var st mps.Status
		var ok bool
		for _, s := range h.m.Statuses() {
			if s.Resource == "nvidia.com/gpu" {
				st, ok = s, true
			}
		}
		if cond(st, ok) {
			return st
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out waiting for %s; status %+v", what, st)
		}
		select {
		case <-ch:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (h *harness) ready() mps.Status {
	h.t.Helper()
	return h.waitFor("the daemon to be ready", func(st mps.Status, _ bool) bool { return st.State == mps.StateReady })
}

// ask sends a command to the daemon as a client would.
func (h *harness) ask(resource, line string) (string, error) {
	cmd := exec.Command(h.bin)
	cmd.Env = []string{"CUDA_MPS_PIPE_DIRECTORY=" + mps.DirsOf(h.root, resource).Pipe}
	cmd.Stdin = strings.NewReader(line)
	out, err := cmd.Output()
	return strings.TrimSpace(string(out)), err
}

func (h *harness) log(resource string) string {
	b, _ := os.ReadFile(filepath.Join(mps.DirsOf(h.root, resource).Log, "control.log"))
	return string(b)
}

func (h *harness) spec(replicas int, memGiB uint64) mps.Spec {
	return mps.Spec{Root: h.root, Resource: "nvidia.com/gpu", Replicas: replicas, GPUs: []mps.GPU{
		{Index: 0, UUID: "GPU-11111111-1111-1111-1111-111111111111", MemoryBytes: memGiB * gib},
		{Index: 1, UUID: "GPU-22222222-2222-2222-2222-222222222222", MemoryBytes: memGiB * gib}}}
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(stat), ')')
	return i > 0 && i+2 < len(stat) && stat[i+2] != 'Z'
}

// TestDaemonLifecycle: start and ready with the limits sent for each
// replica count and GPU size; a crash makes the replicas unhealthy, the
// restart makes them healthy; a reload to fewer replicas restarts the
// daemon with the new limits; stopping leaves no daemon.
func TestDaemonLifecycle(t *testing.T) {
	h := newHarness(t)
	unit := sharing.MPSHealthUnit("nvidia.com/gpu")

	for _, tc := range []struct {
		replicas  int
		memGiB    uint64
		wantLimit string
		wantPct   string
	}{{10, 80, "8192M", "10.0"}, {4, 80, "20480M", "25.0"}, {2, 16, "8192M", "50.0"}} {
		h.m.Apply([]mps.Spec{h.spec(tc.replicas, tc.memGiB)})
		st := h.waitFor(fmt.Sprintf("%d replicas ready", tc.replicas), func(st mps.Status, _ bool) bool {
			return st.State == mps.StateReady && st.Replicas == tc.replicas && st.PinnedLimits[0].Value == tc.wantLimit
		})
		if got, err := h.ask("nvidia.com/gpu", "get_default_active_thread_percentage"); err != nil || got != tc.wantPct {
			t.Errorf("%d replicas: thread percentage %q (%v), want %s", tc.replicas, got, err, tc.wantPct)
		}
		for _, dev := range []string{"0", "1"} {
			if got, err := h.ask("nvidia.com/gpu", "get_default_device_pinned_mem_limit "+dev); err != nil || got != tc.wantLimit {
				t.Errorf("%d replicas: device %s pinned limit %q (%v), want %s", tc.replicas, dev, got, err, tc.wantLimit)
			}
		}
		if ok, reason := h.health.Check(unit); !ok {
			t.Errorf("ready daemon, but its unit is unhealthy: %s", reason)
		}
		if _, err := os.Stat(mps.DirsOf(h.root, "nvidia.com/gpu").Started); err != nil {
			t.Errorf(".started marker: %v", err)
		}
		if !alive(st.PID) {
			t.Errorf("status pid %d is not a live process", st.PID)
		}
	}
	log := h.log("nvidia.com/gpu")
	for _, want := range []string{"CUDA_VISIBLE_DEVICES=GPU-11111111-1111-1111-1111-111111111111,GPU-22222222-2222-2222-2222-222222222222",
		"Cmd:set_default_device_pinned_mem_limit 0 8192M", "Cmd:set_default_device_pinned_mem_limit 1 20480M",
		"Cmd:set_default_active_thread_percentage 10", "Cmd:quit"} {
		if !strings.Contains(log, want) {
			t.Errorf("control.log lacks %q:\n%s", want, log)
		}
	}

	// A crash: unhealthy at once, then restarted and healthy.
	before := h.ready()
	if _, err := h.ask("nvidia.com/gpu", "die"); err != nil {
		t.Logf("die: %v", err)
	}
	failed := h.waitFor("the crash to be seen", func(st mps.Status, _ bool) bool { return st.State != mps.StateReady || st.PID != before.PID })
	if ok, reason := h.health.Check(unit); ok && failed.State != mps.StateReady {
		t.Errorf("daemon %s, but its unit reads healthy", failed.State)
	} else if !ok && !strings.Contains(reason, "MPS control daemon not running") {
		t.Errorf("unhealthy reason %q", reason)
	}
	after := h.waitFor("the restart", func(st mps.Status, _ bool) bool {
		return st.State == mps.StateReady && st.Restarts == before.Restarts+1
	})
	if after.PID == before.PID || alive(before.PID) {
		t.Errorf("restart: pid %d → %d (old alive %v)", before.PID, after.PID, alive(before.PID))
	}
	if ok, reason := h.health.Check(unit); !ok {
		t.Errorf("restarted daemon, but its unit is unhealthy: %s", reason)
	}

	// Stopping the manager quits the daemon: no process, no socket.
	h.stop()
	if alive(after.PID) {
		t.Errorf("daemon pid %d still running after the manager stopped", after.PID)
	}
	if _, err := os.Stat(filepath.Join(mps.DirsOf(h.root, "nvidia.com/gpu").Pipe, "control")); !os.IsNotExist(err) {
		t.Errorf("control socket left behind: %v", err)
	}
	if _, err := os.Stat(mps.DirsOf(h.root, "nvidia.com/gpu").Started); !os.IsNotExist(err) {
		t.Errorf(".started left behind: %v", err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.modes) < 2 || !strings.HasPrefix(h.modes[0], "EXCLUSIVE_PROCESS GPU-1") || !strings.HasPrefix(h.modes[len(h.modes)-1], "DEFAULT GPU-1") {
		t.Errorf("compute mode changes %q: want EXCLUSIVE_PROCESS first and DEFAULT last", h.modes)
	}
}

// TestDaemonRemoved: a resource no longer shared through MPS loses its
// daemon and its status.
func TestDaemonRemoved(t *testing.T) {
	h := newHarness(t)
	h.m.Apply([]mps.Spec{h.spec(2, 16)})
	st := h.ready()
	h.m.Apply(nil)
	h.waitFor("the daemon to go", func(_ mps.Status, ok bool) bool { return !ok })
	if alive(st.PID) {
		t.Errorf("removed resource's daemon %d still runs", st.PID)
	}
	if ok, _ := h.health.Check(sharing.MPSHealthUnit("nvidia.com/gpu")); !ok {
		t.Error("removed resource's unit left unhealthy")
	}
}

// TestDaemonStartFailure: a daemon that cannot start is failed, with the
// binary's message, and retried with backoff.
func TestDaemonStartFailure(t *testing.T) {
	h := newHarness(t, "FAKE_MPS_FAIL_START=1")
	h.m.Apply([]mps.Spec{h.spec(2, 16)})
	st := h.waitFor("retries", func(st mps.Status, _ bool) bool { return st.State == mps.StateFailed && st.Restarts >= 2 })
	if !strings.Contains(st.Reason, "-d: exit status 1") {
		t.Errorf("reason %q: want the -d failure", st.Reason)
	}
	ok, reason := h.health.Check(sharing.MPSHealthUnit("nvidia.com/gpu"))
	if ok || !strings.Contains(reason, "MPS control daemon not running") {
		t.Errorf("health %v %q", ok, reason)
	}
	if h.m.Ready("nvidia.com/gpu") {
		t.Error("Ready true for a daemon that never started")
	}
}

// TestDaemonHungIsRestarted: a daemon that lives but no longer answers is
// killed and restarted after two missed probes.
func TestDaemonHungIsRestarted(t *testing.T) {
	h := newHarness(t)
	h.m.Apply([]mps.Spec{h.spec(2, 16)})
	before := h.ready()
	if err := syscall.Kill(before.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(before.PID, syscall.SIGKILL) })
	h.waitFor("a restart", func(st mps.Status, _ bool) bool { return st.State == mps.StateReady && st.PID != before.PID })
}
