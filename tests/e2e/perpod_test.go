package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"text/template"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/yaml"
)

// perPodUsage (scenario 4b): with perPodUsage.enabled and time-slicing,
// three pods each get a replica (a time-sliced "Deployment" of 3 pods); their containers' real PIDs (sleep, in
// the real kubelet's cgroups) are registered as compute processes on the
// simulated GPUs, with a host process beside them. The plugin, now with
// hostPID, must name each pod from its process's cgroup and the API
// server's pod list, count the host process as unattributed, and drop a
// deleted pod's series.
func (s *suite) perPodUsage(t *testing.T) {
	ctx := context.Background()
	t0 := time.Now()
	s.replacePlugin(t, map[string]any{"perPodUsage": map[string]any{"enabled": true}, "sharing": timeSlicing4})
	if !s.pluginPod.Spec.HostPID {
		t.Fatal("perPodUsage.enabled: the plugin pod does not share the host's PID namespace")
	}
	s.waitAllocatable(t, 4*nodeGPUs, "allocatable 32, time-sliced, per-pod usage on")
	s.timed("4b perPodUsage → new plugin pod Ready, allocatable 32", time.Since(t0))

	c := s.n.client
	type user struct {
		pod  *corev1.Pod
		gpu  string // UUID
		pid  int
		mib  int
		sm   int
		name string
	}
	var users []*user
	for k := range 3 {
		name := fmt.Sprintf("usage-%d", k)
		pod, err := c.CoreV1().Pods("default").Create(ctx, testPod("default", name, 1), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		users = append(users, &user{pod: pod, name: name, mib: 1000 * (k + 1), sm: 10 * (k + 1)})
	}
	t.Cleanup(func() {
		for _, u := range users {
			_ = c.CoreV1().Pods("default").Delete(context.Background(), u.name, metav1.DeleteOptions{})
		}
	})
	uuids := s.nodeUUIDs(t)
	byGPU := map[string][]map[string]any{}
	for _, u := range users {
		u.pod = s.waitPod(t, "default", u.name, "Running", 120*time.Second, running)
		log := s.podLog(t, "default", u.name)
		line := strings.TrimSpace(strings.SplitN(log, "\n", 2)[0])
		u.gpu, _ = strings.CutPrefix(line, "NVIDIA_VISIBLE_DEVICES=")
		u.pid = containerPID(t, u.pod)
		byGPU[u.gpu] = append(byGPU[u.gpu], map[string]any{"pid": u.pid, "used_mib": u.mib, "sm_util": u.sm})
		t.Logf("pod %s (uid %s) on %s runs pid %d", u.name, u.pod.UID, u.gpu, u.pid)
	}
	// A host process (a child of this test, in no pod) on the first pod's GPU.
	host := exec.Command("sleep", "600")
	if err := host.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Process.Kill(); host.Wait() })
	byGPU[users[0].gpu] = append(byGPU[users[0].gpu], map[string]any{"pid": host.Process.Pid, "used_mib": 300, "sm_util": 7})
	for gpu, procs := range byGPU {
		s.setProcesses(t, indexOf(t, uuids, gpu), procs)
	}

	t1 := time.Now()
	want := map[string]string{}
	for _, u := range users {
		want[fmt.Sprintf(`gpu_plugin_pod_gpu_memory_used_bytes{Hostname="%s",UUID="%s",container="main",`, nodeName, u.gpu)+
			fmt.Sprintf(`gpu="%d",namespace="default",pod="%s",pod_uid="%s"}`, indexOf(t, uuids, u.gpu), u.name, u.pod.UID)] = num(float64(u.mib << 20))
		want[fmt.Sprintf(`gpu_plugin_pod_gpu_sm_utilization_ratio{Hostname="%s",UUID="%s",container="main",`, nodeName, u.gpu)+
			fmt.Sprintf(`gpu="%d",namespace="default",pod="%s",pod_uid="%s"}`, indexOf(t, uuids, u.gpu), u.name, u.pod.UID)] = num(float64(u.sm) / 100)
	}
	want[fmt.Sprintf(`gpu_plugin_gpu_unattributed_memory_used_bytes{Hostname="%s",UUID="%s",gpu="%d"}`, nodeName, users[0].gpu, indexOf(t, uuids, users[0].gpu))] = num(300 << 20)
	s.waitMetrics(t, "each pod's own use, and the host process unattributed", want)
	s.timed("4b processes registered → per-pod series served", time.Since(t1))

	s.perPodAutoscaling(t, users[0].pod.Namespace, []string{users[0].name, users[1].name, users[2].name},
		map[string]float64{"usage-0": 10, "usage-1": 20, "usage-2": 30},
		map[string]float64{"usage-0": 1000 << 20, "usage-1": 2000 << 20, "usage-2": 3000 << 20})

	// Scenario 2's pod holds two GPUs and runs nothing on them: 0.
	metrics := string(s.pluginDo(t, http.MethodGet, "/metrics"))
	for _, gpu := range s.gpuUUIDs {
		line := fmt.Sprintf(`gpu_plugin_pod_gpu_memory_used_bytes{Hostname="%s",UUID="%s",container="main",gpu="%d",namespace="default",pod="%s",pod_uid="%s"} 0`,
			nodeName, gpu, indexOf(t, uuids, gpu), s.gpuPod.Name, s.gpuPod.UID)
		if !strings.Contains(metrics, line) {
			t.Errorf("no zero series for the idle GPU pod: want %s", line)
		}
	}

	// A deleted pod's series go.
	t2 := time.Now()
	gone := users[1]
	if err := c.CoreV1().Pods("default").Delete(ctx, gone.name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 60*time.Second, true, func(context.Context) (bool, error) {
		return !strings.Contains(string(s.pluginDo(t, http.MethodGet, "/metrics")), `pod="`+gone.name+`"`), nil
	})
	if err != nil {
		t.Fatalf("pod %s's series still served a minute after its deletion", gone.name)
	}
	s.timed("4b pod deleted → its series gone", time.Since(t2))

	for _, u := range users {
		_ = c.CoreV1().Pods("default").Delete(ctx, u.name, metav1.DeleteOptions{})
	}
	for gpu := range byGPU {
		s.setProcesses(t, indexOf(t, uuids, gpu), []map[string]any{})
	}
	// Back to whole GPUs and no hostPID for the scenarios that follow.
	s.replacePlugin(t, nil)
	s.waitAllocatable(t, nodeGPUs, "allocatable 8 again")
}

