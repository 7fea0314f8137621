package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// running is a daemon in this process with a stand-in kubelet.
type running struct {
	d       *daemon.Daemon
	kubelet *fakekubelet.Kubelet
	dir     string
	cancel  context.CancelFunc
	done    chan error
}

func loadConfig(t testing.TB, dir string, args ...string) *config.Config {
	t.Helper()
	base := []string{"--kubelet-socket-dir=" + dir, "--metrics-address=127.0.0.1:0", "--node-name=test-node"}
	cfg, _, err := config.Load("gpu-plugin", append(base, args...), func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func socketDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "gpd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func start(t testing.TB, withKubelet bool, args ...string) *running {
	t.Helper()
	r := &running{dir: socketDir(t), done: make(chan error, 1)}
	if withKubelet {
		k, err := fakekubelet.Start(r.dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(k.Stop)
		r.kubelet = k
	}
	r.run(t, slog.New(slog.DiscardHandler), args...)
	// New binds the listener, so its address is known before Run.
	if r.d.Addr() == "" {
		t.Fatal("the daemon has no metrics listener after New")
	}
	return r
}

// eventually polls cond (at once, then every 5 ms) until it holds; the test
// fails after 20 s, naming what and the last state cond described.
func eventually(t testing.TB, what string, cond func() (bool, string)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, last := cond()
		if ok {
			return
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("%s: not within 20 s; last seen: %s", what, last)
		}
	}
}

// run starts a daemon in r.dir, running until the test ends.
func (r *running) run(t testing.TB, log *slog.Logger, args ...string) {
	t.Helper()
	d, err := daemon.New(loadConfig(t, r.dir, args...), log)
	if err != nil {
		t.Fatal(err)
	}
	r.d = d
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-r.done; err != nil {
			t.Errorf("daemon Run: %v", err)
		}
		d.Close()
	})
}

func get(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestDaemonEndToEnd(t *testing.T) {
	r := start(t, true, "--simulate=dgx-h100")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 8, 8); err != nil {
		t.Fatal(err)
	}
	base := "http://" + r.d.Addr()
	waitReady(t, base)
	if code, body := get(t, base+"/healthz"); code != 200 || !strings.Contains(body, "ok") {
		t.Errorf("/healthz: %d %q", code, body)
	}

	// A fault injected through /sim is seen by the production code path.
	resp, err := http.Post(base+"/sim/gpus/2/lost", "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/sim: %v %v", err, resp)
	}
	resp.Body.Close()

	code, body := get(t, base+"/debug/devices")
	var doc daemon.DebugDevices
	if err := json.Unmarshal([]byte(body), &doc); err != nil || code != 200 {
		t.Fatalf("/debug/devices: %d %v", code, err)
	}
	if !doc.Simulated || doc.Node != "test-node" || len(doc.Inventory.GPUs) != 8 || len(doc.Resources) != 1 || !doc.Resources[0].Registered {
		t.Errorf("/debug/devices: %+v", doc)
	}

	alloc, err := r.kubelet.Allocate(ctx, "nvidia.com/gpu", doc.Inventory.GPUs[0].UUID)
	if err != nil || alloc.Envs["NVIDIA_VISIBLE_DEVICES"] != doc.Inventory.GPUs[0].UUID {
		t.Errorf("allocate: %v %v", alloc, err)
	}
	if code, body := get(t, base+"/metrics"); code != 200 || !strings.Contains(body, "gpu_plugin_build_info") {
		t.Errorf("/metrics: %d, build info missing", code)
	}
}

func waitReady(t testing.TB, base string) {
	t.Helper()
	eventually(t, "/readyz 200", func() (bool, string) {
		code, body := get(t, base+"/readyz")
		return code == 200, fmt.Sprintf("%d %q", code, body)
	})
}

