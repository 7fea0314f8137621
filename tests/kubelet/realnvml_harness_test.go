package kubelet

// The real-NVML harness: the gpu-plugin binary as its own process, with no
// --simulate, loading the fake libnvidia-ml.so.1 of ../shared/tools/fakenvml
// through the dynamic linker exactly as it loads NVIDIA's; the library's
// control socket injects XIDs, lost GPUs and telemetry and counts every
// NVML function called. The library reads its environment once, when it is
// loaded, and keeps its state for the life of the process, so every
// scenario starts its own daemon process.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

const (
	// fakeNVMLEnv names a directory holding a built libnvidia-ml.so.1
	// (fakenvml/build.sh DIR); scripts/test-kubelet.sh sets it.
	fakeNVMLEnv = "FAKE_NVML_LIB"
	// binaryEnv names a gpu-plugin binary to test instead of building one.
	binaryEnv = "GPU_PLUGIN_BIN"
	// fakeNVMLSource is the library's source, beside this repository
	// (relative to tests/kubelet, where go test runs).
	fakeNVMLSource = "../../../shared/tools/fakenvml"
	// fakeNVMLSoname is what the daemon asks the dynamic linker for.
	fakeNVMLSoname = "libnvidia-ml.so.1"
)

// Both profiles of the fake library; every scenario runs on each.
var fakeProfiles = []string{"dgx1-v100", "dgx-h100"}

// artefacts are built once per test binary, into tempDir (removed by
// TestMain).
var artefacts struct {
	tempDir string

	libOnce sync.Once
	libDir  string
	libSkip string // why the real-NVML tests skip, if they do
	libErr  error

	binOnce sync.Once
	bin     string
	binErr  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if artefacts.tempDir != "" {
		os.RemoveAll(artefacts.tempDir)
	}
	os.Exit(code)
}

func artefactDir() (string, error) {
	if artefacts.tempDir == "" {
		dir, err := os.MkdirTemp("", "realnvml-")
		if err != nil {
			return "", err
		}
		artefacts.tempDir = dir
	}
	return artefacts.tempDir, nil
}

// fakeNVMLDir returns the directory holding the fake libnvidia-ml.so.1:
// $FAKE_NVML_LIB, or one built from ../shared/tools/fakenvml into a
// temporary directory (the source folder may be read-only). Without
// either, the test skips with one line, so a fresh clone passes.
func fakeNVMLDir(tb testing.TB) string {
	tb.Helper()
	artefacts.libOnce.Do(func() {
		if dir := os.Getenv(fakeNVMLEnv); dir != "" {
			if st, err := os.Stat(dir); err == nil && !st.IsDir() {
				dir = filepath.Dir(dir) // the library file itself
			}
			if _, err := os.Stat(filepath.Join(dir, fakeNVMLSoname)); err != nil {
				artefacts.libErr = fmt.Errorf("%s=%s: %w (build it with fakenvml/build.sh DIR)", fakeNVMLEnv, dir, err)
			}
			artefacts.libDir = dir
			return
		}
		src, err := filepath.Abs(fakeNVMLSource)
		if err == nil {
			_, err = os.Stat(filepath.Join(src, "build.sh"))
		}
		if err != nil {
			artefacts.libSkip = fmt.Sprintf("fake NVML library not available (no %s, no %s): real-NVML tests skipped", fakeNVMLEnv, fakeNVMLSource)
			return
		}
		dir, err := artefactDir()
		if err != nil {
			artefacts.libErr = err
			return
		}
		dir = filepath.Join(dir, "fakenvml")
		cmd := exec.Command("sh", filepath.Join(src, "build.sh"), dir)
		if out, err := cmd.CombinedOutput(); err != nil {
			artefacts.libErr = fmt.Errorf("building the fake NVML library (%s): %v\n%s", cmd, err, out)
			return
		}
		artefacts.libDir = dir
	})
	if artefacts.libSkip != "" {
		tb.Skip(artefacts.libSkip)
	}
	if artefacts.libErr != nil {
		tb.Fatal(artefacts.libErr)
	}
	return artefacts.libDir
}

