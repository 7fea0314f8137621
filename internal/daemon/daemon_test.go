package daemon_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
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
	// Wait for the listener to be bound (Run binds it first).
	deadline := time.Now().Add(5 * time.Second)
	for r.d.Addr() == "" && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	return r
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
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := get(t, base+"/readyz")
		if code == 200 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz still %d: %s", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestReadyzWithoutKubelet(t *testing.T) {
	r := start(t, false, "--simulate=pcie-l4x4")
	base := "http://" + r.d.Addr()
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, body := get(t, base+"/readyz")
		if code != 503 {
			t.Fatalf("/readyz without a kubelet: %d, want 503", code)
		}
		if strings.Contains(body, "nvidia.com/gpu not registered with the kubelet") && strings.Contains(body, "kubelet.sock") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz body %q does not explain the missing kubelet", body)
		}
		time.Sleep(20 * time.Millisecond)
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
	time.Sleep(200 * time.Millisecond) // give a wrong registration a chance to happen
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
}