// TestReadyzWithoutKubelet: /readyz is 503 and names why: kubelet.sock is
// missing. Then the socket is a dead one (connection refused) and then a
// directory stands where it should be; each cause is named.
func TestReadyzWithoutKubelet(t *testing.T) {
	r := start(t, false, "--simulate=pcie-l4x4")
	base := "http://" + r.d.Addr()
	sock := filepath.Join(r.dir, "kubelet.sock")
	for _, step := range []struct {
		setup func()
		want  string
	}{
		{func() {}, "kubelet.sock does not exist: the kubelet is not running"},
		{func() {
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close()
		}, "connection refused at " + sock},
		{func() {
			if err := os.Remove(sock); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(sock, 0o755); err != nil {
				t.Fatal(err)
			}
		}, "blocked by a directory"},
	} {
		step.setup()
		eventually(t, "/readyz naming "+step.want, func() (bool, string) {
			code, body := get(t, base+"/readyz")
			return code == 503 && strings.Contains(body, "nvidia.com/gpu not registered with the kubelet: ") && strings.Contains(body, step.want),
				fmt.Sprintf("%d %q", code, body)
		})
	}
}

// TestNoSimRoutesOnRealNodes: the control API exists only with --simulate.
func TestNoSimRoutesOnRealNodes(t *testing.T) {
	r := start(t, false, "--nvml-library="+filepath.Join(t.TempDir(), "missing.so"), "--fail-on-init-error=false")
	base := "http://" + r.d.Addr()
	if code, _ := get(t, base+"/sim/gpus"); code != 404 {
		t.Errorf("/sim/gpus on a real node: %d, want 404", code)
	}
}

// TestNVMLInitFailure covers failOnInitError both ways.
func TestNVMLInitFailure(t *testing.T) {
	missing := "--nvml-library=" + filepath.Join(t.TempDir(), "libnvidia-ml.so.1")

	_, err := daemon.New(loadConfig(t, socketDir(t), missing), slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "ERROR_LIBRARY_NOT_FOUND") || !strings.Contains(err.Error(), "--simulate") ||
		!strings.Contains(err.Error(), "--fail-on-init-error=false") {
		t.Errorf("failOnInitError=true: %v; want the cause and both ways out named", err)
	}

	r := start(t, true, missing, "--fail-on-init-error=false")
	base := "http://" + r.d.Addr()
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz with NVML down: %d, want 200 (alive)", code)
	}
	code, body := get(t, base+"/readyz")
	if code != 503 || !strings.Contains(body, "NVML unavailable") {
		t.Errorf("/readyz with NVML down: %d %q", code, body)
	}
	// Without NVML the daemon serves no resource, so nothing can register.
	if st := r.d.Plugins().Status(); len(st) != 0 {
		t.Errorf("serving %+v without NVML", st)
	}
	if res := r.kubelet.Resources(); len(res) != 0 {
		t.Errorf("registered %v without NVML", res)
	}
}

// TestLostGPUAtStart: a GPU lost before the daemon starts is not advertised;
// the others are, and the daemon reports the missing one.
func TestLostGPUAtStart(t *testing.T) {
	profile := filepath.Join(t.TempDir(), "lost.yaml")
	err := os.WriteFile(profile, []byte(`name: lost
gpus:
  - {model: H100-SXM5-80GB, count: 3, numaNode: 0}
  - {model: H100-SXM5-80GB, numaNode: 0, lost: true}
  - {model: H100-SXM5-80GB, count: 4, numaNode: 1}
`), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	r := start(t, true, "--simulate="+profile)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 7, 7); err != nil {
		t.Fatal(err)
	}
	g := r.d.Inventory().GPUs[3]
	if g.Usable() || !g.Lost || !strings.Contains(g.Problem, "GPU_IS_LOST") {
		t.Errorf("GPU 3 in the inventory: %+v; want it listed as lost with the reason", g)
	}
	_, body := get(t, "http://"+r.d.Addr()+"/debug/devices")
	if !strings.Contains(body, "ERROR_GPU_IS_LOST") {
		t.Errorf("/debug/devices does not report the lost GPU")
	}
}

