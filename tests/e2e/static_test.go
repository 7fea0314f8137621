package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
)

// staticManifest is the second install path of README's install steps:
// `kubectl create -f deployments/static/gpu-plugin.yaml`.
const staticManifest = "deployments/static/gpu-plugin.yaml"

// staticEdit is one change made to the static manifest before it is
// applied, as a user edits the file: what, and the value.
type staticEdit struct{ field, value string }

// editStaticDaemonSet makes the only changes a user of this node makes to
// the static manifest's DaemonSet, the same ones the chart path makes
// through values: the container's image becomes the locally built one
// (the chart's image.repository and image.tag), and the documented
// environment variable GPU_PLUGIN_SIMULATE (flag --simulate) runs the
// daemon on the simulated node (the chart's extraArgs: --simulate=…).
// The object is edited as decoded, so nothing else of it changes.
func editStaticDaemonSet(obj *unstructured.Unstructured, image string) ([]staticEdit, error) {
	path := []string{"spec", "template", "spec", "containers"}
	cs, _, err := unstructured.NestedSlice(obj.Object, path...)
	if err != nil {
		return nil, fmt.Errorf("the static manifest's DaemonSet %s: %w", obj.GetName(), err)
	}
	i := slices.IndexFunc(cs, func(c any) bool {
		m, ok := c.(map[string]any)
		return ok && m["name"] == "gpu-plugin"
	})
	if i < 0 {
		return nil, fmt.Errorf("the static manifest's DaemonSet %s has no container gpu-plugin", obj.GetName())
	}
	c := cs[i].(map[string]any)
	env, _, err := unstructured.NestedSlice(c, "env")
	if err != nil {
		return nil, fmt.Errorf("the static manifest's container gpu-plugin: %w", err)
	}
	if slices.ContainsFunc(env, func(e any) bool { m, ok := e.(map[string]any); return ok && m["name"] == "GPU_PLUGIN_SIMULATE" }) {
		return nil, errors.New("the static manifest's container gpu-plugin already sets GPU_PLUGIN_SIMULATE")
	}
	edits := []staticEdit{
		{fmt.Sprintf("containers[gpu-plugin].image (was %v)", c["image"]), image},
		{"containers[gpu-plugin].env += GPU_PLUGIN_SIMULATE", simProfile},
	}
	c["image"] = image
	c["env"] = append(env, map[string]any{"name": "GPU_PLUGIN_SIMULATE", "value": simProfile})
	if err := unstructured.SetNestedSlice(obj.Object, cs, path...); err != nil {
		return nil, err
	}
	return edits, nil
}

// decodeManifest reads a multi-document YAML file into its objects, in
// order; documents that hold only comments are skipped, as kubectl does.
func decodeManifest(path string) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var objs []*unstructured.Unstructured
	for doc := 1; ; doc++ {
		b, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", path, doc, err)
		}
		j, err := utilyaml.ToJSON(b)
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", path, doc, err)
		}
		if string(j) == "null" {
			continue
		}
		obj := new(unstructured.Unstructured)
		if err := obj.UnmarshalJSON(j); err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", path, doc, err)
		}
		objs = append(objs, obj)
	}
}

// staticClient creates and deletes any object of the manifest, as kubectl
// does: through the dynamic client, with the API server's discovery
// mapping each kind to its resource.
type staticClient struct {
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

func (s *suite) newStaticClient(t *testing.T) *staticClient {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", s.n.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &staticClient{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))}
}

func (sc *staticClient) resource(obj *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	gvk := obj.GroupVersionKind()
	m, err := sc.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", gvk, obj.GetName(), err)
	}
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		return sc.dyn.Resource(m.Resource).Namespace(obj.GetNamespace()), nil
	}
	return sc.dyn.Resource(m.Resource), nil
}

func describe(obj *unstructured.Unstructured) string {
	if ns := obj.GetNamespace(); ns != "" {
		return obj.GetKind() + " " + ns + "/" + obj.GetName()
	}
	return obj.GetKind() + " " + obj.GetName()
}

