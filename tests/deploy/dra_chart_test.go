package deploy

import (
	"bytes"
	"context"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/cel-go/cel"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/sets"
	dracel "k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/utils/ptr"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// The names DRA mode uses, as NVIDIA's DRA driver (/work/notes/dra_contract.md).
const (
	draDriver          = "gpu.nvidia.com"
	draRegistrarDir    = "/var/lib/kubelet/plugins_registry"
	draPluginsDir      = "/var/lib/kubelet/plugins"
	draGPUClass        = "gpu.nvidia.com"
	draMIGClass        = "mig.nvidia.com"
	draGPUSelector     = "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'"
	draMIGSelector     = "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'mig'"
	draExtendedResouce = "nvidia.com/gpu"
)

// draEnv are the environment variables DRA mode adds to the container.
var draEnv = []string{"GPU_PLUGIN_ALLOCATION_MODE", "GPU_PLUGIN_DRA_DEVICES", "KUBELET_REGISTRAR_DIRECTORY_PATH", "KUBELET_PLUGINS_DIRECTORY_PATH"}

// TestChartDRA renders the chart's DRA modes: the daemon's environment,
// the kubelet's plugin directories (and the driver root, for the per-claim
// CDI specs) mounted at their own paths, the service account token, a
// ClusterRole granting exactly the contract's rules, the admission policy
// on ResourceSlice writes, and NVIDIA's DeviceClasses with their selectors
// and extendedResourceName. Every render also passes the install policy,
// with the DRA mounts beside docs/install.md's.
func TestChartDRA(t *testing.T) {
	type want struct {
		mode, devices        string // GPU_PLUGIN_ALLOCATION_MODE, GPU_PLUGIN_DRA_DEVICES ("": unset)
		registrar, plugins   string
		driverRoot           string
		classes, extendedRes bool // the DeviceClasses; extendedResourceName on gpu.nvidia.com
		vap                  bool // the ResourceSlice admission policy
		kinds                []string
		hostPID              bool
		caps                 []string
	}
	base := func(w want) want {
		if w.registrar == "" {
			w.registrar, w.plugins = draRegistrarDir, draPluginsDir
		}
		if w.driverRoot == "" {
			w.driverRoot = "/"
		}
		return w
	}
	draKinds := []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "DaemonSet",
		"DeviceClass", "DeviceClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
	cases := []struct {
		name   string
		values string
		want   want
	}{
		{name: "dra", values: "dra: {mode: dra}",
			want: want{mode: "dra", classes: true, extendedRes: true, vap: true, kinds: draKinds}},
		{name: "split by UUID, MIG UUID and index",
			values: "dra: {mode: split, devices: [GPU-0c8f6e43-61b4-4f55-9ddb-2f5bd0a1c0de, MIG-8a1d3c4b-2e5f-5a6b-9c7d-0e1f2a3b4c5d, 3, \"5\"]}",
			want: want{mode: "split", devices: "GPU-0c8f6e43-61b4-4f55-9ddb-2f5bd0a1c0de,MIG-8a1d3c4b-2e5f-5a6b-9c7d-0e1f2a3b4c5d,3,5",
				classes: true, extendedRes: true, vap: true, kinds: draKinds}},
		{name: "no extendedResourceName", values: "dra: {mode: dra, deviceClasses: {extendedResourceName: false}}",
			want: want{mode: "dra", classes: true, vap: true, kinds: draKinds}},
		{name: "no DeviceClasses", values: "dra: {mode: dra, deviceClasses: {create: false}}",
			want: want{mode: "dra", vap: true, kinds: []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "DaemonSet",
				"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}}},
		{name: "no own-node policy", values: "dra: {mode: dra}\nnodeHealth: {ownNodePolicy: false}",
			want: want{mode: "dra", classes: true, extendedRes: true, kinds: []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "DaemonSet",
				"DeviceClass", "DeviceClass"}}},
		{name: "another kubelet root, cleaned",
			values: "dra: {mode: dra, kubeletRegistrarDirectoryPath: /var/lib/k0s/kubelet/plugins_registry/, kubeletPluginsDirectoryPath: /var/lib/k0s/kubelet//plugins}",
			want: want{mode: "dra", registrar: "/var/lib/k0s/kubelet/plugins_registry", plugins: "/var/lib/k0s/kubelet/plugins",
				classes: true, extendedRes: true, vap: true, kinds: draKinds}},
		{name: "driver container", values: "dra: {mode: dra}\ndriverRoot: /run/nvidia/driver",
			want: want{mode: "dra", driverRoot: "/run/nvidia/driver", classes: true, extendedRes: true, vap: true, kinds: draKinds}},
		{name: "beside node health",
			values: "dra: {mode: split, devices: [\"0\"]}\nnodeHealth: {condition: true}",
			want: want{mode: "split", devices: "0", classes: true, extendedRes: true, vap: true,
				kinds: []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Service", "DaemonSet",
					"DeviceClass", "DeviceClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicyBinding"}}},
		{name: "with MPS", values: "dra: {mode: split, devices: [\"1\"]}\nmps: {enabled: true}",
			want: want{mode: "split", devices: "1", classes: true, extendedRes: true, vap: true, kinds: draKinds, hostPID: true, caps: mpsCaps}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := base(tc.want)
			r, err := RenderChart(chartDir(), values(t, tc.values))
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			if !slices.Equal(r.Kinds(), w.kinds) {
				t.Errorf("rendered kinds %v, want %v", r.Kinds(), w.kinds)
			}
			objs := decodeAll(t, r.Docs)
			ds := objectOf[*appsv1.DaemonSet](t, objs)
			raw := r.Find("DaemonSet").Content
			p := policy{driverRoot: w.driverRoot, metricsPort: 9400, apiAccess: true, hostPID: w.hostPID, allowedCaps: w.caps,
				draDirs: []string{w.registrar, w.plugins}, rawDaemonSet: raw}
			if w.caps != nil {
				p.mpsRoot = "/run/nvidia/mps"
			}
			checkDaemonSetPolicy(t, ds, p)
			checkService(t, objectOf[*corev1.Service](t, objs), ds, p.metricsPort)
			checkNotes(t, r.Notes)
			for _, o := range objs {
				if o.Meta.Namespace == "" && !clusterScoped[o.Doc.Kind] {
					t.Errorf("%s %s has no namespace", o.Doc.Kind, o.Doc.Name)
				}
			}

			spec := ds.Spec.Template.Spec
			c := spec.Containers[0]
			for name, want := range map[string]string{
				"GPU_PLUGIN_ALLOCATION_MODE":       w.mode,
				"GPU_PLUGIN_DRA_DEVICES":           w.devices,
				"KUBELET_REGISTRAR_DIRECTORY_PATH": w.registrar,
				"KUBELET_PLUGINS_DIRECTORY_PATH":   w.plugins,
			} {
				if v, ok := env(c, name); v != want || ok != (want != "") {
					t.Errorf("%s = %q (set: %v), want %q", name, v, ok, want)
				}
			}
			if a := spec.AutomountServiceAccountToken; a == nil || !*a {
				t.Error("the pod does not mount its service account token: the daemon cannot publish ResourceSlices")
			}
			for _, dir := range []string{w.registrar, w.plugins} {
				i := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == dir })
				if i < 0 {
					t.Errorf("%s is not mounted", dir)
					continue
				}
				m := c.VolumeMounts[i]
				v := volume(ds, m.Name)
				if m.ReadOnly || m.MountPropagation != nil || v == nil || v.HostPath == nil || v.HostPath.Path != dir ||
					v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory {
					t.Errorf("mount %+v of volume %+v: want hostPath %s (type Directory) read-write at the same path, no propagation", m, v, dir)
				}
			}
			if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == "/var/run/cdi" && !m.ReadOnly }) {
				t.Error("/var/run/cdi is not mounted read-write: the per-claim CDI specs cannot be written")
			}
			if strings.Count(raw, "name: NODE_NAME") != 1 {
				t.Errorf("NODE_NAME set %d times", strings.Count(raw, "name: NODE_NAME"))
			}

			checkDRARBAC(t, objs, spec.ServiceAccountName)
			checkDRAPolicy(t, objs, w.vap, spec.ServiceAccountName)
			checkDeviceClasses(t, objs, w.classes, w.extendedRes)
			if !strings.Contains(r.Notes, "kubectl get resourceslices") {
				t.Errorf("NOTES.txt does not say how to see the ResourceSlice:\n%s", r.Notes)
			}
		})
	}
}