// gpuPluginBinary returns $GPU_PLUGIN_BIN, or the daemon built once from
// the repository root (its own module and versions, as shipped).
func gpuPluginBinary(tb testing.TB) string {
	tb.Helper()
	artefacts.binOnce.Do(func() {
		if bin := os.Getenv(binaryEnv); bin != "" {
			artefacts.bin = bin
			return
		}
		dir, err := artefactDir()
		if err != nil {
			artefacts.binErr = err
			return
		}
		artefacts.bin = filepath.Join(dir, "gpu-plugin")
		cmd := exec.Command("go", "build", "-o", artefacts.bin, "./cmd/gpu-plugin")
		cmd.Dir = filepath.Join("..", "..")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			artefacts.binErr = fmt.Errorf("building gpu-plugin (%s in %s): %v\n%s", cmd, cmd.Dir, err, out)
		}
	})
	if artefacts.binErr != nil {
		tb.Fatal(artefacts.binErr)
	}
	return artefacts.bin
}

// realOptions describe one daemon process.
type realOptions struct {
	Profile string   // FAKE_NVML_PROFILE: dgx1-v100, dgx-h100 or a profile file
	Env     []string // more environment, e.g. FAKE_NVML_LOST=3
	Flags   []string // more daemon flags; later flags win
	// NoWait: startReal returns at once instead of waiting for the
	// daemon's "running" line (a process that exits by itself, or a start
	// being timed from outside).
	NoWait bool
}

// realDaemon is one gpu-plugin process on the fake library.
type realDaemon struct {
	tb      testing.TB
	cmd     *exec.Cmd
	pid     int
	tmp     string
	ctlPath string
	started time.Time
	log     *lineLog
	metrics string // the metrics listener, host:port

	exited   chan struct{}
	exitCode int // valid once exited is closed

	ctlMu   sync.Mutex
	ctlConn net.Conn
	ctlRd   *bufio.Reader

	httpc *http.Client
}

// realFlags are the flags of every daemon process: the real device
// manager's directory, a metrics listener on a free port, JSON logs, and
// every host-writing default (CDI specs, node labels) and sysfs inside tmp,
// so NUMA nodes can only come from NVML.
func realFlags(tmp string) []string {
	return []string{
		"--kubelet-socket-dir=" + pluginapi.DevicePluginPath,
		"--metrics-address=127.0.0.1:0",
		"--log-format=json",
		"--node-name=realnvml-node",
		"--cdi-spec-dir=" + filepath.Join(tmp, "cdi"),
		"--labels-file=" + filepath.Join(tmp, "features.d", "gpu-plugin"),
		"--sys-root=" + filepath.Join(tmp, "sys"),
	}
}

// realEnv is the whole environment of a daemon process: nothing of the
// test's own (no stray GPU_PLUGIN_*, NVIDIA or FAKE_NVML_* variables), the
// fake library on the dynamic linker's path, its profile and control
// socket.
func realEnv(libDir, profile, ctl string, extra []string) []string {
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"LD_LIBRARY_PATH=" + libDir,
		"FAKE_NVML_PROFILE=" + profile,
		"FAKE_NVML_SOCKET=" + ctl,
	}
	return append(env, extra...)
}

