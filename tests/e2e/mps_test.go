package e2e

// Scenario 4c: CUDA MPS sharing (sharing.mps) on the real node. The chart
// turns MPS on by itself when its own config has a sharing.mps section
// (mps.enabled left false): hostPID, the MPS root mounted at the same path
// and <root>/shm at /dev/shm. The simulated node has no driver, so the
// daemon runs the test fake of nvidia-cuda-mps-control
// (internal/testkit/fakempscontrol), which scenario 4c's image carries.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

const (
	mpsResource = "nvidia.com/gpu"
	mpsReplicas = 4
	// Where image.sh's build_mps_image puts the fake in scenario 4c's image
	// (the product image plus this one file). The chart has no general
	// extraVolumes, so a derived image is how the fake reaches the pod;
	// --mps-control-binary names it, as docs/sharing.md says a simulated
	// node needs.
	mpsControlInPod = "/usr/local/bin/nvidia-cuda-mps-control"
	// FAKE_MPS_READY_DELAY, in the plugin's environment (the daemons inherit
	// it on a simulated node): each start of the fake control daemon listens
	// only after this delay. Without it a killed daemon is back (1 s
	// backoff) long before the kubelet's next node status update (every
	// 10 s), so the node's allocatable would never show the replicas
	// unhealthy; with it, they are unhealthy for about 1 s + this, which
	// always spans a status update.
	mpsReadyDelay = 15 * time.Second
	// The pipe directory a client container gets (CUDA_MPS_PIPE_DIRECTORY).
	mpsPipeInPod = "/mps/" + mpsResource + "/pipe"
)

// mpsValues are the install values with sharing.mps (replicas 4) in the
// chart's config, the MPS root root, scenario 4c's image and the fake's
// path; mps.enabled stays at its default (false).
func mpsValues(e env, root string) map[string]any {
	base := installValues(e.image)
	repo, tag, _ := strings.Cut(e.mpsImage, ":")
	return map[string]any{
		"image": map[string]any{"repository": repo, "tag": tag},
		"sharing": map[string]any{"mps": map[string]any{
			"resources": []any{map[string]any{"name": mpsResource, "replicas": mpsReplicas}},
		}},
		"mps":       map[string]any{"root": root},
		"extraArgs": append(slices.Clone(base["extraArgs"].([]any)), "--mps-control-binary="+mpsControlInPod),
		"extraEnv": append(slices.Clone(base["extraEnv"].([]any)),
			map[string]any{"name": "FAKE_MPS_READY_DELAY", "value": mpsReadyDelay.String()}),
	}
}

// mpsDaemon is the part of a /debug/devices "mps" entry the scenario reads.
type mpsDaemon struct {
	Resource      string `json:"resource"`
	State         string `json:"state"`
	Reason        string `json:"reason"`
	PID           int    `json:"pid"`
	Restarts      uint64 `json:"restarts"`
	Replicas      int    `json:"replicas"`
	PipeDirectory string `json:"pipeDirectory"`
	Started       bool   `json:"started"`
}

type mpsHealth struct {
	Healthy bool   `json:"healthy"`
	Reason  string `json:"reason"`
}

