package kubelet

// The DRA harness: the real kubelet DRA code (pkg/kubelet/cm/dra, the
// manager the kubelet's container manager runs) with plugin registration
// over the real socket (pkg/kubelet/pluginmanager, the kubelet's plugin
// watcher and reconciler), in front of one fake API: client-go's fake
// clientset, which the kubelet code calls directly, and an HTTP shim over
// the same clientset for the daemon, whose own JSON client (internal/kube)
// reaches it through a kubeconfig file.
//
// The shim speaks resource.k8s.io/v1 with the real k8s.io/api types:
// request bodies are decoded strictly (unknown, duplicate or wrongly cased
// fields are a 400, as with fieldValidation=Strict), ResourceSlices are
// defaulted and validated by the API server's own ResourceSlice strategy
// (handwritten and declarative validation), and errors are Status objects
// with the API server's codes and reasons. Writes from either side get
// what an API server gives them and the bare fake does not: a UID,
// generateName, a resourceVersion checked on update (409), delete
// preconditions, metadata.generation on ResourceSlices, field selectors
// (spec.driver, spec.nodeName, spec.pool.name) on list, watch and
// deletecollection, and watch events from any resourceVersion.
//
// What the daemon may call is the chart's RBAC from the DRA contract
// (draDaemonVerbs); anything else is a 403, as on a cluster.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	v1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/operation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apimachinery/pkg/watch"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	"k8s.io/apiserver/pkg/registry/rest"
	"k8s.io/apiserver/pkg/storage/names"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/kubernetes/fake"
	clienttesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	resourceapi "k8s.io/kubernetes/pkg/apis/resource"
	_ "k8s.io/kubernetes/pkg/apis/resource/install" // resource.k8s.io conversion, defaults and declarative validation in legacyscheme
	resourcevalidation "k8s.io/kubernetes/pkg/apis/resource/validation"
	"k8s.io/kubernetes/pkg/features"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	kubeletconfig "k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
	sigsjson "sigs.k8s.io/json"

	"github.com/gpu-plugin/gpu-plugin/internal/kube"
)

const (
	// draDriver is the DRA driver name of the contract (dra_contract.md).
	draDriver = "gpu.nvidia.com"
	// draNodeName is the node of every DRA test, as the daemon's
	// cfg.Daemon.NodeName in startPlugin: the pool name and spec.nodeName.
	draNodeName = "conformance-node"
	// draNamespace is the namespace of pod and its claims.
	draNamespace = "default"
	// draRequest is a claim result's request name when a test gives none.
	draRequest = "gpu"
	// draDeviceClass is the claim requests' device class (the chart's).
	draDeviceClass = "gpu.nvidia.com"
	// draToken is the bearer token in the kubeconfig; the shim answers
	// 401 without it.
	draToken = "conformance-token"
	// draUser is who the shim says the daemon is in a 403.
	draUser = "system:serviceaccount:kube-system:gpu-plugin"
)

// draDaemonVerbs is what the daemon may do through the shim: the chart's
// RBAC when the allocation mode is not device-plugin (dra_contract.md, "API
// permissions"). Anything else is 403 Forbidden, so a call the chart does
// not allow fails here as on a cluster. A test that needs more edits
// k.api.verbs before the daemon starts.
var draDaemonVerbs = map[string][]string{
	"resourceslices": {"get", "list", "watch", "create", "update", "delete"},
	"resourceclaims": {"get"},
	"nodes":          {"get"},
}

// draKubelet is the real kubelet DRA manager and plugin manager over one
// registrar directory, a checkpoint directory that survives restart, and
// the fake API.
type draKubelet struct {
	tb           testing.TB
	logger       klog.Logger
	registrarDir string
	stateDir     string // the DRA manager's checkpoint (dra_manager_state)

	// client is the API the kubelet code calls; api serves it over HTTP.
	client *fake.Clientset
	api    *draAPI
	// nodeUID is the Node object's UID (an owner reference's uid).
	nodeUID types.UID

	mu   sync.Mutex
	pods []*v1.Pod   // active pods: prepared and not unprepared
	run  *draRunning // nil while stopped
	kcfg string      // the kubeconfig file, once written
}

// draRunning is one kubelet run: manager, plugin manager and their stop.
type draRunning struct {
	m      *dra.Manager
	reg    *draRegistrations
	cancel context.CancelFunc
	stopCh chan struct{}
	pmDone chan struct{}
}

// draOption changes the harness before the kubelet starts.
type draOption func(*draKubelet)

// draDropDeviceTaints makes the API drop device taints from every
// ResourceSlice written, as an API server without the DRADeviceTaints
// feature gate does (before 1.36 by default): k.setDropDeviceTaints(true)
// from the start.
func draDropDeviceTaints() draOption {
	return func(k *draKubelet) { k.setDropDeviceTaints(true) }
}

// startDRAKubelet starts the kubelet DRA side on a fresh node: the fake API
// holding the Node draNodeName, its HTTP shim, and the DRA manager (state
// in a temporary directory) with the plugin manager watching registrarDir
// (created if missing). It returns once the manager's startup wipe of the
// node's ResourceSlices has run, so a slice the daemon publishes later is
// not wiped under it. Everything stops at cleanup.
func startDRAKubelet(tb testing.TB, registrarDir string, opts ...draOption) *draKubelet {
	tb.Helper()
	requireKubeletNamespace(tb)
	logger := kubeletLogger(tb)
	k := &draKubelet{
		tb:           tb,
		logger:       logger,
		registrarDir: registrarDir,
		stateDir:     tb.TempDir(),
		client:       fake.NewClientset(),
	}
	k.api = newDRAAPI(tb, k.client)
	for _, o := range opts {
		o(k)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	node, err := k.client.CoreV1().Nodes().Create(ctx, &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: draNodeName, Labels: map[string]string{"kubernetes.io/hostname": draNodeName}},
	}, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("creating the Node: %v", err)
	}
	k.nodeUID = node.UID
	k.start()
	tb.Cleanup(k.stop)
	return k
}

// start runs a DRA manager over the state directory and a plugin manager
// over the registrar directory, as the kubelet does at startup.
func (k *draKubelet) start() {
	k.tb.Helper()
	ctx, cancel := context.WithCancel(klog.NewContext(context.Background(), k.logger))
	m, err := dra.NewManager(k.logger, k.client, k.stateDir)
	if err != nil {
		cancel()
		k.tb.Fatalf("creating the DRA manager: %v", err)
	}
	wipes := k.api.wipes(draNodeName)
	ready := kubeletconfig.NewSourcesReady(func(sets.Set[string]) bool { return true })
	if err := m.Start(ctx, k.activePods, k.getNode, ready); err != nil {
		cancel()
		k.tb.Fatalf("starting the DRA manager: %v", err)
	}
	r := &draRunning{
		m:      m,
		reg:    &draRegistrations{PluginHandler: m.GetWatcherHandler()},
		cancel: cancel,
		stopCh: make(chan struct{}),
		pmDone: make(chan struct{}),
	}
	pm := pluginmanager.NewPluginManager(k.registrarDir, &record.FakeRecorder{})
	pm.AddHandler(registerapi.DRAPlugin, r.reg)
	go func() {
		defer close(r.pmDone)
		pm.Run(ctx, ready, r.stopCh)
	}()
	k.mu.Lock()
	k.run = r
	k.mu.Unlock()
	if err := poll(waitTimeout, func() bool { return k.api.wipes(draNodeName) > wipes }); err != nil {
		k.tb.Fatalf("the DRA manager never wiped the node's ResourceSlices at startup within %v", waitTimeout)
	}
}

// stop stops the plugin manager and the DRA manager (its gRPC connections
// closed, background work waited for), as when the kubelet exits: plugins
// are not told. Safe to call twice.
func (k *draKubelet) stop() {
	k.mu.Lock()
	r := k.run
	k.run = nil
	k.mu.Unlock()
	if r == nil {
		return
	}
	close(r.stopCh)
	r.cancel()
	r.m.Stop()
	select {
	case <-r.pmDone:
	case <-time.After(waitTimeout):
		k.tb.Errorf("the plugin manager did not stop within %v", waitTimeout)
	}
}

// restart is a kubelet restart: a new DRA manager over the same checkpoint
// (prepared claims and their CDI devices survive), a new plugin manager
// that finds the registration sockets already there, and the startup wipe
// of the node's ResourceSlices. Active pods stay active.
func (k *draKubelet) restart() {
	k.tb.Helper()
	k.stop()
	k.start()
}

func (k *draKubelet) running() *draRunning {
	k.tb.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.run == nil {
		k.tb.Fatal("the DRA kubelet is stopped")
	}
	return k.run
}

// manager is the running DRA manager, for what the helpers do not cover.
func (k *draKubelet) manager() *dra.Manager { return k.running().m }

func (k *draKubelet) activePods() []*v1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.pods)
}

func (k *draKubelet) getNode(ctx context.Context) (*v1.Node, error) {
	return k.client.CoreV1().Nodes().Get(ctx, draNodeName, metav1.GetOptions{})
}

// waitRegistered waits until driver is registered with the running kubelet
// (the plugin manager called RegisterPlugin and it succeeded) and returns
// its DRA endpoint.
func (k *draKubelet) waitRegistered(driver string) string {
	k.tb.Helper()
	reg := k.running().reg
	var endpoint string
	if err := poll(waitTimeout, func() bool {
		endpoint = reg.endpoint(driver)
		return endpoint != ""
	}); err != nil {
		k.tb.Fatalf("DRA driver %s never registered with the kubelet within %v", driver, waitTimeout)
	}
	return endpoint
}

