package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/cli-runtime/pkg/genericclioptions"
)

const (
	releaseName = "gpu-plugin"
	releaseNS   = "kube-system"
	chartPath   = "deployments/helm/gpu-plugin"
	// The simulated node: a DGX H100, 8 GPUs.
	simProfile = "dgx-h100"
	nodeGPUs   = 8
)

// installValues are the chart values the suite installs with: all of them
// are values a user sets. --simulate runs the daemon on a simulated node,
// as `make demo` does; --health-quiet-period shortens the wait before a
// GPU that had an XID is healthy again (default 1m). nodeHealth publishes
// GPU health to the API server (scenario 5). This node runs no kube-proxy,
// so the pod reaches the API server at the node's address rather than the
// kubernetes Service's: a cluster with kube-proxy needs no extraEnv.
func installValues(image string) map[string]any {
	repo, tag, _ := strings.Cut(image, ":")
	return map[string]any{
		"image":      map[string]any{"repository": repo, "tag": tag},
		"extraArgs":  []any{"--simulate=" + simProfile, "--health-quiet-period=10s"},
		"nodeHealth": map[string]any{"condition": true, "taint": true},
		"extraEnv": []any{
			map[string]any{"name": "KUBERNETES_SERVICE_HOST", "value": nodeIP},
			map[string]any{"name": "KUBERNETES_SERVICE_PORT", "value": apiPort},
		},
	}
}

// timeSlicing4 is the time-slicing configuration: every GPU as 4 replicas.
var timeSlicing4 = map[string]any{"timeSlicing": map[string]any{
	"resources": []any{map[string]any{"name": "nvidia.com/gpu", "replicas": 4}},
}}

// suite is the state the ordered scenarios share.
type suite struct {
	n       *node
	chart   *chart.Chart
	helm    *action.Configuration
	timings []string

	// promQuery asks scenario 4's Prometheus (nil if it did not run),
	// which runs until the node shuts down.
	promQuery func(q string) ([]map[string]string, error)

	pluginPod *corev1.Pod // the plugin's pod once Ready
	gpuPod    *corev1.Pod // scenario 2's running GPU pod
	gpuUUIDs  []string    // the GPUs it got
}

func (s *suite) timed(what string, d time.Duration) {
	s.timings = append(s.timings, fmt.Sprintf("%-58s %8s", what, d.Round(10*time.Millisecond)))
}

// TestNode runs the scenarios of issue 18 in order on one node. A scenario
// that fails stops the rest (they build on it); every component's log is
// printed then.
func TestNode(t *testing.T) {
	e := loadEnv(t)
	start := time.Now()
	s := &suite{n: startNode(t, e)}
	s.timed("node up (etcd → node Ready)", time.Since(start))
	var err error
	if s.chart, err = loader.Load(filepath.Join(repoRoot(), chartPath)); err != nil {
		t.Fatalf("loading the chart: %v", err)
	}
	s.helm = s.helmConfig(t)
	t.Cleanup(func() {
		t.Logf("timings:\n  %s", strings.Join(s.timings, "\n  "))
	})

	scenarios := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"1-install", s.install},
		{"1b-dra-control-plane", s.draControlPlane},
		{"2-gpu-pod", s.gpuPodScenario},
		{"2b-cdi-cri", s.cdiCRI},
		{"3-time-slicing", s.timeSlicing},
		{"3b-per-node-config", s.perNodeConfig},
		{"3c-node-feature-api", s.nodeFeatureAPI},
		{"4-prometheus", s.prometheus},
		{"4b-per-pod-usage", s.perPodUsage},
		{"4c-mps", s.mpsScenario},
		{"4d-dra", s.draScenario},
		{"5-health", s.health},
		{"6-restarts", s.restarts},
		{"7-uninstall", s.uninstall},
		{"8-static-manifest", s.staticManifestScenarios},
	}
	for _, sc := range scenarios {
		if !t.Run(sc.name, sc.run) {
			t.Fatalf("scenario %s failed; the later ones depend on it", sc.name)
		}
	}
}