// startReal starts a daemon process and, unless opts.NoWait, waits until it
// logs that it runs. It is stopped (SIGTERM, then SIGKILL) at cleanup; a
// failed test gets the daemon's log.
func startReal(tb testing.TB, opts realOptions) *realDaemon {
	tb.Helper()
	lib, bin := fakeNVMLDir(tb), gpuPluginBinary(tb)
	tmp := tb.TempDir()
	d := &realDaemon{
		tb: tb, tmp: tmp, ctlPath: filepath.Join(tmp, "fakenvml.sock"), log: newLineLog(),
		exited: make(chan struct{}), httpc: &http.Client{Timeout: 10 * time.Second},
	}
	args := append(realFlags(tmp), opts.Flags...)
	d.cmd = exec.Command(bin, args...)
	d.cmd.Env = realEnv(lib, opts.Profile, d.ctlPath, opts.Env)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	// The daemon dies with the test binary, whatever happens to it.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	d.started = time.Now()
	if err := d.cmd.Start(); err != nil {
		tb.Fatalf("starting %s: %v", bin, err)
	}
	d.pid = d.cmd.Process.Pid
	go func() {
		err := d.cmd.Wait()
		d.exitCode = d.cmd.ProcessState.ExitCode()
		if d.exitCode < 0 && err != nil {
			d.log.Write([]byte("(test harness) " + err.Error() + "\n"))
		}
		close(d.exited)
	}()
	tb.Cleanup(func() {
		d.kill()
		d.ctlMu.Lock()
		if d.ctlConn != nil {
			d.ctlConn.Close()
		}
		d.ctlMu.Unlock()
		if tb.Failed() {
			tb.Logf("daemon (pid %d, %s, env %q) log:\n%s", d.pid, strings.Join(args, " "), opts.Env, d.log.String())
		}
	})
	if !opts.NoWait {
		d.waitRunning()
	}
	return d
}

// waitRunning waits for the daemon's "gpu-plugin running" line, takes the
// metrics address from it and returns the line.
func (d *realDaemon) waitRunning() logLine {
	d.tb.Helper()
	line := d.waitLog("the daemon running", func(l logLine) bool { return l.Msg == "gpu-plugin running" })
	d.metrics, _ = line.Fields["metrics"].(string)
	if d.metrics == "" {
		d.tb.Fatalf("the daemon's running line names no metrics address: %v", line.Fields)
	}
	return line
}

// kill stops the process if it still runs: SIGTERM, then SIGKILL.
func (d *realDaemon) kill() {
	select {
	case <-d.exited:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		d.tb.Errorf("daemon pid %d ignored SIGTERM for 10s; killing it", d.pid)
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
}

// terminate sends SIGTERM and waits (bounded) for the exit; it returns the
// exit code and how long the process took to exit.
func (d *realDaemon) terminate() (int, time.Duration) {
	d.tb.Helper()
	start := time.Now()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		d.tb.Fatalf("SIGTERM to pid %d: %v", d.pid, err)
	}
	return d.waitExit(), time.Since(start)
}

// waitExit waits (bounded) for the process to exit and returns its code.
func (d *realDaemon) waitExit() int {
	d.tb.Helper()
	select {
	case <-d.exited:
		return d.exitCode
	case <-time.After(waitTimeout):
		d.tb.Fatalf("daemon pid %d still running %v later", d.pid, waitTimeout)
		return -1
	}
}

// ctl sends one command to the fake library's control socket and returns
// its reply line. The library serves one connection at a time, so the
// daemon's connection is kept open.
func (d *realDaemon) ctl(cmd string) (string, error) {
	d.ctlMu.Lock()
	defer d.ctlMu.Unlock()
	if d.ctlConn == nil {
		c, err := net.DialTimeout("unix", d.ctlPath, 5*time.Second)
		if err != nil {
			return "", fmt.Errorf("fake NVML control socket %s: %w", d.ctlPath, err)
		}
		d.ctlConn, d.ctlRd = c, bufio.NewReader(c)
	}
	_ = d.ctlConn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(d.ctlConn, cmd+"\n"); err != nil {
		return "", fmt.Errorf("fake NVML control %q: %w", cmd, err)
	}
	reply, err := d.ctlRd.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("fake NVML control %q: %w", cmd, err)
	}
	return strings.TrimSuffix(reply, "\n"), nil
}

// mustCtl is ctl for commands that must succeed ("ok …").
func (d *realDaemon) mustCtl(cmd string) string {
	d.tb.Helper()
	reply, err := d.ctl(cmd)
	if err != nil {
		d.tb.Fatal(err)
	}
	if !strings.HasPrefix(reply, "ok") {
		d.tb.Fatalf("fake NVML control %q: %s", cmd, reply)
	}
	return strings.TrimSpace(strings.TrimPrefix(reply, "ok"))
}