// staticManifestScenarios: issue 18's second install path. After the
// chart's uninstall, on the same node, the static manifest is applied
// object by object (scenario 1: the plugin pod Ready, allocatable 8), a
// 2-GPU pod runs (scenario 2), and deleting the objects takes the GPUs
// off the node (scenario 7).
func (s *suite) staticManifestScenarios(t *testing.T) {
	objs, err := decodeManifest(filepath.Join(repoRoot(), staticManifest))
	if err != nil {
		t.Fatal(err)
	}
	var edits []staticEdit
	for _, o := range objs {
		if o.GetKind() != "DaemonSet" {
			continue
		}
		if edits, err = editStaticDaemonSet(o, s.n.env.image); err != nil {
			t.Fatal(err)
		}
	}
	if edits == nil {
		t.Fatalf("%s has no DaemonSet", staticManifest)
	}
	for _, e := range edits {
		t.Logf("%s edited: %s = %s", staticManifest, e.field, e.value)
	}
	sc := s.newStaticClient(t)

	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"1-install", func(t *testing.T) { s.staticInstall(t, sc, objs) }},
		{"2-gpu-pod", s.staticGPUPod},
		{"7-delete", func(t *testing.T) { s.staticDelete(t, sc, objs) }},
	}
	for _, st := range steps {
		if !t.Run(st.name, st.run) {
			t.Fatalf("static manifest: %s failed; the later steps depend on it", st.name)
		}
	}
}

