package e2e

// Scenario 4d: the daemon's DRA plugin (driver gpu.nvidia.com) on the real
// node, turned on through the chart's dra.* values, with the real
// scheduler, resourceclaim controller, kubelet DRA manager and containerd
// v2 applying the per-claim CDI specs. A claim's spec names device nodes
// in the simulated driver root, as the cdi-cri specs of scenario 2b do, so
// the values are cdiValues' (TMPDIR=/var/run/cdi, MKNOD, the stand-in
// nvidia-cdi-hook) plus dra.mode; the device plugin side keeps its default
// strategy.
//
// Scenario 2's pod holds 2 GPUs through the device plugin all along: a
// daemon turned to DRA must leave them out of its ResourceSlice until that
// pod ends (docs/dra.md), so the slice offers the other 6 (all 8 when the
// suite is narrowed to 1-install and 4d-dra).

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
	"sigs.k8s.io/yaml"
)

const (
	// The daemon's DRA driver and the chart's DeviceClasses, NVIDIA's names.
	draDriver   = "gpu.nvidia.com"
	draGPUClass = "gpu.nvidia.com"
	draMIGClass = "mig.nvidia.com"
	// A claim's CDI spec on the host, and its kind.
	draClaimSpecPrefix = "k8s.gpu.nvidia.com-claim_"
	draClaimKind       = "k8s.gpu.nvidia.com/claim"
	// The daemon's prepared claims (--kubelet-plugins-directory-path's default).
	draCheckpoint = "/var/lib/kubelet/plugins/" + draDriver + "/checkpoint.json"
	// The simulated MIG node of the MIG sub-step.
	draMIGSimProfile = "dgx-a100-mig"
	draMIGProfile    = "3g.20gb"
	// Every object the scenario creates carries this label.
	draLabel = "e2e.gpu-plugin.io/scenario"
	draNS    = "default"
	// What the kubelet's pod-resources API serves on.
	podResourcesSocket = "/var/lib/kubelet/pod-resources/kubelet.sock"
)

var draLabels = map[string]string{draLabel: "4d-dra"}

// draValues are the install values with dra.mode (and dra.devices) on the
// simulated node profile: cdiValues' TMPDIR, MKNOD and hook, since a
// claim's spec names the simulated driver root's device nodes, and the
// device plugin's default strategy.
func draValues(image, hook, mode string, devices []string, profile string) map[string]any {
	v := cdiValues(image, hook)
	delete(v, "deviceListStrategy")
	args := slices.Clone(v["extraArgs"].([]any))
	for i, a := range args {
		if s, _ := a.(string); strings.HasPrefix(s, "--simulate=") {
			args[i] = "--simulate=" + profile
		}
	}
	v["extraArgs"] = args
	devs := []any{}
	for _, d := range devices {
		devs = append(devs, d)
	}
	v["dra"] = map[string]any{"mode": mode, "devices": devs}
	return v
}

// draDebug is the part of /debug/devices' dra section the scenario reads.
type draDebug struct {
	Registered  bool   `json:"registered"`
	RegisterErr string `json:"registrationError"`
	Slice       string `json:"slice"`
	PublishErr  string `json:"publishError"`
	Devices     []struct {
		Name    string `json:"name"`
		UUID    string `json:"uuid"`
		Healthy bool   `json:"healthy"`
		Reason  string `json:"reason"`
	} `json:"devices"`
	Prepared []struct {
		UID     string   `json:"uid"`
		Name    string   `json:"name"`
		Devices []string `json:"devices"`
	} `json:"preparedClaims"`
}