// xid injects an XID on a GPU and checks that the daemon's one event set
// received it.
func (d *realDaemon) xid(gpu, code int) {
	d.tb.Helper()
	if got := d.mustCtl(fmt.Sprintf("xid %d %d", gpu, code)); got != "delivered=1" {
		d.tb.Fatalf("XID %d on GPU %d: %s, want delivered=1 (the daemon's one event set)", code, gpu, got)
	}
}

// keyValues parses "k=v k=v" reply words.
func keyValues(s string) map[string]string {
	out := map[string]string{}
	for _, w := range strings.Fields(s) {
		if k, v, ok := strings.Cut(w, "="); ok {
			out[k] = v
		}
	}
	return out
}

// nvmlCalls is the library's count of calls per NVML function; stubs that
// answer NOT_SUPPORTED are named with a trailing "!".
type nvmlCalls map[string]uint64

func (d *realDaemon) calls() nvmlCalls {
	d.tb.Helper()
	out := nvmlCalls{}
	for k, v := range keyValues(d.mustCtl("calls")) {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			d.tb.Fatalf("calls: %s=%q is not a count", k, v)
		}
		out[k] = n
	}
	return out
}

// minus is the calls made since before, by function (only those that
// changed).
func (c nvmlCalls) minus(before nvmlCalls) nvmlCalls {
	out := nvmlCalls{}
	for k, n := range c {
		if n != before[k] {
			out[k] = n - before[k]
		}
	}
	return out
}

func (c nvmlCalls) total() uint64 {
	var n uint64
	for _, v := range c {
		n += v
	}
	return n
}

func (c nvmlCalls) String() string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%d", k, c[k])
	}
	if b.Len() == 0 {
		return "none"
	}
	return b.String()
}

// profileGPU is one GPU as the fake library defines it.
type profileGPU struct{ UUID, BusID string }

// profileGPUs asks the library for its GPUs (ping for the count, get for
// each GPU's identity).
func (d *realDaemon) profileGPUs() []profileGPU {
	d.tb.Helper()
	n, err := strconv.Atoi(keyValues(d.mustCtl("ping"))["gpus"])
	if err != nil || n <= 0 {
		d.tb.Fatalf("fake NVML ping: no GPU count: %v", err)
	}
	out := make([]profileGPU, n)
	for i := range out {
		kv := keyValues(d.mustCtl(fmt.Sprintf("get %d", i)))
		out[i] = profileGPU{UUID: kv["uuid"], BusID: kv["busid"]}
	}
	return out
}

func (d *realDaemon) uuids() []string {
	var out []string
	for _, g := range d.profileGPUs() {
		out = append(out, g.UUID)
	}
	return out
}

// httpGet fetches a path from the metrics listener.
func (d *realDaemon) httpGet(path string) (int, string) {
	d.tb.Helper()
	resp, err := d.httpc.Get("http://" + d.metrics + path)
	if err != nil {
		d.tb.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		d.tb.Fatalf("GET %s: reading the body: %v", path, err)
	}
	return resp.StatusCode, string(body)
}

func (d *realDaemon) debugDevices() daemon.DebugDevices {
	d.tb.Helper()
	code, body := d.httpGet("/debug/devices")
	var doc daemon.DebugDevices
	if code != http.StatusOK {
		d.tb.Fatalf("/debug/devices: %d %s", code, body)
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		d.tb.Fatalf("/debug/devices: %v\n%s", err, body)
	}
	return doc
}

// registrations is how often the resource registered, per /debug/devices.
func (d *realDaemon) registrations(resource string) (n uint64, registered bool) {
	for _, st := range d.debugDevices().Resources {
		if st.Resource == resource {
			return st.Registrations, st.Registered && st.LastRegisterError == ""
		}
	}
	return 0, false
}