// num formats a sample value as the exposition writes it.
func num(x float64) string { return strconv.FormatFloat(x, 'g', -1, 64) }

// waitMetrics polls /metrics until every line "series value" in want is
// served.
func (s *suite) waitMetrics(t *testing.T, what string, want map[string]string) {
	t.Helper()
	var missing []string
	err := wait.PollUntilContextTimeout(context.Background(), 250*time.Millisecond, 60*time.Second, true, func(context.Context) (bool, error) {
		m := string(s.pluginDo(t, http.MethodGet, "/metrics"))
		missing = missing[:0]
		for series, v := range want {
			if !strings.Contains(m, series+" "+v+"\n") {
				missing = append(missing, series+" "+v)
			}
		}
		return len(missing) == 0, nil
	})
	if err != nil {
		t.Fatalf("%s: not served after a minute:\n  %s\nplugin /metrics (gpu_plugin_pod_gpu_* and unattributed):\n%s", what,
			strings.Join(missing, "\n  "), grepLines(string(s.pluginDo(t, http.MethodGet, "/metrics")), "gpu_plugin_pod_gpu_", "unattributed"))
	}
}

func grepLines(text string, subs ...string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		for _, sub := range subs {
			if strings.Contains(l, sub) && !strings.HasPrefix(l, "#") {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// setProcesses replaces a simulated GPU's compute processes.
func (s *suite) setProcesses(t *testing.T, gpu int, procs []map[string]any) {
	t.Helper()
	body, _ := json.Marshal(procs)
	p, err := s.n.client.CoreV1().Pods(releaseNS).Get(context.Background(), s.pluginPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPut, fmt.Sprintf("http://%s:9400/sim/gpus/%d/processes", p.Status.PodIP, gpu), bytes.NewReader(body))
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		t.Fatalf("PUT /sim/gpus/%d/processes %s: %s: %s", gpu, body, resp.Status, b.String())
	}
}

// containerPID finds the host PID of a pod's (single) container: the
// process whose cgroup names the container's ID.
func containerPID(t *testing.T, pod *corev1.Pod) int {
	t.Helper()
	_, id, _ := strings.Cut(pod.Status.ContainerStatuses[0].ContainerID, "://")
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cgroup"))
		if err != nil || !strings.Contains(string(b), id) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(d))
		return pid
	}
	t.Fatalf("no process in container %s of pod %s", id, pod.Name)
	return 0
}

func indexOf(t *testing.T, uuids []string, uuid string) int {
	t.Helper()
	for i, u := range uuids {
		if u == uuid {
			return i
		}
	}
	t.Fatalf("%q is not one of the node's GPUs %v", uuid, uuids)
	return -1
}