func (s *suite) helmConfig(t *testing.T) *action.Configuration {
	flags := genericclioptions.NewConfigFlags(false)
	kc, ns := s.n.kubeconfig, releaseNS
	flags.KubeConfig, flags.Namespace = &kc, &ns
	cfg := new(action.Configuration)
	if err := cfg.Init(flags, releaseNS, "secret", func(format string, v ...any) {}); err != nil {
		t.Fatalf("helm: %v", err)
	}
	return cfg
}

// install: the chart through Helm's Go SDK, then the plugin pod Ready and
// the node advertising 8 GPUs.
func (s *suite) install(t *testing.T) {
	ctx := context.Background()
	c := s.n.client
	// As README tells a user without GPU feature discovery: label the GPU node.
	patch := []byte(`{"metadata":{"labels":{"nvidia.com/gpu.present":"true"}}}`)
	if _, err := c.CoreV1().Nodes().Patch(ctx, nodeName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	inst := action.NewInstall(s.helm)
	inst.ReleaseName, inst.Namespace = releaseName, releaseNS
	rel, err := inst.Run(s.chart, installValues(s.n.env.image))
	if err != nil {
		t.Fatalf("helm install: %v", err)
	}
	t.Logf("helm install %s: release %s revision %d, %s", chartPath, rel.Name, rel.Version, rel.Info.Status)
	s.pluginPod = s.waitPluginReady(t, "")
	readyAt := time.Since(t0)
	nd := s.n.waitNode(t, "nvidia.com/gpu capacity and allocatable 8", 120*time.Second, func(nd *corev1.Node) bool {
		cp, al := gpus(nd)
		return cp == nodeGPUs && al == nodeGPUs
	})
	s.timed("1 install → plugin pod Ready", readyAt)
	s.timed("1 install → node allocatable nvidia.com/gpu=8", time.Since(t0))
	cp, al := gpus(nd)
	t.Logf("plugin pod %s Ready after %s on %s; node capacity %d allocatable %d after %s", s.pluginPod.Name,
		readyAt.Round(time.Millisecond), s.pluginPod.Spec.NodeName, cp, al, time.Since(t0).Round(time.Millisecond))
	if s.pluginPod.Spec.NodeName != nodeName {
		t.Fatalf("plugin pod on node %q, want %q", s.pluginPod.Spec.NodeName, nodeName)
	}
}

// waitPluginReady waits for the DaemonSet's pod (not the one with UID
// notUID) to be Ready and returns it.
func (s *suite) waitPluginReady(t *testing.T, notUID types.UID) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	var last string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 180*time.Second, true, func(ctx context.Context) (bool, error) {
		s.n.alive(t, "kubelet")
		pods, err := s.n.client.CoreV1().Pods(releaseNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=gpu-plugin"})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = fmt.Sprintf("%d pods", len(pods.Items))
		for i := range pods.Items {
			p := &pods.Items[i]
			last = fmt.Sprintf("%s: %s %s", p.Name, p.Status.Phase, conditions(p))
			if p.UID == notUID || p.DeletionTimestamp != nil {
				continue
			}
			for _, c := range p.Status.Conditions {
				if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
					pod = p
					return true, nil
				}
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("plugin pod not Ready: %v; last seen: %s", err, last)
	}
	return pod
}

// pluginGet GETs a path of the plugin's metrics listener, through the pod's IP.
func (s *suite) pluginDo(t *testing.T, method, path string) []byte {
	t.Helper()
	p, err := s.n.client.CoreV1().Pods(releaseNS).Get(context.Background(), s.pluginPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(method, "http://"+p.Status.PodIP+":9400"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s on the plugin pod: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s on the plugin pod: %s: %s", method, path, resp.Status, b)
	}
	return b
}

// nodeUUIDs are the simulated node's GPU UUIDs, by index.
func (s *suite) nodeUUIDs(t *testing.T) []string {
	t.Helper()
	var state []struct {
		Index int    `json:"index"`
		UUID  string `json:"uuid"`
	}
	b := s.pluginDo(t, http.MethodGet, "/sim/gpus")
	if err := json.Unmarshal(b, &state); err != nil {
		t.Fatalf("decoding /sim/gpus: %v: %s", err, b)
	}
	out := make([]string, len(state))
	for _, g := range state {
		out[g.Index] = g.UUID
	}
	return out
}

// testPod is a busybox pod that prints its NVIDIA_VISIBLE_DEVICES and sleeps.
func testPod(ns, name string, gpus int64) *corev1.Pod {
	no := false
	grace := int64(1)
	c := corev1.Container{
		Name:            "main",
		Image:           podImage,
		ImagePullPolicy: corev1.PullNever,
		Command:         []string{"/bin/sh", "-c", `echo "NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"; exec sleep 3600`},
	}
	if gpus > 0 {
		c.Resources = gpuLimit(gpus)
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{
			AutomountServiceAccountToken:  &no,
			TerminationGracePeriodSeconds: &grace,
			Containers:                    []corev1.Container{c},
		},
	}
}

// waitPod waits until cond holds for the pod and returns it.
func (s *suite) waitPod(t *testing.T, ns, name, what string, timeout time.Duration, cond func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	var got *corev1.Pod
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		p, err := s.n.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		got = p
		return cond(p), nil
	})
	if err != nil {
		desc := "no pod"
		if got != nil {
			desc = fmt.Sprintf("phase %s, %s", got.Status.Phase, conditions(got))
		}
		t.Fatalf("pod %s/%s: %s not reached in %s: %v; %s", ns, name, what, timeout, err, desc)
	}
	return got
}

func running(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning {
		return false
	}
	for _, c := range p.Status.ContainerStatuses {
		if c.State.Running == nil {
			return false
		}
	}
	return len(p.Status.ContainerStatuses) > 0
}

func (s *suite) podLog(t *testing.T, ns, name string) string {
	t.Helper()
	var out []byte
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		b, err := s.n.client.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctx)
		if err != nil {
			return false, nil
		}
		out = b
		return len(b) > 0, nil
	})
	if err != nil {
		t.Fatalf("no log from pod %s/%s: %v", ns, name, err)
	}
	return string(out)
}

