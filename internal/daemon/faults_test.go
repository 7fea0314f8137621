package daemon_test

// Fault suite (issue 8): NVML calls failing on chosen GPUs through the
// simulator's control API, and the kubelet's pod-resources API missing or
// hanging. The kubelet-absent and config-file faults need the daemon's
// internals and live in faults_internal_test.go.

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"google.golang.org/grpc"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	fake "github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// faultWait bounds every wait in this file. Series of a failing GPU are
// served for the sampler's stale limit (at least 5 s) before they go, and
// the machine is shared, so it is generous.
const faultWait = 30 * time.Second

// seriesValue is the value of one series in a /metrics body, series being
// its name and labels exactly as served; ok is false when it is absent.
func seriesValue(body, series string) (float64, bool) {
	for line := range strings.SplitSeq(body, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
			return v, err == nil
		}
	}
	return 0, false
}

var gpuLabel = regexp.MustCompile(`[{,]gpu="(\d+)"`)

// servedGPUs are the GPU indices that have a series of family in body.
func servedGPUs(body, family string) []int {
	var out []int
	for line := range strings.SplitSeq(body, "\n") {
		if !strings.HasPrefix(line, family+"{") {
			continue
		}
		if m := gpuLabel.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			if !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
	}
	slices.Sort(out)
	return out
}

// nvmlFault is one NVML device call made to fail on one GPU.
type nvmlFault struct {
	gpu  int
	call string // the simulated device method; "*" fails them all
	// function is the NVML function the daemon names in
	// gpu_plugin_nvml_function_errors_total (empty for "*").
	function string
	// sampled: the telemetry sampler makes this call every round, so the
	// GPU's DCGM_* series go stale and then expire.
	sampled bool
	// probed: the health monitor's probe makes it, so the GPU goes
	// unhealthy (at once for GPU_IS_LOST, after 3 failed probes otherwise).
	probed bool
}

// nvmlFaults are injected together, one GPU each, on an 8-GPU node; GPUs 0
// and 7 stay clean. A sampler call failing with UNKNOWN or TIMEOUT costs
// only that GPU's telemetry: a GPU whose probe still answers stays
// allocatable. GPU_IS_LOST from any call, the sampler's included, takes the
// GPU out. "*" is a GPU that stops answering altogether, as a really lost
// one does.
var nvmlFaults = []nvmlFault{
	{gpu: 1, call: "GetUtilizationRates", function: "nvmlDeviceGetUtilizationRates", sampled: true},
	{gpu: 2, call: "GetMemoryInfo_v2", function: "nvmlDeviceGetMemoryInfo_v2", sampled: true},
	{gpu: 3, call: "GetTemperature", function: "nvmlDeviceGetTemperature", sampled: true},
	{gpu: 4, call: "GetPowerUsage", function: "nvmlDeviceGetPowerUsage", sampled: true},
	{gpu: 5, call: "GetPerformanceState", function: "nvmlDeviceGetPerformanceState", probed: true},
	{gpu: 6, call: "*", sampled: true, probed: true},
}

var cleanGPUs = []int{0, 7}

// TestFaultsNVMLCalls: for each error code, chosen NVML calls fail on
// chosen GPUs. The other GPUs stay healthy, allocatable and sampled; the
// faulted GPUs' series expire instead of being served forever, probed GPUs
// go unhealthy with the reason; the error counters rise; clearing the
// faults restores everything.
func TestFaultsNVMLCalls(t *testing.T) {
	for _, code := range []string{"UNKNOWN", "GPU_IS_LOST", "TIMEOUT"} {
		t.Run(code, func(t *testing.T) {
			t.Parallel()
			testNVMLFaults(t, code)
		})
	}
}

