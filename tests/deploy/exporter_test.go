package deploy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
)

// Exported is what the exporter really emits: metric family name → type,
// from /metrics of the whole daemon run in process on simulated nodes.
type Exported map[string]dto.MetricType

// Names lists the family names, sorted.
func (e Exported) Names() []string {
	out := make([]string, 0, len(e))
	for n := range e {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// The exporter's list is the same for every test; the daemons run once.
var exported = sync.OnceValues(scrapeExporter)

// exporterProfiles are the simulated nodes scraped: MIG devices (per-MIG
// series) and a Hopper node (profiling fields where the backend has them).
var exporterProfiles = []string{"dgx-a100-mig", "dgx-h100"}

// exportedMetrics returns the union of the families the daemon emits on
// every profile, after faults were injected so that event-driven families
// (XID and ECC counters) exist too.
func exportedMetrics(t *testing.T) Exported {
	t.Helper()
	e, err := exported()
	if err != nil {
		t.Fatalf("collecting the exporter's metric list from a simulated daemon: %v", err)
	}
	return e
}

func scrapeExporter() (Exported, error) {
	all := Exported{}
	for _, p := range exporterProfiles {
		fams, err := scrapeSimulated(p)
		if err != nil {
			return nil, fmt.Errorf("profile %s: %w", p, err)
		}
		for name, f := range fams {
			all[name] = f.GetType()
		}
	}
	return all, nil
}

// scrapeSimulated runs the daemon on a simulated node against the stand-in
// kubelet and a stand-in pod-resources API with one pod holding a device,
// injects an XID, a double-bit ECC error and telemetry through /sim, waits
// until the kubelet sees the sick GPU, and returns /metrics.
func scrapeSimulated(profile string) (map[string]*dto.MetricFamily, error) {
	dir, err := tempSocketDir()
	if err != nil {
		return nil, err
	}
	defer dir.cleanup()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	kubelet, err := fakekubelet.Start(dir.path, log)
	if err != nil {
		return nil, err
	}
	defer kubelet.Stop()
	pods, err := fakepodresources.Start(filepath.Join(dir.path, "pod-resources.sock"))
	if err != nil {
		return nil, err
	}
	defer pods.Stop()
	args := []string{"--simulate=" + profile, "--metrics-address=127.0.0.1:0", "--kubelet-socket-dir=" + dir.path, "--node-name=deploy-test",
		"--pod-resources-socket=" + filepath.Join(dir.path, "pod-resources.sock"), "--pod-resources-interval=100ms"}
	cfg, _, err := config.Load("gpu-plugin", args, func(string) string { return "" }, io.Discard)
	if err != nil {
		return nil, err
	}
	d, err := daemon.New(cfg, log)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() { cancel(); <-done }()

	wait, cancelWait := context.WithTimeout(ctx, 20*time.Second)
	defer cancelWait()
	allocatable := func() int {
		n := 0
		for _, r := range kubelet.Resources() {
			_, a := kubelet.Capacity(r)
			n += a
		}
		return n
	}
	registered := func(k *fakekubelet.Kubelet) bool {
		st := d.Plugins().Status()
		if len(st) == 0 {
			return false
		}
		for _, s := range st {
			if c, _ := k.Capacity(s.Resource); c != s.Devices {
				return false
			}
		}
		return true
	}
	if err := kubelet.WaitFor(wait, registered); err != nil {
		return nil, fmt.Errorf("registration: %w", err)
	}
	before := allocatable()

	// A pod holding the first advertised device, so that pod attribution
	// (the pod labels and gpu_plugin_pod_gpu_info) is served too. Two List
	// calls after the change mean the cache has taken the first one in.
	resource := kubelet.Resources()[0]
	pods.SetPods(fakepodresources.Pod("ml", "train-0", fakepodresources.Container{Name: "main",
		Devices: []fakepodresources.Devices{{Resource: resource, IDs: []string{kubelet.Devices(resource)[0].ID}}}}))
	for range 2 {
		select {
		case <-pods.Listed():
		case <-wait.Done():
			return nil, fmt.Errorf("the daemon did not list pod resources: %w", wait.Err())
		}
	}

	base := "http://" + d.Addr()
	for _, req := range []struct{ method, path, body string }{
		{http.MethodPut, "/sim/gpus/7/telemetry", `{"gpu_util": 77, "fb_used_mib": 1234, "temperature_c": 66, "power_w": 250}`},
		{http.MethodPost, "/sim/gpus/6/ecc?type=double", ""},
		{http.MethodPost, "/sim/gpus/7/xid?code=48", ""},
		{http.MethodPost, "/sim/gpus/7/xid?code=13", ""},
	} {
		if err := call(req.method, base+req.path, req.body); err != nil {
			return nil, err
		}
	}
	if err := kubelet.WaitFor(wait, func(*fakekubelet.Kubelet) bool { return allocatable() < before }); err != nil {
		return nil, fmt.Errorf("the injected XID did not reach the kubelet: %w", err)
	}
	// The kubelet hears of the XID from the health monitor at once; the
	// telemetry sampler records it (and the injected utilisation) at its
	// next round. Wait for what the callers compare against, not for a
	// proxy of it: scrape until every injected event shows.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		fams, err := scrape(base + "/metrics")
		if err != nil {
			return nil, err
		}
		missing := notYetScraped(fams)
		if missing == "" {
			return fams, nil
		}
		select {
		case <-tick.C:
		case <-wait.Done():
			return nil, fmt.Errorf("the injected events never all reached /metrics (missing: %s): %w", missing, wait.Err())
		}
	}
}

// notYetScraped names the first injected event scrapeSimulated's scrape
// does not show yet, or "" when all do: GPU 7's XID (DCGM_FI_DEV_XID_ERRORS
// and the daemon's counter) and its utilisation of 77 %. (The attributed
// pod is awaited above, through the pod-resources List calls.)
func notYetScraped(fams map[string]*dto.MetricFamily) string {
	gpu7 := func(family string, ok func(float64) bool) bool {
		f := fams[family]
		if f == nil {
			return false
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "gpu" && l.GetValue() == "7" && ok(metricValue(m)) {
					return true
				}
			}
		}
		return false
	}
	switch {
	case !gpu7("DCGM_FI_DEV_XID_ERRORS", func(v float64) bool { return v == 48 || v == 13 }):
		return "DCGM_FI_DEV_XID_ERRORS 48 or 13 on GPU 7"
	case !gpu7("DCGM_FI_DEV_GPU_UTIL", func(v float64) bool { return v == 77 }):
		return "DCGM_FI_DEV_GPU_UTIL 77 on GPU 7"
	case fams["gpu_plugin_xid_errors_total"] == nil:
		return "gpu_plugin_xid_errors_total"
	}
	return ""
}

