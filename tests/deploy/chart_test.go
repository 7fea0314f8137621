package deploy

import (
	"bytes"
	"encoding/json"
	"maps"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	monv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
)

func chartDir() string { return filepath.Join(RepoRoot(), ChartDir) }

// values builds a values map from YAML, as `helm install -f` would read it.
func values(t *testing.T, y string) map[string]any {
	t.Helper()
	v := map[string]any{}
	if err := yaml.Unmarshal([]byte(y), &v); err != nil {
		t.Fatalf("test values: %v", err)
	}
	return v
}

func env(c corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value, true
		}
	}
	return "", false
}

// TestChartRenders renders the chart under its defaults and a set of value
// combinations; every object decodes strictly and the DaemonSet passes the
// install policy, plus each case's own checks.
func TestChartRenders(t *testing.T) {
	type check func(t *testing.T, r *Rendered, objs []Object, ds *appsv1.DaemonSet)
	cases := []struct {
		name   string
		values string
		policy policy
		kinds  []string // the rendered kinds, in order
		check  check
	}{
		{
			name:  "defaults",
			kinds: []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, objs []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				if !slices.Contains(c.Args, "--config=/etc/gpu-plugin/config/config.yaml") {
					t.Errorf("args %v lack --config", c.Args)
				}
				for _, name := range []string{"MIG_STRATEGY", "DEVICE_LIST_STRATEGY", "FAIL_ON_INIT_ERROR"} {
					if v, ok := env(c, name); ok {
						t.Errorf("%s=%q is set by default; it would override the config file", name, v)
					}
				}
				if c.Image != "ghcr.io/gpu-plugin/gpu-plugin:"+chartAppVersion(t) {
					t.Errorf("image %q, want the chart's appVersion as tag", c.Image)
				}
				sa := objectOf[*corev1.ServiceAccount](t, objs)
				if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
					t.Error("ServiceAccount automountServiceAccountToken must be false")
				}
				if ds.Spec.Template.Spec.ServiceAccountName != sa.Name {
					t.Errorf("pod uses ServiceAccount %q, chart creates %q", ds.Spec.Template.Spec.ServiceAccountName, sa.Name)
				}
				if ds.Spec.Template.Spec.Affinity == nil || ds.Spec.Template.Spec.Affinity.NodeAffinity == nil {
					t.Error("no default node affinity: the DaemonSet would start on CPU-only nodes")
				}
				cm := objectOf[*corev1.ConfigMap](t, objs)
				checkConfigMapFile(t, cm.Data["config.yaml"], func(t *testing.T, c *config.Config) {
					if got := c.MigStrategy(); got != "none" {
						t.Errorf("the example config's migStrategy = %q, want none", got)
					}
				})
			},
		},
		{
			name:   "node health",
			values: "nodeHealth: {condition: true, taint: true}",
			policy: policy{apiAccess: true},
			kinds: []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "DaemonSet",
				"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"},
			check: func(t *testing.T, r *Rendered, objs []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				for _, name := range []string{"GPU_PLUGIN_NODE_HEALTH_CONDITION", "GPU_PLUGIN_NODE_HEALTH_TAINT"} {
					if v, _ := env(c, name); v != "true" {
						t.Errorf("%s=%q, want true", name, v)
					}
				}
				if a := ds.Spec.Template.Spec.AutomountServiceAccountToken; a == nil || !*a {
					t.Error("the pod does not mount its service account token: the daemon cannot reach the API server")
				}
				cr := objectOf[*rbacv1.ClusterRole](t, objs)
				want := map[string][]string{"nodes": {"get", "update"}, "nodes/status": {"patch"}, "events": {"create", "patch"}}
				got := map[string][]string{}
				for _, rule := range cr.Rules {
					if len(rule.APIGroups) != 1 || rule.APIGroups[0] != "" {
						t.Errorf("rule %+v reaches beyond the core API group", rule)
					}
					for _, res := range rule.Resources {
						got[res] = append(got[res], rule.Verbs...)
					}
				}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("ClusterRole grants %v, want exactly %v", got, want)
				}
				crb := objectOf[*rbacv1.ClusterRoleBinding](t, objs)
				if len(crb.Subjects) != 1 || crb.Subjects[0].Name != ds.Spec.Template.Spec.ServiceAccountName || crb.RoleRef.Name != cr.Name {
					t.Errorf("ClusterRoleBinding %+v does not bind the pod's service account to %s", crb, cr.Name)
				}
				vap := r.Find("ValidatingAdmissionPolicy")
				if vap == nil || !strings.Contains(vap.Content, "authentication.kubernetes.io/node-name") ||
					!strings.Contains(vap.Content, "system:serviceaccount:"+ReleaseNamespace+":"+crb.Subjects[0].Name) {
					t.Errorf("the ValidatingAdmissionPolicy does not tie the service account's writes to its node: %v", vap)
				}
			},
		},
		{
			name: "per-node configs",
			values: `
config:
  map:
    whole: "version: v1\n"
    shared: "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 4}]}}\n"
  default: whole
`,
			policy: policy{apiAccess: true},
			kinds: []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "DaemonSet",
				"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"},
			check: func(t *testing.T, _ *Rendered, objs []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				if !slices.Contains(c.Args, "--config-dir=/etc/gpu-plugin/config") || slices.ContainsFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--config=") }) {
					t.Errorf("args %v: want --config-dir and no --config", c.Args)
				}
				if v, _ := env(c, "GPU_PLUGIN_DEFAULT_CONFIG"); v != "whole" {
					t.Errorf("GPU_PLUGIN_DEFAULT_CONFIG=%q, want whole", v)
				}
				cm := objectOf[*corev1.ConfigMap](t, objs)
				if len(cm.Data) != 2 {
					t.Fatalf("ConfigMap keys %v, want whole and shared", slices.Sorted(maps.Keys(cm.Data)))
				}
				if c, err := config.Parse([]byte(cm.Data["shared"])); err != nil || c.Sharing.TimeSlicing == nil || len(c.Sharing.TimeSlicing.Resources) != 1 {
					t.Errorf("the shared config does not parse with its time-slicing: %v\n%s", err, cm.Data["shared"])
				}
				cr := objectOf[*rbacv1.ClusterRole](t, objs)
				got := map[string][]string{}
				for _, rule := range cr.Rules {
					for _, res := range rule.Resources {
						got[res] = append(got[res], rule.Verbs...)
					}
				}
				want := map[string][]string{"nodes": {"get", "list", "watch"}, "events": {"create", "patch"}}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("ClusterRole grants %v, want exactly %v (no status patch without nodeHealth)", got, want)
				}
			},
		},
		{
			name:   "per-pod usage",
			values: "perPodUsage: {enabled: true, dcgmSeries: true, virtualGPUs: true}",
			policy: policy{apiAccess: true, hostPID: true},
			kinds:  []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, objs []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				for _, name := range []string{"GPU_PLUGIN_PER_POD_USAGE", "GPU_PLUGIN_PER_POD_DCGM_SERIES", "GPU_PLUGIN_KUBERNETES_VIRTUAL_GPUS"} {
					if v, _ := env(c, name); v != "true" {
						t.Errorf("%s=%q, want true", name, v)
					}
				}
				cr := objectOf[*rbacv1.ClusterRole](t, objs)
				got := map[string][]string{}
				for _, rule := range cr.Rules {
					for _, res := range rule.Resources {
						got[res] = append(got[res], rule.Verbs...)
					}
				}
				want := map[string][]string{"pods": {"get", "list", "watch"}}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("ClusterRole grants %v, want exactly %v (nothing on nodes or events without nodeHealth or config.map)", got, want)
				}
			},
		},
		{
			name:   "NodeFeature API",
			values: "nodeFeatureAPI: true",
			policy: policy{apiAccess: true},
			kinds:  []string{"ServiceAccount", "ConfigMap", "Role", "RoleBinding", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, objs []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				if v, _ := env(c, "USE_NODE_FEATURE_API"); v != "true" {
					t.Errorf("USE_NODE_FEATURE_API=%q, want true", v)
				}
				for name, path := range map[string]string{"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"} {
					found := false
					for _, e := range c.Env {
						if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == path {
							found = true
						}
					}
					if !found {
						t.Errorf("no %s from %s: the daemon cannot name its NodeFeature's namespace or owner", name, path)
					}
				}
				role := objectOf[*rbacv1.Role](t, objs)
				got := map[string][]string{}
				for _, rule := range role.Rules {
					for _, res := range rule.Resources {
						got[strings.Join(rule.APIGroups, ",")+"/"+res] = rule.Verbs
					}
				}
				want := map[string][]string{"nfd.k8s-sigs.io/nodefeatures": {"get", "create", "update"}, "/pods": {"get"}}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("Role grants %v, want exactly %v", got, want)
				}
			},
		},
		{
			name: "existing ConfigMap",
			values: `
config:
  existingConfigMap: site-gpu-config
  key: gpu.yaml
`,
			kinds: []string{"ServiceAccount", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, _ []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				if !slices.Contains(c.Args, "--config=/etc/gpu-plugin/config/gpu.yaml") {
					t.Errorf("args %v: want --config naming the existing ConfigMap's key", c.Args)
				}
				if v := volume(ds, "config"); v == nil || v.ConfigMap == nil || v.ConfigMap.Name != "site-gpu-config" {
					t.Errorf("config volume %+v, want ConfigMap site-gpu-config", v)
				}
			},
		},
		{
			name:   "MIG mixed",
			values: `migStrategy: mixed`,
			policy: policy{allowedCaps: []string{"SYS_ADMIN"}},
			kinds:  []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, _ []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				if v, _ := env(c, "MIG_STRATEGY"); v != "mixed" {
					t.Errorf("MIG_STRATEGY = %q, want mixed", v)
				}
				if !slices.Equal(c.SecurityContext.Capabilities.Add, []corev1.Capability{"SYS_ADMIN"}) {
					t.Errorf("capabilities.add = %v, want [SYS_ADMIN] for MIG", c.SecurityContext.Capabilities.Add)
				}
			},
		},
		{
			name:   "MIG none adds no capability",
			values: "migStrategy: none\nfailOnInitError: false\ndeviceListStrategy: cdi-cri",
			policy: policy{cdi: true},
			kinds:  []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, _ []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				for name, want := range map[string]string{"MIG_STRATEGY": "none", "FAIL_ON_INIT_ERROR": "false", "DEVICE_LIST_STRATEGY": "cdi-cri"} {
					if v, _ := env(c, name); v != want {
						t.Errorf("%s = %q, want %q", name, v, want)
					}
				}
			},
		},
		{
			name: "time-slicing",
			values: `
sharing:
  timeSlicing:
    renameByDefault: true
    resources:
      - name: nvidia.com/gpu
        replicas: 4
`,
			kinds: []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, objs []Object, _ *appsv1.DaemonSet) {
				cm := objectOf[*corev1.ConfigMap](t, objs)
				checkConfigMapFile(t, cm.Data["config.yaml"], func(t *testing.T, c *config.Config) {
					ts := c.Sharing.TimeSlicing
					if ts == nil || len(ts.Resources) != 1 || ts.Resources[0].Name != "nvidia.com/gpu" || ts.Resources[0].Replicas != 4 || !ts.RenameByDefault {
						t.Errorf("sharing.timeSlicing = %+v, want nvidia.com/gpu × 4 renamed", ts)
					}
				})
			},
		},
		{
			name:   "metrics port",
			values: "metrics:\n  port: 9500",
			policy: policy{metricsPort: 9500},
			kinds:  []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
		},
		{
			name: "web config with TLS, inline",
			values: `
webConfig:
  tls: true
  tlsSecret: gpu-plugin-tls
  config: |
    tls_server_config:
      cert_file: /etc/gpu-plugin/tls/tls.crt
      key_file: /etc/gpu-plugin/tls/tls.key
serviceMonitor:
  enabled: true
`,
			policy: policy{tls: true},
			kinds:  []string{"ServiceAccount", "Secret", "ConfigMap", "Service", "DaemonSet", "ServiceMonitor"},
			check: func(t *testing.T, _ *Rendered, objs []Object, ds *appsv1.DaemonSet) {
				c := ds.Spec.Template.Spec.Containers[0]
				if !slices.Contains(c.Args, "--web-config-file=/etc/gpu-plugin/web/web-config.yml") {
					t.Errorf("args %v lack --web-config-file", c.Args)
				}
				sec := objectOf[*corev1.Secret](t, objs)
				if !strings.Contains(sec.StringData["web-config.yml"], "tls_server_config") {
					t.Errorf("web config Secret holds %q", sec.StringData["web-config.yml"])
				}
				if v := volume(ds, "web-config"); v == nil || v.Secret == nil || v.Secret.SecretName != sec.Name {
					t.Errorf("web-config volume %+v, want Secret %s", v, sec.Name)
				}
				if v := volume(ds, "tls"); v == nil || v.Secret == nil || v.Secret.SecretName != "gpu-plugin-tls" {
					t.Errorf("tls volume %+v, want Secret gpu-plugin-tls", v)
				}
				sm := objectOf[*monv1.ServiceMonitor](t, objs)
				ep := sm.Spec.Endpoints[0]
				if ep.Scheme == nil || *ep.Scheme != "https" || ep.TLSConfig == nil {
					t.Errorf("ServiceMonitor endpoint scheme %v tlsConfig %+v, want https with a tlsConfig", ep.Scheme, ep.TLSConfig)
				}
			},
		},
		{
			name: "web config with basic auth, existing Secret",
			values: `
webConfig:
  existingSecret: site-web-config
  basicAuth: true
`,
			policy: policy{basicAuth: true},
			kinds:  []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, _ []Object, ds *appsv1.DaemonSet) {
				if v := volume(ds, "web-config"); v == nil || v.Secret == nil || v.Secret.SecretName != "site-web-config" {
					t.Errorf("web-config volume %+v, want Secret site-web-config", v)
				}
			},
		},
		{
			name: "resources, placement and image",
			values: `
image:
  repository: registry.example.com/gpu-plugin
  tag: v9.9.9
resources:
  requests: {cpu: 100m, memory: 96Mi}
  limits: {cpu: "2", memory: 512Mi}
nodeSelector:
  node-role.example.com/gpu: "true"
affinity: null
tolerations:
  - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
  - {key: CriticalAddonsOnly, operator: Exists}
  - {key: dedicated, operator: Equal, value: ml, effect: NoExecute}
runtimeClassName: nvidia
`,
			kinds: []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, _ []Object, ds *appsv1.DaemonSet) {
				spec := ds.Spec.Template.Spec
				c := spec.Containers[0]
				if c.Image != "registry.example.com/gpu-plugin:v9.9.9" {
					t.Errorf("image %q", c.Image)
				}
				if got := c.Resources.Limits[corev1.ResourceMemory]; got.Cmp(resource.MustParse("512Mi")) != 0 {
					t.Errorf("memory limit %s, want 512Mi", got.String())
				}
				if spec.NodeSelector["node-role.example.com/gpu"] != "true" || spec.Affinity != nil {
					t.Errorf("nodeSelector %v affinity %+v: want the given selector and no affinity", spec.NodeSelector, spec.Affinity)
				}
				if len(spec.Tolerations) != 3 {
					t.Errorf("tolerations %+v, want the 3 given", spec.Tolerations)
				}
				if spec.RuntimeClassName == nil || *spec.RuntimeClassName != "nvidia" {
					t.Errorf("runtimeClassName %v, want nvidia", spec.RuntimeClassName)
				}
			},
		},
		{
			name:   "driver container",
			values: `driverRoot: /run/nvidia/driver`,
			policy: policy{driverRoot: "/run/nvidia/driver"},
			kinds:  []string{"ServiceAccount", "ConfigMap", "Service", "DaemonSet"},
			check: func(t *testing.T, _ *Rendered, _ []Object, ds *appsv1.DaemonSet) {
				if v, _ := env(ds.Spec.Template.Spec.Containers[0], "NVIDIA_DRIVER_ROOT"); v != "/run/nvidia/driver" {
					t.Errorf("NVIDIA_DRIVER_ROOT = %q", v)
				}
			},
		},
		{
			name: "monitoring objects",
			values: `
serviceMonitor: {enabled: true, labels: {release: kube-prometheus-stack}}
prometheusRule: {enabled: true, labels: {release: kube-prometheus-stack}}
dashboard: {enabled: true, namespace: monitoring}
`,
			kinds: []string{"ServiceAccount", "ConfigMap", "ConfigMap", "Service", "DaemonSet", "PrometheusRule", "ServiceMonitor"},
			check: func(t *testing.T, r *Rendered, objs []Object, ds *appsv1.DaemonSet) {
				sm := objectOf[*monv1.ServiceMonitor](t, objs)
				checkServiceMonitor(t, sm, objectOf[*corev1.Service](t, objs))
				if sm.Labels["release"] != "kube-prometheus-stack" {
					t.Errorf("ServiceMonitor labels %v lack the release label", sm.Labels)
				}
				checkPrometheusRule(t, objectOf[*monv1.PrometheusRule](t, objs))
				var dash *corev1.ConfigMap
				for _, cm := range objectsOf[*corev1.ConfigMap](objs) {
					if _, ok := cm.Data["gpu-plugin.json"]; ok {
						dash = cm
					}
				}
				if dash == nil {
					t.Fatal("no dashboard ConfigMap")
				}
				if dash.Namespace != "monitoring" || dash.Labels["grafana_dashboard"] != "1" {
					t.Errorf("dashboard ConfigMap in %q with labels %v, want monitoring and grafana_dashboard=1", dash.Namespace, dash.Labels)
				}
				if !jsonEqual(t, dash.Data["gpu-plugin.json"], string(readFile(t, DashboardFile))) {
					t.Error("the dashboard ConfigMap differs from files/dashboard.json")
				}
				for _, want := range []string{"ServiceMonitor gpu-plugin", "PrometheusRule gpu-plugin", "ConfigMap gpu-plugin-dashboard"} {
					if !strings.Contains(r.Notes, want) {
						t.Errorf("NOTES.txt does not mention %s:\n%s", want, r.Notes)
					}
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, err := RenderChart(chartDir(), values(t, tc.values))
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			if !slices.Equal(r.Kinds(), tc.kinds) {
				t.Errorf("rendered kinds %v, want %v", r.Kinds(), tc.kinds)
			}
			objs := decodeAll(t, r.Docs)
			ds := objectOf[*appsv1.DaemonSet](t, objs)
			p := tc.policy
			if p.driverRoot == "" {
				p.driverRoot = "/"
			}
			if p.metricsPort == 0 {
				p.metricsPort = 9400
			}
			p.rawDaemonSet = r.Find("DaemonSet").Content
			checkDaemonSetPolicy(t, ds, p)
			checkService(t, objectOf[*corev1.Service](t, objs), ds, p.metricsPort)
			checkNotes(t, r.Notes)
			for _, o := range objs {
				if o.Meta.Namespace == "" && !clusterScoped[o.Doc.Kind] {
					t.Errorf("%s %s has no namespace", o.Doc.Kind, o.Doc.Name)
				}
			}
			if tc.check != nil {
				tc.check(t, r, objs, ds)
			}
		})
	}
}