// gpuPodScenario: a pod with limits nvidia.com/gpu: 2 runs and its
// environment names 2 of the node's GPUs; a pod asking for 9 stays Pending
// with the scheduler's Insufficient nvidia.com/gpu; a ResourceQuota on
// requests.nvidia.com/gpu is enforced.
func (s *suite) gpuPodScenario(t *testing.T) {
	ctx := context.Background()
	c := s.n.client

	// A pod without GPUs first: the baseline for the admission time.
	t0 := time.Now()
	plain, err := c.CoreV1().Pods("default").Create(ctx, testPod("default", "plain", 0), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	plain = s.waitPod(t, "default", plain.Name, "Running", 120*time.Second, running)
	dPlain := time.Since(t0)

	t1 := time.Now()
	pod, err := c.CoreV1().Pods("default").Create(ctx, testPod("default", "gpu-2", 2), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod = s.waitPod(t, "default", pod.Name, "Running", 120*time.Second, running)
	dGPU := time.Since(t1)
	// Seen through the API server (polled every 100 ms): scheduling, admission
	// (the plugin's Allocate), sandbox, container start, status update.
	s.timed("2 pod without GPUs: created → seen Running", dPlain)
	s.timed("2 pod with 2 GPUs: created → seen Running", dGPU)
	got := s.visibleGPUs(t, pod)
	s.gpuPod, s.gpuUUIDs = pod, got
	t.Logf("pod %s (limits nvidia.com/gpu: 2) seen Running %s after creation (a pod without GPUs: %s); NVIDIA_VISIBLE_DEVICES names %v",
		pod.Name, dGPU.Round(time.Millisecond), dPlain.Round(time.Millisecond), got)
	if err := c.CoreV1().Pods("default").Delete(ctx, plain.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// Nine GPUs on an 8-GPU node: the scheduler says why it cannot place it.
	nine, err := c.CoreV1().Pods("default").Create(ctx, testPod("default", "gpu-9", 9), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nine = s.waitPod(t, "default", nine.Name, "PodScheduled=False with Insufficient nvidia.com/gpu", 60*time.Second, func(p *corev1.Pod) bool {
		for _, cd := range p.Status.Conditions {
			if cd.Type == corev1.PodScheduled && cd.Status == corev1.ConditionFalse && strings.Contains(cd.Message, "Insufficient nvidia.com/gpu") {
				return true
			}
		}
		return false
	})
	if nine.Status.Phase != corev1.PodPending || nine.Spec.NodeName != "" {
		t.Fatalf("pod asking for 9 GPUs: phase %s on node %q, want Pending and unscheduled", nine.Status.Phase, nine.Spec.NodeName)
	}
	t.Logf("pod %s (9 GPUs): %s", nine.Name, conditions(nine))
	if err := c.CoreV1().Pods("default").Delete(ctx, nine.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// A ResourceQuota of one GPU per namespace: the API server refuses a pod asking for 2.
	ns := "quota"
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	quota := &corev1.ResourceQuota{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gpus"},
		Spec:       corev1.ResourceQuotaSpec{Hard: corev1.ResourceList{"requests.nvidia.com/gpu": *resource.NewQuantity(1, resource.DecimalSI)}},
	}
	if _, err := c.CoreV1().ResourceQuotas(ns).Create(ctx, quota, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	s.n.waitDefaultServiceAccount(t, ns)
	// The quota controller fills in status.hard before the admission plugin enforces it.
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		q, err := c.CoreV1().ResourceQuotas(ns).Get(ctx, "gpus", metav1.GetOptions{})
		return err == nil && len(q.Status.Hard) > 0, nil
	})
	if err != nil {
		t.Fatalf("the quota controller never set the ResourceQuota's status: %v", err)
	}
	_, err = c.CoreV1().Pods(ns).Create(ctx, testPod(ns, "over-quota", 2), metav1.CreateOptions{})
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "exceeded quota") {
		t.Fatalf("a pod asking for 2 GPUs under a 1-GPU quota: got %v, want Forbidden: exceeded quota", err)
	}
	t.Logf("quota enforced: %v", err)
	if _, err := c.CoreV1().Pods(ns).Create(ctx, testPod(ns, "in-quota", 1), metav1.CreateOptions{}); err != nil {
		t.Fatalf("a pod asking for 1 GPU under a 1-GPU quota: %v", err)
	}
	s.waitPod(t, ns, "in-quota", "Running", 120*time.Second, running)
	if err := c.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// visibleGPUs returns, sorted, the GPUs that a 2-GPU test pod printed in
// its NVIDIA_VISIBLE_DEVICES, and fails unless they are 2 distinct GPUs of
// the node.
func (s *suite) visibleGPUs(t *testing.T, pod *corev1.Pod) []string {
	t.Helper()
	log := s.podLog(t, pod.Namespace, pod.Name)
	line := strings.TrimSpace(strings.SplitN(log, "\n", 2)[0])
	value, ok := strings.CutPrefix(line, "NVIDIA_VISIBLE_DEVICES=")
	if !ok {
		t.Fatalf("the GPU pod %s printed %q, want NVIDIA_VISIBLE_DEVICES=…", pod.Name, log)
	}
	got := strings.Split(value, ",")
	uuids := s.nodeUUIDs(t)
	if len(got) != 2 || got[0] == got[1] || !slices.Contains(uuids, got[0]) || !slices.Contains(uuids, got[1]) {
		t.Fatalf("the GPU pod %s's NVIDIA_VISIBLE_DEVICES=%q, want 2 distinct GPUs of the node %v", pod.Name, value, uuids)
	}
	sort.Strings(got)
	return got
}

// upgrade installs the install values plus extra, as `helm upgrade -f
// values.yaml` with the whole file does.
func (s *suite) upgrade(t *testing.T, extra map[string]any) {
	t.Helper()
	vals := installValues(s.n.env.image)
	for k, v := range extra {
		vals[k] = v
	}
	up := action.NewUpgrade(s.helm)
	up.Namespace = releaseNS
	if _, err := up.Run(releaseName, s.chart, vals); err != nil {
		t.Fatalf("helm upgrade: %v", err)
	}
}

// timeSlicing: the chart's ConfigMap gains replicas: 4; the running plugin
// reloads it and the node's allocatable becomes 32, with no restart.
func (s *suite) timeSlicing(t *testing.T) {
	t0 := time.Now()
	s.upgrade(t, map[string]any{"sharing": timeSlicing4})
	s.n.waitNode(t, "allocatable nvidia.com/gpu=32", 180*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		return al == 4*nodeGPUs
	})
	d := time.Since(t0)
	s.timed("3 ConfigMap replicas: 4 → allocatable 32", d)
	s.samePluginPod(t)
	t.Logf("allocatable 32 after %s (kubelet syncFrequency 10s here; default 1m)", d.Round(time.Millisecond))

	// Back to whole GPUs for the scenarios that follow.
	t1 := time.Now()
	s.upgrade(t, nil)
	s.n.waitNode(t, "allocatable nvidia.com/gpu=8 again", 180*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		return al == nodeGPUs
	})
	s.timed("3 ConfigMap without sharing → allocatable 8", time.Since(t1))
	s.samePluginPod(t)
}

// samePluginPod fails unless the plugin pod is the one installed, never restarted.
func (s *suite) samePluginPod(t *testing.T) {
	t.Helper()
	p, err := s.n.client.CoreV1().Pods(releaseNS).Get(context.Background(), s.pluginPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the plugin pod %s: %v", s.pluginPod.Name, err)
	}
	if p.UID != s.pluginPod.UID || len(p.Status.ContainerStatuses) != 1 || p.Status.ContainerStatuses[0].RestartCount != 0 {
		t.Fatalf("the plugin pod was restarted or replaced: %s", conditions(p))
	}
}

// gpuPodUndisturbed fails unless scenario 2's pod still runs its first container.
func (s *suite) gpuPodUndisturbed(t *testing.T) {
	t.Helper()
	p, err := s.n.client.CoreV1().Pods("default").Get(context.Background(), s.gpuPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the GPU pod: %v", err)
	}
	if !running(p) || p.UID != s.gpuPod.UID || p.Status.ContainerStatuses[0].RestartCount != 0 ||
		p.Status.ContainerStatuses[0].ContainerID != s.gpuPod.Status.ContainerStatuses[0].ContainerID {
		t.Fatalf("the GPU pod was disturbed: %s", conditions(p))
	}
}

// health: an XID 79 on one of the GPU pod's GPUs takes it out of the node's
// allocatable (8 → 7); after the quiet period it is back; the pod runs on.
func (s *suite) health(t *testing.T) {
	uuids := s.nodeUUIDs(t)
	gpu := slices.Index(uuids, s.gpuUUIDs[0])
	t0 := time.Now()
	s.pluginDo(t, http.MethodPost, fmt.Sprintf("/sim/gpus/%d/xid?code=79", gpu))
	// nodeHealth.condition: the condition comes from the daemon, not from
	// the kubelet's status update, so it usually shows first.
	s.waitCondition(t, "False naming the GPU", func(c *corev1.NodeCondition) bool {
		return c.Status == corev1.ConditionFalse && strings.Contains(c.Message, uuids[gpu]) && strings.Contains(c.Message, "1 of 8")
	})
	s.timed("5 XID 79 → GPUHealthy=False in the API server", time.Since(t0))
	s.n.waitNode(t, "allocatable nvidia.com/gpu=7", 120*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		return al == nodeGPUs-1
	})
	d := time.Since(t0)
	s.timed("5 XID 79 → node allocatable 7 (status period 10s)", d)
	t.Logf("XID 79 on GPU %d (%s, the GPU pod's): allocatable 7 after %s", gpu, uuids[gpu], d.Round(time.Millisecond))
	s.gpuPodUndisturbed(t)
	s.waitNodeEvent(t, corev1.EventTypeWarning, "GPUUnhealthy", uuids[gpu])

	t1 := time.Now()
	s.n.waitNode(t, "allocatable nvidia.com/gpu=8 after recovery", 180*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		return al == nodeGPUs
	})
	s.timed("5 recovery (quiet period 10s) → allocatable 8", time.Since(t1))
	s.gpuPodUndisturbed(t)
	s.waitCondition(t, "True after recovery", func(c *corev1.NodeCondition) bool { return c.Status == corev1.ConditionTrue })
	s.waitNodeEvent(t, corev1.EventTypeNormal, "GPUHealthy", uuids[gpu])

	s.xidStorm(t)
	s.ownNodeOnly(t)
}

