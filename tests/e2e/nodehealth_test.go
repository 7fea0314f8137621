package e2e

// Scenario 5's cluster-facing half (issue 20): with the chart's
// nodeHealth.condition and nodeHealth.taint, the daemon's GPU health shows
// in the real API server as a GPUHealthy node condition, Events on the
// Node and a NoSchedule taint, and its service account can change nothing
// but its own node.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
)

const (
	conditionType = "GPUHealthy"
	taintKey      = "gpu-plugin.io/no-healthy-gpu"
)

func gpuCondition(nd *corev1.Node) *corev1.NodeCondition {
	for i := range nd.Status.Conditions {
		if nd.Status.Conditions[i].Type == conditionType {
			return &nd.Status.Conditions[i]
		}
	}
	return nil
}

func tainted(nd *corev1.Node) bool {
	return slices.ContainsFunc(nd.Spec.Taints, func(t corev1.Taint) bool {
		return t.Key == taintKey && t.Effect == corev1.TaintEffectNoSchedule
	})
}

// waitCondition waits for the node's GPUHealthy condition to satisfy ok.
func (s *suite) waitCondition(t *testing.T, what string, ok func(*corev1.NodeCondition) bool) *corev1.NodeCondition {
	t.Helper()
	nd := s.n.waitNode(t, "condition "+conditionType+" "+what, 60*time.Second, func(nd *corev1.Node) bool {
		c := gpuCondition(nd)
		return c != nil && ok(c)
	})
	return gpuCondition(nd)
}

// nodeEvents lists the Events about the node with reason, from since on
// (Event times have whole seconds), counting repeats.
func (s *suite) nodeEvents(t *testing.T, reason string, since time.Time) (events []corev1.Event, total int32) {
	t.Helper()
	list, err := s.n.client.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{
		FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + nodeName + ",reason=" + reason,
	})
	if err != nil {
		t.Fatalf("listing the node's %s Events: %v", reason, err)
	}
	for _, e := range list.Items {
		if e.LastTimestamp.Time.Before(since.Truncate(time.Second)) {
			continue
		}
		events = append(events, e)
		total += max(e.Count, 1)
	}
	return events, total
}

// waitNodeEvent waits for an Event about the node with the type and
// reason whose message names what.
func (s *suite) waitNodeEvent(t *testing.T, typ, reason, what string) {
	t.Helper()
	var seen []string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		events, _ := s.nodeEvents(t, reason, time.Time{})
		seen = seen[:0]
		for _, e := range events {
			seen = append(seen, e.Type+" "+e.Message)
			if e.Type == typ && strings.Contains(e.Message, what) && e.Source.Component == "gpu-plugin" {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no %s Event %s about the node naming %s; seen: %q", typ, reason, what, seen)
	}
}

// xidStorm: 1,000 fatal XIDs spread over every GPU. Each GPU turns
// unhealthy once, so the node gets one Event per GPU, not per XID; the
// node is tainted while no GPU can be allocated, the running GPU pod is
// left alone, and recovery clears the condition and the taint.
func (s *suite) xidStorm(t *testing.T) {
	const xids = 1000
	before := map[string]int32{} // Event name → count before the storm
	events, _ := s.nodeEvents(t, "GPUUnhealthy", time.Time{})
	for _, e := range events {
		before[e.Name] = max(e.Count, 1)
	}
	// Straight to the pod, 8 at a time (pluginDo asks the API server for
	// the pod's address each time, under client-go's 5 QPS limit).
	pod, err := s.n.client.CoreV1().Pods(releaseNS).Get(context.Background(), s.pluginPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	errs := make(chan error, xids)
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 10 * time.Second}
	for w := range nodeGPUs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < xids; i += nodeGPUs {
				resp, err := client.Post(fmt.Sprintf("http://%s:9400/sim/gpus/%d/xid?code=79", pod.Status.PodIP, i%nodeGPUs), "", nil)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("XID %d: %s", i, resp.Status)
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("posting the XID storm: %v", err)
	}
	t.Logf("%d XIDs posted in %s", xids, time.Since(t0).Round(time.Millisecond))
	s.n.waitNode(t, "tainted "+taintKey+":NoSchedule", 60*time.Second, tainted)
	s.timed("5 1,000-XID storm → node tainted NoSchedule", time.Since(t0))
	s.waitCondition(t, "False for 8 of 8", func(c *corev1.NodeCondition) bool {
		return c.Status == corev1.ConditionFalse && strings.HasPrefix(c.Message, "8 of 8 GPUs unhealthy")
	})
	s.gpuPodUndisturbed(t)
	// Let the event broadcaster deliver what it will.
	time.Sleep(3 * time.Second)
	events, _ = s.nodeEvents(t, "GPUUnhealthy", t0)
	var total int32
	for _, e := range events {
		total += max(e.Count, 1) - before[e.Name]
	}
	t.Logf("%d XIDs over %d GPUs → %d GPUUnhealthy Events (%d objects)", xids, nodeGPUs, total, len(events))
	s.timings = append(s.timings, fmt.Sprintf("%-58s %8d", "5 GPUUnhealthy Events per 1,000-XID storm", total))
	if total != nodeGPUs {
		var msgs []string
		for _, e := range events {
			msgs = append(msgs, fmt.Sprintf("%d× %s", e.Count, e.Message))
		}
		t.Errorf("%d GPUUnhealthy Events for a storm over %d GPUs, want one per GPU: %q", total, nodeGPUs, msgs)
	}

	t1 := time.Now()
	s.n.waitNode(t, "untainted and allocatable 8 after recovery", 180*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		c := gpuCondition(nd)
		return !tainted(nd) && al == nodeGPUs && c != nil && c.Status == corev1.ConditionTrue
	})
	s.timed("5 storm recovery → condition True, taint gone, allocatable 8", time.Since(t1))
	s.gpuPodUndisturbed(t)

	// After the storm, so that its Events were counted alone.
	s.xidToCondition(t)
	s.n.waitNode(t, "condition True and allocatable 8 again", 180*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		c := gpuCondition(nd)
		return !tainted(nd) && al == nodeGPUs && c != nil && c.Status == corev1.ConditionTrue
	})
}