// checkDRARBAC: the DRA ClusterRole grants exactly the contract's rules
// and is bound to the pod's service account.
func checkDRARBAC(t *testing.T, objs []Object, sa string) {
	t.Helper()
	var role *rbacv1.ClusterRole
	for _, cr := range objectsOf[*rbacv1.ClusterRole](objs) {
		if strings.HasSuffix(cr.Name, "-dra") {
			role = cr
		}
	}
	if role == nil {
		t.Fatal("no DRA ClusterRole (<release>-dra)")
	}
	got := map[string][]string{}
	for _, rule := range role.Rules {
		for _, g := range rule.APIGroups {
			for _, res := range rule.Resources {
				got[g+"/"+res] = append(got[g+"/"+res], rule.Verbs...)
			}
		}
		if len(rule.ResourceNames) > 0 || len(rule.NonResourceURLs) > 0 {
			t.Errorf("rule %+v: want plain resource rules", rule)
		}
	}
	want := map[string][]string{
		"resource.k8s.io/resourceslices": {"get", "list", "watch", "create", "update", "delete"},
		"resource.k8s.io/resourceclaims": {"get"},
		"/nodes":                         {"get"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("DRA ClusterRole grants %v, want exactly %v", got, want)
	}
	bound := false
	for _, crb := range objectsOf[*rbacv1.ClusterRoleBinding](objs) {
		if crb.RoleRef.Name == role.Name && crb.RoleRef.Kind == "ClusterRole" && len(crb.Subjects) == 1 &&
			crb.Subjects[0].Kind == "ServiceAccount" && crb.Subjects[0].Name == sa && crb.Subjects[0].Namespace == ReleaseNamespace {
			bound = true
		}
	}
	if !bound {
		t.Errorf("no ClusterRoleBinding binds %s to the pod's service account %s", role.Name, sa)
	}
}

// draPolicy returns the ResourceSlice admission policy, or nil.
func draPolicy(objs []Object) *admissionv1.ValidatingAdmissionPolicy {
	for _, p := range objectsOf[*admissionv1.ValidatingAdmissionPolicy](objs) {
		for _, r := range p.Spec.MatchConstraints.ResourceRules {
			if slices.Contains(r.Resources, "resourceslices") {
				return p
			}
		}
	}
	return nil
}

// checkDRAPolicy: with ownNodePolicy, a policy matches the service
// account's ResourceSlice writes (and only its) and is bound with Deny; what
// it allows is TestDRAPolicyCEL's.
func checkDRAPolicy(t *testing.T, objs []Object, want bool, sa string) {
	t.Helper()
	p := draPolicy(objs)
	if (p != nil) != want {
		t.Fatalf("ResourceSlice admission policy rendered: %v, want %v", p != nil, want)
	}
	if p == nil {
		return
	}
	if p.Spec.FailurePolicy == nil || *p.Spec.FailurePolicy != admissionv1.Fail {
		t.Errorf("failurePolicy %v, want Fail", p.Spec.FailurePolicy)
	}
	rules := p.Spec.MatchConstraints.ResourceRules
	if len(rules) != 1 || !slices.Equal(rules[0].APIGroups, []string{"resource.k8s.io"}) ||
		!sets.New(rules[0].Operations...).Equal(sets.New[admissionv1.OperationType]("CREATE", "UPDATE", "DELETE")) {
		t.Errorf("match rules %+v: want resource.k8s.io resourceslices CREATE, UPDATE, DELETE", rules)
	}
	if len(p.Spec.MatchConditions) != 1 || !strings.Contains(p.Spec.MatchConditions[0].Expression, `"system:serviceaccount:`+ReleaseNamespace+":"+sa+`"`) {
		t.Errorf("match conditions %+v do not select the service account %s", p.Spec.MatchConditions, sa)
	}
	bound := false
	for _, b := range objectsOf[*admissionv1.ValidatingAdmissionPolicyBinding](objs) {
		if b.Spec.PolicyName == p.Name && slices.Equal(b.Spec.ValidationActions, []admissionv1.ValidationAction{admissionv1.Deny}) {
			bound = true
		}
	}
	if !bound {
		t.Errorf("no ValidatingAdmissionPolicyBinding with Deny for %s", p.Name)
	}
}

// sliceRequest is one admission request the DRA policy judges.
type sliceRequest struct {
	name      string
	op        string
	user      string
	tokenNode string // the pod-bound token's node; "" for none
	driver    string
	node      string // the slice's spec.nodeName; "" for none (e.g. allNodes)
	allowed   bool
}

// TestDRAPolicyCEL evaluates the ResourceSlice admission policy's match
// condition, variables and validations in CEL, in the API server's order,
// on requests by the daemon and by others: the daemon may create, update
// and delete only its own node's slices of its driver.
func TestDRAPolicyCEL(t *testing.T) {
	r, err := RenderChart(chartDir(), DRAValues())
	if err != nil {
		t.Fatal(err)
	}
	objs := decodeAll(t, r.Docs)
	p := draPolicy(objs)
	if p == nil {
		t.Fatal("no ResourceSlice admission policy under dra.mode=dra")
	}
	self := "system:serviceaccount:" + ReleaseNamespace + ":" + objectOf[*appsv1.DaemonSet](t, objs).Spec.Template.Spec.ServiceAccountName
	for _, rq := range []sliceRequest{
		{"create own slice", "CREATE", self, "node-a", draDriver, "node-a", true},
		{"update own slice", "UPDATE", self, "node-a", draDriver, "node-a", true},
		{"delete own slice", "DELETE", self, "node-a", draDriver, "node-a", true},
		{"create another node's slice", "CREATE", self, "node-a", draDriver, "node-b", false},
		{"delete another node's slice", "DELETE", self, "node-a", draDriver, "node-b", false},
		{"another driver on its own node", "CREATE", self, "node-a", "gpu.example.com", "node-a", false},
		{"a slice for all nodes", "CREATE", self, "node-a", draDriver, "", false},
		{"a token naming no node", "CREATE", self, "", draDriver, "node-a", false},
		{"another user is not matched", "DELETE", "system:serviceaccount:kube-system:other", "node-a", draDriver, "node-b", true},
	} {
		t.Run(rq.name, func(t *testing.T) {
			slice := map[string]any{"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
				"metadata": map[string]any{"name": "s"}, "spec": map[string]any{"driver": rq.driver, "pool": map[string]any{"name": rq.node}}}
			if rq.node != "" {
				slice["spec"].(map[string]any)["nodeName"] = rq.node
			} else {
				slice["spec"].(map[string]any)["allNodes"] = true
			}
			extra := map[string]any{}
			if rq.tokenNode != "" {
				extra["authentication.kubernetes.io/node-name"] = []any{rq.tokenNode}
			}
			vars := map[string]any{
				"request": map[string]any{"operation": rq.op, "userInfo": map[string]any{"username": rq.user, "extra": extra}},
				"object":  slice, "oldObject": slice,
			}
			switch rq.op {
			case "CREATE":
				vars["oldObject"] = nil
			case "DELETE":
				vars["object"] = nil
			}
			for _, mc := range p.Spec.MatchConditions {
				if !evalCEL(t, mc.Expression, vars).(bool) {
					if !rq.allowed {
						t.Errorf("match condition %q does not match: the request escapes the policy", mc.Name)
					}
					return
				}
			}
			computed := map[string]any{}
			vars["variables"] = computed
			for _, v := range p.Spec.Variables {
				computed[v.Name] = evalCEL(t, v.Expression, vars)
			}
			allowed := true
			for _, v := range p.Spec.Validations {
				if !evalCEL(t, v.Expression, vars).(bool) {
					allowed = false
					if msg, _ := evalCEL(t, v.MessageExpression, vars).(string); !strings.Contains(msg, "gpu-plugin") {
						t.Errorf("message %q does not say who was refused", msg)
					}
				}
			}
			if allowed != rq.allowed {
				t.Errorf("allowed %v, want %v", allowed, rq.allowed)
			}
		})
	}
}

// evalCEL compiles and evaluates an admission policy expression over
// dynamically typed request, object, oldObject and variables.
func evalCEL(t *testing.T, expr string, vars map[string]any) any {
	t.Helper()
	env, err := cel.NewEnv(cel.Variable("request", cel.DynType), cel.Variable("object", cel.DynType),
		cel.Variable("oldObject", cel.DynType), cel.Variable("variables", cel.DynType))
	if err != nil {
		t.Fatal(err)
	}
	ast, iss := env.Compile(expr)
	if iss.Err() != nil {
		t.Fatalf("compiling %q: %v", expr, iss.Err())
	}
	prg, err := env.Program(ast)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := vars["variables"]; !ok {
		vars = maps.Clone(vars)
		vars["variables"] = map[string]any{}
	}
	out, _, err := prg.Eval(vars)
	if err != nil {
		t.Fatalf("evaluating %q: %v", expr, err)
	}
	return out.Value()
}

// checkDeviceClasses: NVIDIA's two DeviceClasses, cluster-scoped, with
// exactly the contract's selectors; extendedResourceName only on
// gpu.nvidia.com and only when asked; no config.
func checkDeviceClasses(t *testing.T, objs []Object, want, extendedRes bool) {
	t.Helper()
	classes := map[string]*resourcev1.DeviceClass{}
	for _, dc := range objectsOf[*resourcev1.DeviceClass](objs) {
		classes[dc.Name] = dc
	}
	if !want {
		if len(classes) > 0 {
			t.Errorf("DeviceClasses %v rendered with dra.deviceClasses.create=false", slices.Collect(maps.Keys(classes)))
		}
		return
	}
	for name, sel := range map[string]string{draGPUClass: draGPUSelector, draMIGClass: draMIGSelector} {
		dc := classes[name]
		if dc == nil {
			t.Errorf("no DeviceClass %s", name)
			continue
		}
		if dc.Namespace != "" {
			t.Errorf("DeviceClass %s has namespace %q: DeviceClasses are cluster-scoped", name, dc.Namespace)
		}
		if len(dc.Spec.Selectors) != 1 || dc.Spec.Selectors[0].CEL == nil || dc.Spec.Selectors[0].CEL.Expression != sel {
			t.Errorf("DeviceClass %s selectors %+v, want the one CEL selector %q", name, dc.Spec.Selectors, sel)
		}
		if len(dc.Spec.Config) > 0 {
			t.Errorf("DeviceClass %s has config %+v", name, dc.Spec.Config)
		}
		wantExt := name == draGPUClass && extendedRes
		if got := dc.Spec.ExtendedResourceName; (got != nil) != wantExt || (got != nil && *got != draExtendedResouce) {
			t.Errorf("DeviceClass %s extendedResourceName %v, want %v", name, ptr.Deref(got, "<none>"), map[bool]string{true: draExtendedResouce, false: "<none>"}[wantExt])
		}
	}
	if len(classes) != 2 {
		t.Errorf("DeviceClasses %v, want %s and %s", slices.Collect(maps.Keys(classes)), draGPUClass, draMIGClass)
	}
}

// TestDeviceClassSelectors compiles the DeviceClasses' selectors with the
// scheduler's own DRA CEL compiler and runs them on devices shaped as the
// daemon publishes them (the contract's attributes, the driver's domain
// implied): a whole GPU is only in gpu.nvidia.com, a MIG device only in
// mig.nvidia.com, another driver's device in neither.
func TestDeviceClassSelectors(t *testing.T) {
	r, err := RenderChart(chartDir(), DRAValues())
	if err != nil {
		t.Fatal(err)
	}
	selectors := map[string]string{}
	for _, dc := range objectsOf[*resourcev1.DeviceClass](decodeAll(t, r.Docs)) {
		selectors[dc.Name] = dc.Spec.Selectors[0].CEL.Expression
	}
	str := func(s string) resourcev1.DeviceAttribute { return resourcev1.DeviceAttribute{StringValue: &s} }
	ver := func(s string) resourcev1.DeviceAttribute { return resourcev1.DeviceAttribute{VersionValue: &s} }
	gpuAttrs := map[resourcev1.QualifiedName]resourcev1.DeviceAttribute{
		"type": str("gpu"), "uuid": str("GPU-0c8f6e43-61b4-4f55-9ddb-2f5bd0a1c0de"), "productName": str("NVIDIA H100 80GB HBM3"),
		"brand": str("Nvidia"), "architecture": str("Hopper"), "cudaComputeCapability": ver("9.0.0"),
		"driverVersion": ver("570.124.6"), "cudaDriverVersion": ver("12.8.0"),
		"resource.kubernetes.io/pciBusID": str("0000:18:00.0"), "index": {IntValue: ptr.To[int64](0)},
	}
	migAttrs := maps.Clone(gpuAttrs)
	migAttrs["type"] = str("mig")
	migAttrs["uuid"] = str("MIG-8a1d3c4b-2e5f-5a6b-9c7d-0e1f2a3b4c5d")
	migAttrs["parentUUID"] = str("GPU-0c8f6e43-61b4-4f55-9ddb-2f5bd0a1c0de")
	migAttrs["profile"] = str("1g.10gb")
	memory := map[resourcev1.QualifiedName]resourcev1.DeviceCapacity{"memory": {Value: resource.MustParse("80Gi")}}
	devices := map[string]dracel.Device{
		"gpu":                {Driver: draDriver, Attributes: gpuAttrs, Capacity: memory},
		"mig":                {Driver: draDriver, Attributes: migAttrs, Capacity: memory},
		"other driver's gpu": {Driver: "gpu.example.com", Attributes: map[resourcev1.QualifiedName]resourcev1.DeviceAttribute{"type": str("gpu")}},
	}
	want := map[string]map[string]bool{
		draGPUClass: {"gpu": true, "mig": false, "other driver's gpu": false},
		draMIGClass: {"gpu": false, "mig": true, "other driver's gpu": false},
	}
	if len(selectors) != len(want) {
		t.Fatalf("DeviceClasses %v, want %v", slices.Collect(maps.Keys(selectors)), slices.Collect(maps.Keys(want)))
	}
	compiler := dracel.GetCompiler(dracel.Features{})
	for class, expr := range selectors {
		res := compiler.CompileCELExpression(expr, dracel.Options{})
		if res.Error != nil {
			t.Fatalf("DeviceClass %s: %q does not compile: %v", class, expr, res.Error)
		}
		for dev, in := range devices {
			got, _, err := res.DeviceMatches(context.Background(), in)
			if err != nil {
				t.Errorf("DeviceClass %s on the %s device: %v", class, dev, err)
				continue
			}
			if got != want[class][dev] {
				t.Errorf("DeviceClass %s selects the %s device: %v, want %v", class, dev, got, want[class][dev])
			}
		}
	}
}

// TestChartRejectsDRAValues: each mistake in the dra values fails the
// render (through the values schema or the template's checks) with a
// message naming the value.
func TestChartRejectsDRAValues(t *testing.T) {
	for _, tc := range []struct{ name, values, want string }{
		{"split without devices", "dra: {mode: split}", "dra.devices"},
		{"split with an empty device list", "dra: {mode: split, devices: []}", "dra.devices"},
		{"devices without split", "dra: {mode: dra, devices: [\"0\"]}", "dra.devices"},
		{"devices in device-plugin mode", "dra: {devices: [GPU-0c8f6e43-61b4-4f55-9ddb-2f5bd0a1c0de]}", "dra.devices"},
		{"unknown mode", "dra: {mode: dra-only}", "dra.mode"},
		{"empty mode", "dra: {mode: \"\"}", "dra.mode"},
		{"a device with a comma", "dra: {mode: split, devices: [\"0,1\"]}", "dra.devices"},
		{"an empty device", "dra: {mode: split, devices: [\"\"]}", "dra.devices"},
		{"a relative registrar directory", "dra: {mode: dra, kubeletRegistrarDirectoryPath: plugins_registry}", "dra.kubeletRegistrarDirectoryPath"},
		{"the host's root as plugins directory", "dra: {mode: dra, kubeletPluginsDirectoryPath: /}", "dra.kubeletPluginsDirectoryPath"},
		{"one directory for both", "dra: {mode: dra, kubeletRegistrarDirectoryPath: /var/lib/kubelet/plugins, kubeletPluginsDirectoryPath: /var/lib/kubelet/plugins/}", "dra.kubeletRegistrarDirectoryPath"},
		{"the device plugin directory", "dra: {mode: dra, kubeletPluginsDirectoryPath: /var/lib/kubelet/device-plugins}", "dra.kubeletPluginsDirectoryPath"},
		{"misspelt dra value", "dra: {mode: dra, device: [\"0\"]}", "device"},
		{"misspelt DeviceClass value", "dra: {deviceClasses: {extendedResource: false}}", "extendedResource"},
		{"create not a boolean", "dra: {deviceClasses: {create: \"no\"}}", "create"},
	} {
		t.Run(tc.name, func(t *testing.T) { requireRefused(t, tc.values, tc.want) })
	}
}

// TestChartDRAFailMessages: the template's own checks, which a render
// without the values schema (helm --skip-schema-validation) relies on,
// name the value at fault too.
func TestChartDRAFailMessages(t *testing.T) {
	ch := filepath.Join(t.TempDir(), "gpu-plugin")
	copyDir(t, chartDir(), ch)
	removeFile(t, filepath.Join(ch, "values.schema.json"))
	for _, tc := range []struct{ values, want string }{
		{"dra: {mode: dra-only}", `dra.mode "dra-only": want device-plugin, dra or split`},
		{"dra: {mode: split}", "dra.mode is split but dra.devices is empty"},
		{"dra: {mode: device-plugin, devices: [\"0\"]}", "dra.devices is set but dra.mode is device-plugin"},
		{"dra: {mode: dra, kubeletPluginsDirectoryPath: plugins}", "dra.kubeletPluginsDirectoryPath \"plugins\""},
	} {
		_, err := RenderChart(ch, values(t, tc.values))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %q without the schema: error %v, want one saying %q", tc.values, err, tc.want)
		}
	}
}

