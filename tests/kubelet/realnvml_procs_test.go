package kubelet

// Compute processes for per-pod accounting on the production NVML path:
// the telemetry backend reading the fake libnvidia-ml.so.1, loaded in this
// process through go-nvml's real dlopen (C structs, the v3 process call,
// the count-then-fill utilization call), with real `sleep` PIDs registered
// through its control socket on a whole GPU and on a MIG device.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
)

// procsChildEnv marks the child process TestRealNVMLBackendProcesses runs
// its checks in.
const procsChildEnv = "GPU_PLUGIN_PROCS_CHILD"

func TestRealNVMLBackendProcesses(t *testing.T) {
	requireKubeletNamespace(t)
	libDir := fakeNVMLDir(t)
	if !inFakeNVMLChild(t, procsChildEnv, libDir, "dgx-a100-mig") {
		return
	}
	ours, inv := openFakeNVML(t, libDir)
	layout := telemetry.NewLayout(inv, 1)
	backend := nvmlbackend.New(nvmlbackend.Options{Lib: ours})
	defer backend.Close()
	sample := func(fields telemetry.Mask) map[string]telemetry.Result {
		t.Helper()
		out := make([]telemetry.Result, len(layout.Targets))
		req := &telemetry.Request{Inventory: inv, Targets: layout.Targets, Fields: fields, Processes: true, Out: out}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := backend.Sample(ctx, req); err != nil {
			t.Fatal(err)
		}
		res := map[string]telemetry.Result{}
		for i, tg := range layout.Targets {
			if out[i].Err != nil {
				t.Fatalf("%s: %v", tg.Key, out[i].Err)
			}
			res[tg.Key] = out[i]
		}
		return res
	}

	// GPU 5 is whole; GPU 1's 2g.10gb is GPU instance 4 (the README's table).
	whole := inv.GPUs[5]
	var mig nvml.MIGDevice
	for _, m := range inv.GPUs[1].MIGDevices {
		if m.GPUInstanceID == 4 {
			mig = m
		}
	}
	if whole.MIGEnabled || mig.UUID == "" {
		t.Fatalf("dgx-a100-mig: GPU 5 MIG %v, GPU 1's MIG devices %+v", whole.MIGEnabled, inv.GPUs[1].MIGDevices)
	}
	var pids []uint32
	for range 3 {
		c := exec.Command("sleep", "60")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { c.Process.Kill(); c.Wait() }()
		pids = append(pids, uint32(c.Process.Pid))
	}
	ctl := fakeCtl(t, os.Getenv("FAKE_NVML_SOCKET"))
	ctl(fmt.Sprintf("proc 5 %d 1024 40 10", pids[0]))
	ctl(fmt.Sprintf("proc 5 %d 512", pids[1]))
	ctl(fmt.Sprintf("proc 1 %d 300 0 0 4 0", pids[2]))

	byPID := func(ps ...telemetry.Process) []telemetry.Process {
		slices.SortFunc(ps, func(a, b telemetry.Process) int { return int(a.PID) - int(b.PID) })
		return ps
	}
	check := func(round string, res map[string]telemetry.Result, sm float64) {
		t.Helper()
		r := res[whole.UUID]
		want := byPID(telemetry.Process{PID: pids[0], MemoryBytes: 1 << 30, SMUtil: sm}, telemetry.Process{PID: pids[1], MemoryBytes: 512 << 20})
		if !r.ProcsRead || !r.ProcUtil || !slices.Equal(r.Procs, want) {
			t.Errorf("%s: GPU 5: read %v util %v procs %+v, want %+v", round, r.ProcsRead, r.ProcUtil, r.Procs, want)
		}
		r = res[mig.UUID]
		want = []telemetry.Process{{PID: pids[2], MemoryBytes: 300 << 20}}
		if !r.ProcsRead || r.ProcUtil || !slices.Equal(r.Procs, want) {
			t.Errorf("%s: MIG device %s: read %v util %v procs %+v, want memory only %+v", round, mig.UUID, r.ProcsRead, r.ProcUtil, r.Procs, want)
		}
		for _, m := range inv.GPUs[1].MIGDevices {
			if r := res[m.UUID]; m.UUID != mig.UUID && (!r.ProcsRead || len(r.Procs) != 0) {
				t.Errorf("%s: idle MIG device %s: read %v procs %+v", round, m.UUID, r.ProcsRead, r.Procs)
			}
		}
	}
	fields := telemetry.DefaultMetricSet().Fields()
	res := sample(fields)
	check("first round", res, 40)
	r := res[whole.UUID]
	if used, ok := r.Get(telemetry.FBUsed); !ok || used < 1536 {
		t.Errorf("GPU 5's fields beside its processes: FB used %v %v, want at least the processes' 1536 MiB", used, ok)
	}
	time.Sleep(250 * time.Millisecond) // the driver's next 1/6 s sampling period
	check("the next sampling period", sample(fields), 40)
	// Idle now: no sample newer than the last one seen, still listed.
	ctl(fmt.Sprintf("proc 5 %d 1024 0 0", pids[0]))
	time.Sleep(250 * time.Millisecond)
	check("idle", sample(fields), 0)
	// Processes only (DCGM serving the fields).
	res = sample(0)
	check("processes only", res, 0)
	if r := res[whole.UUID]; r.Have != 0 {
		t.Errorf("processes only: fields %b read too", r.Have)
	}
	if calls := ctl("calls"); strings.Contains(calls, "nvmlDeviceGetProcessesUtilizationInfo") {
		t.Errorf("the backend called nvmlDeviceGetProcessesUtilizationInfo, which go-nvml v0.13.4-1 cannot use: %s", calls)
	}
}