// pluginClient is a client with the plugin's own service account and a
// token bound to the running plugin pod, as the kubelet mounts it (the API
// server adds the pod's node to such a token).
func (s *suite) pluginClient(t *testing.T) kubernetes.Interface {
	t.Helper()
	ctx := context.Background()
	admin := s.n.client
	pod, err := admin.CoreV1().Pods(releaseNS).Get(ctx, s.pluginPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := admin.CoreV1().ServiceAccounts(releaseNS).CreateToken(ctx, pod.Spec.ServiceAccountName, &authv1.TokenRequest{
		Spec: authv1.TokenRequestSpec{
			BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
			ExpirationSeconds: ptrTo(int64(600)),
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("a token for the plugin's service account: %v", err)
	}
	return kubernetes.NewForConfigOrDie(&rest.Config{
		Host: "https://127.0.0.1:" + apiPort, BearerToken: tok.Status.Token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
	})
}

// accessCheck is one request the plugin's service account makes, and
// whether the API server must let it through.
type accessCheck struct {
	name    string
	do      func() error
	allowed bool
	because string // in the refusal
}

// checkAccess runs the checks: an allowed one must succeed, a refused one
// must come back Forbidden (or Invalid, as some admission answers) with
// the expected reason in its message.
func checkAccess(t *testing.T, checks []accessCheck) {
	t.Helper()
	for _, ch := range checks {
		err := ch.do()
		switch {
		case ch.allowed && err != nil:
			t.Errorf("%s: refused: %v", ch.name, err)
		case !ch.allowed && !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err):
			t.Errorf("%s: want Forbidden, got %v", ch.name, err)
		case !ch.allowed && !strings.Contains(err.Error(), ch.because):
			t.Errorf("%s: refused, but not for the expected reason (%q): %v", ch.name, ch.because, err)
		case !ch.allowed:
			t.Logf("%s: refused: %v", ch.name, err)
		}
	}
}

// ownNodeOnly: with its own service account the plugin may change its own
// node, and nothing else, even where its ClusterRole alone would allow it.
// Writes are dry runs: admission runs, nothing is stored.
func (s *suite) ownNodeOnly(t *testing.T) {
	ctx := context.Background()
	admin := s.n.client
	c := s.pluginClient(t)
	other := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "e2e-other-node"}}
	if _, err := admin.CoreV1().Nodes().Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating a second Node object: %v", err)
	}
	t.Cleanup(func() { _ = admin.CoreV1().Nodes().Delete(context.Background(), other.Name, metav1.DeleteOptions{}) })

	dry := metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}}
	statusPatch := []byte(`{"status":{"conditions":[{"type":"` + conditionType + `","status":"True","reason":"GPUHealthy","message":"dry run"}]}}`)
	event := func(node string) *corev1.Event {
		return &corev1.Event{
			ObjectMeta:     metav1.ObjectMeta{GenerateName: "gpu-plugin-e2e-", Namespace: metav1.NamespaceDefault},
			InvolvedObject: corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: node, UID: types.UID(node)},
			Type:           corev1.EventTypeNormal, Reason: "GPUHealthy", Message: "dry run",
			Source: corev1.EventSource{Component: "gpu-plugin", Host: node},
		}
	}
	checkAccess(t, []accessCheck{
		{"patch its own node's status", func() error {
			_, err := c.CoreV1().Nodes().Patch(ctx, nodeName, types.StrategicMergePatchType, statusPatch, dry, "status")
			return err
		}, true, ""},
		{"an Event about its own node", func() error {
			_, err := c.CoreV1().Events(metav1.NamespaceDefault).Create(ctx, event(nodeName), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
			return err
		}, true, ""},
		{"patch another node's status", func() error {
			_, err := c.CoreV1().Nodes().Patch(ctx, other.Name, types.StrategicMergePatchType, statusPatch, dry, "status")
			return err
		}, false, "only the node its pod runs on"},
		{"taint another node", func() error {
			// The node controller writes to the new Node too: retry a conflict.
			return retry.RetryOnConflict(retry.DefaultRetry, func() error {
				nd, err := c.CoreV1().Nodes().Get(ctx, other.Name, metav1.GetOptions{})
				if err != nil {
					return err
				}
				nd.Spec.Taints = append(nd.Spec.Taints, corev1.Taint{Key: taintKey, Effect: corev1.TaintEffectNoSchedule})
				_, err = c.CoreV1().Nodes().Update(ctx, nd, metav1.UpdateOptions{DryRun: []string{metav1.DryRunAll}})
				return err
			})
		}, false, "only the node its pod runs on"},
		{"an Event about another node", func() error {
			_, err := c.CoreV1().Events(metav1.NamespaceDefault).Create(ctx, event(other.Name), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
			return err
		}, false, "only the node its pod runs on"},
		{"list secrets", func() error {
			_, err := c.CoreV1().Secrets(releaseNS).List(ctx, metav1.ListOptions{})
			return err
		}, false, "forbidden"},
		{"delete its own node", func() error {
			return c.CoreV1().Nodes().Delete(ctx, nodeName, metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}})
		}, false, "forbidden"},
	})
}