func metricValue(m *dto.Metric) float64 {
	switch {
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	case m.Untyped != nil:
		return m.GetUntyped().GetValue()
	}
	return 0
}

func call(method, url, body string) error {
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %s: %s", method, url, resp.Status, msg)
	}
	return nil
}

func scrape(url string) (map[string]*dto.MetricFamily, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// TestExporterListCoversTheBasics guards the list the other tests compare
// against: a broken scrape must not make every check pass vacuously.
func TestExporterListCoversTheBasics(t *testing.T) {
	e := exportedMetrics(t)
	for _, want := range []string{"gpu_plugin_build_info", "gpu_plugin_device_healthy", "gpu_plugin_xid_errors_total", "gpu_plugin_pod_gpu_info", "DCGM_FI_DEV_GPU_UTIL"} {
		if _, ok := e[want]; !ok {
			t.Errorf("the simulated daemon's /metrics lacks %s; got %s", want, strings.Join(e.Names(), ", "))
		}
	}
	if !slices.ContainsFunc(e.Names(), func(n string) bool { return strings.HasPrefix(n, "DCGM_FI_DEV_") }) {
		t.Errorf("no DCGM_FI_DEV_* family: the telemetry exporter is not wired in")
	}
	for _, n := range e.Names() {
		t.Logf("emitted: %s (%s)", n, e[n])
	}
}

// socketDir is a short temporary directory: unix socket paths are limited
// to 107 bytes, and t.TempDir is unavailable inside the shared scrape.
type socketDir struct{ path string }

func tempSocketDir() (*socketDir, error) {
	p, err := os.MkdirTemp("", "gpd-")
	if err != nil {
		return nil, err
	}
	return &socketDir{path: p}, nil
}

func (d *socketDir) cleanup() { os.RemoveAll(d.path) }
