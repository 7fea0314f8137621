package testkit_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// mps is one fake control daemon's directories, run the way the daemon
// will run the real binary.
type mps struct {
	t         *testing.T
	bin       string
	pipe, log string
	env       []string // more environment: the test controls
}

// newMPS makes the directories (not the daemon) and, at cleanup, stops a
// daemon left running: quit, then SIGKILL through its pid file.
func newMPS(t *testing.T) *mps {
	t.Helper()
	dir := t.TempDir()
	// A unix socket path holds at most 107 bytes; t.TempDir can be longer
	// under a deep $TMPDIR.
	if len(dir+"/pipe/control") > 100 {
		var err error
		if dir, err = os.MkdirTemp("/tmp", "mps"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	m := &mps{t: t, bin: testkit.FakeMPSControl(t), pipe: filepath.Join(dir, "pipe"), log: filepath.Join(dir, "log")}
	t.Cleanup(func() { // before the directories go: registered after them
		m.run("quit\n")
		if err := testkit.KillFakeMPS(m.pipe); err != nil {
			t.Error(err)
		}
	})
	return m
}

// run runs the binary with stdin and args, and returns its stdout,
// stderr and exit code.
func (m *mps) run(stdin string, args ...string) (stdout, stderr string, code int) {
	m.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, m.bin, args...)
	cmd.Env = append(os.Environ(), "CUDA_MPS_PIPE_DIRECTORY="+m.pipe, "CUDA_MPS_LOG_DIRECTORY="+m.log,
		"CUDA_VISIBLE_DEVICES=GPU-aaaa,GPU-bbbb")
	cmd.Env = append(cmd.Env, m.env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if _, exited := err.(*exec.ExitError); err != nil && !exited {
		m.t.Fatalf("%s %q: %v", m.bin, args, err)
	}
	return out.String(), errOut.String(), cmd.ProcessState.ExitCode()
}

// start runs -d and fails the test unless it succeeds.
func (m *mps) start() {
	m.t.Helper()
	if _, stderr, code := m.run("", "-d"); code != 0 {
		m.t.Fatalf("-d: exit %d: %s", code, stderr)
	}
}

// ask sends one command and fails the test unless the client exits 0.
func (m *mps) ask(cmd string) string {
	m.t.Helper()
	out, stderr, code := m.run(cmd + "\n")
	if code != 0 {
		m.t.Fatalf("%q: exit %d: %s", cmd, code, stderr)
	}
	return out
}

// waitDown waits until no daemon answers (a killed process's socket closes
// as it exits, just after its other descriptors).
func (m *mps) waitDown() {
	m.t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		_, stderr, code := m.run("get_server_list\n")
		if code != 0 {
			if !strings.Contains(stderr, "Cannot connect") {
				m.t.Errorf("client with no daemon: stderr %q", stderr)
			}
			return
		}
		if time.Now().After(deadline) {
			m.t.Fatal("the daemon still answers")
		}
	}
}

func (m *mps) logText() string {
	m.t.Helper()
	b, err := os.ReadFile(filepath.Join(m.log, "control.log"))
	if err != nil {
		m.t.Fatal(err)
	}
	return string(b)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// TestFakeMPSControl: commands round-trip through a daemon started with -d,
// the log records them, a second -d is refused, quit stops the daemon and
// removes its socket.
func TestFakeMPSControl(t *testing.T) {
	t.Parallel()
	m := newMPS(t)
	m.start()
	for _, step := range []struct{ cmd, want string }{
		{"get_default_active_thread_percentage", "100.0\n"},
		{"set_default_active_thread_percentage 10", ""},
		{"get_default_active_thread_percentage", "10.0\n"},
		{"get_default_device_pinned_mem_limit 0", "0M\n"},
		{"set_default_device_pinned_mem_limit 0 40960M", ""},
		{"set_default_device_pinned_mem_limit GPU-bbbb 2G", ""},
		{"get_default_device_pinned_mem_limit 0", "40960M\n"},
		{"get_default_device_pinned_mem_limit GPU-bbbb", "2G\n"},
		{"get_default_device_pinned_mem_limit 1", "0M\n"},
		{"get_server_list", ""},
	} {
		if got := m.ask(step.cmd); got != step.want {
			t.Errorf("%q: got %q, want %q", step.cmd, got, step.want)
		}
	}
	for _, bad := range []string{
		"set_default_active_thread_percentage 0",
		"set_default_active_thread_percentage 101",
		"set_default_active_thread_percentage ten",
		"set_default_device_pinned_mem_limit 0 lots",
		"set_default_device_pinned_mem_limit 0",
		"no_such_command",
	} {
		if got := m.ask(bad); !strings.HasSuffix(got, "\n") || strings.Count(got, "\n") != 1 {
			t.Errorf("%q: got %q, want one error line", bad, got)
		}
	}
	if got := m.ask("get_default_active_thread_percentage"); got != "10.0\n" {
		t.Errorf("after bad commands the percentage is %q, want 10.0", got)
	}

	if _, stderr, code := m.run("", "-d"); code == 0 || !strings.Contains(stderr, "already running") {
		t.Errorf("a second -d on the same pipe directory: exit %d, stderr %q", code, stderr)
	}

	b, err := os.ReadFile(filepath.Join(m.pipe, "fake.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid := strings.TrimSpace(string(b))
	log := m.logText()
	for _, want := range []string{
		"(pid " + pid + ", CUDA_VISIBLE_DEVICES=GPU-aaaa,GPU-bbbb)",
		fmt.Sprintf("Control %5s] Cmd:set_default_active_thread_percentage 10\n", pid),
		"] Cmd:set_default_device_pinned_mem_limit 0 40960M\n",
		"] Cmd:no_such_command\n",
	} {
		if !strings.Contains(log, want) {
			t.Errorf("control.log lacks %q:\n%s", want, log)
		}
	}

	if got := m.ask("quit"); got != "" {
		t.Errorf("quit: got %q", got)
	}
	// Already gone when the client returns.
	for _, f := range []string{"control", "fake.pid"} {
		if exists(filepath.Join(m.pipe, f)) {
			t.Errorf("%s is left after quit", f)
		}
	}
	m.waitDown()
	if log := m.logText(); !strings.Contains(log, "Cmd:quit\n") || !strings.HasSuffix(log, "] Exit\n") {
		t.Errorf("control.log does not end with quit:\n%s", log)
	}
}

// TestFakeMPSControlDie: die crashes the daemon, leaving its socket file;
// a new -d starts over it with fresh settings.
func TestFakeMPSControlDie(t *testing.T) {
	t.Parallel()
	m := newMPS(t)
	m.start()
	m.ask("set_default_active_thread_percentage 50")
	m.run("die\n") // answered by the connection closing; its exit code is not part of the contract
	m.waitDown()
	if !exists(filepath.Join(m.pipe, "control")) || !exists(filepath.Join(m.pipe, "fake.pid")) {
		t.Error("die removed the socket or the pid file; a crash would not")
	}
	m.start()
	if got := m.ask("get_default_active_thread_percentage"); got != "100.0\n" {
		t.Errorf("restarted daemon: percentage %q, want 100.0", got)
	}
}

// TestFakeMPSControlKill: KillFakeMPS ends a daemon left running, and is a
// no-op once it is gone.
func TestFakeMPSControlKill(t *testing.T) {
	t.Parallel()
	m := newMPS(t)
	if err := testkit.KillFakeMPS(m.pipe); err != nil {
		t.Errorf("no daemon ever started: %v", err)
	}
	m.start()
	if err := testkit.KillFakeMPS(m.pipe); err != nil {
		t.Fatal(err)
	}
	m.waitDown()
	if err := testkit.KillFakeMPS(m.pipe); err != nil {
		t.Errorf("killed daemon: %v", err)
	}
}

// TestFakeMPSControlReadyDelay: -d returns only once the daemon listens.
func TestFakeMPSControlReadyDelay(t *testing.T) {
	t.Parallel()
	m := newMPS(t)
	const delay = 700 * time.Millisecond
	m.env = []string{"FAKE_MPS_READY_DELAY=" + delay.String()}
	began := time.Now()
	m.start()
	if took := time.Since(began); took < delay {
		t.Errorf("-d returned after %v, before the %v delay", took, delay)
	}
	if got := m.ask("get_default_active_thread_percentage"); got != "100.0\n" {
		t.Errorf("got %q", got)
	}
}

// TestFakeMPSControlFailures: FAKE_MPS_FAIL_START, no pipe directory, and a
// client with no daemon all fail with a message, starting nothing.
func TestFakeMPSControlFailures(t *testing.T) {
	t.Parallel()
	m := newMPS(t)
	if _, stderr, code := m.run("get_server_list\n"); code == 0 || !strings.Contains(stderr, "Cannot connect") {
		t.Errorf("client with no daemon: exit %d, stderr %q", code, stderr)
	}
	m.env = []string{"FAKE_MPS_FAIL_START=1"}
	if _, stderr, code := m.run("", "-d"); code == 0 || !strings.Contains(stderr, "FAKE_MPS_FAIL_START") {
		t.Errorf("FAKE_MPS_FAIL_START=1: exit %d, stderr %q", code, stderr)
	}
	if exists(m.pipe) {
		t.Error("FAKE_MPS_FAIL_START=1 made the pipe directory")
	}
	m.env = []string{"CUDA_MPS_PIPE_DIRECTORY="} // later entries win
	if _, stderr, code := m.run("", "-d"); code == 0 || !strings.Contains(stderr, "CUDA_MPS_PIPE_DIRECTORY") {
		t.Errorf("no pipe directory: exit %d, stderr %q", code, stderr)
	}
	m.env = []string{"FAKE_MPS_READY_DELAY=soon"}
	if _, stderr, code := m.run("", "-d"); code == 0 || !strings.Contains(stderr, "FAKE_MPS_READY_DELAY") {
		t.Errorf("bad FAKE_MPS_READY_DELAY: exit %d, stderr %q", code, stderr)
	}
	if exists(filepath.Join(m.pipe, "fake.pid")) {
		t.Error("a failed -d started a daemon")
	}
}