// TestCDISpecWritten: with a CDI strategy the spec the names refer to exists.
func TestCDISpecWritten(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a simulated node's CDI spec needs device nodes in its driver root: mknod needs root")
	}
	specDir := t.TempDir()
	r := start(t, true, "--simulate=pcie-l4x4", "--device-list-strategy=cdi-cri", "--cdi-spec-dir="+specDir)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 4, 4); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(specDir, "k8s.device-plugin.nvidia.com-gpu.json"))
	if err != nil {
		t.Fatal(err)
	}
	uuid := r.d.Inventory().GPUs[2].UUID
	resp, err := r.kubelet.Allocate(ctx, "nvidia.com/gpu", uuid)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.CdiDevices) != 1 || resp.CdiDevices[0].Name != "k8s.device-plugin.nvidia.com/gpu="+uuid || !strings.Contains(string(raw), `"name":"`+uuid+`"`) {
		t.Errorf("allocated %v; spec holds the device: %v", resp.CdiDevices, strings.Contains(string(raw), uuid))
	}
	// The simulated node's spec comes from nvcdi on a laid-out driver root:
	// the driver's libraries and the hooks are there, as on a real node.
	for _, want := range []string{"libcuda.so." + r.d.Inventory().DriverVersion, `"create-symlinks"`, `"name":"all"`} {
		if !strings.Contains(string(raw), want) {
			t.Errorf("the CDI spec lacks %s", want)
		}
	}
}

// TestFailedStartIsQuiet: a start that fails (the device-plugin directory
// is missing) returns the cause and logs no telemetry warnings: the
// sampler's round was cut short by the shutdown, no device failed.
func TestFailedStartIsQuiet(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "device-plugins")
	var logs testkit.Buffer
	d, err := daemon.New(loadConfig(t, missing, "--simulate=dgx-a100-mig", "--node-labels=false", "--pod-resources-socket="),
		slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	err = d.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("Run with a missing device-plugin directory: %v, want an error naming %s", err, missing)
	}
	if n := logs.Count("level=WARN"); n != 0 {
		t.Errorf("a failed start logged %d warnings:\n%s", n, logs.String())
	}
}

// TestOversizedListReportedAndRecovered: an update hands the kubelet a
// device list over its 4 MiB limit; the stand-in kubelet, like the real
// one, drops the stream. /readyz names the cause, the registration metric
// goes to 0, and both recover once an update brings the list back.
func TestOversizedListReportedAndRecovered(t *testing.T) {
	r := start(t, true, "--simulate=pcie-l4x4", "--rescan-interval=0", "--node-labels=false")
	base := "http://" + r.d.Addr()
	waitReady(t, base)
	respond := advert.Respond(loadConfig(t, r.dir, "--simulate=pcie-l4x4"), advert.Env{})
	good := r.d.Plugins().Resources()[0]
	var devs []sharing.Device
	for i := range 13000 { // × 4 GPUs: about 4.7 MB encoded
		for _, d := range good.Devices {
			d.ID = fmt.Sprintf("%s::replica-with-a-long-name-%06d", d.ID, i)
			devs = append(devs, d)
		}
	}
	r.d.Plugins().Update([]*sharing.Resource{sharing.NewResource(good.Name, devs)}, respond)
	const metric = `gpu_plugin_resource_registered{resource="nvidia.com/gpu"} `
	eventually(t, "/readyz naming the oversized list", func() (bool, string) {
		code, body := get(t, base+"/readyz")
		return code == 503 && strings.Contains(body, "nvidia.com/gpu not registered with the kubelet: the kubelet dropped the ListAndWatch stream") &&
			strings.Contains(body, "over the kubelet's 4194304-byte gRPC message limit"), fmt.Sprintf("%d %q", code, body)
	})
	if _, body := get(t, base+"/metrics"); !strings.Contains(body, metric+"0") {
		t.Errorf("/metrics lacks %s0 while the kubelet drops the stream", metric)
	}
	r.d.Plugins().Update([]*sharing.Resource{good}, respond)
	waitReady(t, base)
	if _, body := get(t, base+"/metrics"); !strings.Contains(body, metric+"1") {
		t.Errorf("/metrics lacks %s1 after the fix", metric)
	}
	if c, a := r.kubelet.Capacity("nvidia.com/gpu"); c != 4 || a != 4 {
		t.Errorf("the kubelet shows %d/%d after the fix, want 4/4", c, a)
	}
}