// devicePluginSockets lists the sockets in the kubelet's device-plugins directory.
func devicePluginSockets(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/var/lib/kubelet/device-plugins")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if e.Type()&os.ModeSocket != 0 {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// restarts: the kubelet restarts (capacity back, pods run on); the plugin
// pod is deleted (the DaemonSet recreates it, allocatable back, no stale socket).
func (s *suite) restarts(t *testing.T) {
	before := devicePluginSockets(t)
	t.Logf("device-plugins sockets: %v", before)

	if err := s.n.stop("kubelet", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	s.n.startKubelet(t)
	// The kubelet's device manager starts empty: it must see the plugin register again.
	s.n.waitNode(t, "allocatable 8 after a kubelet restart", 180*time.Second, func(nd *corev1.Node) bool {
		cp, al := gpus(nd)
		ready := false
		for _, c := range nd.Status.Conditions {
			ready = ready || (c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue && c.LastHeartbeatTime.After(t0))
		}
		return ready && cp == nodeGPUs && al == nodeGPUs
	})
	s.timed("6 kubelet restart → Ready with allocatable 8", time.Since(t0))
	// The restarted kubelet starts with capacity 0 for the plugin's resource
	// (its checkpoint keeps no devices): 8 means the plugin registered again.
	if log := tail(filepath.Join(s.n.logDir, "kubelet.log"), 100000); !strings.Contains(log[strings.LastIndex(log, "==== "):],
		`Got registration request from device plugin with resource" resourceName="nvidia.com/gpu"`) {
		t.Fatal("the restarted kubelet logged no registration of nvidia.com/gpu")
	}
	s.gpuPodUndisturbed(t)
	s.samePluginPod(t)

	// Delete the plugin pod: the DaemonSet controller makes a new one.
	old := s.pluginPod
	t1 := time.Now()
	if err := s.n.client.CoreV1().Pods(releaseNS).Delete(context.Background(), old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	s.pluginPod = s.waitPluginReady(t, old.UID)
	s.n.waitNode(t, "allocatable 8 with the new plugin pod", 120*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		return al == nodeGPUs
	})
	s.timed("6 plugin pod deleted → new pod Ready, allocatable 8", time.Since(t1))
	after := devicePluginSockets(t)
	if !slices.Equal(before, after) {
		t.Fatalf("device-plugins sockets before the plugin pod's replacement %v, after %v: a socket was left behind or lost", before, after)
	}
	s.gpuPodUndisturbed(t)
}

// uninstall: helm uninstall removes every object it made, and the node
// stops offering GPUs.
func (s *suite) uninstall(t *testing.T) {
	ctx := context.Background()
	c := s.n.client
	if err := c.CoreV1().Pods("default").Delete(ctx, s.gpuPod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if _, err := action.NewUninstall(s.helm).Run(releaseName); err != nil {
		t.Fatalf("helm uninstall: %v", err)
	}
	sel := metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + releaseName}
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		ds, err1 := c.AppsV1().DaemonSets(releaseNS).List(ctx, sel)
		pods, err2 := c.CoreV1().Pods(releaseNS).List(ctx, sel)
		cms, err3 := c.CoreV1().ConfigMaps(releaseNS).List(ctx, sel)
		sas, err4 := c.CoreV1().ServiceAccounts(releaseNS).List(ctx, sel)
		svcs, err5 := c.CoreV1().Services(releaseNS).List(ctx, sel)
		crs, err6 := c.RbacV1().ClusterRoles().List(ctx, sel)
		crbs, err7 := c.RbacV1().ClusterRoleBindings().List(ctx, sel)
		vaps, err8 := c.AdmissionregistrationV1().ValidatingAdmissionPolicies().List(ctx, sel)
		vapbs, err9 := c.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().List(ctx, sel)
		if err := errors.Join(err1, err2, err3, err4, err5, err6, err7, err8, err9); err != nil {
			return false, nil
		}
		return len(ds.Items)+len(pods.Items)+len(cms.Items)+len(sas.Items)+len(svcs.Items)+
			len(crs.Items)+len(crbs.Items)+len(vaps.Items)+len(vapbs.Items) == 0, nil
	})
	if err != nil {
		t.Fatalf("objects of the release remain after helm uninstall: %v", err)
	}
	s.timed("7 uninstall → every object gone", time.Since(t0))
	// Scenario 3c's NodeFeature is owned by the DaemonSet: the garbage
	// collector removes it with the release.
	dyn := s.dynamicClient(t)
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := dyn.Resource(nodeFeatureGVR).Namespace(releaseNS).Get(ctx, nodeFeatureName, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
	if err != nil {
		t.Errorf("NodeFeature %s/%s remains after uninstall: %v", releaseNS, nodeFeatureName, err)
	}
	s.waitNoGPUs(t, "7 uninstall", t0)
}

// waitNoGPUs waits, once the plugin is gone, for the node's allocatable
// nvidia.com/gpu 0 and, with E2E_LONG=1, its capacity 0; what names the
// step in the timings, timed from t0.
func (s *suite) waitNoGPUs(t *testing.T, what string, t0 time.Time) {
	t.Helper()
	s.n.waitNode(t, "allocatable nvidia.com/gpu=0", 120*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		return al == 0
	})
	s.timed(what+" → node allocatable 0", time.Since(t0))
	// The kubelet keeps a gone plugin's resource in the node's capacity for
	// its endpoint grace period (5 minutes, fixed in the kubelet), then
	// sets it to 0. E2E_LONG=1 waits for that too.
	if os.Getenv("E2E_LONG") != "1" {
		t.Log("capacity nvidia.com/gpu goes to 0 after the kubelet's 5-minute endpoint grace period: E2E_LONG=1 waits for it")
		return
	}
	s.n.waitNode(t, "capacity nvidia.com/gpu=0", 7*time.Minute, func(nd *corev1.Node) bool {
		cp, _ := gpus(nd)
		return cp == 0
	})
	s.timed(what+" → node capacity 0 (kubelet grace 5m)", time.Since(t0))
}