// clusterScoped are the kinds the chart renders without a namespace.
var clusterScoped = map[string]bool{
	"ClusterRole": true, "ClusterRoleBinding": true,
	"ValidatingAdmissionPolicy": true, "ValidatingAdmissionPolicyBinding": true,
	"DeviceClass": true,
}

// TestChartRejectsContradictoryValues: each mistake fails the render with a
// message that names the values at fault.
func TestChartRejectsContradictoryValues(t *testing.T) {
	for _, tc := range []struct{ name, values, want string }{
		{"unknown MIG strategy", "migStrategy: mixd", "migStrategy"},
		{"non-boolean failOnInitError", "failOnInitError: maybe", "failOnInitError"},
		{"sharing with an existing ConfigMap", "config: {existingConfigMap: x}\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}", "config.existingConfigMap"},
		{"sharing twice", "config: {inline: \"version: v1\\nsharing: {}\\n\"}\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}", "sharing"},
		{"TLS in the web config without tls", "webConfig: {config: \"tls_server_config: {}\"}", "webConfig.tls"},
		{"basic auth in the web config without basicAuth", "webConfig: {config: \"basic_auth_users: {}\"}", "webConfig.basicAuth"},
		{"tls without a web config", "webConfig: {tls: true}", "webConfig.config"},
		{"two web configs", "webConfig: {config: \"x: 1\", existingSecret: s}", "webConfig.existingSecret"},
		{"node health taint without the condition", "nodeHealth: {taint: true}", "nodeHealth.condition"},
		{"per-pod DCGM series without per-pod accounting", "perPodUsage: {dcgmSeries: true}", "perPodUsage.enabled"},
		{"virtual GPUs without per-pod accounting", "perPodUsage: {virtualGPUs: true}", "perPodUsage.virtualGPUs needs perPodUsage.enabled"},
		{"per-node configs with an existing ConfigMap", "config: {existingConfigMap: x, map: {a: \"version: v1\"}}", "config.existingConfigMap"},
		{"per-node configs with sharing", "config: {map: {a: \"version: v1\"}}\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}", "sharing"},
		{"a default that is not in the map", "config: {map: {a: \"version: v1\"}, default: b}", "config.default"},
		{"misspelt top-level value", "nodeSelecter: {a: b}", "nodeSelecter"},
		{"wrong type", "metrics: {port: \"9400\"}", "port"},
	} {
		t.Run(tc.name, func(t *testing.T) { requireRefused(t, tc.values, tc.want) })
	}
}