func ptrTo[T any](v T) *T { return &v }

// xidToCondition samples the time from an XID to the API server's
// GPUHealthy condition naming it: one XID per GPU in turn, each waited
// for (the message counts the sick GPUs), so 8 samples.
func (s *suite) xidToCondition(t *testing.T) {
	pod, err := s.n.client.CoreV1().Pods(releaseNS).Get(context.Background(), s.pluginPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var took []time.Duration
	for g := range nodeGPUs {
		t0 := time.Now()
		resp, err := http.Post(fmt.Sprintf("http://%s:9400/sim/gpus/%d/xid?code=79", pod.Status.PodIP, g), "", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		want := fmt.Sprintf("%d of %d GPUs unhealthy", g+1, nodeGPUs)
		s.waitCondition(t, want, func(c *corev1.NodeCondition) bool {
			return c.Status == corev1.ConditionFalse && strings.HasPrefix(c.Message, want)
		})
		took = append(took, time.Since(t0))
	}
	slices.Sort(took)
	p50, worst := took[len(took)/2], took[len(took)-1]
	t.Logf("XID → GPUHealthy condition in the API server, %d samples: %v", len(took), took)
	s.timed(fmt.Sprintf("5 XID → condition, p50 of %d", len(took)), p50)
	s.timed(fmt.Sprintf("5 XID → condition, max of %d (p99)", len(took)), worst)
}