func (s *suite) draDebug(t *testing.T) (*draDebug, string) {
	t.Helper()
	b := s.pluginDo(t, http.MethodGet, "/debug/devices")
	var doc struct {
		DRA *draDebug `json:"dra"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("decoding /debug/devices: %v: %s", err, b)
	}
	if doc.DRA == nil {
		t.Fatalf("/debug/devices has no dra section: the plugin does not serve DRA")
	}
	raw, _ := json.Marshal(doc.DRA)
	return doc.DRA, string(raw)
}

// waitDRADebug polls /debug/devices until ok holds for its dra section.
func (s *suite) waitDRADebug(t *testing.T, what string, timeout time.Duration, ok func(*draDebug) bool) *draDebug {
	t.Helper()
	var d *draDebug
	var last string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		d, last = s.draDebug(t)
		return ok(d), nil
	})
	if err != nil {
		t.Fatalf("/debug/devices dra: %s not reached in %s: %v; last: %s", what, timeout, err, last)
	}
	return d
}

// draSlices lists the ResourceSlices of the daemon's driver on the node.
func (s *suite) draSlices(t *testing.T) []resourcev1.ResourceSlice {
	t.Helper()
	list, err := s.n.client.ResourceV1().ResourceSlices().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatalf("listing ResourceSlices: %v", err)
	}
	var out []resourcev1.ResourceSlice
	for _, sl := range list.Items {
		if sl.Spec.Driver == draDriver && sl.Spec.NodeName != nil && *sl.Spec.NodeName == nodeName {
			out = append(out, sl)
		}
	}
	return out
}

// describeSlices is what a failed wait says it last saw.
func describeSlices(ss []resourcev1.ResourceSlice) string {
	if len(ss) == 0 {
		return "no slice of " + draDriver + " on the node"
	}
	var out []string
	for _, sl := range ss {
		var devs []string
		for _, d := range sl.Spec.Devices {
			desc := d.Name
			for _, tn := range d.Taints {
				desc += fmt.Sprintf("[%s=%s:%s]", tn.Key, tn.Value, tn.Effect)
			}
			devs = append(devs, desc)
		}
		out = append(out, fmt.Sprintf("slice %s (pool %s generation %d): %v", sl.Name, sl.Spec.Pool.Name, sl.Spec.Pool.Generation, devs))
	}
	return strings.Join(out, "; ")
}

// waitDRASlice waits until the node has exactly one slice of the driver
// and ok holds for it. A device in bad (by UUID) fails it at once.
func (s *suite) waitDRASlice(t *testing.T, what string, timeout time.Duration, bad map[string]bool, ok func(*resourcev1.ResourceSlice) bool) *resourcev1.ResourceSlice {
	t.Helper()
	var got []resourcev1.ResourceSlice
	var found *resourcev1.ResourceSlice
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		got = s.draSlices(t)
		for _, sl := range got {
			for i := range sl.Spec.Devices {
				if u := attrString(&sl.Spec.Devices[i], "uuid"); bad[u] {
					t.Fatalf("the slice offers %s (%s), which a pod holds through the device plugin: %s", sl.Spec.Devices[i].Name, u, describeSlices(got))
				}
			}
		}
		if len(got) != 1 || !ok(&got[0]) {
			return false, nil
		}
		found = &got[0]
		return true, nil
	})
	if err != nil {
		t.Fatalf("ResourceSlice of %s on %s: %s not reached in %s: %v; last seen: %s", draDriver, nodeName, what, timeout, err, describeSlices(got))
	}
	return found
}

// attrString is a device's string or version attribute ("" if none).
func attrString(d *resourcev1.Device, name string) string {
	a, ok := d.Attributes[resourcev1.QualifiedName(name)]
	switch {
	case !ok:
		return ""
	case a.StringValue != nil:
		return *a.StringValue
	case a.VersionValue != nil:
		return *a.VersionValue
	}
	return ""
}

func attrInt(d *resourcev1.Device, name string) (int64, bool) {
	a, ok := d.Attributes[resourcev1.QualifiedName(name)]
	if !ok || a.IntValue == nil {
		return 0, false
	}
	return *a.IntValue, true
}

func sliceDevice(sl *resourcev1.ResourceSlice, name string) *resourcev1.Device {
	for i := range sl.Spec.Devices {
		if sl.Spec.Devices[i].Name == name {
			return &sl.Spec.Devices[i]
		}
	}
	return nil
}

// draClaimSpec asks for count devices of a class, with an optional CEL
// selector.
func draClaimSpec(class string, count int64, cel string) resourcev1.ResourceClaimSpec {
	req := &resourcev1.ExactDeviceRequest{DeviceClassName: class}
	if count > 1 {
		req.AllocationMode, req.Count = resourcev1.DeviceAllocationModeExactCount, count
	}
	if cel != "" {
		req.Selectors = []resourcev1.DeviceSelector{{CEL: &resourcev1.CELDeviceSelector{Expression: cel}}}
	}
	return resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{Requests: []resourcev1.DeviceRequest{{Name: "gpu", Exactly: req}}}}
}

// draReportScript makes a container print its NVIDIA device nodes (what
// ls finds under /dev/nvidia* and /dev/nvidia-caps/, directories left
// out), one "node=<path> <type> <major>:<minor>" line each (hex, as stat
// prints them), then "done", and sleep.
const draReportScript = `for f in $(ls -1d /dev/nvidia* /dev/nvidia-caps/* 2>/dev/null); do [ -d "$f" ] || echo "node=$f $(stat -c '%F %t:%T' "$f")"; done
echo done
exec sleep 3600
`

// draPod is a busybox pod whose container uses the pod's claims and
// reports its device nodes.
func draPod(name string, claims ...corev1.PodResourceClaim) *corev1.Pod {
	p := testPod(draNS, name, 0)
	p.Labels = draLabels
	p.Spec.Containers[0].Command = []string{"/bin/sh", "-c", draReportScript}
	p.Spec.ResourceClaims = claims
	for _, c := range claims {
		p.Spec.Containers[0].Resources.Claims = append(p.Spec.Containers[0].Resources.Claims, corev1.ResourceClaim{Name: c.Name})
	}
	return p
}

// fromTemplate and fromClaim are a pod's claim "gpu" from a template or a
// shared ResourceClaim.
func fromTemplate(tmpl string) corev1.PodResourceClaim {
	return corev1.PodResourceClaim{Name: "gpu", ResourceClaimTemplateName: ptrTo(tmpl)}
}

func fromClaim(claim string) corev1.PodResourceClaim {
	return corev1.PodResourceClaim{Name: "gpu", ResourceClaimName: ptrTo(claim)}
}

// podClaim is the name of a pod's claim "gpu": the shared claim it names,
// the one the resourceclaim controller made from its template, or the
// scheduler's claim for its extended resources ("" until there is one).
func podClaim(p *corev1.Pod) string {
	for _, c := range p.Spec.ResourceClaims {
		if c.Name == "gpu" && c.ResourceClaimName != nil {
			return *c.ResourceClaimName
		}
	}
	for _, st := range p.Status.ResourceClaimStatuses {
		if st.Name == "gpu" && st.ResourceClaimName != nil {
			return *st.ResourceClaimName
		}
	}
	if e := p.Status.ExtendedResourceClaimStatus; e != nil {
		return e.ResourceClaimName
	}
	return ""
}

// claimDevices returns a claim and the devices allocated to it, failing
// unless every one is the driver's, in the node's pool.
func (s *suite) claimDevices(t *testing.T, name string) (*resourcev1.ResourceClaim, []string) {
	t.Helper()
	claim, err := s.n.client.ResourceV1().ResourceClaims(draNS).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("ResourceClaim %s: %v", name, err)
	}
	if claim.Status.Allocation == nil {
		t.Fatalf("ResourceClaim %s is not allocated: %+v", name, claim.Status)
	}
	var devs []string
	for _, r := range claim.Status.Allocation.Devices.Results {
		if r.Driver != draDriver || r.Pool != nodeName {
			t.Fatalf("ResourceClaim %s: result %+v, want driver %s, pool %s", name, r, draDriver, nodeName)
		}
		devs = append(devs, r.Device)
	}
	return claim, devs
}

// readClaimSpec reads a claim's CDI spec from the host's /var/run/cdi.
func readClaimSpec(t *testing.T, uid string) *cdiSpec {
	t.Helper()
	path := filepath.Join(cdiSpecDir, draClaimSpecPrefix+uid+".yaml")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the claim's CDI spec: %v", err)
	}
	var sp cdiSpec
	if err := yaml.Unmarshal(b, &sp); err != nil {
		t.Fatalf("CDI spec %s: %v", path, err)
	}
	if sp.Kind != draClaimKind {
		t.Fatalf("CDI spec %s: kind %q, want %s", path, sp.Kind, draClaimKind)
	}
	return &sp
}

// specNodes are the device nodes a container of a claim gets from its
// spec: the common ones and those of each device, described as stat
// prints them.
func specNodes(sp *cdiSpec) map[string]string {
	out := map[string]string{}
	add := func(e cdiEdits) {
		for _, d := range e.DeviceNodes {
			out[d.Path] = fmt.Sprintf("character special file %x:%x", d.Major, d.Minor)
		}
	}
	add(sp.ContainerEdits)
	for _, d := range sp.Devices {
		add(d.ContainerEdits)
	}
	return out
}

// devNodes waits for a pod's report and returns its device nodes.
func (s *suite) devNodes(t *testing.T, name string) map[string]string {
	t.Helper()
	var log string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		b, err := s.n.client.CoreV1().Pods(draNS).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctx)
		log = string(b)
		return err == nil && strings.Contains(log, "\ndone\n") || log == "done\n", nil
	})
	if err != nil {
		t.Fatalf("pod %s did not finish its report: %v; log so far:\n%s", name, err, log)
	}
	nodes := map[string]string{}
	for _, l := range strings.Split(log, "\n") {
		if v, ok := strings.CutPrefix(l, "node="); ok {
			path, desc, _ := strings.Cut(v, " ")
			nodes[path] = desc
		}
	}
	return nodes
}

// gpuNodes are the whole-GPU device nodes (/dev/nvidia<minor>) among nodes.
func gpuNodes(nodes map[string]string) []string {
	var out []string
	for p := range nodes {
		if rest, ok := strings.CutPrefix(p, "/dev/nvidia"); ok && rest != "" && strings.Trim(rest, "0123456789") == "" {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

// checkPodDevices fails unless a running pod's device nodes are exactly
// those of its claim's CDI spec, with the spec's majors and minors, and
// returns its GPU device nodes.
func (s *suite) checkPodDevices(t *testing.T, pod string, claim *resourcev1.ResourceClaim, devices []string) []string {
	t.Helper()
	sp := readClaimSpec(t, string(claim.UID))
	var names []string
	for _, d := range sp.Devices {
		names = append(names, d.Name)
	}
	var want []string
	for _, d := range devices {
		want = append(want, string(claim.UID)+"-"+d)
	}
	sort.Strings(names)
	sort.Strings(want)
	if !slices.Equal(names, want) {
		t.Fatalf("claim %s's CDI spec has devices %v, want %v", claim.Name, names, want)
	}
	wantNodes, got := specNodes(sp), s.devNodes(t, pod)
	for p, d := range wantNodes {
		if got[p] != d {
			t.Errorf("%s in pod %s: %q, want %q (claim %s's CDI spec)", p, pod, got[p], d, claim.Name)
		}
	}
	for p, d := range got {
		if _, ok := wantNodes[p]; !ok {
			t.Errorf("pod %s has %s (%s), which claim %s's CDI spec does not give it", pod, p, d, claim.Name)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return gpuNodes(got)
}

// podUndisturbed fails unless the pod still runs its first container.
func (s *suite) podUndisturbed(t *testing.T, before *corev1.Pod) {
	t.Helper()
	p, err := s.n.client.CoreV1().Pods(before.Namespace).Get(context.Background(), before.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("pod %s: %v", before.Name, err)
	}
	if !running(p) || p.UID != before.UID || p.Status.ContainerStatuses[0].RestartCount != 0 ||
		p.Status.ContainerStatuses[0].ContainerID != before.Status.ContainerStatuses[0].ContainerID || p.DeletionTimestamp != nil {
		t.Fatalf("pod %s was disturbed: %s", before.Name, conditions(p))
	}
}

// unschedulable holds for a pod the scheduler refused for its claims
// (PodScheduled False, reason Unschedulable, the DynamicResources
// plugin's message).
func unschedulable(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable &&
			strings.Contains(c.Message, "cannot allocate all claims") {
			return true
		}
	}
	return false
}

// staysUnscheduled fails if the pod is bound to a node within d.
func (s *suite) staysUnscheduled(t *testing.T, name string, d time.Duration) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 500*time.Millisecond, d, true, func(ctx context.Context) (bool, error) {
		p, err := s.n.client.CoreV1().Pods(draNS).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil // the poll's own deadline, or a hiccup: the next look decides
		}
		if p.Spec.NodeName != "" || !unschedulable(p) {
			return false, fmt.Errorf("pod %s was scheduled after all: node %q, %s", name, p.Spec.NodeName, conditions(p))
		}
		return false, nil
	})
	if !wait.Interrupted(err) {
		t.Fatal(err)
	}
}

// kubeletAllocatable is the kubelet's view of the device plugin
// resources: the pod-resources API's allocatable device IDs of resource.
func kubeletAllocatable(t *testing.T, res string) []string {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+podResourcesSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := podresourcesv1.NewPodResourcesListerClient(conn).GetAllocatableResources(ctx, &podresourcesv1.AllocatableResourcesRequest{})
	if err != nil {
		t.Fatalf("the kubelet's pod-resources GetAllocatableResources: %v", err)
	}
	var out []string
	for _, d := range resp.GetDevices() {
		if d.GetResourceName() == res {
			out = append(out, d.GetDeviceIds()...)
		}
	}
	sort.Strings(out)
	return out
}

// draObjects are what the scenario created, for the cleanup of a failed
// run (a passing run deletes them itself, and checks).
type draObjects struct {
	s                       *suite
	pods, claims, templates []string
}

func (o *draObjects) pod(t *testing.T, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	o.pods = append(o.pods, p.Name)
	p, err := o.s.n.client.CoreV1().Pods(draNS).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s: %v", p.Name, err)
	}
	return p
}

func (o *draObjects) template(t *testing.T, name string, spec resourcev1.ResourceClaimSpec) {
	t.Helper()
	o.templates = append(o.templates, name)
	tmpl := &resourcev1.ResourceClaimTemplate{
		ObjectMeta: metav1.ObjectMeta{Namespace: draNS, Name: name, Labels: draLabels},
		Spec:       resourcev1.ResourceClaimTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: draLabels}, Spec: spec},
	}
	if _, err := o.s.n.client.ResourceV1().ResourceClaimTemplates(draNS).Create(context.Background(), tmpl, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating ResourceClaimTemplate %s: %v", name, err)
	}
}

func (o *draObjects) claim(t *testing.T, name string, spec resourcev1.ResourceClaimSpec) {
	t.Helper()
	o.claims = append(o.claims, name)
	c := &resourcev1.ResourceClaim{ObjectMeta: metav1.ObjectMeta{Namespace: draNS, Name: name, Labels: draLabels}, Spec: spec}
	if _, err := o.s.n.client.ResourceV1().ResourceClaims(draNS).Create(context.Background(), c, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating ResourceClaim %s: %v", name, err)
	}
}

func (o *draObjects) deleteAll() {
	ctx, c := context.Background(), o.s.n.client
	for _, p := range o.pods {
		_ = c.CoreV1().Pods(draNS).Delete(ctx, p, metav1.DeleteOptions{})
	}
	for _, n := range o.claims {
		_ = c.ResourceV1().ResourceClaims(draNS).Delete(ctx, n, metav1.DeleteOptions{})
	}
	for _, n := range o.templates {
		_ = c.ResourceV1().ResourceClaimTemplates(draNS).Delete(ctx, n, metav1.DeleteOptions{})
	}
}

// release deletes every pod, claim and template made so far and waits
// until the pods are gone, the daemon has unprepared every claim (its
// checkpoint and the claims' CDI specs are empty) and no claim is left in
// the namespace (the generated ones go with their pods).
func (o *draObjects) release(t *testing.T) time.Duration {
	t.Helper()
	t0 := time.Now()
	ctx, c := context.Background(), o.s.n.client
	for _, p := range o.pods {
		if err := c.CoreV1().Pods(draNS).Delete(ctx, p, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
	}
	var last string
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		pods, err := c.CoreV1().Pods(draNS).List(ctx, metav1.ListOptions{LabelSelector: draLabel})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		var left []string
		for _, p := range pods.Items {
			left = append(left, p.Name+" "+string(p.Status.Phase))
		}
		d, _ := o.s.draDebug(t)
		specs, _ := filepath.Glob(filepath.Join(cdiSpecDir, draClaimSpecPrefix+"*"))
		last = fmt.Sprintf("pods %v, prepared claims %+v, claim specs %v", left, d.Prepared, specs)
		return len(left) == 0 && len(d.Prepared) == 0 && len(specs) == 0, nil
	})
	if err != nil {
		t.Fatalf("the scenario's pods deleted: pods gone and claims unprepared not reached: %v; last seen: %s", err, last)
	}
	for _, n := range o.claims {
		if err := c.ResourceV1().ResourceClaims(draNS).Delete(ctx, n, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
	}
	for _, n := range o.templates {
		if err := c.ResourceV1().ResourceClaimTemplates(draNS).Delete(ctx, n, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		claims, err1 := c.ResourceV1().ResourceClaims(draNS).List(ctx, metav1.ListOptions{})
		tmpls, err2 := c.ResourceV1().ResourceClaimTemplates(draNS).List(ctx, metav1.ListOptions{LabelSelector: draLabel})
		if err1 != nil || err2 != nil {
			last = fmt.Sprint(err1, err2)
			return false, nil
		}
		var left []string
		for _, x := range claims.Items {
			left = append(left, "claim "+x.Name)
		}
		for _, x := range tmpls.Items {
			left = append(left, "template "+x.Name)
		}
		last = fmt.Sprint(left)
		return len(left) == 0, nil
	})
	if err != nil {
		t.Fatalf("ResourceClaims or templates remain in %s: %v; last seen: %s", draNS, err, last)
	}
	o.pods, o.claims, o.templates = nil, nil, nil
	return time.Since(t0)
}

// draScenario is scenario 4d.
func (s *suite) draScenario(t *testing.T) {
	ctx := context.Background()
	c := s.n.client
	hook, _ := s.cdiHook(t)
	uuids := s.nodeUUIDs(t)
	// Scenario 2's pod holds these through the device plugin (none when the
	// suite is narrowed without it).
	held := map[string]bool{}
	for _, u := range s.gpuUUIDs {
		held[u] = true
	}
	var free []int // GPU indexes no pod holds
	for i, u := range uuids {
		if !held[u] {
			free = append(free, i)
		}
	}
	objs := &draObjects{s: s}
	t.Cleanup(objs.deleteAll)

	s.draMode(t, hook, uuids, held, free)
	s.draOwnNodeOnly(t)
	shared := s.draClaims(t, objs, free)
	s.draHealth(t, shared)
	s.draRestart(t, objs, shared)
	s.draMetrics(t, shared)
	s.timed("4d all DRA pods deleted → claims unprepared, none left", objs.release(t))
	s.draMIG(t, objs, hook)
	s.draSplit(t, hook, uuids, free)

	// 10. Back to the install values: the device plugin has every GPU
	// again; the kubelet deletes the slice of the driver it no longer
	// hears from (30 s after the plugin deregisters: a daemon in
	// device-plugin mode never talks to DRA); helm deletes the DeviceClasses.
	t0 := time.Now()
	s.replacePlugin(t, nil)
	s.waitAllocatable(t, nodeGPUs, "allocatable nvidia.com/gpu=8 again")
	s.timed("4d back to the install values → allocatable 8", time.Since(t0))
	var last string
	err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 120*time.Second, true, func(ctx context.Context) (bool, error) {
		ss := s.draSlices(t)
		var classes []string
		for _, n := range []string{draGPUClass, draMIGClass} {
			if _, err := c.ResourceV1().DeviceClasses().Get(ctx, n, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				classes = append(classes, n)
			}
		}
		last = fmt.Sprintf("%s; DeviceClasses %v", describeSlices(ss), classes)
		return len(ss) == 0 && len(classes) == 0, nil
	})
	if err != nil {
		t.Fatalf("after the return to the install values, the slice and DeviceClasses are not gone: %v; last seen: %s", err, last)
	}
	s.timed("4d back to the install values → slice and classes gone", time.Since(t0))
	// The DRA daemons' node spec (cdi-cri kind) names a driver root that
	// went with their pods, as in scenario 2b.
	for _, path := range nodeCDISpecs(t) {
		if err := os.Remove(path); err != nil {
			t.Error(err)
		}
	}
	if s.gpuPod != nil {
		s.gpuPodUndisturbed(t)
	}
}

// nodeCDISpecs are the daemon's node specs (kind cdiKind) in the host's
// /var/run/cdi.
func nodeCDISpecs(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(cdiSpecDir, "*.json"))
	var out []string
	for _, f := range files {
		var sp cdiSpec
		if b, err := os.ReadFile(f); err == nil && json.Unmarshal(b, &sp) == nil && sp.Kind == cdiKind {
			out = append(out, f)
		}
	}
	return out
}

// draMode is step 1: the chart with dra.mode=dra. The DeviceClasses
// exist, the slice lists every GPU no device plugin pod holds with
// NVIDIA's attributes, and the node offers no nvidia.com/gpu.
func (s *suite) draMode(t *testing.T, hook string, uuids []string, held map[string]bool, free []int) {
	ctx := context.Background()
	c := s.n.client
	t0 := time.Now()
	s.replacePlugin(t, draValues(s.n.env.image, hook, "dra", nil, simProfile))
	readyAt := time.Since(t0)
	sl := s.waitDRASlice(t, fmt.Sprintf("the %d GPUs no pod holds", len(free)), 120*time.Second, held, func(sl *resourcev1.ResourceSlice) bool {
		return len(sl.Spec.Devices) == len(free)
	})
	sliceAt := time.Since(t0)
	s.waitAllocatable(t, 0, "allocatable nvidia.com/gpu=0 in dra mode")
	s.timed("4d dra.mode=dra → new plugin pod Ready", readyAt)
	s.timed(fmt.Sprintf("4d dra.mode=dra → slice of %d GPUs", len(free)), sliceAt)
	s.timed("4d dra.mode=dra → allocatable nvidia.com/gpu=0", time.Since(t0))

	for _, n := range []string{draGPUClass, draMIGClass} {
		dc, err := c.ResourceV1().DeviceClasses().Get(ctx, n, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("DeviceClass %s: %v", n, err)
		}
		if n == draGPUClass && (dc.Spec.ExtendedResourceName == nil || *dc.Spec.ExtendedResourceName != string(gpuResource)) {
			t.Errorf("DeviceClass %s: extendedResourceName %v, want %s", n, dc.Spec.ExtendedResourceName, gpuResource)
		}
	}
	if sl.Spec.Pool.Name != nodeName || sl.Spec.Pool.ResourceSliceCount != 1 {
		t.Errorf("slice %s: pool %+v, want %s with 1 slice", sl.Name, sl.Spec.Pool, nodeName)
	}
	if own := sl.OwnerReferences; len(own) != 1 || own[0].Kind != "Node" || own[0].Name != nodeName {
		t.Errorf("slice %s: owners %+v, want the Node %s", sl.Name, own, nodeName)
	}
	byUUID := map[string]*resourcev1.Device{}
	for i := range sl.Spec.Devices {
		byUUID[attrString(&sl.Spec.Devices[i], "uuid")] = &sl.Spec.Devices[i]
	}
	for _, i := range free {
		d := byUUID[uuids[i]]
		if d == nil {
			t.Errorf("slice %s has no device with uuid %s (GPU %d)", sl.Name, uuids[i], i)
			continue
		}
		name := d.Name
		idx, _ := attrInt(d, "index")
		mn, _ := attrInt(d, "minor")
		mem := d.Capacity["memory"].Value
		checks := []struct {
			attr, got string
			ok        bool
		}{
			{"name", name, name == fmt.Sprintf("gpu-%d", mn)},
			{"type", attrString(d, "type"), attrString(d, "type") == "gpu"},
			{"index", fmt.Sprint(idx), idx == int64(i)},
			{"productName", attrString(d, "productName"), strings.Contains(attrString(d, "productName"), "H100")},
			{"architecture", attrString(d, "architecture"), attrString(d, "architecture") == "Hopper"},
			{"cudaComputeCapability", attrString(d, "cudaComputeCapability"), attrString(d, "cudaComputeCapability") == "9.0.0"},
			{"driverVersion", attrString(d, "driverVersion"), strings.Count(attrString(d, "driverVersion"), ".") == 2},
			{"cudaDriverVersion", attrString(d, "cudaDriverVersion"), strings.Count(attrString(d, "cudaDriverVersion"), ".") == 2},
			{"resource.kubernetes.io/pciBusID", attrString(d, "resource.kubernetes.io/pciBusID"), len(attrString(d, "resource.kubernetes.io/pciBusID")) == len("0000:00:00.0")},
			{"capacity memory", mem.String(), mem.Cmp(resource.MustParse("79Gi")) > 0},
		}
		for _, ch := range checks {
			if !ch.ok {
				t.Errorf("slice device %s: %s = %q", name, ch.attr, ch.got)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	d0 := sl.Spec.Devices[0]
	mem := d0.Capacity["memory"].Value
	attrs, _ := json.Marshal(d0.Attributes)
	t.Logf("slice %s: %s; e.g. %s: %s, memory %s", sl.Name, describeSlices([]resourcev1.ResourceSlice{*sl}), d0.Name, attrs, mem.String())
}

// draOwnNodeOnly: the chart's ValidatingAdmissionPolicy, on the real API
// server, confines the plugin's ResourceSlice writes to its own node and
// its own driver, although its ClusterRole allows them on every slice.
// The plugin's writes are dry runs: admission runs, nothing is stored.
func (s *suite) draOwnNodeOnly(t *testing.T) {
	ctx := context.Background()
	admin := s.n.client
	c := s.pluginClient(t)
	slice := func(name, driver, node string) *resourcev1.ResourceSlice {
		return &resourcev1.ResourceSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: draLabels},
			Spec: resourcev1.ResourceSliceSpec{
				Driver: driver, NodeName: &node,
				Pool:    resourcev1.ResourcePool{Name: node, Generation: 1, ResourceSliceCount: 1},
				Devices: []resourcev1.Device{{Name: "gpu-0"}},
			},
		}
	}
	// Another node's slice of our driver, as another node's daemon wrote
	// it (the admin here: the policy matches only the plugin's account).
	theirs, err := admin.ResourceV1().ResourceSlices().Create(ctx, slice("e2e-other-node-slice", draDriver, "e2e-other-node"), metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating another node's slice: %v", err)
	}
	defer func() {
		if err := admin.ResourceV1().ResourceSlices().Delete(context.Background(), theirs.Name, metav1.DeleteOptions{}); err != nil {
			t.Errorf("deleting another node's slice: %v", err)
		}
	}()
	dry := []string{metav1.DryRunAll}
	create := func(sl *resourcev1.ResourceSlice) func() error {
		return func() error {
			_, err := c.ResourceV1().ResourceSlices().Create(ctx, sl, metav1.CreateOptions{DryRun: dry})
			return err
		}
	}
	refused := "on the node its pod runs on (" + nodeName + ")"
	checkAccess(t, []accessCheck{
		{"create a slice of its driver for its own node", create(slice("e2e-own-node-slice", draDriver, nodeName)), true, ""},
		{"create a slice for another node", create(slice("e2e-other-node-slice-2", draDriver, "e2e-other-node")), false, refused},
		{"create a slice of another driver for its own node", create(slice("e2e-own-node-other-driver", "example.com", nodeName)), false, refused},
		{"update another node's slice", func() error {
			mine := theirs.DeepCopy()
			mine.Spec.Devices = append(mine.Spec.Devices, resourcev1.Device{Name: "gpu-1"})
			_, err := c.ResourceV1().ResourceSlices().Update(ctx, mine, metav1.UpdateOptions{DryRun: dry})
			return err
		}, false, refused},
		// The policy checks an update's new object only: the API server's
		// validation, which runs before it, keeps nodeName immutable.
		{"move another node's slice to its own node", func() error {
			mine := theirs.DeepCopy()
			mine.Spec.NodeName = ptrTo(nodeName)
			_, err := c.ResourceV1().ResourceSlices().Update(ctx, mine, metav1.UpdateOptions{DryRun: dry})
			return err
		}, false, "immutable"},
		{"delete another node's slice", func() error {
			return c.ResourceV1().ResourceSlices().Delete(ctx, theirs.Name, metav1.DeleteOptions{DryRun: dry})
		}, false, refused},
	})
}

// draPodsOfScenario are the pods of steps 2 to 4 that later steps look at.
type draPodsOfScenario struct {
	one        *corev1.Pod // step 2's: one GPU from a template
	oneDevice  string      // its device in the slice
	oneIndex   int         // and that GPU's index
	sharedName string      // step 4's shared ResourceClaim
	sharedDev  []string    // its GPU device node
	running    []*corev1.Pod
}

// draClaims are steps 2 to 5: a claim from a template, the extended
// resource nvidia.com/gpu through DRA, CEL selectors on memory, a shared
// claim, a claim for more GPUs than the node has.
func (s *suite) draClaims(t *testing.T, objs *draObjects, free []int) *draPodsOfScenario {
	out := &draPodsOfScenario{}
	sl := s.draSlices(t)[0]

	// 2. One GPU from a template: exactly its device node in the container.
	t0 := time.Now()
	objs.template(t, "dra-one", draClaimSpec(draGPUClass, 1, ""))
	objs.pod(t, draPod("dra-one", fromTemplate("dra-one")))
	one := s.waitPod(t, draNS, "dra-one", "Running", 120*time.Second, running)
	s.timed("4d claim from a template (1 GPU) → pod Running", time.Since(t0))
	claim, devs := s.claimDevices(t, podClaim(one))
	if len(devs) != 1 || sliceDevice(&sl, devs[0]) == nil {
		t.Fatalf("claim %s: devices %v, want 1 of the slice's", claim.Name, devs)
	}
	nodes := s.checkPodDevices(t, one.Name, claim, devs)
	minor := strings.TrimPrefix(devs[0], "gpu-")
	if !slices.Equal(nodes, []string{"/dev/nvidia" + minor}) {
		t.Fatalf("pod %s has GPU device nodes %v, want only /dev/nvidia%s (claim %s: %s)", one.Name, nodes, minor, claim.Name, devs[0])
	}
	idx, _ := attrInt(sliceDevice(&sl, devs[0]), "index")
	out.one, out.oneDevice, out.oneIndex = one, devs[0], int(idx)
	out.running = append(out.running, one)
	t.Logf("pod %s: claim %s allocated %s; its container has %v and the control nodes, nothing else", one.Name, claim.Name, devs[0], nodes)

	// 2b. A pod written for the device plugin, limits nvidia.com/gpu: 1: the
	// node advertises no nvidia.com/gpu, the DeviceClass maps it, so the
	// scheduler makes a claim for it and allocates a GPU of the slice.
	t1 := time.Now()
	ext := testPod(draNS, "dra-extended", 1)
	ext.Labels = draLabels
	ext.Spec.Containers[0].Command = []string{"/bin/sh", "-c", draReportScript}
	objs.pod(t, ext)
	ext = s.waitPod(t, draNS, ext.Name, "Running", 120*time.Second, running)
	s.timed("4d limits nvidia.com/gpu: 1 through DRA → pod Running", time.Since(t1))
	if ext.Status.ExtendedResourceClaimStatus == nil {
		t.Fatalf("pod %s runs without status.extendedResourceClaimStatus: its GPU did not come through DRA", ext.Name)
	}
	claim, devs = s.claimDevices(t, podClaim(ext))
	nodes = s.checkPodDevices(t, ext.Name, claim, devs)
	if len(devs) != 1 || len(nodes) != 1 || devs[0] == out.oneDevice {
		t.Fatalf("pod %s (nvidia.com/gpu: 1): claim %s devices %v, GPU nodes %v; want one GPU other than %s", ext.Name, claim.Name, devs, nodes, out.oneDevice)
	}
	out.running = append(out.running, ext)
	t.Logf("pod %s (limits nvidia.com/gpu: 1): the scheduler's claim %s (mappings %+v) allocated %s; GPU nodes %v", ext.Name, claim.Name,
		ext.Status.ExtendedResourceClaimStatus.RequestMappings, devs[0], nodes)

	// 3. CEL on the memory capacity: 40 GiB fits an H100 80GB, 100 GiB nothing.
	t2 := time.Now()
	objs.template(t, "dra-40gi", draClaimSpec(draGPUClass, 1, "device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('40Gi')) >= 0"))
	objs.template(t, "dra-100gi", draClaimSpec(draGPUClass, 1, "device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('100Gi')) >= 0"))
	objs.pod(t, draPod("dra-40gi", fromTemplate("dra-40gi")))
	objs.pod(t, draPod("dra-100gi", fromTemplate("dra-100gi")))
	big := s.waitPod(t, draNS, "dra-40gi", "Running", 120*time.Second, running)
	s.timed("4d claim with CEL memory >= 40Gi → pod Running", time.Since(t2))
	claim, devs = s.claimDevices(t, podClaim(big))
	s.checkPodDevices(t, big.Name, claim, devs)
	out.running = append(out.running, big)
	huge := s.waitPod(t, draNS, "dra-100gi", "PodScheduled=False, Unschedulable: cannot allocate all claims", 60*time.Second, unschedulable)
	s.staysUnscheduled(t, huge.Name, 10*time.Second)
	huge, _ = s.n.client.CoreV1().Pods(draNS).Get(context.Background(), huge.Name, metav1.GetOptions{})
	t.Logf("memory >= 40Gi: pod %s got %v; memory >= 100Gi: pod %s unscheduled for 10 s: %s", big.Name, devs, huge.Name, conditions(huge))
	if err := s.n.client.CoreV1().Pods(draNS).Delete(context.Background(), huge.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// 4. One ResourceClaim, two pods: the same GPU in both.
	t3 := time.Now()
	out.sharedName = "dra-shared"
	objs.claim(t, out.sharedName, draClaimSpec(draGPUClass, 1, ""))
	objs.pod(t, draPod("dra-shared-a", fromClaim(out.sharedName)))
	objs.pod(t, draPod("dra-shared-b", fromClaim(out.sharedName)))
	a := s.waitPod(t, draNS, "dra-shared-a", "Running", 120*time.Second, running)
	b := s.waitPod(t, draNS, "dra-shared-b", "Running", 120*time.Second, running)
	s.timed("4d one shared ResourceClaim → both pods Running", time.Since(t3))
	claim, devs = s.claimDevices(t, out.sharedName)
	nodesA := s.checkPodDevices(t, a.Name, claim, devs)
	nodesB := s.checkPodDevices(t, b.Name, claim, devs)
	if len(nodesA) != 1 || !slices.Equal(nodesA, nodesB) {
		t.Fatalf("pods %s and %s of shared claim %s (%v): GPU nodes %v and %v, want the same one", a.Name, b.Name, claim.Name, devs, nodesA, nodesB)
	}
	var reserved []string
	for _, r := range claim.Status.ReservedFor {
		reserved = append(reserved, r.Name)
	}
	sort.Strings(reserved)
	if !slices.Equal(reserved, []string{a.Name, b.Name}) {
		t.Errorf("shared claim %s reserved for %v, want both pods", claim.Name, reserved)
	}
	out.sharedDev = nodesA
	out.running = append(out.running, a, b)
	t.Logf("shared claim %s: %v, reserved for %v, both containers have %v", claim.Name, devs, reserved, nodesA)

	// 5. Nine GPUs: never.
	objs.template(t, "dra-nine", draClaimSpec(draGPUClass, 9, ""))
	objs.pod(t, draPod("dra-nine", fromTemplate("dra-nine")))
	nine := s.waitPod(t, draNS, "dra-nine", "PodScheduled=False, Unschedulable: cannot allocate all claims", 60*time.Second, unschedulable)
	t.Logf("a claim for 9 GPUs: pod %s: %s", nine.Name, conditions(nine))
	if err := s.n.client.CoreV1().Pods(draNS).Delete(context.Background(), nine.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	return out
}

// draHealth is step 6: a fatal XID on step 2's GPU taints its slice
// device NoSchedule; the pod runs on; recovery removes the taint.
func (s *suite) draHealth(t *testing.T, p *draPodsOfScenario) {
	t0 := time.Now()
	s.pluginDo(t, http.MethodPost, fmt.Sprintf("/sim/gpus/%d/xid?code=48", p.oneIndex))
	tainted := func(sl *resourcev1.ResourceSlice) bool {
		d := sliceDevice(sl, p.oneDevice)
		return d != nil && slices.ContainsFunc(d.Taints, func(tn resourcev1.DeviceTaint) bool {
			return tn.Key == draDriver+"/xid" && tn.Value == "48" && tn.Effect == resourcev1.DeviceTaintEffectNoSchedule
		})
	}
	sl := s.waitDRASlice(t, p.oneDevice+" tainted "+draDriver+"/xid=48:NoSchedule", 60*time.Second, nil, tainted)
	s.timed("4d XID 48 → slice device taint in the API server", time.Since(t0))
	for _, d := range sl.Spec.Devices {
		if d.Name != p.oneDevice && len(d.Taints) > 0 {
			t.Errorf("device %s tainted too: %+v", d.Name, d.Taints)
		}
	}
	s.podUndisturbed(t, p.one)
	t.Logf("XID 48 on GPU %d: %s", p.oneIndex, describeSlices([]resourcev1.ResourceSlice{*sl}))

	t1 := time.Now()
	s.waitDRASlice(t, p.oneDevice+" untainted after the quiet period", 120*time.Second, nil, func(sl *resourcev1.ResourceSlice) bool {
		for _, d := range sl.Spec.Devices {
			if len(d.Taints) > 0 {
				return false
			}
		}
		return true
	})
	s.timed("4d recovery (quiet period 10s) → slice taint gone", time.Since(t1))
	for _, pod := range p.running {
		s.podUndisturbed(t, pod)
	}
}

// draRestart is step 7: the plugin pod replaced by the DaemonSet: the
// claims' pods run on, the prepared claims survive in the checkpoint, a
// new pod of the shared claim gets its GPU, and the slice is the same one.
func (s *suite) draRestart(t *testing.T, objs *draObjects, p *draPodsOfScenario) {
	ctx := context.Background()
	before := s.draSlices(t)
	cp, err := os.ReadFile(draCheckpoint)
	if err != nil {
		t.Fatalf("the DRA checkpoint on the host: %v", err)
	}
	shared, err := s.n.client.ResourceV1().ResourceClaims(draNS).Get(ctx, p.sharedName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cp), string(shared.UID)) {
		t.Fatalf("%s does not hold the shared claim %s (%s): %s", draCheckpoint, shared.Name, shared.UID, cp)
	}
	d, _ := s.draDebug(t)
	prepared := len(d.Prepared)

	old := s.pluginPod
	t0 := time.Now()
	if err := s.n.client.CoreV1().Pods(releaseNS).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	s.pluginPod = s.waitPluginReady(t, old.UID)
	s.waitDRADebug(t, fmt.Sprintf("registered, slice published, %d claims restored from the checkpoint", prepared), 60*time.Second, func(d *draDebug) bool {
		return d.Registered && d.Slice != "" && d.PublishErr == "" && len(d.Prepared) == prepared
	})
	s.timed("4d plugin pod deleted → new pod Ready, DRA registered", time.Since(t0))
	for _, pod := range p.running {
		s.podUndisturbed(t, pod)
	}

	t1 := time.Now()
	objs.pod(t, draPod("dra-shared-c", fromClaim(p.sharedName)))
	cpod := s.waitPod(t, draNS, "dra-shared-c", "Running", 120*time.Second, running)
	s.timed("4d new pod of the shared claim after the restart → Running", time.Since(t1))
	claim, devs := s.claimDevices(t, p.sharedName)
	if nodes := s.checkPodDevices(t, cpod.Name, claim, devs); !slices.Equal(nodes, p.sharedDev) {
		t.Fatalf("pod %s of shared claim %s after the plugin's restart: GPU nodes %v, want %v as its other pods", cpod.Name, claim.Name, nodes, p.sharedDev)
	}
	p.running = append(p.running, cpod)
	after := s.draSlices(t)
	if len(before) != 1 || len(after) != 1 || after[0].Name != before[0].Name {
		t.Fatalf("slices before the restart: %s; after: %s; want the same one slice", describeSlices(before), describeSlices(after))
	}
	t.Logf("after the plugin's restart: slice %s kept (generation %d → %d), %d prepared claims restored, pod %s got %v", after[0].Name,
		before[0].Spec.Pool.Generation, after[0].Spec.Pool.Generation, prepared, cpod.Name, p.sharedDev)
}

// draMetrics is step 8: the DCGM series of step 2's GPU carry its pod,
// namespace and container, from the kubelet's pod-resources API
// (dynamic_resources).
func (s *suite) draMetrics(t *testing.T, p *draPodsOfScenario) {
	uuid := s.nodeUUIDs(t)[p.oneIndex]
	want := []string{`UUID="` + uuid + `"`, `pod="` + p.one.Name + `"`, `namespace="` + draNS + `"`, `container="main"`}
	var last string
	t0 := time.Now()
	err := wait.PollUntilContextTimeout(context.Background(), 500*time.Millisecond, 60*time.Second, true, func(context.Context) (bool, error) {
		lines := grepLines(string(s.pluginDo(t, http.MethodGet, "/metrics")), `UUID="`+uuid+`"`)
		last = ""
		for _, l := range strings.Split(lines, "\n") {
			if !strings.HasPrefix(l, "DCGM_FI_DEV_GPU_UTIL{") && !strings.HasPrefix(l, "DCGM_FI_DEV_FB_USED{") {
				continue
			}
			last += l + "\n"
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(l, w)
			}
			if ok {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no DCGM_FI_DEV_GPU_UTIL or FB_USED series of %s (%s) with %v: %v; last seen:\n%s", p.oneDevice, uuid, want[1:], err, last)
	}
	s.timed("4d DCGM series of a claimed GPU carry its pod", time.Since(t0))
	t.Logf("DCGM series of %s (%s) carry pod %s", p.oneDevice, uuid, p.one.Name)
}

// draMIG is the MIG sub-step: the plugin on the simulated MIG node, a
// claim for a MIG device by profile; its container gets the parent GPU's
// node and the MIG capabilities' nodes of the claim's spec.
func (s *suite) draMIG(t *testing.T, objs *draObjects, hook string) {
	t0 := time.Now()
	s.replacePlugin(t, draValues(s.n.env.image, hook, "dra", nil, draMIGSimProfile))
	var migDev *resourcev1.Device
	sl := s.waitDRASlice(t, "a "+draMIGProfile+" MIG device", 120*time.Second, nil, func(sl *resourcev1.ResourceSlice) bool {
		for i := range sl.Spec.Devices {
			if d := &sl.Spec.Devices[i]; attrString(d, "type") == "mig" && attrString(d, "profile") == draMIGProfile {
				migDev = d
				return strings.Contains(attrString(d, "productName"), "A100")
			}
		}
		return false
	})
	s.timed("4d --simulate="+draMIGSimProfile+" → slice with MIG devices", time.Since(t0))
	var names []string
	for _, d := range sl.Spec.Devices {
		names = append(names, d.Name+"("+attrString(&d, "type")+")")
	}
	t.Logf("slice on %s: %d devices: %v", draMIGSimProfile, len(names), names)

	t1 := time.Now()
	objs.template(t, "dra-mig", draClaimSpec(draMIGClass, 1, "device.attributes['gpu.nvidia.com'].profile == '"+draMIGProfile+"'"))
	objs.pod(t, draPod("dra-mig", fromTemplate("dra-mig")))
	pod := s.waitPod(t, draNS, "dra-mig", "Running", 120*time.Second, running)
	s.timed("4d MIG claim by profile ("+draMIGProfile+") → pod Running", time.Since(t1))
	claim, devs := s.claimDevices(t, podClaim(pod))
	d := sliceDevice(sl, devs[0])
	if len(devs) != 1 || d == nil || attrString(d, "profile") != draMIGProfile {
		t.Fatalf("MIG claim %s: devices %v, want one %s MIG device of the slice (e.g. %s)", claim.Name, devs, draMIGProfile, migDev.Name)
	}
	parent, _ := attrInt(d, "parentIndex")
	// NVIDIA's name: the driver's 3g.20gb profile ID (9), placement start
	// 0 or 4, 4 memory slices.
	if want := regexp.MustCompile(`^gpu-\d+-mig-9-[04]-4$`); !want.MatchString(d.Name) {
		t.Errorf("MIG device %s: want a name like NVIDIA's, %s", d.Name, want)
	}
	nodes := s.checkPodDevices(t, pod.Name, claim, devs)
	if want := fmt.Sprintf("/dev/nvidia%d", parent); !slices.Equal(nodes, []string{want}) {
		t.Fatalf("MIG pod %s: GPU nodes %v, want its parent's %s only", pod.Name, nodes, want)
	}
	var caps []string
	for p := range specNodes(readClaimSpec(t, string(claim.UID))) {
		if strings.HasPrefix(p, "/dev/nvidia-caps/") {
			caps = append(caps, p)
		}
	}
	if len(caps) == 0 {
		t.Fatalf("MIG claim %s's spec gives no /dev/nvidia-caps node", claim.Name)
	}
	sort.Strings(caps)
	t.Logf("MIG pod %s: claim %s allocated %s (parent GPU %d); container has %v and %v (from the spec)", pod.Name, claim.Name, devs[0], parent, nodes, caps)
	s.timed("4d MIG pod deleted → claim unprepared", objs.release(t))
}

// draSplit is step 9: dra.mode=split with two GPUs (the first two no pod
// holds): the slice has those two, the device plugin the other six, as
// the kubelet sees them.
func (s *suite) draSplit(t *testing.T, hook string, uuids []string, free []int) {
	pick := free[:2]
	devices := []string{strconv.Itoa(pick[0]), strconv.Itoa(pick[1])}
	t0 := time.Now()
	s.replacePlugin(t, draValues(s.n.env.image, hook, "split", devices, simProfile))
	sl := s.waitDRASlice(t, fmt.Sprintf("GPUs %v only", devices), 120*time.Second, nil, func(sl *resourcev1.ResourceSlice) bool {
		if len(sl.Spec.Devices) != 2 {
			return false
		}
		for _, d := range sl.Spec.Devices {
			if i, _ := attrInt(&d, "index"); i != int64(pick[0]) && i != int64(pick[1]) {
				return false
			}
		}
		return true
	})
	s.waitAllocatable(t, nodeGPUs-2, "allocatable nvidia.com/gpu=6 in split mode")
	s.timed("4d dra.mode=split (2 GPUs) → slice of 2, allocatable 6", time.Since(t0))
	var draUUIDs []string
	for _, d := range sl.Spec.Devices {
		draUUIDs = append(draUUIDs, attrString(&d, "uuid"))
	}
	var plugin []string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		plugin = kubeletAllocatable(t, string(gpuResource))
		return len(plugin) == nodeGPUs-2, nil
	})
	if err != nil {
		t.Fatalf("the kubelet's allocatable %s devices: %v, want 6: %v", gpuResource, plugin, err)
	}
	all := append(slices.Clone(plugin), draUUIDs...)
	sort.Strings(all)
	want := slices.Clone(uuids)
	sort.Strings(want)
	if !slices.Equal(all, want) {
		t.Fatalf("split mode: DRA offers %v, the device plugin %v: want each of the node's GPUs %v in exactly one", draUUIDs, plugin, uuids)
	}
	t.Logf("split mode: DRA offers GPUs %v (%v), the kubelet's nvidia.com/gpu the other 6", devices, draUUIDs)
}