// waitDeregistered waits until driver is no longer registered with the
// running kubelet (its registration socket went away).
func (k *draKubelet) waitDeregistered(driver string) {
	k.tb.Helper()
	reg := k.running().reg
	if err := poll(waitTimeout, func() bool { return reg.endpoint(driver) == "" }); err != nil {
		k.tb.Fatalf("DRA driver %s still registered with the kubelet after %v", driver, waitTimeout)
	}
}

// registrations is how often driver has registered with the running
// kubelet (since its last restart).
func (k *draKubelet) registrations(driver string) int { return k.running().reg.registrations(driver) }

// draResult is one allocated device of driver draDriver in the node's pool
// for request draRequest; claim fills these in when left empty.
func draResult(device string) resourcev1.DeviceRequestAllocationResult {
	return resourcev1.DeviceRequestAllocationResult{Request: draRequest, Driver: draDriver, Pool: draNodeName, Device: device}
}

// claim creates an allocated ResourceClaim, as the scheduler leaves it:
// spec.devices.requests (one ExactCount request of class draDeviceClass per
// request name in results) and status.allocation with results and the
// node. Empty Request, Driver and Pool in a result default to draRequest,
// draDriver and draNodeName. The claim is reserved for no pod yet: pod
// does that. It returns the stored claim (with its UID).
func (k *draKubelet) claim(ns, name string, results ...resourcev1.DeviceRequestAllocationResult) *resourcev1.ResourceClaim {
	k.tb.Helper()
	if len(results) == 0 {
		k.tb.Fatalf("claim %s/%s: an allocated claim needs at least one device result", ns, name)
	}
	results = slices.Clone(results)
	counts := map[string]int64{}
	var order []string
	for i := range results {
		r := &results[i]
		if r.Request == "" {
			r.Request = draRequest
		}
		if r.Driver == "" {
			r.Driver = draDriver
		}
		if r.Pool == "" {
			r.Pool = draNodeName
		}
		if counts[r.Request] == 0 {
			order = append(order, r.Request)
		}
		counts[r.Request]++
	}
	var requests []resourcev1.DeviceRequest
	for _, req := range order {
		requests = append(requests, resourcev1.DeviceRequest{Name: req, Exactly: &resourcev1.ExactDeviceRequest{
			DeviceClassName: draDeviceClass,
			AllocationMode:  resourcev1.DeviceAllocationModeExactCount,
			Count:           counts[req],
		}})
	}
	c := &resourcev1.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{Requests: requests}},
		Status: resourcev1.ResourceClaimStatus{Allocation: &resourcev1.AllocationResult{
			Devices: resourcev1.DeviceAllocationResult{Results: results},
			NodeSelector: &v1.NodeSelector{NodeSelectorTerms: []v1.NodeSelectorTerm{{MatchFields: []v1.NodeSelectorRequirement{{
				Key: "metadata.name", Operator: v1.NodeSelectorOpIn, Values: []string{draNodeName},
			}}}}},
		}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	created, err := k.client.ResourceV1().ResourceClaims(ns).Create(ctx, c, metav1.CreateOptions{})
	if err != nil {
		k.tb.Fatalf("creating ResourceClaim %s/%s: %v", ns, name, err)
	}
	return created
}

// pod is a pod in draNamespace on the node whose spec.resourceClaims name
// claims (ResourceClaimName, the pod claim named as the claim) and whose
// one container (containerName) uses them all. The claims, which must
// exist, are reserved for the pod (status.reservedFor), as the scheduler
// does. The pod's UID is "uid-"+name.
func (k *draKubelet) pod(name string, claims ...string) *v1.Pod {
	k.tb.Helper()
	return k.podIn(draNamespace, name, claims...)
}

// podIn is pod in namespace ns (where its claims must be).
func (k *draKubelet) podIn(ns, name string, claims ...string) *v1.Pod {
	k.tb.Helper()
	p := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID("uid-" + name)},
		Spec: v1.PodSpec{
			NodeName:   draNodeName,
			Containers: []v1.Container{{Name: containerName, Image: "cuda"}},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	for _, c := range claims {
		p.Spec.ResourceClaims = append(p.Spec.ResourceClaims, v1.PodResourceClaim{Name: c, ResourceClaimName: &c})
		p.Spec.Containers[0].Resources.Claims = append(p.Spec.Containers[0].Resources.Claims, v1.ResourceClaim{Name: c})
		api := k.client.ResourceV1().ResourceClaims(ns)
		rc, err := api.Get(ctx, c, metav1.GetOptions{})
		if err != nil {
			k.tb.Fatalf("pod %s/%s: claim %s: %v", ns, name, c, err)
		}
		ref := resourcev1.ResourceClaimConsumerReference{Resource: "pods", Name: name, UID: p.UID}
		if !slices.Contains(rc.Status.ReservedFor, ref) {
			rc.Status.ReservedFor = append(rc.Status.ReservedFor, ref)
			if _, err := api.UpdateStatus(ctx, rc, metav1.UpdateOptions{}); err != nil {
				k.tb.Fatalf("pod %s/%s: reserving claim %s: %v", ns, name, c, err)
			}
		}
	}
	return p
}

// prepare makes the pod active and prepares its claims as the kubelet does
// before starting the pod's containers (PrepareResources: the claims read
// from the API, NodePrepareResources to the driver).
func (k *draKubelet) prepare(p *v1.Pod) error {
	k.tb.Helper()
	m := k.manager()
	k.mu.Lock()
	if !slices.ContainsFunc(k.pods, func(q *v1.Pod) bool { return q.UID == p.UID }) {
		k.pods = append(k.pods, p)
	}
	k.mu.Unlock()
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), k.logger), waitTimeout)
	defer cancel()
	return m.PrepareResources(ctx, p)
}

// cdiDevices is what the kubelet hands the runtime for one container of a
// prepared pod: GetResources' CDI device names, in the manager's order.
func (k *draKubelet) cdiDevices(p *v1.Pod, container string) []string {
	k.tb.Helper()
	i := slices.IndexFunc(p.Spec.Containers, func(c v1.Container) bool { return c.Name == container })
	if i < 0 {
		k.tb.Fatalf("pod %s has no container %q", p.Name, container)
	}
	info, err := k.manager().GetResources(p, &p.Spec.Containers[i])
	if err != nil {
		k.tb.Fatalf("GetResources for pod %s container %s: %v", p.Name, container, err)
	}
	names := []string{}
	for _, d := range info.CDIDevices {
		names = append(names, d.Name)
	}
	return names
}

// unprepare makes the pod inactive and unprepares its claims, as the
// kubelet does once the pod has terminated (UnprepareResources:
// NodeUnprepareResources for each claim no other active pod uses). The
// manager's own reconcile loop, which unprepares inactive pods, runs only
// every 60 s: tests call this.
func (k *draKubelet) unprepare(p *v1.Pod) error {
	k.tb.Helper()
	m := k.manager()
	k.mu.Lock()
	k.pods = slices.DeleteFunc(k.pods, func(q *v1.Pod) bool { return q.UID == p.UID })
	k.mu.Unlock()
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), k.logger), waitTimeout)
	defer cancel()
	return m.UnprepareResources(ctx, p)
}

// slices is every ResourceSlice in the API, by name.
func (k *draKubelet) slices() []resourcev1.ResourceSlice {
	k.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	list, err := k.client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{})
	if err != nil {
		k.tb.Fatalf("listing ResourceSlices: %v", err)
	}
	items := list.Items
	slices.SortFunc(items, func(a, b resourcev1.ResourceSlice) int { return strings.Compare(a.Name, b.Name) })
	return items
}

// waitSlices waits until the ResourceSlices in the API satisfy ok and
// returns them; what names the condition in the failure message.
func (k *draKubelet) waitSlices(what string, ok func([]resourcev1.ResourceSlice) bool) []resourcev1.ResourceSlice {
	k.tb.Helper()
	var last []resourcev1.ResourceSlice
	if err := poll(waitTimeout, func() bool {
		last = k.slices()
		return ok(last)
	}); err != nil {
		k.tb.Fatalf("the ResourceSlices never showed %s within %v; last seen: %s", what, waitTimeout, dumpJSON(last))
	}
	return last
}

// setDropDeviceTaints switches the API's DRADeviceTaints behaviour: while
// on, device taints are dropped from every ResourceSlice written, unless
// the stored slice already has some (the API server's rule for a disabled
// field).
func (k *draKubelet) setDropDeviceTaints(drop bool) {
	k.api.mu.Lock()
	k.api.dropTaints = drop
	k.api.mu.Unlock()
}

