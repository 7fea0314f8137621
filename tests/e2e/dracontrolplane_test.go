package e2e

// Scenario 1b: what a DRA driver needs from this node's control plane,
// before any driver exists. Kubernetes 1.37 runs DRA with its defaults:
// resource.k8s.io/v1 served, the controller manager's resourceclaim and
// device-taint-eviction controllers started by --controllers=*, the
// scheduler's DynamicResources plugin on, device taints kept (DRADeviceTaints
// is GA in 1.37, so no feature gate is set). The scenario shows each of these
// on the real node with a stand-in driver's ResourceSlice; the daemon is not
// involved.

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

const (
	// draTestDriver names the stand-in driver of scenario 1b: no kubelet
	// plugin serves it, so its devices can be allocated but never prepared.
	draTestDriver = "e2e.example.com"
	draTaintKey   = draTestDriver + "/broken"
)

func (s *suite) draControlPlane(t *testing.T) {
	ctx := context.Background()
	c := s.n.client
	t0 := time.Now()

	// The API server serves resource.k8s.io/v1 with every kind a driver and
	// its users need.
	list, err := c.Discovery().ServerResourcesForGroupVersion(resourcev1.SchemeGroupVersion.String())
	if err != nil {
		t.Fatalf("the API server does not serve %s: %v", resourcev1.SchemeGroupVersion, err)
	}
	var served []string
	for _, r := range list.APIResources {
		served = append(served, r.Name)
	}
	for _, want := range []string{"deviceclasses", "resourceclaims", "resourceclaimtemplates", "resourceslices", "devicetaintrules"} {
		if !slices.Contains(served, want) {
			t.Errorf("%s does not serve %s (it serves %v)", resourcev1.SchemeGroupVersion, want, served)
		}
	}

	// The controller manager runs its DRA controllers: each running
	// controller has its own check in /healthz (default secure port 10257).
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := hc.Get("https://127.0.0.1:10257/healthz?verbose")
	if err != nil {
		t.Fatalf("the controller manager's /healthz: %v", err)
	}
	health, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, ctl := range []string{"resourceclaim-controller", "device-taint-eviction-controller"} {
		if !strings.Contains(string(health), "[+]"+ctl+" ok") {
			t.Errorf("the controller manager does not run %s; its /healthz?verbose says:\n%s", ctl, health)
		}
	}

	// A stand-in driver's slice: one device on this node, tainted NoSchedule.
	// The API server keeps the taint (it drops device taints where
	// DRADeviceTaints is off).
	slice := &resourcev1.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "e2e-" + nodeName},
		Spec: resourcev1.ResourceSliceSpec{
			Driver:   draTestDriver,
			Pool:     resourcev1.ResourcePool{Name: nodeName, Generation: 1, ResourceSliceCount: 1},
			NodeName: ptrTo(nodeName),
			Devices: []resourcev1.Device{{
				Name:   "dev-0",
				Taints: []resourcev1.DeviceTaint{{Key: draTaintKey, Value: "true", Effect: resourcev1.DeviceTaintEffectNoSchedule}},
			}},
		},
	}
	slice, err = c.ResourceV1().ResourceSlices().Create(ctx, slice, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating a ResourceSlice: %v", err)
	}
	t.Cleanup(func() {
		_ = c.ResourceV1().ResourceSlices().Delete(context.Background(), slice.Name, metav1.DeleteOptions{})
	})
	if got := slice.Spec.Devices[0].Taints; len(got) != 1 || got[0].Key != draTaintKey {
		t.Fatalf("the API server kept the device taints %+v, want the one set (is DRADeviceTaints off?)", got)
	}

	class := &resourcev1.DeviceClass{
		ObjectMeta: metav1.ObjectMeta{Name: draTestDriver},
		Spec: resourcev1.DeviceClassSpec{Selectors: []resourcev1.DeviceSelector{{
			CEL: &resourcev1.CELDeviceSelector{Expression: fmt.Sprintf("device.driver == %q", draTestDriver)},
		}}},
	}
	if _, err := c.ResourceV1().DeviceClasses().Create(ctx, class, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.ResourceV1().DeviceClasses().Delete(context.Background(), class.Name, metav1.DeleteOptions{})
	})
	template := func(name string, tolerate bool) {
		req := &resourcev1.ExactDeviceRequest{DeviceClassName: class.Name}
		if tolerate {
			req.Tolerations = []resourcev1.DeviceToleration{{
				Key: draTaintKey, Operator: resourcev1.DeviceTolerationOpExists, Effect: resourcev1.DeviceTaintEffectNoSchedule,
			}}
		}
		rct := &resourcev1.ResourceClaimTemplate{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
			Spec: resourcev1.ResourceClaimTemplateSpec{Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{
				Requests: []resourcev1.DeviceRequest{{Name: "dev", Exactly: req}},
			}}},
		}
		if _, err := c.ResourceV1().ResourceClaimTemplates("default").Create(ctx, rct, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = c.ResourceV1().ResourceClaimTemplates("default").Delete(context.Background(), name, metav1.DeleteOptions{})
		})
	}
	template("dra-untolerated", false)
	template("dra-tolerated", true)
	claimPod := func(name, tmpl string) *corev1.Pod {
		p := testPod("default", name, 0)
		p.Spec.ResourceClaims = []corev1.PodResourceClaim{{Name: "dev", ResourceClaimTemplateName: ptrTo(tmpl)}}
		p.Spec.Containers[0].Resources.Claims = []corev1.ResourceClaim{{Name: "dev"}}
		p, err := c.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The pod's claim, made from its template by the resourceclaim controller.
	claimOf := func(p *corev1.Pod) string {
		for _, st := range p.Status.ResourceClaimStatuses {
			if st.Name == "dev" && st.ResourceClaimName != nil {
				return *st.ResourceClaimName
			}
		}
		return ""
	}

	// Untolerated: the controller makes the claim, the scheduler finds no
	// device for it and says so.
	bad := claimPod("dra-untolerated", "dra-untolerated")
	bad = s.waitPod(t, "default", bad.Name, "a generated claim and PodScheduled=False", 60*time.Second, func(p *corev1.Pod) bool {
		if claimOf(p) == "" {
			return false
		}
		for _, cd := range p.Status.Conditions {
			if cd.Type == corev1.PodScheduled && cd.Status == corev1.ConditionFalse && cd.Reason == corev1.PodReasonUnschedulable {
				return true
			}
		}
		return false
	})
	t.Logf("pod %s, claim %s (device tainted %s:NoSchedule, not tolerated): %s", bad.Name, claimOf(bad), draTaintKey, conditions(bad))

	// Tolerated: the scheduler allocates the tainted device and binds the
	// pod; the kubelet then cannot prepare it (no plugin for the driver).
	good := claimPod("dra-tolerated", "dra-tolerated")
	good = s.waitPod(t, "default", good.Name, "scheduled with a generated claim", 60*time.Second, func(p *corev1.Pod) bool {
		return p.Spec.NodeName == nodeName && claimOf(p) != ""
	})
	claim, err := c.ResourceV1().ResourceClaims("default").Get(ctx, claimOf(good), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if a := claim.Status.Allocation; a == nil || len(a.Devices.Results) != 1 || a.Devices.Results[0].Driver != draTestDriver ||
		a.Devices.Results[0].Pool != nodeName || a.Devices.Results[0].Device != "dev-0" {
		t.Fatalf("claim %s: allocation %+v, want %s's dev-0 in pool %s", claim.Name, claim.Status.Allocation, draTestDriver, nodeName)
	}
	if !slices.ContainsFunc(claim.Status.ReservedFor, func(r resourcev1.ResourceClaimConsumerReference) bool { return r.UID == good.UID }) {
		t.Errorf("claim %s is not reserved for pod %s: %+v", claim.Name, good.Name, claim.Status.ReservedFor)
	}
	t.Logf("pod %s (toleration for %s) bound to %s; claim %s allocated %s/%s/%s", good.Name, draTaintKey, good.Spec.NodeName,
		claim.Name, draTestDriver, nodeName, "dev-0")
	s.timed("1b DRA: slice, class, 2 claims from templates, allocation", time.Since(t0))

	// Both pods go; the controller deletes their generated claims.
	for _, p := range []*corev1.Pod{bad, good} {
		if err := c.CoreV1().Pods("default").Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 90*time.Second, true, func(ctx context.Context) (bool, error) {
		for _, p := range []*corev1.Pod{bad, good} {
			if _, err := c.CoreV1().Pods("default").Get(ctx, p.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return false, nil
			}
			if _, err := c.ResourceV1().ResourceClaims("default").Get(ctx, claimOf(p), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("the DRA pods or their generated claims remain: %v", err)
	}
}
