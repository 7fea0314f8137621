package e2e

// Scenario 3c (issue 20): the node labels as an NFD NodeFeature object
// (the chart's nodeFeatureAPI, GFD's useNodeFeatureAPI). NFD itself is not
// installed: the suite installs a NodeFeature CRD of its own (the group,
// version and names NFD serves; no schema beyond an object) and checks
// the object the daemon writes, as nfd-master would read it.

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
)

var (
	crdGVR         = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	nodeFeatureGVR = schema.GroupVersionResource{Group: "nfd.k8s-sigs.io", Version: "v1alpha1", Resource: "nodefeatures"}
)

const nodeFeatureName = "nvidia-features-for-" + nodeName

func (s *suite) dynamicClient(t *testing.T) dynamic.Interface {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", s.n.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	return dynamic.NewForConfigOrDie(cfg)
}

// installNodeFeatureCRD makes nfd.k8s-sigs.io/v1alpha1 NodeFeature served.
func (s *suite) installNodeFeatureCRD(t *testing.T, dyn dynamic.Interface) {
	t.Helper()
	crd := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1",
		"kind":       "CustomResourceDefinition",
		"metadata":   map[string]any{"name": "nodefeatures.nfd.k8s-sigs.io"},
		"spec": map[string]any{
			"group": "nfd.k8s-sigs.io",
			"names": map[string]any{"kind": "NodeFeature", "listKind": "NodeFeatureList", "plural": "nodefeatures", "singular": "nodefeature"},
			"scope": "Namespaced",
			"versions": []any{map[string]any{
				"name": "v1alpha1", "served": true, "storage": true,
				"schema": map[string]any{"openAPIV3Schema": map[string]any{
					"type": "object", "x-kubernetes-preserve-unknown-fields": true,
				}},
			}},
		},
	}}
	ctx := context.Background()
	if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating the NodeFeature CRD: %v", err)
	}
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := dyn.Resource(nodeFeatureGVR).Namespace(releaseNS).List(ctx, metav1.ListOptions{})
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("NodeFeature never served: %v", err)
	}
}

// waitNodeFeature waits for the node's NodeFeature to satisfy ok and
// returns its spec.labels.
func (s *suite) waitNodeFeature(t *testing.T, dyn dynamic.Interface, what string, ok func(obj *unstructured.Unstructured, labels map[string]string) bool) map[string]string {
	t.Helper()
	var last map[string]string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		obj, err := dyn.Resource(nodeFeatureGVR).Namespace(releaseNS).Get(ctx, nodeFeatureName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		last, _, _ = unstructured.NestedStringMap(obj.Object, "spec", "labels")
		return ok(obj, last), nil
	})
	if err != nil {
		t.Fatalf("NodeFeature %s/%s never showed %s; last spec.labels: %v", releaseNS, nodeFeatureName, what, last)
	}
	return last
}

func (s *suite) nodeFeatureAPI(t *testing.T) {
	dyn := s.dynamicClient(t)
	s.installNodeFeatureCRD(t, dyn)

	t0 := time.Now()
	s.replacePlugin(t, map[string]any{"nodeFeatureAPI": true})
	labels := s.waitNodeFeature(t, dyn, "the node's 8 GPUs, owned by the DaemonSet", func(obj *unstructured.Unstructured, l map[string]string) bool {
		refs := obj.GetOwnerReferences()
		return l["nvidia.com/gpu.count"] == "8" && obj.GetLabels()["nfd.node.kubernetes.io/node-name"] == nodeName &&
			len(refs) == 1 && refs[0].Kind == "DaemonSet" && refs[0].Name == releaseName
	})
	s.timed("3c nodeFeatureAPI → NodeFeature with gpu.count=8", time.Since(t0))
	if labels["nvidia.com/gpu.product"] == "" || labels["nvidia.com/gpu.replicas"] != "1" {
		t.Errorf("NodeFeature labels %v lack gpu.product or gpu.replicas=1", labels)
	}

	// A ConfigMap change reaches the object live.
	t1 := time.Now()
	s.upgrade(t, map[string]any{"nodeFeatureAPI": true, "sharing": timeSlicing4})
	s.waitNodeFeature(t, dyn, "gpu.replicas=4", func(_ *unstructured.Unstructured, l map[string]string) bool {
		return l["nvidia.com/gpu.replicas"] == "4" && l["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
	})
	s.timed("3c ConfigMap replicas: 4 → NodeFeature gpu.replicas=4", time.Since(t1))
	s.samePluginPod(t)

	// Back to the features.d file for the scenarios that follow; the
	// object stays, owned by the DaemonSet, until uninstall (scenario 7).
	s.replacePlugin(t, nil)
	s.waitAllocatable(t, nodeGPUs, "allocatable 8 without the NodeFeature API")
}