// staticInstall creates every object of the manifest in the file's order
// (the ServiceAccount before the DaemonSet whose pods name it), then waits
// for the plugin pod Ready and the node's 8 GPUs.
func (s *suite) staticInstall(t *testing.T, sc *staticClient, objs []*unstructured.Unstructured) {
	ctx := context.Background()
	// As README tells a user without GPU feature discovery: label the GPU
	// node (done already when the chart's scenarios ran first).
	patch := []byte(`{"metadata":{"labels":{"nvidia.com/gpu.present":"true"}}}`)
	if _, err := s.n.client.CoreV1().Nodes().Patch(ctx, nodeName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	for _, o := range objs {
		ri, err := sc.resource(o)
		if err != nil {
			t.Fatal(err)
		}
		// kubectl create validates strictly by default: an unknown field fails.
		if _, err := ri.Create(ctx, o, metav1.CreateOptions{FieldValidation: metav1.FieldValidationStrict}); err != nil {
			t.Fatalf("creating %s from %s: %v", describe(o), staticManifest, err)
		}
		t.Logf("created %s", describe(o))
	}
	s.pluginPod = s.waitPluginReady(t, "")
	readyAt := time.Since(t0)
	nd := s.n.waitNode(t, "nvidia.com/gpu capacity and allocatable 8", 120*time.Second, func(nd *corev1.Node) bool {
		cp, al := gpus(nd)
		return cp == nodeGPUs && al == nodeGPUs
	})
	s.timed("8 static create -f → plugin pod Ready", readyAt)
	s.timed("8 static create -f → node allocatable nvidia.com/gpu=8", time.Since(t0))
	p := s.pluginPod
	if p.Spec.NodeName != nodeName {
		t.Fatalf("plugin pod on node %q, want %q", p.Spec.NodeName, nodeName)
	}
	if got := p.Spec.Containers[0].Image; got != s.n.env.image {
		t.Fatalf("plugin pod %s runs image %s, want the edited manifest's %s", p.Name, got, s.n.env.image)
	}
	if len(p.OwnerReferences) != 1 || p.OwnerReferences[0].Kind != "DaemonSet" || p.OwnerReferences[0].Name != "gpu-plugin" {
		t.Fatalf("plugin pod %s is owned by %v, want the static manifest's DaemonSet gpu-plugin", p.Name, p.OwnerReferences)
	}
	cp, al := gpus(nd)
	t.Logf("plugin pod %s Ready after %s; node capacity %d allocatable %d after %s", p.Name,
		readyAt.Round(time.Millisecond), cp, al, time.Since(t0).Round(time.Millisecond))
}

// staticGPUPod: a pod with limits nvidia.com/gpu: 2 runs on the statically
// installed plugin, its environment naming 2 of the node's GPUs.
func (s *suite) staticGPUPod(t *testing.T) {
	ctx := context.Background()
	t0 := time.Now()
	pod, err := s.n.client.CoreV1().Pods("default").Create(ctx, testPod("default", "static-gpu-2", 2), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod = s.waitPod(t, "default", pod.Name, "Running", 120*time.Second, running)
	d := time.Since(t0)
	s.timed("8 static: pod with 2 GPUs: created → seen Running", d)
	got := s.visibleGPUs(t, pod)
	s.gpuPod, s.gpuUUIDs = pod, got
	t.Logf("pod %s (limits nvidia.com/gpu: 2) seen Running %s after creation; NVIDIA_VISIBLE_DEVICES names %v",
		pod.Name, d.Round(time.Millisecond), got)
}

// staticDelete deletes the GPU pod, then every object of the manifest (as
// `kubectl delete -f` does), waits for all of them and the plugin's pods
// to be gone, and for the node to stop offering GPUs.
func (s *suite) staticDelete(t *testing.T, sc *staticClient, objs []*unstructured.Unstructured) {
	ctx := context.Background()
	if err := s.n.client.CoreV1().Pods("default").Delete(ctx, s.gpuPod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	bg := metav1.DeletePropagationBackground
	for _, o := range objs {
		ri, err := sc.resource(o)
		if err != nil {
			t.Fatal(err)
		}
		if err := ri.Delete(ctx, o.GetName(), metav1.DeleteOptions{PropagationPolicy: &bg}); err != nil {
			t.Fatalf("deleting %s: %v", describe(o), err)
		}
	}
	var last string
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		for _, o := range objs {
			ri, err := sc.resource(o)
			if err != nil {
				return false, err
			}
			if _, err := ri.Get(ctx, o.GetName(), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				last = describe(o) + " remains"
				return false, nil
			}
		}
		pods, err := s.n.client.CoreV1().Pods(releaseNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=gpu-plugin"})
		if err != nil || len(pods.Items) > 0 {
			last = fmt.Sprintf("plugin pods remain: %v", err)
			if err == nil {
				last = fmt.Sprintf("plugin pod %s remains: %s", pods.Items[0].Name, conditions(&pods.Items[0]))
			}
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("objects of %s remain after deleting them: %v; %s", staticManifest, err, last)
	}
	s.timed("8 static delete -f → every object gone", time.Since(t0))
	s.waitNoGPUs(t, "8 static delete -f", t0)
}

// TestStaticManifestEdits: the static manifest decodes into its four
// objects in install order, and the edits change exactly the DaemonSet's
// image and add one environment variable. It needs no node.
func TestStaticManifestEdits(t *testing.T) {
	objs, err := decodeManifest(filepath.Join(repoRoot(), staticManifest))
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, o := range objs {
		kinds = append(kinds, describe(o))
	}
	want := []string{"ServiceAccount kube-system/gpu-plugin", "ConfigMap kube-system/gpu-plugin-config",
		"Service kube-system/gpu-plugin", "DaemonSet kube-system/gpu-plugin"}
	if !slices.Equal(kinds, want) {
		t.Fatalf("%s holds %v, want %v", staticManifest, kinds, want)
	}
	ds := objs[3]
	orig := ds.DeepCopy()
	const image = "registry.example.com/gpu-plugin:test"
	edits, err := editStaticDaemonSet(ds, image)
	if err != nil {
		t.Fatal(err)
	}
	if len(edits) != 2 {
		t.Errorf("edits %v, want 2", edits)
	}
	cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	c := cs[0].(map[string]any)
	env := c["env"].([]any)
	if c["image"] != image || !reflect.DeepEqual(env[len(env)-1], map[string]any{"name": "GPU_PLUGIN_SIMULATE", "value": simProfile}) {
		t.Fatalf("edited container: image %v, last env %v", c["image"], env[len(env)-1])
	}
	// Undo the two edits: what remains is the manifest as decoded.
	origCs, _, _ := unstructured.NestedSlice(orig.Object, "spec", "template", "spec", "containers")
	c["image"] = origCs[0].(map[string]any)["image"]
	c["env"] = env[:len(env)-1]
	if err := unstructured.SetNestedSlice(ds.Object, cs, "spec", "template", "spec", "containers"); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ds.Object, orig.Object) {
		t.Errorf("the edits changed more than the image and one env entry:\nedited %v\noriginal %v", ds.Object, orig.Object)
	}
	if _, err := editStaticDaemonSet(orig, image); err != nil {
		t.Fatal(err)
	}
	if _, err := editStaticDaemonSet(orig, image); err == nil || !strings.Contains(err.Error(), "already sets GPU_PLUGIN_SIMULATE") {
		t.Errorf("editing twice: %v, want an error saying GPU_PLUGIN_SIMULATE is set already", err)
	}
}
