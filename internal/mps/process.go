package mps

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// process is a started control daemon.
type process struct {
	pid     int // 0 when it could not be found: then only probes see it die
	proc    *os.Process
	exited  chan struct{} // closed when it exits
	exitErr error         // why, once exited is closed
}

// kill ends the daemon at once and waits for its exit.
func (p *process) kill() {
	if p.proc == nil {
		return
	}
	_ = p.proc.Kill()
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
	}
}

// env is the daemon's and its commands' environment.
func (m *Manager) env(s Spec) []string {
	d := s.Dirs()
	var base []string
	if m.opts.InheritEnv {
		base = os.Environ()
	}
	return append(append(base,
		"CUDA_MPS_PIPE_DIRECTORY="+d.Pipe,
		"CUDA_MPS_LOG_DIRECTORY="+d.Log,
		"CUDA_VISIBLE_DEVICES="+s.VisibleDevices(),
	), m.opts.Env...)
}

// start starts the daemon as NVIDIA's mps-control-daemon does: compute
// mode EXCLUSIVE_PROCESS, `nvidia-cuda-mps-control -d`, the per-GPU pinned
// memory limits and the active thread percentage, then the .started marker.
func (m *Manager) start(ctx context.Context, s Spec) (*process, error) {
	if m.opts.Prepare != nil {
		if err := m.opts.Prepare(s); err != nil {
			return nil, err
		}
	}
	d := s.Dirs()
	for _, dir := range []string{d.Pipe, d.Log} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("creating %s: %w", dir, err)
		}
	}
	_ = os.Remove(d.Started)
	if set := m.opts.ComputeMode; set != nil {
		if err := set(ctx, gpuUUIDs(s), "EXCLUSIVE_PROCESS"); err != nil {
			return nil, fmt.Errorf("setting compute mode EXCLUSIVE_PROCESS: %w", err)
		}
	}
	sctx, cancel := context.WithTimeout(ctx, m.opts.ReadyTimeout)
	defer cancel()
	cmd := exec.CommandContext(sctx, m.opts.Binary, "-d")
	cmd.Env = m.env(s)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("%s -d: %w%s", m.opts.Binary, err, outputTail(out))
	}
	p := m.adopt(d.Pipe)
	// The daemon may take a moment to listen: ask until it answers.
	var err error
	for {
		if _, err = m.command(sctx, s, "get_default_active_thread_percentage"); err == nil {
			break
		}
		select {
		case <-sctx.Done():
			p.kill()
			return nil, fmt.Errorf("the MPS control daemon did not answer within %s: %w", m.opts.ReadyTimeout, err)
		case <-p.exited:
			return nil, fmt.Errorf("the MPS control daemon exited while starting: %w", p.exitErr)
		case <-time.After(50 * time.Millisecond):
		}
	}
	cmds := make([]string, 0, len(s.GPUs)+1)
	for _, l := range s.PinnedLimits() {
		cmds = append(cmds, "set_default_device_pinned_mem_limit "+l.Device+" "+l.Value)
	}
	cmds = append(cmds, "set_default_active_thread_percentage "+strconv.Itoa(s.ThreadPercentage()))
	for _, c := range cmds {
		out, err := m.command(ctx, s, c)
		if err == nil && strings.TrimSpace(out) != "" {
			err = errors.New(strings.TrimSpace(out)) // a set command answers nothing when it worked
		}
		if err != nil {
			m.stop(s, p)
			return nil, fmt.Errorf("%s: %w", c, err)
		}
	}
	if err := os.WriteFile(d.Started, nil, 0o644); err != nil {
		m.stop(s, p)
		return nil, fmt.Errorf("writing %s: %w", d.Started, err)
	}
	return p, nil
}

// command sends one control command and returns the daemon's answer.
func (m *Manager) command(ctx context.Context, s Spec, line string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, m.opts.CommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, m.opts.Binary)
	cmd.Env = m.env(s)
	cmd.Stdin = strings.NewReader(line + "\n")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s: %w%s", strings.Fields(line)[0], err, outputTail(errOut.Bytes()))
	}
	return out.String(), nil
}