// waitRegistrations waits until the resource has registered at least n
// times and says it is registered: capacity shows in the kubelet before
// our Register call returns.
func (d *realDaemon) waitRegistrations(resource string, n uint64) {
	d.tb.Helper()
	var got uint64
	var ok bool
	if err := pollHTTP(func() bool { got, ok = d.registrations(resource); return ok && got >= n }); err != nil {
		d.tb.Fatalf("%s: %d registrations (registered %v), want at least %d within %v", resource, got, ok, n, waitTimeout)
	}
}

// pollHTTP is poll for conditions read from the daemon's HTTP listener,
// paced so that the asking does not load the daemon being measured.
func pollHTTP(cond func() bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// procStatus reads one "Name: value" line of /proc/<pid>/status.
func (d *realDaemon) procStatus(name string) int {
	d.tb.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.pid))
	if err != nil {
		d.tb.Fatalf("reading the daemon's status: %v", err)
	}
	for line := range strings.Lines(string(raw)) {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			n, err := strconv.Atoi(strings.Fields(v)[0])
			if err != nil {
				d.tb.Fatalf("/proc/%d/status %s: %v", d.pid, name, err)
			}
			return n
		}
	}
	d.tb.Fatalf("/proc/%d/status has no %s", d.pid, name)
	return 0
}

// procUsage is what a long-running process must not accumulate.
type procUsage struct{ Threads, FDs int }

func (u procUsage) String() string { return fmt.Sprintf("%d threads, %d open fds", u.Threads, u.FDs) }

func (d *realDaemon) usage() procUsage {
	d.tb.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.pid))
	if err != nil {
		d.tb.Fatalf("counting the daemon's open fds: %v", err)
	}
	return procUsage{Threads: d.procStatus("Threads"), FDs: len(fds)}
}

// clockTick is the unit of utime and stime in /proc/<pid>/stat
// (sysconf(_SC_CLK_TCK), 100 on Linux).
const clockTick = 10 * time.Millisecond

// cpuTime is the CPU time the process used so far (user + system, all
// threads, dead ones included).
func (d *realDaemon) cpuTime() time.Duration {
	d.tb.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", d.pid))
	if err != nil {
		d.tb.Fatalf("reading the daemon's stat: %v", err)
	}
	// The fields after the command name: state is field 3, utime 14, stime 15.
	_, rest, _ := strings.Cut(string(raw), ") ")
	f := strings.Fields(rest)
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		d.tb.Fatalf("/proc/%d/stat: utime %q stime %q", d.pid, f[11], f[12])
	}
	return time.Duration(utime+stime) * clockTick
}

// cpuShare measures the process's CPU use over window, as a share of one
// core; logged says how many log lines it wrote meanwhile.
func (d *realDaemon) cpuShare(window time.Duration) (share float64, logged int) {
	d.tb.Helper()
	lines0, cpu0, t0 := d.log.Len(), d.cpuTime(), time.Now()
	time.Sleep(window) // the measurement itself: CPU over a wall-clock window
	cpu1, t1 := d.cpuTime(), time.Now()
	return float64(cpu1-cpu0) / float64(t1.Sub(t0)), d.log.Len() - lines0
}

// pluginClient dials the daemon's socket for resource directly, as the
// kubelet does.
func (d *realDaemon) pluginClient(resource string) pluginapi.DevicePluginClient {
	d.tb.Helper()
	conn, err := grpc.NewClient("unix://"+filepath.Join(pluginapi.DevicePluginPath, sharing.SocketName(resource)),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		d.tb.Fatalf("dialling the plugin socket for %s: %v", resource, err)
	}
	d.tb.Cleanup(func() { conn.Close() })
	return pluginapi.NewDevicePluginClient(conn)
}

// logLine is one JSON log line of the daemon.
type logLine struct {
	Level, Msg string
	Fields     map[string]any
	Raw        string
}

// lineLog collects the daemon's output and wakes waiters on every write.
type lineLog struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	lines   []string
	partial []byte
	changed chan struct{}
}