// requireRefused renders the chart with values and requires an error
// that names want. The schema names a value by its path (/dra/mode), the
// template's checks by its key (dra.mode): both read as the key.
func requireRefused(t *testing.T, vals, want string) {
	t.Helper()
	_, err := RenderChart(chartDir(), values(t, vals))
	if err == nil {
		t.Fatalf("values %q rendered without error", vals)
	}
	if msg := strings.ReplaceAll(err.Error(), "/", "."); !strings.Contains(msg, want) {
		t.Errorf("error %q does not name %q", err, want)
	}
}

// TestChartLint runs Helm's own chart linter (what `helm lint` checks)
// under the defaults, with the monitoring objects on, with MPS on and with
// DRA on (dra.mode dra and split); warnings fail.
func TestChartLint(t *testing.T) {
	for name, vals := range map[string]map[string]any{
		"defaults":   nil,
		"monitoring": MonitoringValues(),
		"mps":        {"mps": map[string]any{"enabled": true}},
		"dra":        DRAValues(),
		"dra split":  {"dra": map[string]any{"mode": "split", "devices": []any{"0"}}},
	} {
		t.Run(name, func(t *testing.T) {
			res := lint.AllWithKubeVersion(chartDir(), vals, ReleaseNamespace, nil)
			for _, m := range res.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("helm lint: %s", m)
				}
			}
		})
	}
}

