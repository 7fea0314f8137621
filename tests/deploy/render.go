package deploy

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/releaseutil"
)

// Release the static manifests are rendered as: `kubectl create -f` installs
// exactly what `helm install gpu-plugin deployments/helm/gpu-plugin -n
// kube-system` would.
const (
	ReleaseName      = "gpu-plugin"
	ReleaseNamespace = "kube-system"
)

// Paths of the install assets, relative to the repository root.
const (
	ChartDir          = "deployments/helm/gpu-plugin"
	StaticManifest    = "deployments/static/gpu-plugin.yaml"
	StaticMonitoring  = "deployments/static/monitoring.yaml"
	AlertsFile        = "deployments/helm/gpu-plugin/files/alerts.yaml"
	AlertsTestFile    = "deployments/monitoring/alerts_test.yaml"
	DashboardFile     = "deployments/helm/gpu-plugin/files/dashboard.json"
	DockerfilePath    = "Dockerfile"
	DockerignorePath  = ".dockerignore"
	ReadmePath        = "README.md"
	helmOnlyLabelKeys = "helm.sh/chart:|app.kubernetes.io/managed-by:"
)

// The docs pages whose sections between <!-- name:begin/end --> markers the
// tests read, relative to the repository root.
const (
	ConfigurationDoc = "docs/configuration.md" // the flags table
	InstallDoc       = "docs/install.md"       // the host paths table
	AutoscalingDoc   = "docs/autoscaling.md"   // the HPA side-by-side
)

// MetricsDocs are the pages that document the metric families: the telemetry
// reference, health's families and live reload's.
func MetricsDocs() []string {
	return []string{"docs/telemetry.md", "docs/health.md", "docs/configuration.md"}
}

// RepoRoot is the repository's root directory, found from this file's place
// (tests/deploy), so tests and the generator work from any directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Doc is one rendered Kubernetes object.
type Doc struct {
	Source  string // template file, e.g. gpu-plugin/templates/daemonset.yaml
	Kind    string
	Name    string
	Content string // the object's YAML, comments included
}

// Rendered is a chart render: the objects in install order, and NOTES.txt.
type Rendered struct {
	Docs  []Doc
	Notes string
}

// Find returns the rendered object of that kind, or nil.
func (r *Rendered) Find(kind string) *Doc {
	for i := range r.Docs {
		if r.Docs[i].Kind == kind {
			return &r.Docs[i]
		}
	}
	return nil
}

// Kinds lists the rendered objects' kinds in order.
func (r *Rendered) Kinds() []string {
	var out []string
	for _, d := range r.Docs {
		out = append(out, d.Kind)
	}
	return out
}

// RenderChart renders the chart at dir with the Helm library as `helm
// template` does: values merged over values.yaml and checked against
// values.schema.json, templates rendered, objects split and put in Helm's
// install order.
func RenderChart(dir string, values map[string]any) (*Rendered, error) {
	return renderChart(dir, values, chartutil.DefaultCapabilities.Copy())
}

// RenderChartWithAPIVersions renders as RenderChart does for a cluster
// that serves only these API versions (`helm template --api-versions`
// replacing, not adding to, Helm's default set).
func RenderChartWithAPIVersions(dir string, values map[string]any, apiVersions []string) (*Rendered, error) {
	caps := chartutil.DefaultCapabilities.Copy()
	caps.APIVersions = chartutil.VersionSet(apiVersions)
	return renderChart(dir, values, caps)
}

func renderChart(dir string, values map[string]any, caps *chartutil.Capabilities) (*Rendered, error) {
	ch, err := loader.LoadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("loading chart %s: %w", dir, err)
	}
	if values == nil {
		values = map[string]any{}
	}
	opts := chartutil.ReleaseOptions{Name: ReleaseName, Namespace: ReleaseNamespace, Revision: 1, IsInstall: true}
	rv, err := chartutil.ToRenderValues(ch, values, opts, caps)
	if err != nil {
		return nil, fmt.Errorf("values: %w", err)
	}
	files, err := engine.Render(ch, rv)
	if err != nil {
		return nil, err
	}
	out := &Rendered{}
	for name, content := range files {
		if strings.HasSuffix(name, "NOTES.txt") {
			out.Notes = content
			delete(files, name)
		}
	}
	hooks, manifests, err := releaseutil.SortManifests(files, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("splitting the rendered manifests: %w", err)
	}
	if len(hooks) > 0 {
		return nil, fmt.Errorf("the chart has %d hooks; the static manifest cannot express them", len(hooks))
	}
	for _, m := range manifests {
		if m.Head == nil {
			continue
		}
		name := ""
		if m.Head.Metadata != nil {
			name = m.Head.Metadata.Name
		}
		out.Docs = append(out.Docs, Doc{Source: m.Name, Kind: m.Head.Kind, Name: name, Content: strings.TrimSpace(m.Content)})
	}
	return out, nil
}