// perPodAutoscaling evaluates deployments/autoscaling/per-pod in scenario
// 4's Prometheus: each adapter rule as prometheus-adapter renders it for
// the pods (one value per pod), the KEDA trigger aimed at them (one sample,
// the sum), and the HPA accepted by the API server.
func (s *suite) perPodAutoscaling(t *testing.T, ns string, pods []string, smPercent, memBytes map[string]float64) {
	t.Helper()
	if s.promQuery == nil {
		t.Log("scenario 4 did not run Prometheus: the per-pod autoscaling queries are not evaluated")
		return
	}
	t0 := time.Now()
	var cfg struct {
		Rules []struct {
			Name struct {
				Matches string `json:"matches"`
				As      string `json:"as"`
			} `json:"name"`
			MetricsQuery string `json:"metricsQuery"`
		} `json:"rules"`
	}
	readYAML(t, "deployments/autoscaling/per-pod/prometheus-adapter.yaml", &cfg)
	want := map[string]map[string]float64{"gpu_sm_utilization": smPercent, "gpu_process_memory_used_bytes": memBytes}
	if len(cfg.Rules) != len(want) {
		t.Fatalf("per-pod adapter rules %d, want %d (%v)", len(cfg.Rules), len(want), want)
	}
	for _, r := range cfg.Rules {
		exp, ok := want[r.Name.As]
		if !ok {
			t.Fatalf("no expected values for the adapter metric %s", r.Name.As)
		}
		tmpl := template.Must(template.New(r.Name.As).Delims("<<", ">>").Parse(r.MetricsQuery))
		var q strings.Builder
		err := tmpl.Execute(&q, map[string]any{
			"Series":        strings.TrimSuffix(strings.TrimPrefix(r.Name.Matches, "^"), "$"),
			"LabelMatchers": fmt.Sprintf("namespace=%q,pod=~%q", ns, strings.Join(pods, "|")),
			"GroupBy":       "pod",
		})
		if err != nil {
			t.Fatal(err)
		}
		s.waitQuery(t, r.Name.As, q.String(), func(res []map[string]string) string {
			got := map[string]float64{}
			for _, m := range res {
				v, _ := strconv.ParseFloat(m["__value__"], 64)
				got[m["pod"]] = v
			}
			for pod, v := range exp {
				if g, ok := got[pod]; !ok || math.Abs(g-v) > 1e-6*math.Max(1, v) {
					return fmt.Sprintf("got %v, want %v", got, exp)
				}
			}
			if len(got) != len(exp) {
				return fmt.Sprintf("got %v, want %v", got, exp)
			}
			return ""
		})
	}

	// KEDA: the trigger's one sample, aimed at these pods.
	var so struct {
		Spec struct {
			Triggers []struct {
				Name     string            `json:"name"`
				Metadata map[string]string `json:"metadata"`
			} `json:"triggers"`
		} `json:"spec"`
	}
	readYAML(t, "deployments/autoscaling/per-pod/keda-scaledobject.yaml", &so)
	const aim = `namespace="llm",pod=~"vllm-[a-z0-9]+-[a-z0-9]+"`
	var sum float64
	for _, v := range smPercent {
		sum += v
	}
	for _, tr := range so.Spec.Triggers {
		if tr.Name != "gpu-utilization" {
			continue
		}
		q := tr.Metadata["query"]
		if !strings.Contains(q, aim) {
			t.Fatalf("the KEDA query does not select the Deployment's pods with %s:\n%s", aim, q)
		}
		q = strings.ReplaceAll(q, aim, fmt.Sprintf("namespace=%q,pod=~%q", ns, strings.Join(pods, "|")))
		s.waitQuery(t, "KEDA gpu-utilization", q, func(res []map[string]string) string {
			if len(res) != 1 {
				return fmt.Sprintf("want one sample, got %v", res)
			}
			if v, _ := strconv.ParseFloat(res[0]["__value__"], 64); math.Abs(v-sum) > 1e-6 {
				return fmt.Sprintf("got %v, want %g", res, sum)
			}
			return ""
		})
	}

	// The HPA, as the API server takes it (in this namespace).
	var hpa autoscalingv2.HorizontalPodAutoscaler
	readYAML(t, "deployments/autoscaling/per-pod/hpa.yaml", &hpa)
	hpa.Namespace = ns
	ctx := context.Background()
	if _, err := s.n.client.AutoscalingV2().HorizontalPodAutoscalers(ns).Create(ctx, &hpa, metav1.CreateOptions{}); err != nil {
		t.Fatalf("the API server refuses deployments/autoscaling/per-pod/hpa.yaml: %v", err)
	}
	_ = s.n.client.AutoscalingV2().HorizontalPodAutoscalers(ns).Delete(ctx, hpa.Name, metav1.DeleteOptions{})
	s.timed("4b per-pod autoscaling queries right in Prometheus", time.Since(t0))
}

// waitQuery polls Prometheus until check passes on q's result ("" = pass).
func (s *suite) waitQuery(t *testing.T, what, q string, check func([]map[string]string) string) {
	t.Helper()
	last := ""
	err := wait.PollUntilContextTimeout(context.Background(), 500*time.Millisecond, 60*time.Second, true, func(context.Context) (bool, error) {
		res, err := s.promQuery(q)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = check(res)
		return last == "", nil
	})
	if err != nil {
		t.Fatalf("%s in Prometheus: %s\nquery:\n%s", what, last, q)
	}
}

// readYAML decodes a file of the repository.
func readYAML(t *testing.T, rel string, v any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(), rel))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
}