// TestChartDRANeedsResourceV1: on a cluster without resource.k8s.io/v1
// (Kubernetes before 1.34), DRA mode fails the install saying so, instead
// of failing on the DeviceClasses' kind or at run time.
func TestChartDRANeedsResourceV1(t *testing.T) {
	if _, err := RenderChartWithAPIVersions(chartDir(), DRAValues(), []string{"v1", "apps/v1", "rbac.authorization.k8s.io/v1"}); err == nil ||
		!strings.Contains(err.Error(), "resource.k8s.io/v1") || !strings.Contains(err.Error(), "dra.mode") {
		t.Errorf("DRA mode without resource.k8s.io/v1: error %v, want one naming dra.mode and resource.k8s.io/v1", err)
	}
	if _, err := RenderChartWithAPIVersions(chartDir(), nil, []string{"v1", "apps/v1"}); err != nil {
		t.Errorf("the device-plugin mode must not need resource.k8s.io/v1: %v", err)
	}
}

// TestChartDefaultsWithoutDRA: under the device-plugin mode no dra value
// changes the render by a byte (the default install is what it was before
// DRA), and nothing of DRA is rendered.
func TestChartDefaultsWithoutDRA(t *testing.T) {
	def, err := RenderChart(chartDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	other, err := RenderChart(chartDir(), values(t, `
dra:
  mode: device-plugin
  devices: []
  kubeletRegistrarDirectoryPath: /var/lib/k0s/kubelet/plugins_registry
  kubeletPluginsDirectoryPath: /var/lib/k0s/kubelet/plugins
  deviceClasses: {create: false, extendedResourceName: false}
`))
	if err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal(def)
	b, _ := json.Marshal(other)
	if !bytes.Equal(a, b) {
		t.Error("dra values change the device-plugin mode's render")
	}
	all := string(a)
	for _, s := range append([]string{"resource.k8s.io", "DeviceClass", "plugins_registry", "gpu.nvidia.com", "DRA"}, draEnv...) {
		if strings.Contains(all, s) {
			t.Errorf("the default render mentions %q", s)
		}
	}
	ds := objectOf[*appsv1.DaemonSet](t, decodeAll(t, def.Docs))
	if v := volume(ds, "driver-root"); v != nil {
		t.Errorf("the default render mounts the driver root: %+v", v)
	}
}

// TestStaticManifestDRASection: the static manifest's DRA section, read
// back from the file, is the chart's DRA mode: its listed additions, made
// to the static DaemonSet, give the chart's DRA DaemonSet, and its
// commented-out objects (extracted as the section says, with sed's
// 's/^#| //') are the objects the chart adds, without the Helm-only labels.
func TestStaticManifestDRASection(t *testing.T) {
	text := string(readFile(t, StaticManifest))
	i := strings.Index(text, "\n---\n# DRA: ")
	if i < 0 {
		t.Fatalf("%s has no DRA section", StaticManifest)
	}
	section := text[i+1:]
	if !strings.Contains(text[:i], "DaemonSet") || strings.Contains(section, "\nkind:") {
		t.Fatal("the DRA section must follow the DaemonSet and hold only comments")
	}
	var extracted strings.Builder
	var adds [][]byte
	for _, line := range strings.Split(section, "\n") {
		if rest, ok := strings.CutPrefix(line, DRAObjectPrefix); ok {
			extracted.WriteString(rest + "\n")
		} else if rest, ok := strings.CutPrefix(line, "#     {"); ok {
			adds = append(adds, []byte("{"+rest))
		}
	}

	chart, err := RenderChart(chartDir(), DRAValues())
	if err != nil {
		t.Fatal(err)
	}
	chartObjs := decodeAll(t, chart.Docs)
	draDS := objectOf[*appsv1.DaemonSet](t, chartObjs)
	docs, err := splitYAMLFile(filepath.Join(RepoRoot(), StaticManifest))
	if err != nil {
		t.Fatal(err)
	}
	ds := objectOf[*appsv1.DaemonSet](t, decodeAll(t, docs)).DeepCopy()
	spec := &ds.Spec.Template.Spec
	c := &spec.Containers[0]
	for _, a := range adds {
		var probe map[string]any
		if err := json.Unmarshal(a, &probe); err != nil {
			t.Fatalf("listed addition %s: %v", a, err)
		}
		switch {
		case probe["hostPath"] != nil:
			var v corev1.Volume
			mustJSON(t, a, &v)
			spec.Volumes = append(spec.Volumes, v)
		case probe["mountPath"] != nil:
			var m corev1.VolumeMount
			mustJSON(t, a, &m)
			c.VolumeMounts = append(c.VolumeMounts, m)
		default:
			var e corev1.EnvVar
			mustJSON(t, a, &e)
			c.Env = append(c.Env, e)
		}
	}
	if !strings.Contains(section, "automountServiceAccountToken: true") {
		t.Error("the DRA section does not say to mount the service account token")
	}
	spec.AutomountServiceAccountToken = ptr.To(true)
	want := draDS.DeepCopy()
	delete(want.Labels, "helm.sh/chart")
	delete(want.Labels, "app.kubernetes.io/managed-by")
	for _, d := range []*appsv1.DaemonSet{ds, want} {
		s := &d.Spec.Template.Spec
		slices.SortFunc(s.Containers[0].Env, func(a, b corev1.EnvVar) int { return strings.Compare(a.Name, b.Name) })
		slices.SortFunc(s.Containers[0].VolumeMounts, func(a, b corev1.VolumeMount) int { return strings.Compare(a.Name, b.Name) })
		slices.SortFunc(s.Volumes, func(a, b corev1.Volume) int { return strings.Compare(a.Name, b.Name) })
	}
	if !reflect.DeepEqual(ds, want) {
		a, _ := json.Marshal(ds)
		b, _ := json.Marshal(want)
		t.Errorf("the static DaemonSet with the DRA section's additions is not the chart's DRA DaemonSet:\nstatic+section %s\nchart          %s", a, b)
	}
	for _, name := range []string{"GPU_PLUGIN_ALLOCATION_MODE=split", "GPU_PLUGIN_DRA_DEVICES", "/var/run/cdi", "containerd", "CRI-O"} {
		if !strings.Contains(section, name) {
			t.Errorf("the DRA section does not mention %s", name)
		}
	}

	path := filepath.Join(t.TempDir(), "dra.yaml")
	writeFile(t, path, extracted.String())
	got, err := splitYAMLFile(path)
	if err != nil {
		t.Fatal(err)
	}
	gotObjs := decodeAll(t, got)
	var wantObjs []Object
	for _, o := range chartObjs {
		if o.Doc.Kind == "DaemonSet" || o.Doc.Kind == "ServiceAccount" || o.Doc.Kind == "ConfigMap" || o.Doc.Kind == "Service" {
			continue
		}
		delete(o.Meta.Labels, "helm.sh/chart")
		delete(o.Meta.Labels, "app.kubernetes.io/managed-by")
		wantObjs = append(wantObjs, o)
	}
	if len(gotObjs) != len(wantObjs) {
		t.Fatalf("the DRA section holds %d objects, the chart's DRA mode adds %d", len(gotObjs), len(wantObjs))
	}
	for i := range wantObjs {
		if !reflect.DeepEqual(gotObjs[i].Obj, wantObjs[i].Obj) {
			a, _ := json.Marshal(gotObjs[i].Obj)
			b, _ := json.Marshal(wantObjs[i].Obj)
			t.Errorf("object %d of the DRA section differs from the chart's:\nsection %s\nchart   %s", i, a, b)
		}
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.CopyFS(to, os.DirFS(from)); err != nil {
		t.Fatal(err)
	}
}

func removeFile(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func mustJSON(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	// A listed entry must be whole: re-encoded, it reads the same.
	again, _ := json.Marshal(v)
	var x, y any
	_ = yaml.Unmarshal(b, &x)
	_ = yaml.Unmarshal(again, &y)
	if !reflect.DeepEqual(x, y) {
		t.Errorf("listed entry %s has fields its type lacks (%s)", b, again)
	}
}

// TestInstallDocDRAExample: the claim and pod docs/install.md's DRA section
// shows decode strictly, ask for a DeviceClass the chart creates, and the
// pod uses the claim the template makes.
func TestInstallDocDRAExample(t *testing.T) {
	doc := string(readFile(t, InstallDoc))
	i := strings.Index(doc, "\n## DRA mode\n")
	if i < 0 {
		t.Fatalf("%s has no DRA mode section", InstallDoc)
	}
	section := doc[i+1:]
	if j := strings.Index(section[1:], "\n## "); j >= 0 {
		section = section[:j+1]
	}
	for _, want := range []string{"dra.mode=dra", "containerd 1.7", "enable_cdi", "containerd 2.x", "CRI-O 1.23", "gpu.nvidia.com", "mig.nvidia.com", "unchanged"} {
		if !strings.Contains(section, want) {
			t.Errorf("the DRA mode section does not mention %q", want)
		}
	}
	blocks := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllStringSubmatch(section, -1)
	if len(blocks) != 1 {
		t.Fatalf("the DRA mode section has %d YAML blocks, want 1", len(blocks))
	}
	var tmpl resourcev1.ResourceClaimTemplate
	var pod corev1.Pod
	for _, part := range strings.Split(blocks[0][1], "\n---\n") {
		js, err := yaml.YAMLToJSONStrict([]byte(part))
		if err != nil {
			t.Fatal(err)
		}
		var head struct{ Kind string }
		_ = json.Unmarshal(js, &head)
		var into any
		switch head.Kind {
		case "ResourceClaimTemplate":
			into = &tmpl
		case "Pod":
			into = &pod
		default:
			t.Fatalf("unexpected kind %q in the DRA example", head.Kind)
		}
		strict, err := kjson.UnmarshalStrict(js, into, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
		if err != nil || len(strict) > 0 {
			t.Errorf("%s: %v %v", head.Kind, err, strict)
		}
	}
	reqs := tmpl.Spec.Spec.Devices.Requests
	if len(reqs) != 1 || reqs[0].Exactly == nil || reqs[0].Exactly.DeviceClassName != draGPUClass {
		t.Errorf("the example claim requests %+v, want one request of DeviceClass %s", reqs, draGPUClass)
	}
	if len(pod.Spec.ResourceClaims) != 1 || ptr.Deref(pod.Spec.ResourceClaims[0].ResourceClaimTemplateName, "") != tmpl.Name ||
		len(pod.Spec.Containers) != 1 || len(pod.Spec.Containers[0].Resources.Claims) != 1 ||
		pod.Spec.Containers[0].Resources.Claims[0].Name != pod.Spec.ResourceClaims[0].Name {
		t.Errorf("the example pod does not use a claim from the template %s: %+v", tmpl.Name, pod.Spec)
	}
}
