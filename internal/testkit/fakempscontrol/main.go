// Command fakempscontrol is a stand-in for NVIDIA's nvidia-cuda-mps-control,
// for tests of the daemon's CUDA MPS sharing on machines without a GPU.
// testkit.FakeMPSControl builds it as an executable named
// nvidia-cuda-mps-control. It is invoked the way the real one is:
//
//	nvidia-cuda-mps-control -d   start a control daemon in the background;
//	                             exit 0 once it accepts commands
//	nvidia-cuda-mps-control -f   run the control daemon in the foreground
//	nvidia-cuda-mps-control      send each line of stdin to the daemon as
//	                             a command and print its answers; exit 1 if
//	                             no daemon answers
//
// Environment, as for the real binary: CUDA_MPS_PIPE_DIRECTORY (the daemon
// listens on its unix socket "control") and CUDA_MPS_LOG_DIRECTORY (it
// appends to control.log there), both required here, so that a test never
// touches the real defaults /tmp/nvidia-mps and /var/log/nvidia-mps; the
// daemon logs CUDA_VISIBLE_DEVICES in its start line. It also writes its
// pid to $CUDA_MPS_PIPE_DIRECTORY/fake.pid (removed by quit), so that a test
// can kill a daemon left behind.
//
// Commands: set_default_active_thread_percentage N (1..100),
// get_default_active_thread_percentage (prints e.g. "100.0"),
// set_default_device_pinned_mem_limit DEV VALUE (VALUE: digits and an
// optional K, M, G or T), get_default_device_pinned_mem_limit DEV (prints
// the value as set, or "0M"), get_server_list (prints nothing), quit (the
// daemon removes its socket and exits 0 before the client returns), and the
// test-only die (the daemon exits 1 at once, leaving its socket file: a
// crash). Each command received is logged as "Cmd:<command>". Set commands
// print nothing; a bad command or argument prints one error line (the
// client still exits 0, as the real one does).
//
// Test controls, read from the environment of the -d invocation:
//
//	FAKE_MPS_READY_DELAY=<Go duration>  the daemon listens only after this
//	                                    delay, so -d takes at least as long
//	FAKE_MPS_FAIL_START=1               -d fails (exit 1) and starts nothing
//
// Limits: there is no MPS server, no GPU and no CUDA client; the settings
// are only stored and read back (DEV is any word, not checked against
// CUDA_VISIBLE_DEVICES; values are not normalised). The client-daemon
// protocol is this program's own: one command line per connection, the
// answer until EOF. The daemon serves one connection at a time.
//
// It imports only the standard library: testkit.FakeMPSControl keys its
// cache of the built binary on this directory's files and the Go version.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	daemonArg = "-fake-daemon" // hidden: the background process that -d starts
	startWait = 10 * time.Second
	ioTimeout = 5 * time.Second
)

func main() {
	switch args := os.Args[1:]; {
	case len(args) == 0:
		os.Exit(client())
	case len(args) == 1 && args[0] == "-d":
		os.Exit(start())
	case len(args) == 1 && (args[0] == "-f" || args[0] == daemonArg):
		os.Exit(daemon())
	default:
		fmt.Fprintf(os.Stderr, "nvidia-cuda-mps-control (fake): unsupported arguments %q (want none, -d or -f)\n", args)
		os.Exit(1)
	}
}

// dirs returns the pipe and log directories, made if missing.
func dirs() (pipe, logDir string, err error) {
	pipe, logDir = os.Getenv("CUDA_MPS_PIPE_DIRECTORY"), os.Getenv("CUDA_MPS_LOG_DIRECTORY")
	if pipe == "" || logDir == "" {
		return "", "", errors.New("CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY must both be set")
	}
	for _, d := range []string{pipe, logDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", "", err
		}
	}
	return pipe, logDir, nil
}

func fail(format string, a ...any) int {
	fmt.Fprintf(os.Stderr, "nvidia-cuda-mps-control (fake): "+format+"\n", a...)
	return 1
}

// answers reports whether a daemon accepts connections on socket.
func answers(socket string) bool {
	c, err := net.DialTimeout("unix", socket, time.Second)
	if err == nil {
		c.Close()
	}
	return err == nil
}

// start is -d: it starts the daemon as a new session (so it outlives the
// caller and its process group) and waits until it listens, as the real
// binary returns only once its daemon is up.
func start() int {
	if os.Getenv("FAKE_MPS_FAIL_START") == "1" {
		return fail("FAKE_MPS_FAIL_START=1: refusing to start the control daemon")
	}
	delay, err := readyDelay()
	if err != nil {
		return fail("%v", err)
	}
	pipe, logDir, err := dirs()
	if err != nil {
		return fail("%v", err)
	}
	socket := filepath.Join(pipe, "control")
	if answers(socket) {
		return fail("An instance of this daemon is already running (%s)", socket)
	}
	self, err := os.Executable()
	if err != nil {
		return fail("%v", err)
	}
	// The daemon's own stdout and stderr (a panic) go to the log too; none
	// of the caller's descriptors are inherited, so a caller reading -d's
	// output is not held open by the daemon.
	logFile, err := os.OpenFile(filepath.Join(logDir, "control.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fail("%v", err)
	}
	cmd := exec.Command(self, daemonArg)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fail("starting the control daemon: %v", err)
	}
	logFile.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(delay + startWait)
	for tick := time.NewTicker(10 * time.Millisecond); ; {
		select {
		case err := <-exited:
			return fail("the control daemon exited before it was ready (%v); see %s", err, logFile.Name())
		case <-deadline:
			cmd.Process.Kill()
			return fail("the control daemon did not listen on %s within %v", socket, delay+startWait)
		case <-tick.C:
			if answers(socket) {
				return 0
			}
		}
	}
}