// mpsDebug reads /debug/devices: the resource's MPS daemon (nil if none)
// and its health unit.
func (s *suite) mpsDebug(t *testing.T) (*mpsDaemon, mpsHealth, string) {
	t.Helper()
	b := s.pluginDo(t, http.MethodGet, "/debug/devices")
	var doc struct {
		Health map[string]mpsHealth `json:"health"`
		MPS    []mpsDaemon          `json:"mps"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("decoding /debug/devices: %v: %s", err, b)
	}
	h, ok := doc.Health["mps:"+mpsResource]
	if !ok {
		h = mpsHealth{Healthy: true, Reason: "(no health unit)"}
	}
	var mpsJSON []byte
	mpsJSON, _ = json.Marshal(doc.MPS)
	for i := range doc.MPS {
		if doc.MPS[i].Resource == mpsResource {
			return &doc.MPS[i], h, string(mpsJSON)
		}
	}
	return nil, h, string(mpsJSON)
}

// waitMPS polls /debug/devices until ok holds for the daemon.
func (s *suite) waitMPS(t *testing.T, what string, timeout time.Duration, ok func(*mpsDaemon, mpsHealth) bool) *mpsDaemon {
	t.Helper()
	var d *mpsDaemon
	var last string
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		var h mpsHealth
		d, h, last = s.mpsDebug(t)
		last += fmt.Sprintf(" health %+v", h)
		return d != nil && ok(d, h), nil
	})
	if err != nil {
		t.Fatalf("/debug/devices: MPS daemon of %s: %s not reached in %s: %v; last: %s", mpsResource, what, timeout, err, last)
	}
	return d
}

// cmdline is /proc/<pid>/cmdline, arguments split ("" if gone).
func cmdline(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// fakeDaemons lists the PIDs of live fake control daemons (the fake runs
// its daemon as "<binary> -fake-daemon") in this PID namespace, the node's.
func fakeDaemons() []int {
	var out []int
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(d), "%d", &pid); err != nil {
			continue
		}
		if slices.Contains(cmdline(pid), "-fake-daemon") {
			out = append(out, pid)
		}
	}
	return out
}

// mpsPodSpec is a busybox pod with one MPS replica that reports, one
// key=value per line: its CUDA_MPS_PIPE_DIRECTORY; whether the pipe
// directory's control is a socket; the file the host wrote in <root>/shm
// as its /dev/shm shows it; that it wrote /dev/shm/<name> (token and
// name); with read set, that file of another pod; then "done".
func mpsPodSpec(name, token, read string) *corev1.Pod {
	p := testPod("default", name, 1)
	script := `echo "CUDA_MPS_PIPE_DIRECTORY=$CUDA_MPS_PIPE_DIRECTORY"
if test -S ` + mpsPipeInPod + `/control; then echo "control=socket"; else echo "control=not a socket"; fi
echo "from-host=$(cat /dev/shm/from-host 2>&1)"
if echo "` + token + ` ` + name + `" > /dev/shm/` + name + `; then echo "wrote=ok"; else echo "wrote=failed"; fi
`
	if read != "" {
		script += `echo "read=$(cat /dev/shm/` + read + ` 2>&1)"` + "\n"
	}
	script += "echo done\nexec sleep 3600\n"
	p.Spec.Containers[0].Command = []string{"/bin/sh", "-c", script}
	return p
}

// podReport waits for a pod's log to end its report ("done") and returns
// its key=value lines.
func (s *suite) podReport(t *testing.T, name string) map[string]string {
	t.Helper()
	var log string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		b, err := s.n.client.CoreV1().Pods("default").GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctx)
		if err != nil {
			return false, nil
		}
		log = string(b)
		return strings.Contains(log, "\ndone\n"), nil
	})
	if err != nil {
		t.Fatalf("pod %s did not finish its report: %v; log so far:\n%s", name, err, log)
	}
	out := map[string]string{}
	for _, l := range strings.Split(log, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			out[k] = v
		}
	}
	t.Logf("pod %s reports:\n%s", name, strings.TrimSpace(log))
	return out
}

// mpsPluginPodProblems lists what the plugin pod lacks of the chart's MPS
// rendering: hostPID, the MPS root at the same path, <root>/shm at
// /dev/shm, MPS_ROOT, the capabilities, the fake's flag.
func mpsPluginPodProblems(p *corev1.Pod, root, image string) []string {
	var bad []string
	if !p.Spec.HostPID {
		bad = append(bad, "no hostPID")
	}
	vols := map[string]string{}
	for _, v := range p.Spec.Volumes {
		if v.HostPath != nil {
			vols[v.Name] = v.HostPath.Path
		}
	}
	if vols["mps-root"] != root {
		bad = append(bad, fmt.Sprintf("volume mps-root is hostPath %q, want %q", vols["mps-root"], root))
	}
	if vols["mps-shm"] != root+"/shm" {
		bad = append(bad, fmt.Sprintf("volume mps-shm is hostPath %q, want %q", vols["mps-shm"], root+"/shm"))
	}
	if len(p.Spec.Containers) != 1 {
		return append(bad, fmt.Sprintf("%d containers, want 1", len(p.Spec.Containers)))
	}
	c := p.Spec.Containers[0]
	if c.Image != image {
		bad = append(bad, fmt.Sprintf("image %q, want %q", c.Image, image))
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	if mounts["mps-root"] != root {
		bad = append(bad, fmt.Sprintf("mps-root mounted at %q, want %q (the host path)", mounts["mps-root"], root))
	}
	if mounts["mps-shm"] != "/dev/shm" {
		bad = append(bad, fmt.Sprintf("mps-shm mounted at %q, want /dev/shm", mounts["mps-shm"]))
	}
	envRoot := ""
	for _, e := range c.Env {
		if e.Name == "MPS_ROOT" {
			envRoot = e.Value
		}
	}
	if envRoot != root {
		bad = append(bad, fmt.Sprintf("MPS_ROOT=%q, want %q", envRoot, root))
	}
	var caps []string
	if sc := c.SecurityContext; sc != nil && sc.Capabilities != nil {
		for _, cp := range sc.Capabilities.Add {
			caps = append(caps, string(cp))
		}
	}
	for _, want := range []string{"SYS_ADMIN", "SETUID", "SETGID"} {
		if !slices.Contains(caps, want) {
			bad = append(bad, fmt.Sprintf("capabilities add %v lacks %s", caps, want))
		}
	}
	if !slices.Contains(c.Args, "--mps-control-binary="+mpsControlInPod) {
		bad = append(bad, fmt.Sprintf("args %v lack --mps-control-binary=%s", c.Args, mpsControlInPod))
	}
	return bad
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// mpsScenario (4c): the release upgraded to sharing.mps; the plugin pod
// runs the MPS control daemon; the node offers 32 replicas; two pods get
// the MPS environment and mounts and share one /dev/shm with the host's
// <root>/shm and the plugin's MPS side; a 2-replica pod is refused; a
// killed daemon takes the replicas out of the node's allocatable until it
// is restarted; the way back quits the daemon.
func (s *suite) mpsScenario(t *testing.T) {
	ctx := context.Background()
	c := s.n.client
	// A short root (unix socket paths are limited to 107 bytes) of this
	// test's own, so that nothing touches /run/nvidia/mps.
	root, err := os.MkdirTemp("/tmp", "e2e-mps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(root); err != nil {
			t.Logf("removing the MPS root %s: %v", root, err)
		}
	})
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	pipe := filepath.Join(root, mpsResource, "pipe")
	socket := filepath.Join(pipe, "control")
	started := filepath.Join(root, mpsResource, ".started")
	controlLog := filepath.Join(root, mpsResource, "log", "control.log")
	shm := filepath.Join(root, "shm")

	// 1. sharing.mps in the chart's config: a new plugin pod (hostPID, the
	// MPS mounts, scenario 4c's image).
	t0 := time.Now()
	s.replacePlugin(t, mpsValues(s.n.env, root))
	if bad := mpsPluginPodProblems(s.pluginPod, root, s.n.env.mpsImage); len(bad) > 0 {
		t.Fatalf("the plugin pod with sharing.mps in the chart's config (mps.enabled false):\n  %s", strings.Join(bad, "\n  "))
	}
	d := s.waitMPS(t, "ready", 120*time.Second, func(d *mpsDaemon, h mpsHealth) bool { return d.State == "ready" && h.Healthy })
	s.waitAllocatable(t, mpsReplicas*nodeGPUs, "allocatable nvidia.com/gpu=32 (8 GPUs × 4 MPS replicas)")
	s.timed(fmt.Sprintf("4c sharing.mps → allocatable 32 (fake ready delay %s)", mpsReadyDelay), time.Since(t0))
	if d.Replicas != mpsReplicas || d.PipeDirectory != pipe || d.Restarts != 0 || !d.Started || d.PID <= 0 {
		t.Fatalf("/debug/devices MPS daemon %+v, want replicas %d, pipeDirectory %s, 0 restarts, started, a pid", d, mpsReplicas, pipe)
	}
	// hostPID: the daemon's PID, as the plugin sees it, is the node's.
	if args := cmdline(d.PID); !slices.Contains(args, "-fake-daemon") {
		t.Fatalf("process %d (the MPS daemon's pid in /debug/devices) runs %q on the node, want the fake's -fake-daemon", d.PID, args)
	}
	if fi, err := os.Stat(socket); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("the host's %s is not a socket: %v", socket, err)
	}
	if _, err := os.Stat(started); err != nil {
		t.Errorf("the .started marker: %v", err)
	}
	metrics := grepLines(string(s.pluginDo(t, http.MethodGet, "/metrics")), "gpu_plugin_mps_daemon_ready{")
	if !strings.Contains(metrics, `resource="nvidia.com/gpu"`) || !strings.Contains(metrics, `state="ready"`) || !strings.HasSuffix(metrics, " 1") {
		t.Errorf("gpu_plugin_mps_daemon_ready: got %q, want the resource's series, state ready, 1", metrics)
	}
	t.Logf("MPS daemon ready: pid %d (node PID namespace), pipe %s, metric %s", d.PID, d.PipeDirectory, metrics)

	// 2. Two client pods, one after the other: the host's file in <root>/shm
	// is in their /dev/shm, pod A's file is on the host, in the plugin's
	// /dev/shm (the MPS daemon's) and in pod B's.
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	token := hex.EncodeToString(b)
	write(t, filepath.Join(shm, "from-host"), token+" host")
	pods := []string{"mps-a", "mps-b", "mps-two"}
	t.Cleanup(func() {
		for _, p := range pods {
			_ = c.CoreV1().Pods("default").Delete(context.Background(), p, metav1.DeleteOptions{})
		}
	})
	t1 := time.Now()
	for i, name := range pods[:2] {
		read := ""
		if i == 1 {
			read = pods[0]
		}
		if _, err := c.CoreV1().Pods("default").Create(ctx, mpsPodSpec(name, token, read), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		s.waitPod(t, "default", name, "Running", 120*time.Second, running)
		r := s.podReport(t, name)
		want := map[string]string{
			"CUDA_MPS_PIPE_DIRECTORY": mpsPipeInPod,
			"control":                 "socket",
			"from-host":               token + " host",
			"wrote":                   "ok",
		}
		if read != "" {
			want["read"] = token + " " + read
		}
		for k, v := range want {
			if r[k] != v {
				t.Errorf("pod %s: %s=%q, want %q", name, k, r[k], v)
			}
		}
		if got, err := os.ReadFile(filepath.Join(shm, name)); err != nil || strings.TrimSpace(string(got)) != token+" "+name {
			t.Errorf("pod %s's /dev/shm/%s is not the host's %s: %q, %v", name, name, filepath.Join(shm, name), got, err)
		}
		// The plugin container's /dev/shm, through the MPS daemon's root
		// (the distroless image has no shell to exec).
		inPlugin := fmt.Sprintf("/proc/%d/root/dev/shm/%s", d.PID, name)
		if got, err := os.ReadFile(inPlugin); err != nil || strings.TrimSpace(string(got)) != token+" "+name {
			t.Errorf("pod %s's /dev/shm/%s is not the plugin container's (%s): %q, %v", name, name, inPlugin, got, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	s.timed("4c two MPS pods Running, one /dev/shm", time.Since(t1))

	// 3. Two replicas in one container: refused (failRequestsGreaterThanOne
	// defaults to true with MPS), at the kubelet's admission.
	two := testPod("default", pods[2], 2)
	if _, err := c.CoreV1().Pods("default").Create(ctx, two, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p := s.waitPod(t, "default", pods[2], "Failed", 120*time.Second, func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodFailed })
	if p.Status.Reason != "UnexpectedAdmissionError" || !strings.Contains(p.Status.Message, "MPS with failRequestsGreaterThanOne") {
		t.Fatalf("a pod asking for 2 MPS replicas: reason %q message %q, want UnexpectedAdmissionError naming MPS with failRequestsGreaterThanOne", p.Status.Reason, p.Status.Message)
	}
	t.Logf("2 replicas refused: %s: %s", p.Status.Reason, p.Status.Message)
	if err := c.CoreV1().Pods("default").Delete(ctx, pods[2], metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// 4. The control daemon dies (the fake's die, sent from the host through
	// the host's pipe directory): the replicas turn unhealthy, the node's
	// allocatable drops to 0, and comes back once the daemon is restarted.
	before := d
	t2 := time.Now()
	die := exec.Command(s.n.env.mpsControl)
	die.Env = append(os.Environ(), "CUDA_MPS_PIPE_DIRECTORY="+pipe)
	die.Stdin = strings.NewReader("die\n")
	out, err := die.CombinedOutput()
	t.Logf("echo die | CUDA_MPS_PIPE_DIRECTORY=%s %s: %v %s", pipe, s.n.env.mpsControl, err, bytes.TrimSpace(out))
	s.waitMPS(t, "its replicas unhealthy after die", 10*time.Second, func(d *mpsDaemon, h mpsHealth) bool {
		return !h.Healthy && strings.Contains(h.Reason, "MPS control daemon not running")
	})
	s.timed("4c MPS daemon killed → its replicas unhealthy", time.Since(t2))
	s.waitAllocatable(t, 0, "allocatable nvidia.com/gpu=0 while the MPS daemon is down")
	s.timed("4c MPS daemon killed → allocatable 0 (status period 10s)", time.Since(t2))
	if args := cmdline(before.PID); slices.Contains(args, "-fake-daemon") {
		t.Fatalf("the killed daemon, pid %d, still runs", before.PID)
	}
	d = s.waitMPS(t, "ready again, restarted once", 120*time.Second, func(d *mpsDaemon, h mpsHealth) bool {
		return d.State == "ready" && h.Healthy && d.Restarts == before.Restarts+1 && d.PID != before.PID
	})
	s.waitAllocatable(t, mpsReplicas*nodeGPUs, "allocatable nvidia.com/gpu=32 after the MPS daemon's restart")
	s.timed("4c MPS daemon killed → restarted, allocatable 32", time.Since(t2))
	t.Logf("MPS daemon restarted: pid %d → %d, restarts %d", before.PID, d.PID, d.Restarts)
	for _, name := range pods[:2] {
		p, err := c.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil || !running(p) || p.Status.ContainerStatuses[0].RestartCount != 0 {
			t.Errorf("MPS pod %s after the daemon's restart: %v %s", name, err, conditionsOf(p))
		}
	}

	// 5. Back to whole GPUs: the plugin pod is replaced, and its MPS daemon
	// quit (not killed: quit removes the socket, which a crash leaves).
	t3 := time.Now()
	for _, name := range pods[:2] {
		if err := c.CoreV1().Pods("default").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		for _, name := range pods {
			if _, err := c.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("the MPS pods are not gone a minute after their deletion: %v", err)
	}
	lastPID := d.PID
	s.replacePlugin(t, nil)
	s.waitAllocatable(t, nodeGPUs, "allocatable nvidia.com/gpu=8 again")
	if s.pluginPod.Spec.HostPID || s.pluginPod.Spec.Containers[0].Image != s.n.env.image {
		t.Errorf("the plugin pod after the rollback: hostPID %v, image %s; want no hostPID, %s", s.pluginPod.Spec.HostPID, s.pluginPod.Spec.Containers[0].Image, s.n.env.image)
	}
	var left []string
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		left = nil
		if _, err := os.Lstat(socket); err == nil {
			left = append(left, "socket "+socket)
		}
		if _, err := os.Lstat(started); err == nil {
			left = append(left, "marker "+started)
		}
		if pids := fakeDaemons(); len(pids) > 0 {
			left = append(left, fmt.Sprintf("fake daemon processes %v", pids))
		}
		return len(left) == 0, nil
	})
	if err != nil {
		t.Fatalf("after the rollback the MPS daemon was not quit: left %v", left)
	}
	// The fake logs each command: the last daemon's lines, from its start
	// line on, end with quit and its exit.
	logText := readFile(t, controlLog)
	last := logText
	if i := strings.Index(logText, fmt.Sprintf("Control %5d]", lastPID)); i >= 0 {
		last = logText[i:]
	}
	if !strings.Contains(last, fmt.Sprintf("Control %5d] Cmd:quit", lastPID)) || !strings.Contains(last, fmt.Sprintf("Control %5d] Exit", lastPID)) {
		t.Errorf("the last MPS daemon (pid %d) did not take quit; its log:\n%s", lastPID, last)
	}
	s.timed("4c back to whole GPUs → allocatable 8, MPS daemon quit", time.Since(t3))
}

func conditionsOf(p *corev1.Pod) string {
	if p == nil {
		return "no pod"
	}
	return conditions(p)
}