func testNVMLFaults(t *testing.T, code string) {
	const res = "nvidia.com/gpu"
	r := start(t, true, "--simulate=dgx-h100", "--collect-interval=100ms", "--health-probe-interval=50ms",
		"--health-quiet-period=1s", "--pod-resources-socket=", "--rescan-interval=0", "--node-labels=false")
	ctx, cancel := context.WithTimeout(context.Background(), faultWait)
	defer cancel()
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8); err != nil {
		t.Fatal(err)
	}
	base := "http://" + r.d.Addr()
	gpus := r.d.Inventory().GPUs
	waitSample(t, r.d, "every GPU sampled", func(s *telemetry.Snapshot) bool {
		for i := range gpus {
			if _, ok := value(s, i, telemetry.GPUTemp); !ok {
				return false
			}
		}
		return true
	})
	_, body := get(t, base+"/metrics")
	errorsBefore, ok := seriesValue(body, "gpu_plugin_nvml_call_errors_total")
	if !ok {
		t.Fatal("/metrics lacks gpu_plugin_nvml_call_errors_total")
	}

	for _, f := range nvmlFaults {
		post(t, fmt.Sprintf("%s/sim/gpus/%d/fault?call=%s&error=%s", base, f.gpu, f.call, code))
	}

	// Probed GPUs go unhealthy, and with GPU_IS_LOST sampled ones too; the
	// kubelet is told. (The quiet period, 1 s, is longer than the sampling
	// interval, so a GPU the sampler keeps finding lost stays out.)
	goesOut := func(f nvmlFault) bool { return f.probed || (code == "GPU_IS_LOST" && f.sampled) }
	unhealthy := 0
	for _, f := range nvmlFaults {
		if goesOut(f) {
			unhealthy++
		}
	}
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8-unhealthy); err != nil {
		t.Fatalf("probed GPUs did not go unhealthy: %v", err)
	}
	doc := debugDevices(t, base)
	for _, f := range nvmlFaults {
		if !goesOut(f) {
			if h := healthOf(r.kubelet, res, gpus[f.gpu].UUID); h != pluginapi.Healthy {
				t.Errorf("GPU %d (%s failing, probe answering): %s in ListAndWatch; a failing telemetry call is no health event", f.gpu, f.call, h)
			}
			continue
		}
		st := doc.Health[gpus[f.gpu].UUID]
		want := "probe failing"
		if code == "GPU_IS_LOST" {
			want = "lost:"
		}
		if st.Healthy || !strings.Contains(st.Reason, want) || !strings.Contains(st.Reason, "ERROR_"+code) {
			t.Errorf("GPU %d (%s failing): health %+v, want unhealthy with a reason saying %q and ERROR_%s", f.gpu, f.call, st, want, code)
		}
	}

	// Sampled GPUs' series are served stale for a while, then dropped.
	expire := 0
	for _, f := range nvmlFaults {
		if f.sampled {
			expire++
		}
	}
	stale := r.d.Telemetry().StaleAfter()
	wctx, wcancel := context.WithTimeout(context.Background(), stale+faultWait)
	defer wcancel()
	if err := r.d.Telemetry().WaitFor(wctx, func(s *telemetry.Snapshot) bool {
		n := 0
		for i := range s.Devices {
			if !s.Devices[i].Servable(time.Now(), stale) {
				n++
			}
		}
		return n == expire
	}); err != nil {
		t.Fatalf("the failing GPUs' samples did not expire: %v", err)
	}

	// The clean GPUs keep being sampled: a value set now reaches /metrics.
	for _, g := range cleanGPUs {
		put(t, fmt.Sprintf("%s/sim/gpus/%d/telemetry", base, g), fmt.Sprintf(`{"gpu_util": %d}`, 40+g))
	}
	waitSample(t, r.d, "the clean GPUs' new values", func(s *telemetry.Snapshot) bool {
		for _, g := range cleanGPUs {
			if u, _ := value(s, g, telemetry.GPUUtil); u != float64(40+g) {
				return false
			}
		}
		return true
	})
	_, body = get(t, base+"/metrics")
	var wantServed []int
	for i := range gpus {
		if !slices.ContainsFunc(nvmlFaults, func(f nvmlFault) bool { return f.gpu == i && f.sampled }) {
			wantServed = append(wantServed, i)
		}
	}
	if got := servedGPUs(body, "DCGM_FI_DEV_GPU_TEMP"); !slices.Equal(got, wantServed) {
		t.Errorf("DCGM_FI_DEV_GPU_TEMP served for GPUs %v, want %v (the failing ones expired)", got, wantServed)
	}
	for _, g := range cleanGPUs {
		if !hasSeriesWith(body, "DCGM_FI_DEV_GPU_UTIL", fmt.Sprintf(`gpu="%d",`, g), fmt.Sprint(40+g)) {
			t.Errorf("/metrics does not serve GPU %d's new utilisation %d", g, 40+g)
		}
	}
	for _, want := range []string{
		fmt.Sprintf(`gpu_plugin_telemetry_devices{state="expired"} %d`, expire),
		fmt.Sprintf(`gpu_plugin_telemetry_devices{state="fresh"} %d`, 8-expire),
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	errorsDuring, _ := seriesValue(body, "gpu_plugin_nvml_call_errors_total")
	if errorsDuring <= errorsBefore {
		t.Errorf("gpu_plugin_nvml_call_errors_total %v with faults, was %v: the failed calls are not counted", errorsDuring, errorsBefore)
	}
	for _, f := range nvmlFaults {
		if f.function == "" {
			continue
		}
		series := fmt.Sprintf(`gpu_plugin_nvml_function_errors_total{function=%q}`, f.function)
		if n, _ := seriesValue(body, series); n == 0 {
			t.Errorf("/metrics: %s is %v with %s failing", series, n, f.call)
		}
	}
	if n, ok := seriesValue(body, `gpu_plugin_nvml_function_errors_total{function="nvmlDeviceGetName"}`); ok {
		t.Errorf("gpu_plugin_nvml_function_errors_total counts %v failures of a function nobody failed", n)
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
	for _, f := range nvmlFaults {
		series := fmt.Sprintf(`gpu_plugin_telemetry_device_sample_failures_total{gpu="%d",uuid=%q}`, f.gpu, gpus[f.gpu].UUID)
		if n, _ := seriesValue(body, series); f.sampled != (n > 0) {
			t.Errorf("%s = %v; want > 0 exactly when a sampled call fails (%s)", series, n, f.call)
		}
	}
	if n, _ := seriesValue(body, `gpu_plugin_health_monitor_errors_total{kind="probe"}`); (code != "GPU_IS_LOST") != (n > 0) {
		t.Errorf(`gpu_plugin_health_monitor_errors_total{kind="probe"} = %v with %s probes (lost GPUs are counted as faults, not errors)`, n, code)
	}

	// The kubelet can still allocate the clean GPUs, and not a probed one.
	for _, g := range cleanGPUs {
		if h := healthOf(r.kubelet, res, gpus[g].UUID); h != pluginapi.Healthy {
			t.Errorf("clean GPU %d: %s in ListAndWatch", g, h)
		}
		if a, err := r.kubelet.Allocate(ctx, res, gpus[g].UUID); err != nil || a.Envs["NVIDIA_VISIBLE_DEVICES"] != gpus[g].UUID {
			t.Errorf("Allocate clean GPU %d: %v %v", g, a, err)
		}
	}
	if _, err := r.kubelet.Allocate(ctx, res, gpus[5].UUID); err == nil {
		t.Error("Allocate of GPU 5, unhealthy after its probe failed, succeeded")
	}

	// Clearing the faults restores health and telemetry.
	for _, f := range nvmlFaults {
		post(t, fmt.Sprintf("%s/sim/gpus/%d/fault?call=%s&error=SUCCESS", base, f.gpu, f.call))
	}
	if err := r.kubelet.WaitForAllocatable(ctx, res, 8, 8); err != nil {
		t.Fatalf("GPUs did not come back after the faults were cleared: %v", err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), faultWait)
	defer rcancel()
	if err := r.d.Telemetry().WaitFor(rctx, func(s *telemetry.Snapshot) bool {
		for i := range s.Devices {
			if s.Devices[i].Stale || !s.Devices[i].Servable(time.Now(), stale) {
				return false
			}
		}
		return true
	}); err != nil {
		t.Fatalf("telemetry did not recover after the faults were cleared: %v", err)
	}
	_, body = get(t, base+"/metrics")
	if got := servedGPUs(body, "DCGM_FI_DEV_GPU_TEMP"); len(got) != 8 {
		t.Errorf("after clearing the faults DCGM_FI_DEV_GPU_TEMP is served for GPUs %v, want all 8", got)
	}
}

// hasSeriesWith reports whether a series of family carries label (a
// `name="value",` fragment) and has the value.
func hasSeriesWith(body, family, label, value string) bool {
	for line := range strings.SplitSeq(body, "\n") {
		if strings.HasPrefix(line, family+"{") && strings.Contains(line, label) && strings.HasSuffix(line, "} "+value) {
			return true
		}
	}
	return false
}

// hangingPodResources is a pod-resources server whose List hangs until
// released or until the caller gives up, as a kubelet stuck behind a busy
// API server can.
type hangingPodResources struct {
	podresourcesv1.UnimplementedPodResourcesListerServer
	srv      *grpc.Server
	release  chan struct{} // closed: List answers at once
	pods     []*podresourcesv1.PodResources
	inFlight atomic.Int64
	arrived  chan struct{} // signalled (coalesced) when a List call arrives
}

func startHanging(t testing.TB, socket string, pods ...*podresourcesv1.PodResources) *hangingPodResources {
	t.Helper()
	lis, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	h := &hangingPodResources{srv: grpc.NewServer(), release: make(chan struct{}), pods: pods, arrived: make(chan struct{}, 1)}
	podresourcesv1.RegisterPodResourcesListerServer(h.srv, h)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = h.srv.Serve(lis)
	}()
	t.Cleanup(func() {
		h.srv.Stop() // cancels the hanging calls
		<-done
	})
	return h
}