// readmeScrapeJob returns README's scrape_configs block for the gpu-plugin
// job, unchanged.
func readmeScrapeJob(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	const start = "```yaml\nscrape_configs:\n  - job_name: gpu-plugin\n"
	i := strings.Index(string(b), start)
	if i < 0 {
		t.Fatalf("README.md has no ```yaml block starting with scrape_configs: - job_name: gpu-plugin")
	}
	rest := string(b)[i+len("```yaml\n"):]
	j := strings.Index(rest, "```")
	if j < 0 {
		t.Fatal("README.md's scrape job block is not closed")
	}
	return rest[:j]
}

// prometheus: a real Prometheus with README's scrape job, finding the
// plugin through kubernetes_sd against the real API server as an
// in-cluster Prometheus does (the service-account files and
// KUBERNETES_SERVICE_* it reads are made here), scrapes it, and the GPU
// pod's devices carry its pod, namespace and container. The server is
// E2E_PROMETHEUS (scripts/test-e2e.sh builds it from the Prometheus
// module), else the one on PATH.
func (s *suite) prometheus(t *testing.T) {
	bin := os.Getenv("E2E_PROMETHEUS")
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("prometheus"); err != nil {
			t.Skip("SKIP scenario 4: no prometheus binary (E2E_PROMETHEUS, or the Debian package prometheus)")
		}
	}
	if out, err := exec.Command(bin, "--version").CombinedOutput(); err == nil {
		t.Logf("Prometheus %s: %s", bin, strings.SplitN(string(out), "\n", 2)[0])
	}
	n := s.n
	sa := "/var/run/secrets/kubernetes.io/serviceaccount" // under the namespace's private /run
	if err := os.MkdirAll(sa, 0o755); err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(n.path("apiserver", "apiserver.crt"))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(sa, "token"), adminToken)
	write(t, filepath.Join(sa, "ca.crt"), string(ca))
	write(t, filepath.Join(sa, "namespace"), "monitoring")
	dir := n.path("prometheus")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "prometheus.yml"), "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n"+readmeScrapeJob(t))
	// Debian builds Prometheus without some service discoveries (2.42 in
	// bookworm has no kubernetes_sd); promtool, from the same package, says so.
	if promtool, err := exec.LookPath("promtool"); err == nil && os.Getenv("E2E_PROMETHEUS") == "" {
		out, err := exec.Command(promtool, "check", "config", filepath.Join(dir, "prometheus.yml")).CombinedOutput()
		if err != nil && strings.Contains(string(out), "kubernetes_sd_configs not found") {
			t.Skipf("SKIP scenario 4: this machine's Prometheus (%s, Debian's) is built without kubernetes_sd, which README's scrape job uses (promtool: field kubernetes_sd_configs not found)", bin)
		}
	}
	const addr = "127.0.0.1:9090"
	t0 := time.Now()
	n.startEnv(t, "prometheus", []string{"KUBERNETES_SERVICE_HOST=" + nodeIP, "KUBERNETES_SERVICE_PORT=" + apiPort},
		bin, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+addr, "--log.level=info")
	// Stopped with the node: scenario 4b queries it too.

	query := func(q string) ([]map[string]string, error) {
		resp, err := http.Get("http://" + addr + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var r struct {
			Status string `json:"status"`
			Data   struct {
				Result []struct {
					Metric map[string]string `json:"metric"`
					Value  []any             `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return nil, err
		}
		var out []map[string]string
		for _, x := range r.Data.Result {
			m := x.Metric
			m["__value__"] = fmt.Sprint(x.Value[1])
			out = append(out, m)
		}
		return out, nil
	}
	var last string
	err = wait.PollUntilContextTimeout(context.Background(), 500*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		n.alive(t, "prometheus")
		r, err := query(`up{job="gpu-plugin"}`)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = fmt.Sprint(r)
		return len(r) == 1 && r[0]["__value__"] == "1", nil
	})
	if err != nil {
		t.Fatalf(`up{job="gpu-plugin"} is not 1 after 120s: %v; last: %s`, err, last)
	}
	s.timed(`4 Prometheus start → up{job="gpu-plugin"} == 1`, time.Since(t0))
	for _, uuid := range s.gpuUUIDs {
		err = wait.PollUntilContextTimeout(context.Background(), 500*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
			r, err := query(fmt.Sprintf(`DCGM_FI_DEV_GPU_UTIL{UUID=%q}`, uuid))
			if err != nil {
				last = err.Error()
				return false, nil
			}
			last = fmt.Sprint(r)
			return len(r) == 1 && r[0]["pod"] == s.gpuPod.Name && r[0]["namespace"] == "default" && r[0]["container"] == "main", nil
		})
		if err != nil {
			t.Fatalf("DCGM_FI_DEV_GPU_UTIL for the GPU pod's %s does not carry pod %s, namespace default, container main: %v; last: %s", uuid, s.gpuPod.Name, err, last)
		}
	}
	t.Logf("Prometheus found the plugin through kubernetes_sd; DCGM_FI_DEV_GPU_UTIL of %v carries pod=%s namespace=default container=main", s.gpuUUIDs, s.gpuPod.Name)
	s.promQuery = query
}