// MonitoringValues switches on every monitoring object.
func MonitoringValues() map[string]any {
	return map[string]any{
		"serviceMonitor": map[string]any{"enabled": true},
		"prometheusRule": map[string]any{"enabled": true},
		"dashboard":      map[string]any{"enabled": true},
	}
}

var monitoringKinds = map[string]bool{"ServiceMonitor": true, "PrometheusRule": true}

func isMonitoring(d Doc) bool {
	return monitoringKinds[d.Kind] || strings.HasSuffix(d.Source, "/dashboard.yaml")
}

// StaticFiles renders the two static manifests from the chart: the
// DaemonSet and its companions under the default values, and the monitoring
// objects with their toggles on. Keys are paths relative to the repository.
func StaticFiles(root string) (map[string][]byte, error) {
	chart := filepath.Join(root, ChartDir)
	def, err := RenderChart(chart, nil)
	if err != nil {
		return nil, err
	}
	mon, err := RenderChart(chart, MonitoringValues())
	if err != nil {
		return nil, err
	}
	dra, err := draStaticSection(def, chart)
	if err != nil {
		return nil, err
	}
	var monDocs []Doc
	for _, d := range mon.Docs {
		if isMonitoring(d) {
			monDocs = append(monDocs, d)
		}
	}
	return map[string][]byte{
		StaticManifest: append(staticText(def.Docs, `# gpu-plugin: the GPU device plugin and telemetry DaemonSet, for
#   kubectl create -f deployments/static/gpu-plugin.yaml
# It installs into kube-system: a ServiceAccount, the config ConfigMap (edit it in place; the
# daemon applies changes live), a headless metrics Service on port 9400 and the DaemonSet.
# DRA (ResourceClaims, NVIDIA's DRA driver's DeviceClasses) instead of or beside the device
# plugin: see the end of this file.
`), dra...),
		StaticMonitoring: staticText(monDocs, `# gpu-plugin's monitoring objects, for clusters running the Prometheus Operator and Grafana's
# dashboard sidecar (kube-prometheus-stack):
#   kubectl create -f deployments/static/monitoring.yaml
# A ServiceMonitor, the alerts (PrometheusRule) and the dashboard (ConfigMap labelled
# grafana_dashboard: "1"). Without the operator: scrape port 9400 of the pods yourself, load
# deployments/helm/gpu-plugin/files/alerts.yaml as a rule file and import
# deployments/helm/gpu-plugin/files/dashboard.json into Grafana.
`),
	}, nil
}

// staticText joins rendered objects into a kubectl-ready file, without the
// labels that only make sense under Helm.
func staticText(docs []Doc, header string) []byte {
	var b bytes.Buffer
	b.WriteString(header)
	b.WriteString(`#
# GENERATED by "make manifests" from the Helm chart deployments/helm/gpu-plugin with its default
# values (release "gpu-plugin", namespace kube-system). Edit the chart, then regenerate; a test
# fails while this file and the chart disagree.
`)
	for _, d := range docs {
		fmt.Fprintf(&b, "---\n# Source: %s\n", d.Source)
		for _, line := range strings.Split(d.Content, "\n") {
			if isHelmOnlyLabel(line) {
				continue
			}
			b.WriteString(strings.TrimRight(line, " \t"))
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

func isHelmOnlyLabel(line string) bool {
	t := strings.TrimSpace(line)
	for _, k := range strings.Split(helmOnlyLabelKeys, "|") {
		if strings.HasPrefix(t, k) {
			return true
		}
	}
	return false
}

// WriteStatic regenerates the static manifests in the repository.
func WriteStatic(root string) ([]string, error) {
	files, err := StaticFiles(root)
	if err != nil {
		return nil, err
	}
	var written []string
	for rel, content := range files {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(p, content, 0o644); err != nil {
			return nil, err
		}
		written = append(written, rel)
	}
	return written, nil
}