// TestStaticManifestMatchesChart: the static manifests are the chart's
// renders, byte for byte, and their objects equal the chart's default
// objects except for the Helm-only labels.
func TestStaticManifestMatchesChart(t *testing.T) {
	files, err := StaticFiles(RepoRoot())
	if err != nil {
		t.Fatal(err)
	}
	for rel, want := range files {
		if got := readFile(t, rel); !bytes.Equal(got, want) {
			t.Errorf("%s is not the chart's current render: run `make manifests`", rel)
		}
	}

	docs, err := splitYAMLFile(filepath.Join(RepoRoot(), StaticManifest))
	if err != nil {
		t.Fatal(err)
	}
	static := decodeAll(t, docs)
	r, err := RenderChart(chartDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	chart := decodeAll(t, r.Docs)
	if len(static) != len(chart) {
		t.Fatalf("static manifest has %d objects, the chart's default render %d", len(static), len(chart))
	}
	for i := range chart {
		for _, k := range []string{"helm.sh/chart", "app.kubernetes.io/managed-by"} {
			delete(chart[i].Meta.Labels, k)
		}
		if !reflect.DeepEqual(static[i].Obj, chart[i].Obj) {
			a, _ := json.MarshalIndent(static[i].Obj, "", " ")
			b, _ := json.MarshalIndent(chart[i].Obj, "", " ")
			t.Errorf("object %d (%s %s) differs between the static manifest and the chart:\nstatic %s\nchart  %s", i, chart[i].Doc.Kind, chart[i].Doc.Name, a, b)
		}
	}
	ds := objectOf[*appsv1.DaemonSet](t, static)
	checkDaemonSetPolicy(t, ds, policy{driverRoot: "/", metricsPort: 9400, rawDaemonSet: string(readFile(t, StaticManifest))})
	if ds.Namespace != "kube-system" {
		t.Errorf("static DaemonSet in namespace %q, want kube-system", ds.Namespace)
	}
	if got := strings.Count(string(readFile(t, StaticManifest)), "helm.sh/chart"); got != 0 {
		t.Errorf("static manifest carries %d helm.sh/chart labels", got)
	}

	mon, err := splitYAMLFile(filepath.Join(RepoRoot(), StaticMonitoring))
	if err != nil {
		t.Fatal(err)
	}
	monObjs := decodeAll(t, mon)
	checkPrometheusRule(t, objectOf[*monv1.PrometheusRule](t, monObjs))
	checkServiceMonitor(t, objectOf[*monv1.ServiceMonitor](t, monObjs), objectOf[*corev1.Service](t, static))
}

// checkConfigMapFile parses a config file from a ConfigMap with the
// daemon's own parser, and requires the comments users learn from.
func checkConfigMapFile(t *testing.T, file string, check func(*testing.T, *config.Config)) {
	t.Helper()
	c, err := config.Parse([]byte(file))
	if err != nil {
		t.Fatalf("the ConfigMap's config file does not parse: %v\n%s", err, file)
	}
	if w := c.Warnings(); len(w) > 0 {
		t.Errorf("the ConfigMap's config file has warnings: %v", w)
	}
	if strings.Count(file, "#") < 5 {
		t.Errorf("the ConfigMap's config file is not a commented example:\n%s", file)
	}
	check(t, c)
}

func checkServiceMonitor(t *testing.T, sm *monv1.ServiceMonitor, svc *corev1.Service) {
	t.Helper()
	for k, v := range sm.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("ServiceMonitor selects %s=%s, the Service has %v", k, v, svc.Labels)
		}
	}
	if sm.Spec.JobLabel != "app.kubernetes.io/name" || svc.Labels["app.kubernetes.io/name"] != "gpu-plugin" {
		t.Errorf("job label %q: the alerts select job=\"gpu-plugin\", so it must come from app.kubernetes.io/name=gpu-plugin (%v)", sm.Spec.JobLabel, svc.Labels)
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" {
		t.Fatalf("ServiceMonitor endpoints %+v, want one on port metrics", sm.Spec.Endpoints)
	}
	if ep := sm.Spec.Endpoints[0]; !ep.HonorLabels {
		t.Error("ServiceMonitor honorLabels must be true: the DCGM_* series' pod/namespace/container name the GPU's user")
	}
}