// kubeconfig writes (once) a kubeconfig file for the shim, with the bearer
// token it wants, and returns its path.
func (k *draKubelet) kubeconfig() string {
	k.tb.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.kcfg != "" {
		return k.kcfg
	}
	path := filepath.Join(k.tb.TempDir(), "kubeconfig")
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: conformance
  cluster:
    server: %s
contexts:
- name: conformance
  context:
    cluster: conformance
    user: gpu-plugin
current-context: conformance
users:
- name: gpu-plugin
  user:
    token: %s
`, k.api.url(), draToken)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		k.tb.Fatalf("writing the kubeconfig: %v", err)
	}
	k.kcfg = path
	return path
}

// kubeconfigFlag is the daemon flag naming kubeconfig().
func (k *draKubelet) kubeconfigFlag() string { return "--kubeconfig=" + k.kubeconfig() }

// apiRequests is every HTTP request the shim has answered, in order.
func (k *draKubelet) apiRequests() []draAPIRequest {
	k.api.mu.Lock()
	defer k.api.mu.Unlock()
	return slices.Clone(k.api.requests)
}

// draRegistrations is the DRA manager's plugin handler as the plugin
// manager calls it, noting which drivers are registered.
type draRegistrations struct {
	cache.PluginHandler

	mu        sync.Mutex
	endpoints map[string]string // driver → endpoint
	count     map[string]int
}

func (r *draRegistrations) RegisterPlugin(ctx context.Context, name, endpoint string, versions []string, timeout *time.Duration) error {
	err := r.PluginHandler.RegisterPlugin(ctx, name, endpoint, versions, timeout)
	if err == nil {
		r.mu.Lock()
		if r.endpoints == nil {
			r.endpoints, r.count = map[string]string{}, map[string]int{}
		}
		r.endpoints[name] = endpoint
		r.count[name]++
		r.mu.Unlock()
	}
	return err
}

func (r *draRegistrations) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	r.PluginHandler.DeRegisterPlugin(ctx, name, endpoint)
	r.mu.Lock()
	if r.endpoints[name] == endpoint {
		delete(r.endpoints, name)
	}
	r.mu.Unlock()
}

func (r *draRegistrations) endpoint(driver string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.endpoints[driver]
}

func (r *draRegistrations) registrations(driver string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.count[driver]
}

// ---------------------------------------------------------------------------
// The fake API: reactors on the fake clientset and the HTTP shim.

// draResource is one API resource the fake API serves with API-server
// semantics.
type draResource struct {
	gvr        schema.GroupVersionResource
	kind       string
	namespaced bool
	newObj     func() runtime.Object
	// fields are the object's field-selector fields, as the API server's
	// GetAttrs for the resource.
	fields func(runtime.Object) fields.Set
}

func (r *draResource) gvk() schema.GroupVersionKind { return r.gvr.GroupVersion().WithKind(r.kind) }
func (r *draResource) gr() schema.GroupResource     { return r.gvr.GroupResource() }

var draResources = []*draResource{
	{
		gvr: v1.SchemeGroupVersion.WithResource("nodes"), kind: "Node",
		newObj: func() runtime.Object { return &v1.Node{} },
		fields: func(o runtime.Object) fields.Set {
			n := o.(*v1.Node)
			return fields.Set{"metadata.name": n.Name, "spec.unschedulable": strconv.FormatBool(n.Spec.Unschedulable)}
		},
	},
	{
		gvr: resourcev1.SchemeGroupVersion.WithResource("resourceclaims"), kind: "ResourceClaim", namespaced: true,
		newObj: func() runtime.Object { return &resourcev1.ResourceClaim{} },
		fields: func(o runtime.Object) fields.Set {
			c := o.(*resourcev1.ResourceClaim)
			return fields.Set{"metadata.name": c.Name, "metadata.namespace": c.Namespace}
		},
	},
	{
		gvr: resourcev1.SchemeGroupVersion.WithResource("resourceslices"), kind: "ResourceSlice",
		newObj: func() runtime.Object { return &resourcev1.ResourceSlice{} },
		fields: func(o runtime.Object) fields.Set {
			s := o.(*resourcev1.ResourceSlice)
			node := ""
			if s.Spec.NodeName != nil {
				node = *s.Spec.NodeName
			}
			return fields.Set{
				"metadata.name":                          s.Name,
				resourcev1.ResourceSliceSelectorNodeName: node,
				resourcev1.ResourceSliceSelectorDriver:   s.Spec.Driver,
				resourcev1.ResourceSliceSelectorPoolName: s.Spec.Pool.Name,
			}
		},
	},
}

func draResourceFor(gvr schema.GroupVersionResource) *draResource {
	for _, r := range draResources {
		if r.gvr == gvr {
			return r
		}
	}
	return nil
}

// draEvent is one change, for watches.
type draEvent struct {
	typ watch.EventType
	res *draResource
	obj runtime.Object // as stored after the change (as before it for DELETED)
	rv  int64
}

// draAPIRequest is one HTTP request the shim answered.
type draAPIRequest struct {
	Method, Path, Query string
	Code                int
}

func (r draAPIRequest) String() string {
	q := ""
	if r.Query != "" {
		q = "?" + r.Query
	}
	return fmt.Sprintf("%s %s%s → %d", r.Method, r.Path, q, r.Code)
}

// draAPI is the fake API server state around the fake clientset. Every
// write through the clientset (the kubelet's, a test's, the shim's) goes
// through its reactors, which run under the clientset's lock and take mu.
type draAPI struct {
	tb      testing.TB
	client  *fake.Clientset
	tracker clienttesting.ObjectTracker
	srv     *httptest.Server
	done    chan struct{} // closed at cleanup: watches end
	closed  sync.Once

	mu         sync.Mutex
	rv         int64 // the last resourceVersion given out
	events     []draEvent
	changed    chan struct{} // closed and replaced on each event
	dropTaints bool
	// deleteCollections are the field selectors of the deletecollection
	// calls made, in order (the kubelet's wipes).
	deleteCollections []fields.Selector
	requests          []draAPIRequest
	// verbs is what the daemon may call through the shim, by resource.
	verbs map[string][]string
}

func newDRAAPI(tb testing.TB, client *fake.Clientset) *draAPI {
	a := &draAPI{
		tb:      tb,
		client:  client,
		tracker: client.Tracker(),
		done:    make(chan struct{}),
		changed: make(chan struct{}),
		verbs:   map[string][]string{},
	}
	for r, v := range draDaemonVerbs {
		a.verbs[r] = slices.Clone(v)
	}
	client.PrependReactor("create", "*", a.reactCreate)
	client.PrependReactor("update", "*", a.reactUpdate)
	client.PrependReactor("patch", "*", a.reactPatch)
	client.PrependReactor("delete", "*", a.reactDelete)
	client.PrependReactor("delete-collection", "*", a.reactDeleteCollection)
	client.PrependReactor("list", "*", a.reactList)
	a.srv = httptest.NewServer(http.HandlerFunc(a.serveHTTP))
	tb.Cleanup(a.close)
	return a
}

func (a *draAPI) url() string { return a.srv.URL }

// close ends the watches and stops the server; safe to call twice.
func (a *draAPI) close() {
	a.closed.Do(func() {
		close(a.done)
		a.srv.CloseClientConnections()
		a.srv.Close()
	})
}

// wipes is how many deletecollection calls have selected node's slices.
func (a *draAPI) wipes(node string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, sel := range a.deleteCollections {
		if v, ok := sel.RequiresExactMatch(resourcev1.ResourceSliceSelectorNodeName); ok && v == node {
			n++
		}
	}
	return n
}

// emit records a change; mu held.
func (a *draAPI) emit(typ watch.EventType, res *draResource, obj runtime.Object) {
	a.events = append(a.events, draEvent{typ: typ, res: res, obj: obj.DeepCopyObject(), rv: a.rv})
	close(a.changed)
	a.changed = make(chan struct{})
}

func (a *draAPI) nextRV() string {
	a.rv++
	return strconv.FormatInt(a.rv, 10)
}

func (a *draAPI) reactCreate(action clienttesting.Action) (bool, runtime.Object, error) {
	act, ok := action.(clienttesting.CreateAction)
	res := draResourceFor(action.GetResource())
	if !ok || res == nil || act.GetSubresource() != "" {
		return false, nil, nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	obj := act.GetObject().DeepCopyObject()
	m, err := meta.Accessor(obj)
	if err != nil {
		return true, nil, apierrors.NewBadRequest(err.Error())
	}
	if res.namespaced && m.GetNamespace() == "" {
		m.SetNamespace(act.GetNamespace())
	}
	if m.GetName() == "" && m.GetGenerateName() != "" {
		for range 10 {
			m.SetName(names.SimpleNameGenerator.GenerateName(m.GetGenerateName()))
			if _, err := a.tracker.Get(res.gvr, m.GetNamespace(), m.GetName()); apierrors.IsNotFound(err) {
				break
			}
		}
	}
	if m.GetName() == "" {
		return true, nil, apierrors.NewInvalid(res.gvk().GroupKind(), "", field.ErrorList{
			field.Required(field.NewPath("metadata", "name"), "name or generateName is required")})
	}
	if m.GetResourceVersion() != "" {
		return true, nil, apierrors.NewInternalError(errors.New("resourceVersion should not be set on objects to be created"))
	}
	m.SetUID(uuid.NewUUID())
	m.SetCreationTimestamp(metav1.Now().Rfc3339Copy())
	if s, ok := obj.(*resourcev1.ResourceSlice); ok {
		s.Generation = 1
		a.dropDisabledTaints(s, nil)
		if err := validateResourceSlice(s, nil); err != nil {
			return true, nil, err
		}
	}
	m.SetResourceVersion(strconv.FormatInt(a.rv+1, 10))
	if err := a.tracker.Create(res.gvr, obj, m.GetNamespace()); err != nil {
		return true, nil, err
	}
	a.rv++
	stored, err := a.tracker.Get(res.gvr, m.GetNamespace(), m.GetName())
	if err != nil {
		return true, nil, err
	}
	a.emit(watch.Added, res, stored)
	return true, stored, nil
}

func (a *draAPI) reactUpdate(action clienttesting.Action) (bool, runtime.Object, error) {
	act, ok := action.(clienttesting.UpdateAction)
	res := draResourceFor(action.GetResource())
	if !ok || res == nil {
		return false, nil, nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	obj := act.GetObject().DeepCopyObject()
	m, err := meta.Accessor(obj)
	if err != nil {
		return true, nil, apierrors.NewBadRequest(err.Error())
	}
	if res.namespaced && m.GetNamespace() == "" {
		m.SetNamespace(act.GetNamespace())
	}
	stored, err := a.update(res, obj, act.GetSubresource())
	return true, stored, err
}

// update stores obj over the object of its name: the resourceVersion (if
// set) and UID (if set) must match, system fields are kept, a
// ResourceSlice's generation goes up when its spec changes, the status
// subresource writes only the status and the object only the rest. mu held.
func (a *draAPI) update(res *draResource, obj runtime.Object, subresource string) (runtime.Object, error) {
	m, err := meta.Accessor(obj)
	if err != nil {
		return nil, apierrors.NewBadRequest(err.Error())
	}
	old, err := a.tracker.Get(res.gvr, m.GetNamespace(), m.GetName())
	if err != nil {
		return nil, err
	}
	om, _ := meta.Accessor(old)
	if rv := m.GetResourceVersion(); rv != "" && rv != om.GetResourceVersion() {
		return nil, apierrors.NewConflict(res.gr(), m.GetName(),
			errors.New("the object has been modified; please apply your changes to the latest version and try again"))
	}
	if uid := m.GetUID(); uid != "" && uid != om.GetUID() {
		return nil, apierrors.NewConflict(res.gr(), m.GetName(),
			fmt.Errorf("Precondition failed: UID in precondition: %v, UID in object meta: %v", uid, om.GetUID()))
	}
	m.SetUID(om.GetUID())
	m.SetCreationTimestamp(om.GetCreationTimestamp())
	m.SetGeneration(om.GetGeneration())
	switch o := obj.(type) {
	case *resourcev1.ResourceClaim:
		if subresource == "status" {
			o.Spec = old.(*resourcev1.ResourceClaim).Spec
		} else {
			o.Status = old.(*resourcev1.ResourceClaim).Status
		}
	case *v1.Node:
		if subresource == "status" {
			o.Spec = old.(*v1.Node).Spec
		} else {
			o.Status = old.(*v1.Node).Status
		}
	case *resourcev1.ResourceSlice:
		oldSlice := old.(*resourcev1.ResourceSlice)
		a.dropDisabledTaints(o, oldSlice)
		if !apiequality.Semantic.DeepEqual(o.Spec, oldSlice.Spec) {
			o.Generation = oldSlice.Generation + 1
		}
		if err := validateResourceSlice(o, oldSlice); err != nil {
			return nil, err
		}
	}
	m.SetResourceVersion(strconv.FormatInt(a.rv+1, 10))
	if err := a.tracker.Update(res.gvr, obj, m.GetNamespace()); err != nil {
		return nil, err
	}
	a.rv++
	stored, err := a.tracker.Get(res.gvr, m.GetNamespace(), m.GetName())
	if err != nil {
		return nil, err
	}
	a.emit(watch.Modified, res, stored)
	return stored, nil
}

func (a *draAPI) reactPatch(action clienttesting.Action) (bool, runtime.Object, error) {
	act, ok := action.(clienttesting.PatchAction)
	res := draResourceFor(action.GetResource())
	if !ok || res == nil {
		return false, nil, nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	old, err := a.tracker.Get(res.gvr, act.GetNamespace(), act.GetName())
	if err != nil {
		return true, nil, err
	}
	oldJSON, err := json.Marshal(old)
	if err != nil {
		return true, nil, apierrors.NewInternalError(err)
	}
	var patched []byte
	switch act.GetPatchType() {
	case types.JSONPatchType:
		var p jsonpatch.Patch
		if p, err = jsonpatch.DecodePatch(act.GetPatch()); err == nil {
			patched, err = p.Apply(oldJSON)
		}
	case types.MergePatchType:
		patched, err = jsonpatch.MergePatch(oldJSON, act.GetPatch())
	case types.StrategicMergePatchType:
		patched, err = strategicpatch.StrategicMergePatch(oldJSON, act.GetPatch(), res.newObj())
	default:
		return true, nil, apierrors.NewGenericServerResponse(http.StatusUnsupportedMediaType, "patch", res.gr(), act.GetName(),
			fmt.Sprintf("the patch type %q is not supported here", act.GetPatchType()), 0, false)
	}
	if err != nil {
		return true, nil, apierrors.NewBadRequest(fmt.Sprintf("the patch could not be applied: %v", err))
	}
	obj := res.newObj()
	if err := json.Unmarshal(patched, obj); err != nil {
		return true, nil, apierrors.NewBadRequest(fmt.Sprintf("the patched object does not decode: %v", err))
	}
	stored, err := a.update(res, obj, act.GetSubresource())
	return true, stored, err
}

func (a *draAPI) reactDelete(action clienttesting.Action) (bool, runtime.Object, error) {
	act, ok := action.(clienttesting.DeleteAction)
	res := draResourceFor(action.GetResource())
	if !ok || res == nil || act.GetSubresource() != "" {
		return false, nil, nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	obj, err := a.delete(res, act.GetNamespace(), act.GetName(), act.GetDeleteOptions().Preconditions)
	return true, obj, err
}

// delete removes an object after checking the preconditions and returns
// it as last seen. mu held.
func (a *draAPI) delete(res *draResource, ns, name string, pre *metav1.Preconditions) (runtime.Object, error) {
	old, err := a.tracker.Get(res.gvr, ns, name)
	if err != nil {
		return nil, err
	}
	om, _ := meta.Accessor(old)
	if pre != nil && pre.UID != nil && *pre.UID != om.GetUID() {
		return nil, apierrors.NewConflict(res.gr(), name,
			fmt.Errorf("Precondition failed: UID in precondition: %v, UID in object meta: %v", *pre.UID, om.GetUID()))
	}
	if pre != nil && pre.ResourceVersion != nil && *pre.ResourceVersion != om.GetResourceVersion() {
		return nil, apierrors.NewConflict(res.gr(), name,
			fmt.Errorf("Precondition failed: ResourceVersion in precondition: %v, ResourceVersion in object meta: %v", *pre.ResourceVersion, om.GetResourceVersion()))
	}
	if err := a.tracker.Delete(res.gvr, ns, name); err != nil {
		return nil, err
	}
	om.SetResourceVersion(a.nextRV())
	a.emit(watch.Deleted, res, old)
	return old, nil
}

func (a *draAPI) reactDeleteCollection(action clienttesting.Action) (bool, runtime.Object, error) {
	act, ok := action.(clienttesting.DeleteCollectionActionImpl)
	res := draResourceFor(action.GetResource())
	if !ok || res == nil {
		return false, nil, nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	lr := act.GetListRestrictions()
	items, err := a.list(res, act.GetNamespace(), lr.Labels, lr.Fields)
	if err != nil {
		return true, nil, err
	}
	a.deleteCollections = append(a.deleteCollections, lr.Fields)
	for _, o := range items {
		m, _ := meta.Accessor(o)
		if _, err := a.delete(res, m.GetNamespace(), m.GetName(), act.DeleteOptions.Preconditions); err != nil && !apierrors.IsNotFound(err) {
			return true, nil, err
		}
	}
	return true, nil, nil
}

func (a *draAPI) reactList(action clienttesting.Action) (bool, runtime.Object, error) {
	act, ok := action.(clienttesting.ListActionImpl)
	res := draResourceFor(action.GetResource())
	if !ok || res == nil {
		return false, nil, nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	lr := act.GetListRestrictions()
	items, err := a.list(res, act.GetNamespace(), lr.Labels, lr.Fields)
	if err != nil {
		return true, nil, err
	}
	list, err := a.tracker.List(res.gvr, res.gvk(), act.GetNamespace())
	if err != nil {
		return true, nil, err
	}
	if err := meta.SetList(list, items); err != nil {
		return true, nil, apierrors.NewInternalError(err)
	}
	lm, _ := meta.ListAccessor(list)
	lm.SetResourceVersion(strconv.FormatInt(a.rv, 10))
	return true, list, nil
}

// list is the stored objects of res in ns (all namespaces if "") that the
// selectors pick, by name. A field the resource has no selector for is a
// 400, as from the API server. mu held.
func (a *draAPI) list(res *draResource, ns string, ls labels.Selector, fs fields.Selector) ([]runtime.Object, error) {
	if fs != nil {
		known := res.fields(res.newObj())
		for _, r := range fs.Requirements() {
			if _, ok := known[r.Field]; !ok {
				return nil, apierrors.NewBadRequest(fmt.Sprintf("field label not supported: %s", r.Field))
			}
		}
	}
	all, err := a.tracker.List(res.gvr, res.gvk(), ns)
	if err != nil {
		return nil, err
	}
	objs, err := meta.ExtractList(all)
	if err != nil {
		return nil, err
	}
	var out []runtime.Object
	for _, o := range objs {
		if draMatches(res, o, ls, fs) {
			out = append(out, o)
		}
	}
	slices.SortFunc(out, func(x, y runtime.Object) int {
		mx, _ := meta.Accessor(x)
		my, _ := meta.Accessor(y)
		return strings.Compare(mx.GetNamespace()+"/"+mx.GetName(), my.GetNamespace()+"/"+my.GetName())
	})
	return out, nil
}

func draMatches(res *draResource, o runtime.Object, ls labels.Selector, fs fields.Selector) bool {
	m, err := meta.Accessor(o)
	if err != nil {
		return false
	}
	if ls != nil && !ls.Matches(labels.Set(m.GetLabels())) {
		return false
	}
	return fs == nil || fs.Matches(res.fields(o))
}

// dropDisabledTaints drops device taints while dropTaints is on, unless the
// stored slice already uses them (the strategy's dropDisabledFields rule).
// mu held.
func (a *draAPI) dropDisabledTaints(s, old *resourcev1.ResourceSlice) {
	if !a.dropTaints {
		return
	}
	if old != nil && slices.ContainsFunc(old.Spec.Devices, func(d resourcev1.Device) bool { return len(d.Taints) > 0 }) {
		return
	}
	for i := range s.Spec.Devices {
		s.Spec.Devices[i].Taints = nil
	}
}

// validateResourceSlice defaults s as the API server decodes it, then
// validates it as the API server's ResourceSlice strategy does (its
// Validate or ValidateUpdate: the handwritten validation, then the
// declarative validation with the strategy's configuration and the default
// feature gates), against old on update. The result is a 422 Invalid
// Status. (The strategy package itself would link the API server's etcd
// storage into the suite.)
func validateResourceSlice(s, old *resourcev1.ResourceSlice) error {
	legacyscheme.Scheme.Default(s)
	verb, op := "create", operation.Create
	if old != nil {
		verb, op = "update", operation.Update
	}
	ctx := genericapirequest.WithRequestInfo(context.Background(), &genericapirequest.RequestInfo{
		IsResourceRequest: true, Verb: verb, APIGroup: resourcev1.GroupName, APIVersion: "v1",
		Resource: "resourceslices", Name: s.Name,
	})
	in := &resourceapi.ResourceSlice{}
	if err := legacyscheme.Scheme.Convert(s, in, nil); err != nil {
		return apierrors.NewInternalError(fmt.Errorf("converting the ResourceSlice: %w", err))
	}
	// As resourceslice.Strategy.DeclarativeValidationConfig.
	cfg := rest.DeclarativeValidationConfig{
		NormalizationRules: resourcevalidation.ResourceNormalizationRules,
		Options: map[string]bool{
			string(features.DRAPartitionableDevicesType): utilfeature.DefaultFeatureGate.Enabled(features.DRAPartitionableDevicesType),
		},
	}
	var errs field.ErrorList
	if old == nil {
		errs = resourcevalidation.ValidateResourceSlice(in)
		errs = rest.ValidateDeclarativelyWithMigrationChecks(ctx, legacyscheme.Scheme, in, nil, errs, op, cfg)
	} else {
		oldIn := &resourceapi.ResourceSlice{}
		if err := legacyscheme.Scheme.Convert(old, oldIn, nil); err != nil {
			return apierrors.NewInternalError(fmt.Errorf("converting the stored ResourceSlice: %w", err))
		}
		errs = resourcevalidation.ValidateResourceSliceUpdate(in, oldIn)
		errs = rest.ValidateDeclarativelyWithMigrationChecks(ctx, legacyscheme.Scheme, in, oldIn, errs, op, cfg)
	}
	if len(errs) > 0 {
		return apierrors.NewInvalid(schema.GroupKind{Group: resourcev1.GroupName, Kind: "ResourceSlice"}, s.Name, errs)
	}
	return nil
}

// ---------------------------------------------------------------------------
// The HTTP shim.

// draStatusWriter notes the status code and passes Flush on (watches).
type draStatusWriter struct {
	http.ResponseWriter
	code int
}

func (w *draStatusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *draStatusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *draStatusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (a *draAPI) serveHTTP(w http.ResponseWriter, r *http.Request) {
	sw := &draStatusWriter{ResponseWriter: w}
	a.route(sw, r)
	req := draAPIRequest{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Code: sw.code}
	a.mu.Lock()
	a.requests = append(a.requests, req)
	a.mu.Unlock()
	if sw.code >= 400 {
		a.tb.Logf("fake API: %s", req)
	}
}

// route finds the resource, namespace, name and verb of a request, checks
// the token and the daemon's permissions, and serves it.
func (a *draAPI) route(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+draToken {
		writeStatus(w, apierrors.NewUnauthorized("Unauthorized"))
		return
	}
	var gv schema.GroupVersion
	var rest string
	switch {
	case strings.HasPrefix(r.URL.Path, "/api/v1/"):
		gv, rest = v1.SchemeGroupVersion, strings.TrimPrefix(r.URL.Path, "/api/v1/")
	case strings.HasPrefix(r.URL.Path, "/apis/"):
		parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/apis/"), "/", 3)
		if len(parts) == 3 {
			gv, rest = schema.GroupVersion{Group: parts[0], Version: parts[1]}, parts[2]
		}
	}
	parts := strings.Split(rest, "/")
	ns := ""
	if len(parts) >= 3 && parts[0] == "namespaces" {
		ns, parts = parts[1], parts[2:]
	}
	var res *draResource
	if rest != "" && len(parts) <= 2 {
		res = draResourceFor(gv.WithResource(parts[0]))
	}
	if res == nil || res.namespaced != (ns != "") && !(res.namespaced && len(parts) == 1 && r.Method == http.MethodGet) {
		writeStatus(w, apierrors.NewGenericServerResponse(http.StatusNotFound, strings.ToLower(r.Method), schema.GroupResource{}, "",
			"the server could not find the requested resource", 0, false))
		return
	}
	name := ""
	if len(parts) == 2 {
		name = parts[1]
	}
	q := r.URL.Query()
	verb := ""
	switch {
	case r.Method == http.MethodGet && name != "":
		verb = "get"
	case r.Method == http.MethodGet && (q.Get("watch") == "true" || q.Get("watch") == "1"):
		verb = "watch"
	case r.Method == http.MethodGet:
		verb = "list"
	case r.Method == http.MethodPost && name == "":
		verb = "create"
	case r.Method == http.MethodPut && name != "":
		verb = "update"
	case r.Method == http.MethodPatch && name != "":
		verb = "patch"
	case r.Method == http.MethodDelete && name != "":
		verb = "delete"
	case r.Method == http.MethodDelete:
		verb = "deletecollection"
	default:
		writeStatus(w, apierrors.NewMethodNotSupported(res.gr(), strings.ToLower(r.Method)))
		return
	}
	a.mu.Lock()
	allowed := slices.Contains(a.verbs[res.gvr.Resource], verb)
	a.mu.Unlock()
	if !allowed {
		scope := "at the cluster scope"
		if ns != "" {
			scope = fmt.Sprintf("in the namespace %q", ns)
		}
		writeStatus(w, apierrors.NewForbidden(res.gr(), name, fmt.Errorf("User %q cannot %s resource %q in API group %q %s",
			draUser, verb, res.gvr.Resource, res.gvr.Group, scope)))
		return
	}
	switch verb {
	case "get":
		a.serveGet(w, res, ns, name)
	case "list", "watch", "deletecollection":
		a.serveCollection(w, r, res, ns, verb)
	case "create", "update":
		a.serveWrite(w, r, res, ns, name, verb)
	case "patch":
		a.servePatch(w, r, res, ns, name)
	case "delete":
		a.serveDelete(w, r, res, ns, name)
	}
}

func (a *draAPI) serveGet(w http.ResponseWriter, res *draResource, ns, name string) {
	var act clienttesting.Action = clienttesting.NewRootGetAction(res.gvr, name)
	if res.namespaced {
		act = clienttesting.NewGetAction(res.gvr, ns, name)
	}
	obj, err := a.client.Invokes(act, nil)
	if err != nil {
		writeStatus(w, err)
		return
	}
	writeObject(w, http.StatusOK, res, obj)
}

func (a *draAPI) serveCollection(w http.ResponseWriter, r *http.Request, res *draResource, ns, verb string) {
	q := r.URL.Query()
	opts := metav1.ListOptions{LabelSelector: q.Get("labelSelector"), FieldSelector: q.Get("fieldSelector"), ResourceVersion: q.Get("resourceVersion")}
	ls, err := labels.Parse(opts.LabelSelector)
	if err != nil {
		writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("unable to parse requirement: %v", err)))
		return
	}
	fs, err := fields.ParseSelector(opts.FieldSelector)
	if err != nil {
		writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("invalid field selector: %v", err)))
		return
	}
	switch verb {
	case "watch":
		a.serveWatch(w, r, res, ns, ls, fs, opts.ResourceVersion)
	case "deletecollection":
		act := clienttesting.NewDeleteCollectionActionWithOptions(res.gvr, ns, metav1.DeleteOptions{}, opts)
		if _, err := a.client.Invokes(act, nil); err != nil {
			writeStatus(w, err)
			return
		}
		writeJSON(w, http.StatusOK, &metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusSuccess})
	default:
		list, err := a.client.Invokes(clienttesting.NewListActionWithOptions(res.gvr, res.gvk(), ns, opts), nil)
		if err != nil {
			writeStatus(w, err)
			return
		}
		// Items carry no apiVersion and kind, as from the API server.
		items, err := meta.ExtractList(list)
		if err != nil {
			writeStatus(w, apierrors.NewInternalError(err))
			return
		}
		for _, o := range items {
			o.GetObjectKind().SetGroupVersionKind(schema.GroupVersionKind{})
		}
		list.GetObjectKind().SetGroupVersionKind(res.gvr.GroupVersion().WithKind(res.kind + "List"))
		writeJSON(w, http.StatusOK, list)
	}
}

// serveWatch streams watch events of res as the API server does: from
// resourceVersion "" or "0", an ADDED event for each object first; from
// any other, every change after it (the shim keeps them all, so none is
// ever too old). It ends with timeoutSeconds, the client or the shim.
func (a *draAPI) serveWatch(w http.ResponseWriter, r *http.Request, res *draResource, ns string, ls labels.Selector, fs fields.Selector, rv string) {
	var timeout <-chan time.Time
	if s := r.URL.Query().Get("timeoutSeconds"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("invalid timeoutSeconds %q", s)))
			return
		}
		if n > 0 {
			t := time.NewTimer(time.Duration(n) * time.Second)
			defer t.Stop()
			timeout = t.C
		}
	}
	a.mu.Lock()
	var initial []runtime.Object
	next := len(a.events)
	switch rv {
	case "", "0":
		var err error
		if initial, err = a.list(res, ns, ls, fs); err != nil {
			a.mu.Unlock()
			writeStatus(w, err)
			return
		}
	default:
		n, err := strconv.ParseInt(rv, 10, 64)
		if err != nil {
			a.mu.Unlock()
			writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("invalid resource version %q", rv)))
			return
		}
		next = len(a.events)
		for next > 0 && a.events[next-1].rv > n {
			next--
		}
	}
	a.mu.Unlock()

	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Transfer-Encoding", "chunked")
	w.WriteHeader(http.StatusOK)
	flusher := w.(http.Flusher)
	flusher.Flush()
	enc := json.NewEncoder(w)
	send := func(typ watch.EventType, obj runtime.Object) bool {
		obj = obj.DeepCopyObject()
		obj.GetObjectKind().SetGroupVersionKind(res.gvk())
		raw, err := json.Marshal(obj)
		if err != nil {
			return false
		}
		return enc.Encode(metav1.WatchEvent{Type: string(typ), Object: runtime.RawExtension{Raw: raw}}) == nil
	}
	for _, o := range initial {
		if !send(watch.Added, o) {
			return
		}
	}
	flusher.Flush()
	for {
		a.mu.Lock()
		events := a.events[next:]
		next = len(a.events)
		changed := a.changed
		a.mu.Unlock()
		for _, ev := range events {
			m, _ := meta.Accessor(ev.obj)
			if ev.res != res || ns != "" && m.GetNamespace() != ns || !draMatches(res, ev.obj, ls, fs) {
				continue
			}
			if !send(ev.typ, ev.obj) {
				return
			}
		}
		flusher.Flush()
		select {
		case <-changed:
		case <-timeout:
			return
		case <-r.Context().Done():
			return
		case <-a.done:
			return
		}
	}
}

// decodeStrict decodes a request body into obj as the API server does with
// fieldValidation=Strict: case-sensitive, no unknown or duplicate field.
func decodeStrict(body []byte, obj any) error {
	strict, err := sigsjson.UnmarshalStrict(body, obj, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	if err != nil {
		return apierrors.NewBadRequest(fmt.Sprintf("the body does not decode: %v", err))
	}
	if len(strict) > 0 {
		return apierrors.NewBadRequest(fmt.Sprintf("strict decoding error: %v", errors.Join(strict...)))
	}
	return nil
}

func (a *draAPI) serveWrite(w http.ResponseWriter, r *http.Request, res *draResource, ns, name, verb string) {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		writeStatus(w, apierrors.NewGenericServerResponse(http.StatusUnsupportedMediaType, verb, res.gr(), name,
			fmt.Sprintf("the body of the request was in an unknown format - accepted media types include: application/json (got %q)", ct), 0, false))
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeStatus(w, apierrors.NewBadRequest(err.Error()))
		return
	}
	obj := res.newObj()
	if err := decodeStrict(body, obj); err != nil {
		writeStatus(w, err)
		return
	}
	if gvk := obj.GetObjectKind().GroupVersionKind(); !gvk.Empty() && gvk != res.gvk() {
		writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("the API version in the data (%s) does not match the expected API version (%s)",
			gvk.GroupVersion(), res.gvr.GroupVersion())))
		return
	}
	obj.GetObjectKind().SetGroupVersionKind(schema.GroupVersionKind{})
	m, _ := meta.Accessor(obj)
	if res.namespaced && m.GetNamespace() != "" && m.GetNamespace() != ns {
		writeStatus(w, apierrors.NewBadRequest("the namespace of the provided object does not match the namespace sent on the request"))
		return
	}
	var act clienttesting.Action
	code := http.StatusOK
	switch verb {
	case "create":
		code = http.StatusCreated
		act = clienttesting.NewCreateAction(res.gvr, ns, obj)
	case "update":
		if m.GetName() != name {
			writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("the name of the object (%s) does not match the name on the URL (%s)", m.GetName(), name)))
			return
		}
		act = clienttesting.NewUpdateAction(res.gvr, ns, obj)
	}
	stored, err := a.client.Invokes(act, nil)
	if err != nil {
		writeStatus(w, err)
		return
	}
	writeObject(w, code, res, stored)
}

func (a *draAPI) servePatch(w http.ResponseWriter, r *http.Request, res *draResource, ns, name string) {
	pt := types.PatchType(strings.TrimSpace(strings.Split(r.Header.Get("Content-Type"), ";")[0]))
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeStatus(w, apierrors.NewBadRequest(err.Error()))
		return
	}
	stored, err := a.client.Invokes(clienttesting.NewPatchAction(res.gvr, ns, name, pt, body), nil)
	if err != nil {
		writeStatus(w, err)
		return
	}
	writeObject(w, http.StatusOK, res, stored)
}

func (a *draAPI) serveDelete(w http.ResponseWriter, r *http.Request, res *draResource, ns, name string) {
	var opts metav1.DeleteOptions
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeStatus(w, apierrors.NewBadRequest(err.Error()))
		return
	}
	if len(bytes.TrimSpace(body)) > 0 {
		if err := decodeStrict(body, &opts); err != nil {
			writeStatus(w, err)
			return
		}
	}
	var act clienttesting.Action = clienttesting.NewRootDeleteActionWithOptions(res.gvr, name, opts)
	if res.namespaced {
		act = clienttesting.NewDeleteActionWithOptions(res.gvr, ns, name, opts)
	}
	old, err := a.client.Invokes(act, nil)
	if err != nil {
		writeStatus(w, err)
		return
	}
	writeObject(w, http.StatusOK, res, old)
}

// writeObject answers one object of res with its apiVersion and kind.
func writeObject(w http.ResponseWriter, code int, res *draResource, obj runtime.Object) {
	obj = obj.DeepCopyObject()
	obj.GetObjectKind().SetGroupVersionKind(res.gvk())
	writeJSON(w, code, obj)
}

// writeStatus answers an error as the API server does: a Status object
// with its code (an error that is none is a 500).
func writeStatus(w http.ResponseWriter, err error) {
	var st metav1.Status
	var as apierrors.APIStatus
	if errors.As(err, &as) {
		st = as.Status()
	} else {
		st = apierrors.NewInternalError(err).ErrStatus
	}
	st.TypeMeta = metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}
	st.Status = metav1.StatusFailure
	if st.Code == 0 {
		st.Code = http.StatusInternalServerError
	}
	writeJSON(w, int(st.Code), &st)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","code":500}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(b)
}

// dumpJSON renders v for failure messages.
func dumpJSON(v any) string {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Sprintf("%+v", v)
	}
	return string(b)
}

// ---------------------------------------------------------------------------
// Harness self-test. selfTestDRAPlugin below is NOT gpu-plugin's DRA
// driver and no scenario may use it: it is the smallest DRA kubelet plugin
// (registration plus v1.DRAPlugin over two Unix sockets) that lets
// TestDRAHarness prove the harness itself before the daemon serves DRA.

// selfTestDRAPlugin registers as draDriver and answers prepare and
// unprepare with one fixed device, recording what it was asked.
type selfTestDRAPlugin struct {
	regSock, draSock string
	srv              *grpc.Server
	serveDone        chan struct{}

	mu         sync.Mutex
	prepared   []*drapb.Claim
	unprepared []*drapb.Claim
	statuses   []*registerapi.RegistrationStatus
}

// selfTestCDIDevice is the CDI device the self-test plugin returns for a
// claim, in the contract's form.
func selfTestCDIDevice(claimUID string) string {
	return "k8s.gpu.nvidia.com/claim=" + claimUID + "-gpu-0"
}

func startSelfTestDRAPlugin(tb testing.TB, registrarDir, pluginsDir string) *selfTestDRAPlugin {
	tb.Helper()
	p := &selfTestDRAPlugin{
		regSock:   filepath.Join(registrarDir, draDriver+"-reg.sock"),
		draSock:   filepath.Join(pluginsDir, draDriver, "dra.sock"),
		srv:       grpc.NewServer(),
		serveDone: make(chan struct{}),
	}
	registerapi.RegisterRegistrationServer(p.srv, selfTestRegistration{p: p})
	drapb.RegisterDRAPluginServer(p.srv, selfTestDRA{p: p})
	// The DRA socket first: the kubelet may call it as soon as the
	// registration socket appears.
	var listeners []net.Listener
	for _, sock := range []string{p.draSock, p.regSock} {
		if err := os.MkdirAll(filepath.Dir(sock), 0o750); err != nil {
			tb.Fatal(err)
		}
		l, err := net.Listen("unix", sock)
		if err != nil {
			tb.Fatalf("self-test DRA plugin: listening on %s: %v", sock, err)
		}
		listeners = append(listeners, l)
	}
	var wg sync.WaitGroup
	for _, l := range listeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = p.srv.Serve(l)
		}()
	}
	go func() {
		wg.Wait()
		close(p.serveDone)
	}()
	tb.Cleanup(p.stop)
	return p
}

// stop stops serving; the sockets are removed, so the kubelet deregisters
// the driver. Safe to call twice.
func (p *selfTestDRAPlugin) stop() {
	p.srv.Stop()
	<-p.serveDone
	_ = os.Remove(p.regSock)
	_ = os.Remove(p.draSock)
}

func (p *selfTestDRAPlugin) calls() (prepared, unprepared []*drapb.Claim, statuses []*registerapi.RegistrationStatus) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.prepared), slices.Clone(p.unprepared), slices.Clone(p.statuses)
}

type selfTestRegistration struct {
	registerapi.UnimplementedRegistrationServer
	p *selfTestDRAPlugin
}

func (s selfTestRegistration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.DRAPlugin,
		Name:              draDriver,
		Endpoint:          s.p.draSock,
		SupportedVersions: []string{drapb.DRAPluginService},
	}, nil
}

func (s selfTestRegistration) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	s.p.mu.Lock()
	s.p.statuses = append(s.p.statuses, st)
	s.p.mu.Unlock()
	return &registerapi.RegistrationStatusResponse{}, nil
}

type selfTestDRA struct {
	drapb.UnimplementedDRAPluginServer
	p *selfTestDRAPlugin
}

func (s selfTestDRA) NodePrepareResources(_ context.Context, req *drapb.NodePrepareResourcesRequest) (*drapb.NodePrepareResourcesResponse, error) {
	resp := &drapb.NodePrepareResourcesResponse{Claims: map[string]*drapb.NodePrepareResourceResponse{}}
	s.p.mu.Lock()
	defer s.p.mu.Unlock()
	for _, c := range req.Claims {
		s.p.prepared = append(s.p.prepared, c)
		resp.Claims[c.Uid] = &drapb.NodePrepareResourceResponse{Devices: []*drapb.Device{{
			RequestNames: []string{draRequest}, PoolName: draNodeName, DeviceName: "gpu-0",
			CdiDeviceIds: []string{selfTestCDIDevice(c.Uid)},
		}}}
	}
	return resp, nil
}

func (s selfTestDRA) NodeUnprepareResources(_ context.Context, req *drapb.NodeUnprepareResourcesRequest) (*drapb.NodeUnprepareResourcesResponse, error) {
	resp := &drapb.NodeUnprepareResourcesResponse{Claims: map[string]*drapb.NodeUnprepareResourceResponse{}}
	s.p.mu.Lock()
	defer s.p.mu.Unlock()
	for _, c := range req.Claims {
		s.p.unprepared = append(s.p.unprepared, c)
		resp.Claims[c.Uid] = &drapb.NodeUnprepareResourceResponse{}
	}
	return resp, nil
}

var (
	_ registerapi.RegistrationServer = selfTestRegistration{}
	_ drapb.DRAPluginServer          = selfTestDRA{}
)

// shimCall is one HTTP request to the shim with the daemon's token; it
// returns the status code and body.
func shimCall(tb testing.TB, k *draKubelet, method, path, contentType, body string) (int, []byte) {
	tb.Helper()
	req, err := http.NewRequest(method, k.api.url()+path, strings.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+draToken)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: waitTimeout}
	resp, err := client.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("%s %s: reading the answer: %v", method, path, err)
	}
	return resp.StatusCode, b
}

// wantStatus checks that an answer is a Status of code and reason.
func wantStatus(tb testing.TB, what string, code int, body []byte, wantCode int, reason metav1.StatusReason) {
	tb.Helper()
	var st metav1.Status
	if err := json.Unmarshal(body, &st); err != nil || st.Kind != "Status" || st.APIVersion != "v1" {
		tb.Errorf("%s: answer %d is not a Status (%v): %s", what, code, err, body)
		return
	}
	if code != wantCode || int(st.Code) != wantCode || st.Reason != reason {
		tb.Errorf("%s: %d (status code %d, reason %q), want %d %q: %s", what, code, st.Code, st.Reason, wantCode, reason, st.Message)
	}
}

const selfTestSlicesPath = "/apis/resource.k8s.io/v1/resourceslices"

// selfTestSliceJSON is a ResourceSlice as a hand-written JSON client sends
// it: one pool named after the node, one device with a taint.
func selfTestSliceJSON(nodeUID types.UID, extra string) string {
	return `{
  "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
  "metadata": {"generateName": "conformance-node-gpu.nvidia.com-",
    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "conformance-node", "uid": "` + string(nodeUID) + `", "controller": true}]},
  "spec": {"driver": "gpu.nvidia.com", "nodeName": "conformance-node",
    "pool": {"name": "conformance-node", "generation": 1, "resourceSliceCount": 1},
    "devices": [{"name": "gpu-0",
      "attributes": {"type": {"string": "gpu"}, "index": {"int": 0}, "driverVersion": {"version": "580.65.6"}` + extra + `},
      "capacity": {"memory": {"value": "80Gi"}},
      "taints": [{"key": "gpu.nvidia.com/xid", "value": "79", "effect": "NoSchedule"}]}]}
}`
}

// TestDRAHarness proves the DRA harness with the self-test plugin:
// registration over the real socket, prepare, CDI devices and unprepare
// through the real kubelet DRA manager, a kubelet restart, the shim's
// ResourceSlice round trip and errors, the taint-dropping API, the
// kubeconfig through the daemon's own loader, and nothing left running.
func TestDRAHarness(t *testing.T) {
	requireKubeletNamespace(t)
	before := currentUsage(t)
	root := t.TempDir()
	registrarDir := filepath.Join(root, "plugins_registry")
	pluginsDir := filepath.Join(root, "plugins")

	func() {
		k := startDRAKubelet(t, registrarDir)
		defer k.stop()
		p := startSelfTestDRAPlugin(t, registrarDir, pluginsDir)
		defer p.stop()

		// Registration over the real socket.
		if ep := k.waitRegistered(draDriver); ep != p.draSock {
			t.Errorf("registered endpoint %q, want %q", ep, p.draSock)
		}
		if err := poll(waitTimeout, func() bool { _, _, st := p.calls(); return len(st) > 0 }); err != nil {
			t.Fatal("the kubelet never notified the plugin of its registration")
		}
		if _, _, st := p.calls(); !st[0].PluginRegistered || st[0].Error != "" {
			t.Errorf("registration status %+v, want registered without error", st[0])
		}

		// Prepare, CDI devices, unprepare.
		c := k.claim(draNamespace, "claim-a", draResult("gpu-0"))
		if c.UID == "" || c.ResourceVersion == "" {
			t.Fatalf("the stored claim has no UID or resourceVersion: %+v", c.ObjectMeta)
		}
		pod := k.pod("pod-a", "claim-a")
		if err := k.prepare(pod); err != nil {
			t.Fatalf("PrepareResources: %v", err)
		}
		prepared, _, _ := p.calls()
		if len(prepared) != 1 || prepared[0].Namespace != draNamespace || prepared[0].Uid != string(c.UID) || prepared[0].Name != "claim-a" {
			t.Errorf("NodePrepareResources got %v, want claim %s/claim-a uid %s", prepared, draNamespace, c.UID)
		}
		want := []string{selfTestCDIDevice(string(c.UID))}
		if got := k.cdiDevices(pod, containerName); !slices.Equal(got, want) {
			t.Errorf("CDI devices %v, want %v", got, want)
		}

		// A kubelet restart: re-registration from the socket already
		// there, CDI devices from the checkpoint, the startup wipe.
		if _, err := k.client.ResourceV1().ResourceSlices().Create(context.Background(), &resourcev1.ResourceSlice{
			ObjectMeta: metav1.ObjectMeta{Name: "to-be-wiped"},
			Spec: resourcev1.ResourceSliceSpec{Driver: draDriver, NodeName: ptrTo(draNodeName),
				Pool: resourcev1.ResourcePool{Name: draNodeName, ResourceSliceCount: 1}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		k.restart()
		if got := k.slices(); len(got) != 0 {
			t.Errorf("ResourceSlices after a kubelet restart: %d, want none (the startup wipe)", len(got))
		}
		k.waitRegistered(draDriver)
		if got := k.cdiDevices(pod, containerName); !slices.Equal(got, want) {
			t.Errorf("CDI devices after a kubelet restart %v, want %v (from the checkpoint)", got, want)
		}
		if err := k.unprepare(pod); err != nil {
			t.Fatalf("UnprepareResources: %v", err)
		}
		if _, unprepared, _ := p.calls(); len(unprepared) != 1 || unprepared[0].Uid != string(c.UID) || unprepared[0].Name != "claim-a" {
			t.Errorf("NodeUnprepareResources got %v, want claim-a uid %s", unprepared, c.UID)
		}

		selfTestShim(t, k)

		// The plugin going away deregisters it.
		p.stop()
		k.waitDeregistered(draDriver)
		k.stop()
		k.api.close()
	}()

	// Everything stopped: the kubelet, its plugin manager, the plugin and
	// the shim.
	after := checkNoLeak(t, before, 0)
	t.Logf("before %s, after %s", before, after)
}

// selfTestShim checks the HTTP shim against the fake clientset.
func selfTestShim(t *testing.T, k *draKubelet) {
	t.Helper()
	ctx := context.Background()

	// Create through HTTP JSON (generateName), read through the clientset.
	code, body := shimCall(t, k, http.MethodPost, selfTestSlicesPath, "application/json", selfTestSliceJSON(k.nodeUID, ""))
	if code != http.StatusCreated {
		t.Fatalf("POST ResourceSlice: %d %s", code, body)
	}
	var created resourcev1.ResourceSlice
	if err := json.Unmarshal(body, &created); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(created.Name, "conformance-node-gpu.nvidia.com-") || created.UID == "" || created.ResourceVersion == "" ||
		created.Generation != 1 || created.Kind != "ResourceSlice" || created.APIVersion != "resource.k8s.io/v1" {
		t.Errorf("created slice metadata: %s %s", created.APIVersion+"/"+created.Kind, dumpJSON(created.ObjectMeta))
	}
	got := k.slices()
	if len(got) != 1 || got[0].Name != created.Name || len(got[0].Spec.Devices) != 1 || len(got[0].Spec.Devices[0].Taints) != 1 ||
		got[0].Spec.Devices[0].Attributes["driverVersion"].VersionValue == nil || got[0].OwnerReferences[0].UID != k.nodeUID {
		t.Fatalf("the slice through the clientset: %s", dumpJSON(got))
	}

	// List with field selectors, as the daemon's informer does.
	sel := "?fieldSelector=" + fields.AndSelectors(
		fields.OneTermEqualSelector(resourcev1.ResourceSliceSelectorDriver, draDriver),
		fields.OneTermEqualSelector(resourcev1.ResourceSliceSelectorNodeName, draNodeName)).String()
	code, body = shimCall(t, k, http.MethodGet, selfTestSlicesPath+sel, "", "")
	var list resourcev1.ResourceSliceList
	if err := json.Unmarshal(body, &list); code != http.StatusOK || err != nil || len(list.Items) != 1 || list.ResourceVersion == "" || list.Kind != "ResourceSliceList" {
		t.Fatalf("LIST with %s: %d %v %s", sel, code, err, body)
	}
	code, body = shimCall(t, k, http.MethodGet, selfTestSlicesPath+"?fieldSelector=spec.nodeName%3Dother-node", "", "")
	if err := json.Unmarshal(body, &list); code != http.StatusOK || err != nil || len(list.Items) != 0 {
		t.Errorf("LIST for another node: %d %v %s", code, err, body)
	}
	code, body = shimCall(t, k, http.MethodGet, selfTestSlicesPath+"?fieldSelector=spec.nodename%3Dx", "", "")
	wantStatus(t, "LIST with an unknown field selector", code, body, http.StatusBadRequest, metav1.StatusReasonBadRequest)

	// Watch from the list's resourceVersion: a clientset update arrives.
	watchCtx, stopWatch := context.WithTimeout(ctx, waitTimeout)
	defer stopWatch()
	req, _ := http.NewRequestWithContext(watchCtx, http.MethodGet, k.api.url()+selfTestSlicesPath+sel+"&watch=true&resourceVersion="+list.ResourceVersion, nil)
	req.Header.Set("Authorization", "Bearer "+draToken)
	watchClient := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := watchClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("WATCH: %v %v", resp, err)
	}
	updated := got[0].DeepCopy()
	updated.Spec.Devices[0].Attributes["productName"] = resourcev1.DeviceAttribute{StringValue: ptrTo("NVIDIA H100 80GB HBM3")}
	if updated, err = k.client.ResourceV1().ResourceSlices().Update(ctx, updated, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var ev struct {
		Type   string                   `json:"type"`
		Object resourcev1.ResourceSlice `json:"object"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ev); err != nil || ev.Type != "MODIFIED" || ev.Object.ResourceVersion != updated.ResourceVersion || ev.Object.Generation != 2 {
		t.Errorf("watch event %s %s/%s generation %d (%v), want MODIFIED at %s generation 2",
			ev.Type, ev.Object.Name, ev.Object.ResourceVersion, ev.Object.Generation, err, updated.ResourceVersion)
	}
	stopWatch()
	resp.Body.Close()

	// PUT: a stale resourceVersion is a conflict, the current one is not.
	stale := got[0].DeepCopy()
	stale.Spec.Pool.Generation = 2
	code, body = shimCall(t, k, http.MethodPut, selfTestSlicesPath+"/"+stale.Name, "application/json", dumpJSON(stale))
	wantStatus(t, "PUT with a stale resourceVersion", code, body, http.StatusConflict, metav1.StatusReasonConflict)
	stale.ResourceVersion = updated.ResourceVersion
	code, body = shimCall(t, k, http.MethodPut, selfTestSlicesPath+"/"+stale.Name, "application/json", dumpJSON(stale))
	if code != http.StatusOK {
		t.Errorf("PUT with the current resourceVersion: %d %s", code, body)
	}

	// Schema and validation errors, as the API server gives them.
	code, body = shimCall(t, k, http.MethodPost, selfTestSlicesPath, "application/json",
		strings.Replace(selfTestSliceJSON(k.nodeUID, ""), `"nodeName"`, `"nodename"`, 1))
	wantStatus(t, "POST with a wrongly cased field", code, body, http.StatusBadRequest, metav1.StatusReasonBadRequest)
	code, body = shimCall(t, k, http.MethodPost, selfTestSlicesPath, "application/json",
		selfTestSliceJSON(k.nodeUID, `, "cudaDriverVersion": {"version": "580.65.06"}`))
	wantStatus(t, "POST with a version attribute that is no semver", code, body, http.StatusUnprocessableEntity, metav1.StatusReasonInvalid)

	// DELETE honours a UID precondition.
	code, body = shimCall(t, k, http.MethodDelete, selfTestSlicesPath+"/"+created.Name, "application/json",
		`{"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}}`)
	wantStatus(t, "DELETE with another UID", code, body, http.StatusConflict, metav1.StatusReasonConflict)
	code, body = shimCall(t, k, http.MethodDelete, selfTestSlicesPath+"/"+created.Name, "application/json",
		`{"preconditions": {"uid": "`+string(created.UID)+`"}}`)
	if code != http.StatusOK {
		t.Errorf("DELETE with the UID: %d %s", code, body)
	}
	code, body = shimCall(t, k, http.MethodGet, selfTestSlicesPath+"/"+created.Name, "", "")
	wantStatus(t, "GET a deleted slice", code, body, http.StatusNotFound, metav1.StatusReasonNotFound)

	// Taints dropped while the API has no DRADeviceTaints.
	k.setDropDeviceTaints(true)
	code, body = shimCall(t, k, http.MethodPost, selfTestSlicesPath, "application/json", selfTestSliceJSON(k.nodeUID, ""))
	created = resourcev1.ResourceSlice{}
	if err := json.Unmarshal(body, &created); code != http.StatusCreated || err != nil || len(created.Spec.Devices[0].Taints) != 0 {
		t.Errorf("POST without DRADeviceTaints: %d %v, want no taints: %s", code, err, body)
	}
	if s := k.slices(); len(s) != 1 || len(s[0].Spec.Devices[0].Taints) != 0 {
		t.Errorf("stored without DRADeviceTaints: %s", dumpJSON(s))
	}
	k.setDropDeviceTaints(false)
	if err := k.client.ResourceV1().ResourceSlices().Delete(ctx, created.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// Claims and the Node: GET only, 403 for the rest, 401 without the
	// token, 404 for an unknown resource.
	c := k.claim(draNamespace, "claim-b", draResult("gpu-1"))
	code, body = shimCall(t, k, http.MethodGet, "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/claim-b", "", "")
	var rc resourcev1.ResourceClaim
	if err := json.Unmarshal(body, &rc); code != http.StatusOK || err != nil || rc.UID != c.UID || rc.Status.Allocation == nil {
		t.Errorf("GET claim: %d %v %s", code, err, body)
	}
	code, body = shimCall(t, k, http.MethodGet, "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/missing", "", "")
	wantStatus(t, "GET a missing claim", code, body, http.StatusNotFound, metav1.StatusReasonNotFound)
	code, body = shimCall(t, k, http.MethodGet, "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims", "", "")
	wantStatus(t, "LIST claims", code, body, http.StatusForbidden, metav1.StatusReasonForbidden)
	code, body = shimCall(t, k, http.MethodGet, "/apis/resource.k8s.io/v1/deviceclasses", "", "")
	wantStatus(t, "an unknown resource", code, body, http.StatusNotFound, metav1.StatusReasonNotFound)
	req, _ = http.NewRequest(http.MethodGet, k.api.url()+"/api/v1/nodes/"+draNodeName, nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET without a token: %v %v, want 401", resp, err)
	} else {
		resp.Body.Close()
	}
	http.DefaultClient.CloseIdleConnections()

	// The kubeconfig through the daemon's own loader and client.
	cfg, err := kube.LoadKubeconfig(k.kubeconfig())
	if err != nil {
		t.Fatalf("the kubeconfig: %v", err)
	}
	client, err := kube.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	node, err := client.GetNode(ctx, draNodeName)
	if err != nil || node.Name != draNodeName || node.UID != string(k.nodeUID) {
		t.Errorf("GetNode through internal/kube: %+v %v, want UID %s", node, err, k.nodeUID)
	}
	t.Logf("the shim answered %d requests", len(k.apiRequests()))
}

func ptrTo[T any](v T) *T { return &v }