// stop quits the daemon (`quit`, then SIGKILL if it lingers), removes the
// .started marker and gives the GPUs back their DEFAULT compute mode.
func (m *Manager) stop(s Spec, p *process) {
	ctx, cancel := context.WithTimeout(context.Background(), m.opts.CommandTimeout)
	defer cancel()
	if _, err := m.command(ctx, s, "quit"); err != nil {
		m.log.Warn("MPS control daemon did not take quit; killing it", "resource", s.Resource, "err", err)
		p.kill()
	} else if p.proc != nil {
		select {
		case <-p.exited:
		case <-time.After(m.opts.CommandTimeout):
			m.log.Warn("MPS control daemon still running after quit; killing it", "resource", s.Resource, "pid", p.pid)
			p.kill()
		}
	}
	m.cleanup(s)
	m.log.Info("MPS control daemon stopped", "resource", s.Resource)
}

// cleanup removes the .started marker and resets the compute mode.
func (m *Manager) cleanup(s Spec) {
	_ = os.Remove(s.Dirs().Started)
	if set := m.opts.ComputeMode; set != nil {
		ctx, cancel := context.WithTimeout(context.Background(), m.opts.CommandTimeout)
		defer cancel()
		if err := set(ctx, gpuUUIDs(s), "DEFAULT"); err != nil {
			m.log.Warn("cannot set the GPUs' compute mode back to DEFAULT", "resource", s.Resource, "err", err)
		}
	}
}

// adopt finds the daemon -d left running (the process of our binary whose
// environment names this pipe directory) and waits for its exit in the
// background. Not found, the returned process never reports an exit, and
// the probes alone watch the daemon.
func (m *Manager) adopt(pipe string) *process {
	p := &process{exited: make(chan struct{})}
	pid := findDaemon(filepath.Base(m.opts.Binary), "CUDA_MPS_PIPE_DIRECTORY="+pipe)
	if pid == 0 {
		m.log.Warn("cannot find the MPS control daemon's process; its exit is seen by probing only", "pipe", pipe)
		return p
	}
	proc, err := os.FindProcess(pid)
	if err != nil {
		return p
	}
	p.pid, p.proc = pid, proc
	go func() {
		defer close(p.exited)
		st, err := proc.Wait()
		if err == nil {
			p.exitErr = fmt.Errorf("the MPS control daemon (pid %d) exited: %s", pid, st)
			return
		}
		// Not our child (no subreaper): poll until it is gone.
		for proc.Signal(zeroSignal) == nil {
			time.Sleep(200 * time.Millisecond)
		}
		p.exitErr = fmt.Errorf("the MPS control daemon (pid %d) exited", pid)
	}()
	return p
}

// findDaemon returns the pid of a process running an executable named exe
// whose environment holds envEntry, or 0.
func findDaemon(exe, envEntry string) int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	want := []byte(envEntry + "\x00")
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		target, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || filepath.Base(strings.TrimSuffix(target, " (deleted)")) != exe {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || !bytes.Contains(append([]byte{0}, env...), append([]byte{0}, want...)) {
			continue
		}
		if isZombie(pid) {
			continue
		}
		return pid
	}
	return 0
}

func isZombie(pid int) bool {
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return true
	}
	// The state follows the command name's closing parenthesis.
	i := bytes.LastIndexByte(stat, ')')
	return i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z'
}

func gpuUUIDs(s Spec) []string {
	out := make([]string, len(s.GPUs))
	for i, g := range s.GPUs {
		out[i] = g.UUID
	}
	return out
}

// outputTail is a command's output for an error message: trimmed, the
// last 500 bytes at most.
func outputTail(out []byte) string {
	s := strings.TrimSpace(string(out))
	if s == "" {
		return ""
	}
	if len(s) > 500 {
		s = "…" + s[len(s)-500:]
	}
	return ": " + s
}

// zeroSignal checks that a process exists without signalling it.
const zeroSignal = syscall.Signal(0)