func readyDelay() (time.Duration, error) {
	v := os.Getenv("FAKE_MPS_READY_DELAY")
	if v == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("FAKE_MPS_READY_DELAY: %v", err)
	}
	return d, nil
}

// state is what the daemon was told to set.
type state struct {
	threads float64
	pinned  map[string]string // device → limit as set
}

var memLimit = regexp.MustCompile(`^[0-9]+[KMGT]?$`)

func daemon() int {
	pipe, logDir, err := dirs()
	if err != nil {
		return fail("%v", err)
	}
	logFile, err := os.OpenFile(filepath.Join(logDir, "control.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fail("%v", err)
	}
	logf := func(format string, a ...any) {
		fmt.Fprintf(logFile, "[%s Control %5d] %s\n", time.Now().Format("2006-01-02 15:04:05.000"), os.Getpid(), fmt.Sprintf(format, a...))
	}
	socket, pidFile := filepath.Join(pipe, "control"), filepath.Join(pipe, "fake.pid")
	logf("Starting control daemon using socket %s (pid %d, CUDA_VISIBLE_DEVICES=%s)", socket, os.Getpid(), os.Getenv("CUDA_VISIBLE_DEVICES"))
	// Written before the delay, so that a test can kill a daemon that is
	// not ready yet.
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		logf("%v", err)
		return 1
	}
	delay, err := readyDelay()
	if err != nil {
		logf("%v", err)
		return 1
	}
	time.Sleep(delay)
	os.Remove(socket) // a crashed daemon's
	ln, err := net.Listen("unix", socket)
	if err != nil {
		logf("%v", err)
		return 1
	}
	logf("Control daemon ready")
	st := &state{threads: 100, pinned: map[string]string{}}
	for {
		c, err := ln.Accept()
		if err != nil {
			logf("accept: %v", err)
			return 1
		}
		c.SetDeadline(time.Now().Add(ioTimeout))
		line, _ := bufio.NewReader(c).ReadString('\n')
		line = strings.TrimSpace(line)
		if line == "" { // a readiness probe
			c.Close()
			continue
		}
		logf("Cmd:%s", line)
		switch line {
		case "die":
			os.Exit(1) // no cleanup at all, like a crash
		case "quit":
			// Gone before the client returns, so that a caller of quit can
			// rely on the socket being removed.
			ln.Close()
			os.Remove(socket)
			os.Remove(pidFile)
			logf("Exit")
			c.Close()
			return 0
		}
		io.WriteString(c, st.do(strings.Fields(line)))
		c.Close()
	}
}

// do runs one command and returns the answer to print.
func (st *state) do(f []string) string {
	switch {
	case f[0] == "get_default_active_thread_percentage" && len(f) == 1:
		return strconv.FormatFloat(st.threads, 'f', 1, 64) + "\n"
	case f[0] == "set_default_active_thread_percentage" && len(f) == 2:
		p, err := strconv.ParseFloat(f[1], 64)
		if err != nil || p < 1 || p > 100 {
			return fmt.Sprintf("Invalid active thread percentage %q: want a number in 1..100\n", f[1])
		}
		st.threads = p
		return ""
	case f[0] == "get_default_device_pinned_mem_limit" && len(f) == 2:
		if v, ok := st.pinned[f[1]]; ok {
			return v + "\n"
		}
		return "0M\n"
	case f[0] == "set_default_device_pinned_mem_limit" && len(f) == 3:
		if !memLimit.MatchString(f[2]) {
			return fmt.Sprintf("Invalid pinned memory limit %q: want digits and an optional K, M, G or T\n", f[2])
		}
		st.pinned[f[1]] = f[2]
		return ""
	case f[0] == "get_server_list" && len(f) == 1:
		return ""
	}
	return fmt.Sprintf("Unrecognized or malformed command: %s\n", strings.Join(f, " "))
}

// client sends each line of stdin to the daemon, one connection each.
func client() int {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		return fail("reading stdin: %v", err)
	}
	pipe := os.Getenv("CUDA_MPS_PIPE_DIRECTORY")
	if pipe == "" {
		return fail("CUDA_MPS_PIPE_DIRECTORY is not set")
	}
	socket := filepath.Join(pipe, "control")
	for line := range strings.Lines(string(in)) {
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		c, err := net.DialTimeout("unix", socket, ioTimeout)
		if err != nil {
			return fail("Cannot connect to the MPS control daemon at %s: %v", socket, err)
		}
		c.SetDeadline(time.Now().Add(ioTimeout))
		_, err = io.WriteString(c, line+"\n")
		if err == nil {
			_, err = io.Copy(os.Stdout, c)
		}
		c.Close()
		if err != nil {
			return fail("command %q: %v", line, err)
		}
	}
	return 0
}