// inFakeNVMLChild runs the test t (a subtest too) again in a child
// process of this test binary, with childEnv=1, the library on profile
// and a control socket of its own in FAKE_NVML_SOCKET, and reports false;
// in that child it reports true: the caller runs its checks. The library
// reads its profile and socket once, when first loaded, and is never
// unloaded: another test of this binary may have loaded it already, so
// checks on it run in a child process of their own. The child's failure
// fails t, its skip skips t.
func inFakeNVMLChild(t *testing.T, childEnv, libDir, profile string) bool {
	t.Helper()
	if os.Getenv(childEnv) != "" {
		return true
	}
	var run []string
	for _, name := range strings.Split(t.Name(), "/") {
		run = append(run, "^"+regexp.QuoteMeta(name)+"$")
	}
	cmd := exec.Command(os.Args[0], "-test.run="+strings.Join(run, "/"), "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"=1", fakeNVMLEnv+"="+libDir,
		"FAKE_NVML_PROFILE="+profile, "FAKE_NVML_SOCKET="+filepath.Join(t.TempDir(), "ctl.sock"))
	out, err := cmd.CombinedOutput()
	switch {
	case err == nil && strings.Contains(string(out), "--- SKIP: "+t.Name()+" "):
		t.Skipf("skipped in the child process:\n%s", out)
	case err != nil || !strings.Contains(string(out), "--- PASS: "+t.Name()+" "):
		t.Fatalf("the checks in a child process (%v):\n%s", err, out)
	}
	t.Logf("child process:\n%s", out)
	return false
}

// openFakeNVML opens the fake library through go-nvml's real dlopen (in a
// child process: inFakeNVMLChild) and scans it as the daemon does, with
// the driver's mig-minors for 8 GPUs; the library is closed at cleanup.
func openFakeNVML(t *testing.T, libDir string) (*nvml.Library, *nvml.Inventory) {
	t.Helper()
	lib := gonvml.New(gonvml.WithLibraryPath(filepath.Join(libDir, fakeNVMLSoname)))
	ours, err := nvml.Open(lib)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ours.Close() })
	procRoot := t.TempDir()
	minors := filepath.Join(procRoot, "driver", "nvidia-caps", "mig-minors")
	if err := os.MkdirAll(filepath.Dir(minors), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(minors, nvml.DriverMIGMinors(8), 0o444); err != nil {
		t.Fatal(err)
	}
	inv, err := nvml.Scan(ours, nvml.ScanOptions{ProcRoot: procRoot})
	if err != nil {
		t.Fatal(err)
	}
	return ours, inv
}

// fakeCtl returns a function sending one command to the fake library's
// control socket, failing the test unless the reply is "ok …".
func fakeCtl(t *testing.T, sock string) func(cmd string) string {
	return func(cmd string) string {
		t.Helper()
		c, err := net.DialTimeout("unix", sock, 5*time.Second)
		if err != nil {
			t.Fatalf("fake NVML control socket: %v", err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, cmd+"\n"); err != nil {
			t.Fatalf("fake NVML control %q: %v", cmd, err)
		}
		reply, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || !strings.HasPrefix(reply, "ok") {
			t.Fatalf("fake NVML control %q: %q %v", cmd, reply, err)
		}
		return strings.TrimSpace(reply)
	}
}