func checkPrometheusRule(t *testing.T, pr *monv1.PrometheusRule) {
	t.Helper()
	var want struct {
		Groups []monv1.RuleGroup `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(readFile(t, AlertsFile), &want); err != nil {
		t.Fatalf("%s: %v", AlertsFile, err)
	}
	if !reflect.DeepEqual(pr.Spec.Groups, want.Groups) {
		t.Errorf("the PrometheusRule's groups differ from %s", AlertsFile)
	}
}

func checkNotes(t *testing.T, notes string) {
	t.Helper()
	for _, want := range []string{"kubectl", "get pods", "kubectl describe node", "nvidia.com/gpu", `up{job="gpu-plugin"}`, "DCGM_FI_DEV_GPU_UTIL"} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt does not tell the user %q:\n%s", want, notes)
		}
	}
}

func volume(ds *appsv1.DaemonSet, name string) *corev1.Volume {
	for i, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == name {
			return &ds.Spec.Template.Spec.Volumes[i]
		}
	}
	return nil
}

func chartAppVersion(t *testing.T) string {
	t.Helper()
	md, err := chartutil.LoadChartfile(filepath.Join(chartDir(), "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	return md.AppVersion
}

func jsonEqual(t *testing.T, a, b string) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal([]byte(a), &x); err != nil {
		t.Fatalf("not JSON: %v", err)
	}
	if err := json.Unmarshal([]byte(b), &y); err != nil {
		t.Fatalf("not JSON: %v", err)
	}
	return reflect.DeepEqual(x, y)
}