func newLineLog() *lineLog { return &lineLog{changed: make(chan struct{})} }

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		l.lines = append(l.lines, string(l.partial[:i]))
		l.partial = l.partial[i+1:]
	}
	close(l.changed)
	l.changed = make(chan struct{})
	return len(p), nil
}

func (l *lineLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// Len is the number of complete lines so far.
func (l *lineLog) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.lines)
}

// since returns the lines from index i on and a channel closed at the
// next write.
func (l *lineLog) since(i int) ([]string, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.lines[min(i, len(l.lines)):]), l.changed
}

func parseLogLine(raw string) logLine {
	l := logLine{Raw: raw}
	if err := json.Unmarshal([]byte(raw), &l.Fields); err != nil {
		return l // not JSON: e.g. a message of the fake library
	}
	l.Level, _ = l.Fields["level"].(string)
	l.Msg, _ = l.Fields["msg"].(string)
	return l
}

// waitLog waits (bounded) for a log line matching ok and returns it; it
// fails early if the process exits first.
func (d *realDaemon) waitLog(what string, ok func(logLine) bool) logLine {
	d.tb.Helper()
	deadline := time.After(waitTimeout)
	seen := 0
	for {
		lines, changed := d.log.since(seen)
		seen += len(lines)
		for _, raw := range lines {
			if l := parseLogLine(raw); ok(l) {
				return l
			}
		}
		select {
		case <-changed:
		case <-d.exited:
			// Drain what was written before the exit.
			if lines, _ := d.log.since(seen); len(lines) > 0 {
				continue
			}
			d.tb.Fatalf("waiting for %s: the daemon exited with code %d", what, d.exitCode)
		case <-deadline:
			d.tb.Fatalf("waiting for %s: not logged within %v", what, waitTimeout)
		}
	}
}

// capacityWatch wakes on every change in the device-plugin directory,
// which the manager makes right after each device update (it writes its
// checkpoint there: a temporary file renamed over the old one), so a
// latency measured with it is not rounded up to a polling interval.
type capacityWatch struct {
	k    *kubelet
	f    *os.File
	wake chan struct{}
	done chan struct{}
}

// watchCapacity starts the watch; it ends at cleanup. Start it after
// startKubelet (which recreates the directory).
func watchCapacity(tb testing.TB, k *kubelet) *capacityWatch {
	tb.Helper()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		tb.Fatalf("inotify: %v", err)
	}
	if _, err := unix.InotifyAddWatch(fd, pluginapi.DevicePluginPath, unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO|unix.IN_CREATE|unix.IN_DELETE); err != nil {
		unix.Close(fd)
		tb.Fatalf("inotify watch on %s: %v", pluginapi.DevicePluginPath, err)
	}
	w := &capacityWatch{k: k, f: os.NewFile(uintptr(fd), "inotify"), wake: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		buf := make([]byte, 64<<10)
		for {
			if _, err := w.f.Read(buf); err != nil {
				return
			}
			select {
			case w.wake <- struct{}{}:
			default:
			}
		}
	}()
	tb.Cleanup(func() {
		w.f.Close()
		<-w.done
	})
	return w
}

// wait waits until resource shows want and returns when that was first
// seen, checking on every directory event and at least every millisecond.
func (w *capacityWatch) wait(resource string, want counts) time.Time {
	w.k.tb.Helper()
	deadline := time.After(waitTimeout)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var last counts
	for {
		if last = w.k.capacity(resource); last == want {
			return time.Now()
		}
		select {
		case <-w.wake:
		case <-tick.C:
		case <-deadline:
			w.k.tb.Fatalf("kubelet device manager: %s never showed %s within %v (last seen: %s)", resource, want, waitTimeout, last)
		}
	}
}

// percentile is the nearest-rank percentile q (0 < q ≤ 1) of xs.
func percentile(xs []time.Duration, q float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// loadAverage is the machine's 1-minute load average, for every figure:
// the build machine is shared.
func loadAverage() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Fields(string(raw))[0]
}