func (h *hangingPodResources) List(ctx context.Context, _ *podresourcesv1.ListPodResourcesRequest) (*podresourcesv1.ListPodResourcesResponse, error) {
	h.inFlight.Add(1)
	defer h.inFlight.Add(-1)
	select {
	case h.arrived <- struct{}{}:
	default:
	}
	select {
	case <-h.release:
		return &podresourcesv1.ListPodResourcesResponse{PodResources: h.pods}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// TestFaultsPodResources: with the pod-resources socket missing, or its
// List hanging past the daemon's 5 s timeout, /metrics answers at once,
// unattributed; when pod-resources answers again, the pod labels return.
func TestFaultsPodResources(t *testing.T) {
	for _, tc := range []struct {
		name string
		hang bool // a server whose List hangs; else no socket at all
	}{
		{"socket missing", false},
		{"List hangs", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			socket := filepath.Join(socketDir(t), "pr.sock")
			var h *hangingPodResources
			// back makes pod-resources answer, with pods.
			back := func(pods ...*podresourcesv1.PodResources) {
				srv, err := fake.Start(socket)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(srv.Stop)
				srv.SetPods(pods...)
			}
			if tc.hang {
				h = startHanging(t, socket)
				back = func(pods ...*podresourcesv1.PodResources) {
					h.pods = pods // List reads it only after release is closed
					close(h.release)
				}
			}
			r := start(t, true, "--simulate=pcie-l4x4", "--pod-resources-socket="+socket, "--pod-resources-interval=100ms",
				"--collect-interval=100ms", "--rescan-interval=0", "--node-labels=false")
			ctx, cancel := context.WithTimeout(context.Background(), faultWait)
			defer cancel()
			if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 4, 4); err != nil {
				t.Fatal(err)
			}
			waitSample(t, r.d, "a first sample", func(s *telemetry.Snapshot) bool { _, ok := value(s, 0, telemetry.GPUTemp); return ok })
			if tc.hang {
				select {
				case <-h.arrived:
				case <-time.After(faultWait):
					t.Fatal("the daemon never called List")
				}
			} else {
				waitAttribution(t, r, "a failed refresh", func(_ *podresources.Snapshot, st podresources.Status) bool { return st.Failures > 0 })
			}

			// Scrapes while pod-resources is unavailable.
			base := "http://" + r.d.Addr()
			var took []time.Duration
			var body string
			for range 20 {
				t0 := time.Now()
				var code int
				code, body = get(t, base+"/metrics")
				took = append(took, time.Since(t0))
				if code != 200 {
					t.Fatalf("/metrics: %d", code)
				}
			}
			if tc.hang && h.inFlight.Load() == 0 {
				t.Fatal("no List call was hanging during the scrapes: the test proves nothing")
			}
			slices.Sort(took)
			t.Logf("20 scrapes with pod-resources %s: median %v, max %v", tc.name, took[len(took)/2], took[len(took)-1])
			// Loose on purpose: a scrape that waited for pod-resources
			// would take its 5 s timeout.
			if took[len(took)-1] > 2500*time.Millisecond {
				t.Errorf("slowest scrape %v: scrapes must not wait for pod-resources", took[len(took)-1])
			}
			if strings.Contains(body, `pod="`) {
				t.Error("/metrics carries pod labels without pod-resources")
			}
			if !strings.Contains(body, "gpu_plugin_pod_resources_up 0") || len(servedGPUs(body, "DCGM_FI_DEV_GPU_TEMP")) != 4 {
				t.Error("/metrics must serve every GPU, unattributed, with gpu_plugin_pod_resources_up 0")
			}

			// Pod-resources answers again: the labels return.
			uuid := r.d.Inventory().GPUs[1].UUID
			back(fake.Pod("ml", "train-0", fake.Container{Name: "main", Devices: []fake.Devices{{Resource: "nvidia.com/gpu", IDs: []string{uuid}}}}))
			waitAttribution(t, r, "attribution once pod-resources answers", func(s *podresources.Snapshot, _ podresources.Status) bool {
				return len(s.Holders(uuid)) == 1
			})
			_, body = get(t, base+"/metrics")
			if !hasSeriesLabels(body, "DCGM_FI_DEV_GPU_TEMP", `gpu="1",`, `namespace="ml"`, `pod="train-0"`) {
				t.Error("GPU 1's DCGM_FI_DEV_GPU_TEMP is not attributed to ml/train-0 after pod-resources came back")
			}
			if !strings.Contains(body, "gpu_plugin_pod_resources_up 1") {
				t.Error("gpu_plugin_pod_resources_up is not 1 after pod-resources came back")
			}
		})
	}
}

// waitAttribution waits until cond holds for the daemon's pod attribution.
func waitAttribution(t *testing.T, r *running, what string, cond func(*podresources.Snapshot, podresources.Status) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), faultWait)
	defer cancel()
	if err := r.d.PodAttribution().WaitFor(ctx, cond); err != nil {
		t.Fatalf("%s: %v (status %+v)", what, err, r.d.PodAttribution().Status())
	}
}

// hasSeriesLabels reports whether one series of family carries every
// label fragment.
func hasSeriesLabels(body, family string, labels ...string) bool {
	for line := range strings.SplitSeq(body, "\n") {
		if strings.HasPrefix(line, family+"{") && !slices.ContainsFunc(labels, func(l string) bool { return !strings.Contains(line, l) }) {
			return true
		}
	}
	return false
}
