package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	fake "github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// podResources starts a stand-in for the kubelet's pod-resources API.
func podResources(t testing.TB) (*fake.Server, string) {
	t.Helper()
	socket := filepath.Join(socketDir(t), "pr.sock")
	srv, err := fake.Start(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv, socket
}

func put(t testing.TB, url, body string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, url, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("PUT %s: %d %s", url, resp.StatusCode, b)
	}
}

// waitSample waits until the sampler's snapshot satisfies cond.
func waitSample(t testing.TB, d *daemon.Daemon, what string, cond func(*telemetry.Snapshot) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.Telemetry().WaitFor(ctx, func(s *telemetry.Snapshot) bool { return s != nil && cond(s) }); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// value is a device's field value in a snapshot (GPU by index, whole).
func value(s *telemetry.Snapshot, gpu int, f telemetry.Field) (float64, bool) {
	for i, t := range s.Layout.Targets {
		if t.GPU.Index == gpu && t.MIG == nil {
			return s.Devices[i].Get(f)
		}
	}
	return 0, false
}

// mine are the metric families this daemon's telemetry and wiring add;
// promlint must find nothing in them.
func mine(name string) bool {
	for _, p := range []string{"gpu_plugin_telemetry_", "gpu_plugin_pod_", "gpu_plugin_resource_", "gpu_plugin_registrations_", "gpu_plugin_allocation", "gpu_plugin_nvml_", "gpu_plugin_scrape_"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// TestTelemetryThroughControlAPI: values injected through /sim reach
// /metrics through the sampler; an Allocate refreshes pod attribution at
// once (the refresh interval is an hour); XIDs become the last-XID gauge;
// the daemon's own metrics count the allocation.
func TestTelemetryThroughControlAPI(t *testing.T) {
	srv, socket := podResources(t)
	r := start(t, true, "--simulate=dgx-a100-mig", "--mig-strategy=mixed", "--pod-resources-socket="+socket,
		"--pod-resources-interval=1h", "--collect-interval=100ms")
	const res = "nvidia.com/mig-1g.5gb"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.kubelet.WaitFor(ctx, func(k2 *fakekubelet.Kubelet) bool { return len(k2.Devices(res)) > 0 }); err != nil {
		t.Fatal(err)
	}
	base := "http://" + r.d.Addr()
	waitReady(t, base)
	id := r.kubelet.Devices(res)[0].ID

	srv.SetPods(fake.Pod("ml", "infer-0", fake.Container{Name: "main", Devices: []fake.Devices{{Resource: res, IDs: []string{id}}}}))
	if _, err := r.kubelet.Allocate(ctx, res, id); err != nil {
		t.Fatal(err)
	}
	actx, acancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer acancel()
	if err := r.d.PodAttribution().WaitFor(actx, func(s *podresources.Snapshot, _ podresources.Status) bool {
		return len(s.Holders(id)) == 1
	}); err != nil {
		t.Fatalf("attribution after Allocate (refresh interval 1h): %v", err)
	}

	put(t, base+"/sim/gpus/5/telemetry", `{"gpu_util": 66, "power_w": 250.5}`)
	post(t, base+"/sim/gpus/6/xid?code=31")
	waitSample(t, r.d, "injected values sampled", func(s *telemetry.Snapshot) bool {
		u, _ := value(s, 5, telemetry.GPUUtil)
		x, _ := value(s, 6, telemetry.XIDErrors)
		return u == 66 && x == 31
	})

	code, body := get(t, base+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`gpu="5",modelName="NVIDIA A100-SXM4-40GB",pci_bus_id="00000000:90:00.0"} 66`,
		`gpu="5",modelName="NVIDIA A100-SXM4-40GB",pci_bus_id="00000000:90:00.0"} 250.5`,
		`gpu="6",modelName="NVIDIA A100-SXM4-40GB",pci_bus_id="00000000:B7:00.0"} 31`,
		`Hostname="test-node"`,
		`namespace="ml",pci_bus_id="00000000:07:00.0",pod="infer-0"} 0`, // the MIG device's FB_USED, attributed
		`gpu_plugin_pod_gpu_info{GPU_I_ID="`,
		`gpu_plugin_telemetry_backend_info{backend="nvml",configured="auto"} 1`,
		`gpu_plugin_allocations_total{resource="nvidia.com/mig-1g.5gb"} 1`,
		`gpu_plugin_resource_registered{resource="nvidia.com/mig-1g.5gb"} 1`,
		`gpu_plugin_nvml_up 1`,
		`gpu_plugin_pod_resources_up 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if code, body := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d %s", code, body)
	}
	if code, body := get(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz: %d %s", code, body)
	}

	problems, err := promlint.New(strings.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if mine(p.Metric) {
			t.Errorf("promlint: %s: %s", p.Metric, p.Text)
		}
	}
}

// TestTelemetryBackendChoice: on a node without DCGM, auto and dcgm both
// sample through NVML (dcgm keeps retrying); none turns DCGM_* off.
func TestTelemetryBackendChoice(t *testing.T) {
	for _, tc := range []struct {
		backend, want string
		dcgmMetrics   bool
	}{
		{"auto", `gpu_plugin_telemetry_backend_info{backend="nvml",configured="auto"} 1`, true},
		{"dcgm", `gpu_plugin_telemetry_backend_info{backend="nvml",configured="dcgm"} 1`, true},
		{"nvml", `gpu_plugin_telemetry_backend_info{backend="nvml",configured="nvml"} 1`, true},
		{"none", "", false},
	} {
		t.Run(tc.backend, func(t *testing.T) {
			if tc.backend == "dcgm" && libdcgmInstalled() {
				t.Skip("libdcgm.so.4 is installed: DCGM would initialise here")
			}
			var logs testkit.Buffer
			r := startLogged(t, &logs, "--simulate=pcie-l4x4", "--telemetry-backend="+tc.backend, "--pod-resources-socket=")
			if tc.dcgmMetrics {
				waitSample(t, r.d, "a first sample", func(*telemetry.Snapshot) bool { return true })
			}
			_, body := get(t, "http://"+r.d.Addr()+"/metrics")
			if tc.want != "" && !strings.Contains(body, tc.want) {
				t.Errorf("/metrics lacks %s", tc.want)
			}
			if has := strings.Contains(body, "DCGM_FI_DEV_GPU_TEMP{"); has != tc.dcgmMetrics {
				t.Errorf("DCGM_FI_DEV_GPU_TEMP served: %v, want %v", has, tc.dcgmMetrics)
			}
			if tc.backend == "dcgm" && !strings.Contains(logs.String(), "libdcgm.so.4 not found") {
				t.Errorf("the DCGM init failure is not logged:\n%s", logs.String())
			}
		})
	}
}

// startLogged is start without a kubelet, logging to logs.
func startLogged(t *testing.T, logs io.Writer, args ...string) *running {
	t.Helper()
	r := &running{dir: socketDir(t), done: make(chan error, 1)}
	r.run(t, slog.New(slog.NewTextHandler(logs, nil)), args...)
	return r
}

func libdcgmInstalled() bool {
	out, err := exec.Command("ldconfig", "-p").Output()
	return err == nil && bytes.Contains(out, []byte("libdcgm.so.4"))
}

// TestCollectorsFlag: --collectors chooses the families; a broken file
// stops the start with an error naming the flag.
func TestCollectorsFlag(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "counters.csv")
	if err := os.WriteFile(good, []byte("# just two\nDCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).\nDCGM_FI_DEV_POWER_VIOLATION, counter, not served\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := startLogged(t, io.Discard, "--simulate=pcie-l4x4", "--collectors="+good, "--pod-resources-socket=")
	waitSample(t, r.d, "a first sample", func(*telemetry.Snapshot) bool { return true })
	_, body := get(t, "http://"+r.d.Addr()+"/metrics")
	if !strings.Contains(body, "DCGM_FI_DEV_GPU_TEMP{") || strings.Contains(body, "DCGM_FI_DEV_POWER_USAGE") || strings.Contains(body, "DCGM_FI_DRIVER_VERSION=") {
		t.Errorf("with a one-field counters file, /metrics has other DCGM families or labels")
	}

	bad := filepath.Join(dir, "bad.csv")
	if err := os.WriteFile(bad, []byte("DCGM_FI_DEV_GPU_TEMP, gague, x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := daemon.New(loadConfig(t, socketDir(t), "--simulate=pcie-l4x4", "--collectors="+bad), slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "--collectors") || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("a broken counters file: %v, want an error naming --collectors and the line", err)
	}
}

// TestMetricsBasicAuth: with a web config, /metrics needs the credentials.
func TestMetricsBasicAuth(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "web.yml")
	// bcrypt of "s3cret", cost 4.
	const hash = "$2a$04$mPIvQeJNhTlhtw6cdR.grOcn0v0Ue9fi25iX.qcx/Bv9bu4XVvF6i"
	if err := os.WriteFile(cfg, []byte("basic_auth_users:\n  prom: "+hash+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startLogged(t, io.Discard, "--simulate=pcie-l4x4", "--web-config-file="+cfg, "--pod-resources-socket=")
	waitSample(t, r.d, "a first sample", func(*telemetry.Snapshot) bool { return true })
	url := "http://" + r.d.Addr() + "/metrics"
	for _, tc := range []struct {
		user, pass string
		want       int
	}{{"", "", 401}, {"prom", "wrong", 401}, {"prom", "s3cret", 200}} {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		if tc.user != "" {
			req.SetBasicAuth(tc.user, tc.pass)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("user %q password %q: %d, want %d", tc.user, tc.pass, resp.StatusCode, tc.want)
		}
		if tc.want == 200 && !bytes.Contains(b, []byte("DCGM_FI_DEV_GPU_TEMP{")) {
			t.Error("authorised /metrics lacks the DCGM families")
		}
	}
}

// TestPrometheusScrapesDaemon: a real Prometheus (Debian package
// prometheus; scripts/test.sh installs it) scrapes the daemon on loopback
// every second, and a PromQL query returns the value injected through
// /sim.
func TestPrometheusScrapesDaemon(t *testing.T) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("prometheus is not installed (Debian package prometheus; scripts/test.sh installs it as root)")
	}
	r := startLogged(t, io.Discard, "--simulate=dgx-h100", "--collect-interval=200ms", "--pod-resources-socket=")
	base := "http://" + r.d.Addr()
	put(t, base+"/sim/gpus/1/telemetry", `{"gpu_util": 77, "fb_used_mib": 4321}`)

	dir := t.TempDir()
	promCfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(promCfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: gpu-plugin
    static_configs:
      - targets: ["%s"]
`, r.d.Addr())), 0o644); err != nil {
		t.Fatal(err)
	}
	promAddr := freeLoopbackAddr(t)
	var promLog testkit.Buffer
	cmd := exec.Command(bin, "--config.file="+promCfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+promAddr, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = &promLog, &promLog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	query := func(q string) (string, error) {
		resp, err := http.Get("http://" + promAddr + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		var doc struct {
			Status string `json:"status"`
			Data   struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
			return "", err
		}
		if doc.Status != "success" || len(doc.Data.Result) != 1 {
			return "", fmt.Errorf("status %s, %d results", doc.Status, len(doc.Data.Result))
		}
		return fmt.Sprint(doc.Data.Result[0].Value[1]), nil
	}
	// Prometheus scrapes once a second; a first result comes after a few.
	deadline := time.After(60 * time.Second)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		got, err := query(`DCGM_FI_DEV_GPU_UTIL{gpu="1",Hostname="test-node"}`)
		if err == nil && got == "77" {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("prometheus exited: %v\n%s", err, promLog.String())
		case <-deadline:
			t.Fatalf("Prometheus never returned 77 for DCGM_FI_DEV_GPU_UTIL{gpu=\"1\"} (last: %q, %v)\n%s", got, err, promLog.String())
		case <-tick.C:
		}
	}
	if got, err := query(`DCGM_FI_DEV_FB_USED{gpu="1"}`); err != nil || got != "4321" {
		t.Errorf("FB_USED through Prometheus: %q %v, want 4321", got, err)
	}
	if got, err := query(`up{job="gpu-plugin"}`); err != nil || got != "1" {
		t.Errorf("up: %q %v", got, err)
	}
	// Counters keep their type without a _total suffix (Prometheus asks
	// for OpenMetrics first; the text format is served).
	resp, err := http.Get("http://" + promAddr + "/api/v1/metadata?metric=DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var meta struct {
		Data map[string][]struct {
			Type string `json:"type"`
			Help string `json:"help"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&meta); err != nil {
		t.Fatal(err)
	}
	if m := meta.Data["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]; len(m) != 1 || m[0].Type != "counter" || m[0].Help != "Total energy consumption since boot (in mJ)." {
		t.Errorf("Prometheus' metadata for the energy counter: %+v, want type counter and dcgm-exporter's help", m)
	}
}

func freeLoopbackAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestXIDGaugeNeedsEvents: with XID checks off the monitor sees no XIDs,
// so DCGM_FI_DEV_XID_ERRORS is left out rather than claiming 0.
func TestXIDGaugeNeedsEvents(t *testing.T) {
	r := startLogged(t, io.Discard, "--simulate=pcie-l4x4", "--disable-healthchecks=all", "--pod-resources-socket=")
	waitSample(t, r.d, "a sample", func(s *telemetry.Snapshot) bool { _, ok := value(s, 0, telemetry.GPUTemp); return ok })
	_, body := get(t, "http://"+r.d.Addr()+"/metrics")
	if strings.Contains(body, "DCGM_FI_DEV_XID_ERRORS{") || !strings.Contains(body, "DCGM_FI_DEV_GPU_TEMP{") {
		t.Errorf("with health checks disabled: want GPU_TEMP and no XID_ERRORS series")
	}
}
