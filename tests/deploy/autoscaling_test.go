package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"text/template"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	yamlv2 "go.yaml.in/yaml/v2"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// The autoscaling examples, relative to the repository root.
const (
	AdapterConfigFile = "deployments/autoscaling/prometheus-adapter.yaml"
	HPAFile           = "deployments/autoscaling/hpa.yaml"
	ScaledObjectFile  = "deployments/autoscaling/keda-scaledobject.yaml"
)

// The per-pod custom metrics the examples promise.
var promisedCustomMetrics = []string{"gpu_utilization", "gpu_memory_used_bytes"}

// externalMetrics are metrics the examples may name although gpu-plugin does
// not emit them, by the KEDA trigger allowed to: the demand signal that
// exists while a Deployment has no pods.
var externalMetrics = map[string]string{
	"nginx_ingress_controller_requests": "requests",
}

// adapterConfig mirrors prometheus-adapter's configuration file (package
// pkg/config of sigs.k8s.io/prometheus-adapter, whose module the Go module
// proxy does not serve): the same fields and yaml tags, decoded as the
// adapter's loader does, with yaml.v2's UnmarshalStrict.
type adapterConfig struct {
	Rules         []adapterRule         `yaml:"rules"`
	ResourceRules *adapterResourceRules `yaml:"resourceRules,omitempty"`
	ExternalRules []adapterRule         `yaml:"externalRules,omitempty"`
}

type adapterRule struct {
	SeriesQuery   string                 `yaml:"seriesQuery"`
	SeriesFilters []adapterRegexFilter   `yaml:"seriesFilters"`
	Resources     adapterResourceMapping `yaml:"resources"`
	Name          adapterNameMapping     `yaml:"name"`
	MetricsQuery  string                 `yaml:"metricsQuery,omitempty"`
}

type adapterRegexFilter struct {
	Is    string `yaml:"is,omitempty"`
	IsNot string `yaml:"isNot,omitempty"`
}

type adapterResourceMapping struct {
	Template   string                          `yaml:"template,omitempty"`
	Overrides  map[string]adapterGroupResource `yaml:"overrides,omitempty"`
	Namespaced *bool                           `yaml:"namespaced,omitempty"`
}

type adapterGroupResource struct {
	Group    string `yaml:"group,omitempty"`
	Resource string `yaml:"resource"`
}

type adapterNameMapping struct {
	Matches string `yaml:"matches"`
	As      string `yaml:"as"`
}

type adapterResourceRules struct {
	CPU    adapterResourceRule `yaml:"cpu"`
	Memory adapterResourceRule `yaml:"memory"`
	Window model.Duration      `yaml:"window"`
}

type adapterResourceRule struct {
	ContainerQuery string                 `yaml:"containerQuery"`
	NodeQuery      string                 `yaml:"nodeQuery"`
	Resources      adapterResourceMapping `yaml:"resources"`
	ContainerLabel string                 `yaml:"containerLabel"`
}

// adapterQueryArgs are the metrics query template's arguments, named as the
// adapter names them (.Series, .LabelMatchers, .GroupBy, ...).
type adapterQueryArgs struct {
	Series            string
	LabelMatchers     string
	LabelValuesByName map[string]string
	GroupBy           string
	GroupBySlice      []string
}

func readAdapterConfig(t *testing.T) adapterConfig {
	t.Helper()
	var cfg adapterConfig
	if err := yamlv2.UnmarshalStrict(readFile(t, AdapterConfigFile), &cfg); err != nil {
		t.Fatalf("%s: prometheus-adapter would refuse it: %v", AdapterConfigFile, err)
	}
	return cfg
}

// adapterProblems checks what the adapter checks when it loads its rules
// (templates, regular expressions, names, resources) and what the examples
// rely on: per-pod rules over gpu-plugin's info series.
func adapterProblems(cfg adapterConfig) []string {
	var out []string
	seen := map[string]bool{}
	for i, r := range cfg.Rules {
		where := fmt.Sprintf("rules[%d]", i)
		if _, err := promqlParser.ParseMetricSelector(r.SeriesQuery); err != nil {
			out = append(out, fmt.Sprintf("%s: seriesQuery %q is not a series selector: %v", where, r.SeriesQuery, err))
		}
		for _, f := range r.SeriesFilters {
			if (f.Is == "") == (f.IsNot == "") {
				out = append(out, where+": a series filter needs exactly one of is and isNot")
			}
			if _, err := regexp.Compile(f.Is + f.IsNot); err != nil {
				out = append(out, fmt.Sprintf("%s: series filter: %v", where, err))
			}
		}
		if re, err := regexp.Compile(r.Name.Matches); err != nil {
			out = append(out, fmt.Sprintf("%s: name.matches: %v", where, err))
		} else if !re.MatchString(podInfoMetric) {
			out = append(out, fmt.Sprintf("%s: name.matches %q does not match %s", where, r.Name.Matches, podInfoMetric))
		}
		if r.Name.As == "" {
			out = append(out, where+": name.as must name the custom metric")
		} else if seen[r.Name.As] {
			out = append(out, fmt.Sprintf("%s: custom metric %s defined twice", where, r.Name.As))
		}
		seen[r.Name.As] = true
		if _, err := template.New("q").Delims("<<", ">>").Parse(r.MetricsQuery); err != nil {
			out = append(out, fmt.Sprintf("%s: metricsQuery: %v", where, err))
		}
		// The queries group by the pod label, which must map to pods, and
		// select by namespace, which must map to namespaces.
		if r.Resources.Overrides["pod"].Resource != "pod" || r.Resources.Overrides["namespace"].Resource != "namespace" {
			out = append(out, fmt.Sprintf("%s: resources.overrides must map the pod label to pods and namespace to namespaces, got %v", where, r.Resources.Overrides))
		}
	}
	for _, m := range promisedCustomMetrics {
		if !seen[m] {
			out = append(out, "no rule serves the custom metric "+m)
		}
	}
	return out
}

// podInfoMetric is the attribution series the adapter rules discover pods by.
const podInfoMetric = "gpu_plugin_pod_gpu_info"

// adapterQuery renders a rule's metrics query as prometheus-adapter does for
// a request for pods of a namespace: label matchers namespace="…" and then
// pod="…" (one pod) or pod=~"a|b" (several), grouped by the pod label.
func adapterQuery(t *testing.T, r adapterRule, namespace string, pods ...string) string {
	t.Helper()
	tmpl, err := template.New("metrics-query").Delims("<<", ">>").Parse(r.MetricsQuery)
	if err != nil {
		t.Fatal(err)
	}
	podMatcher := fmt.Sprintf("pod=%q", pods[0])
	if len(pods) > 1 {
		podMatcher = fmt.Sprintf("pod=~%q", strings.Join(pods, "|"))
	}
	args := adapterQueryArgs{
		Series:            podInfoMetric,
		LabelMatchers:     fmt.Sprintf("namespace=%q,", namespace) + podMatcher,
		LabelValuesByName: map[string]string{"namespace": namespace, "pod": strings.Join(pods, "|")},
		GroupBy:           "pod",
		GroupBySlice:      []string{"pod"},
	}
	var b bytes.Buffer
	if err := tmpl.Execute(&b, args); err != nil {
		t.Fatalf("rule %s: %v", r.Name.As, err)
	}
	return b.String()
}

// resourceMetricsAPIResources are the resources the resource metrics API
// (metrics.k8s.io, served by metrics-server) reports per container: the only
// ones a Resource or ContainerResource HPA metric can get values for.
var resourceMetricsAPIResources = []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory}

// hpaProblems applies the API server's rule for Pods metrics and what makes
// an HPA actually scale: Resource metrics only on cpu and memory, custom
// metrics that prometheus-adapter.yaml serves.
func hpaProblems(h *autoscalingv2.HorizontalPodAutoscaler, served []string) []string {
	var out []string
	toZero := h.Spec.MinReplicas != nil && *h.Spec.MinReplicas == 0
	for i, m := range h.Spec.Metrics {
		where := fmt.Sprintf("spec.metrics[%d]", i)
		var res corev1.ResourceName
		switch m.Type {
		case autoscalingv2.ObjectMetricSourceType, autoscalingv2.ExternalMetricSourceType:
			toZero = false
		case autoscalingv2.ResourceMetricSourceType:
			res = m.Resource.Name
		case autoscalingv2.ContainerResourceMetricSourceType:
			res = m.ContainerResource.Name
		case autoscalingv2.PodsMetricSourceType:
			if m.Pods.Target.Type != autoscalingv2.AverageValueMetricType || m.Pods.Target.AverageValue == nil {
				out = append(out, where+": a Pods metric takes only an AverageValue target with averageValue")
			}
			if !slices.Contains(served, m.Pods.Metric.Name) {
				out = append(out, fmt.Sprintf("%s: custom metric %s is not served by %s (it serves %v)", where, m.Pods.Metric.Name, AdapterConfigFile, served))
			}
		}
		if res != "" && !slices.Contains(resourceMetricsAPIResources, res) {
			out = append(out, fmt.Sprintf("%s: %s metric %s: the resource metrics API serves only cpu and memory, so the HPA controller never gets a value (FailedGetResourceMetric) and never scales on it", where, m.Type, res))
		}
	}
	if toZero {
		out = append(out, "minReplicas 0 needs an Object or External metric (the API server refuses it otherwise): use KEDA to scale to zero")
	}
	return out
}

func readHPA(t *testing.T, doc Doc) *autoscalingv2.HorizontalPodAutoscaler {
	t.Helper()
	o, err := decodeStrict(doc)
	if err != nil {
		t.Fatal(err)
	}
	h, ok := o.Obj.(*autoscalingv2.HorizontalPodAutoscaler)
	if !ok {
		t.Fatalf("%s: %T, want a HorizontalPodAutoscaler", doc.Source, o.Obj)
	}
	return h
}

func onlyDoc(t *testing.T, rel string) Doc {
	t.Helper()
	docs, err := splitYAMLFile(filepath.Join(RepoRoot(), rel))
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) != 1 {
		t.Fatalf("%s holds %d objects, want 1", rel, len(docs))
	}
	return docs[0]
}

// scaledObject mirrors KEDA's ScaledObject (keda.sh/v1alpha1, v2.21) as far
// as its schema goes, for strict decoding; the CRD check validates the rest.
type scaledObject struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		ScaleTargetRef struct {
			APIVersion             string `json:"apiVersion,omitempty"`
			Kind                   string `json:"kind,omitempty"`
			Name                   string `json:"name"`
			EnvSourceContainerName string `json:"envSourceContainerName,omitempty"`
		} `json:"scaleTargetRef"`
		PollingInterval       *int32 `json:"pollingInterval,omitempty"`
		InitialCooldownPeriod *int32 `json:"initialCooldownPeriod,omitempty"`
		CooldownPeriod        *int32 `json:"cooldownPeriod,omitempty"`
		IdleReplicaCount      *int32 `json:"idleReplicaCount,omitempty"`
		MinReplicaCount       *int32 `json:"minReplicaCount,omitempty"`
		MaxReplicaCount       *int32 `json:"maxReplicaCount,omitempty"`
		Advanced              *struct {
			HorizontalPodAutoscalerConfig *struct {
				Name     string                                         `json:"name,omitempty"`
				Behavior *autoscalingv2.HorizontalPodAutoscalerBehavior `json:"behavior,omitempty"`
			} `json:"horizontalPodAutoscalerConfig,omitempty"`
			RestoreToOriginalReplicaCount bool `json:"restoreToOriginalReplicaCount,omitempty"`
		} `json:"advanced,omitempty"`
		Fallback *struct {
			FailureThreshold int32  `json:"failureThreshold"`
			Replicas         int32  `json:"replicas"`
			Behavior         string `json:"behavior,omitempty"`
		} `json:"fallback,omitempty"`
		Triggers []kedaTrigger `json:"triggers"`
	} `json:"spec"`
}

type kedaTrigger struct {
	Type              string                         `json:"type"`
	Name              string                         `json:"name,omitempty"`
	UseCachedMetrics  bool                           `json:"useCachedMetrics,omitempty"`
	MetricType        autoscalingv2.MetricTargetType `json:"metricType,omitempty"`
	Metadata          map[string]string              `json:"metadata"`
	AuthenticationRef *struct {
		Name string `json:"name"`
		Kind string `json:"kind,omitempty"`
	} `json:"authenticationRef,omitempty"`
}

// kedaPrometheusMetadata mirrors the trigger metadata KEDA's Prometheus
// scaler reads (prometheusMetadata's `keda:"name=…"` keys in
// pkg/scalers/prometheus_scaler.go, v2.21; authentication keys left out).
type kedaPrometheusMetadata struct {
	ServerAddress       string `json:"serverAddress"`
	Query               string `json:"query"`
	QueryParameters     string `json:"queryParameters,omitempty"`
	Threshold           string `json:"threshold"`
	ActivationThreshold string `json:"activationThreshold,omitempty"`
	Namespace           string `json:"namespace,omitempty"`
	CustomHeaders       string `json:"customHeaders,omitempty"`
	IgnoreNullValues    string `json:"ignoreNullValues,omitempty"`
	UnsafeSSL           string `json:"unsafeSsl,omitempty"`
	AWSRegion           string `json:"awsRegion,omitempty"`
	Timeout             string `json:"timeout,omitempty"`
	IdentityOwner       string `json:"identityOwner,omitempty"`
}

// strictJSON decodes JSON into v, refusing unknown, duplicate or wrongly
// cased fields.
func strictJSON(js []byte, v any) error {
	strict, err := kjson.UnmarshalStrict(js, v, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err == nil && len(strict) > 0 {
		err = errors.Join(strict...)
	}
	return err
}

func readScaledObject(t *testing.T, doc Doc) *scaledObject {
	t.Helper()
	js, err := yaml.YAMLToJSONStrict([]byte(doc.Content))
	if err != nil {
		t.Fatalf("%s: %v", doc.Source, err)
	}
	var so scaledObject
	if err := strictJSON(js, &so); err != nil {
		t.Fatalf("%s: strict decoding into KEDA's ScaledObject: %v", doc.Source, err)
	}
	return &so
}

// prometheusTrigger decodes a trigger's metadata strictly and checks the
// values KEDA parses.
func prometheusTrigger(tr kedaTrigger) (kedaPrometheusMetadata, []string) {
	var md kedaPrometheusMetadata
	var out []string
	js, _ := json.Marshal(tr.Metadata)
	if err := strictJSON(js, &md); err != nil {
		return md, []string{fmt.Sprintf("trigger %s: metadata KEDA's Prometheus scaler does not read: %v", tr.Name, err)}
	}
	if u, err := url.Parse(md.ServerAddress); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		out = append(out, fmt.Sprintf("trigger %s: serverAddress %q is not an http(s) URL", tr.Name, md.ServerAddress))
	}
	if v, err := strconv.ParseFloat(md.Threshold, 64); err != nil || v <= 0 {
		out = append(out, fmt.Sprintf("trigger %s: threshold %q must be a positive number", tr.Name, md.Threshold))
	}
	if _, err := strconv.ParseFloat(md.ActivationThreshold, 64); md.ActivationThreshold != "" && err != nil {
		out = append(out, fmt.Sprintf("trigger %s: activationThreshold %q is not a number", tr.Name, md.ActivationThreshold))
	}
	if _, err := strconv.ParseBool(md.IgnoreNullValues); md.IgnoreNullValues != "" && err != nil {
		out = append(out, fmt.Sprintf("trigger %s: ignoreNullValues %q is not a boolean", tr.Name, md.IgnoreNullValues))
	}
	// KEDA applies fallback replicas only to AverageValue metrics.
	if tr.MetricType != autoscalingv2.AverageValueMetricType {
		out = append(out, fmt.Sprintf("trigger %s: metricType %q, want AverageValue (per-replica, as the HPA's Pods metric; fallback needs it)", tr.Name, tr.MetricType))
	}
	return md, out
}

// kedaTriggerByName returns a Prometheus trigger's metadata.
func kedaTriggerByName(t *testing.T, so *scaledObject, name string) kedaPrometheusMetadata {
	t.Helper()
	for _, tr := range so.Spec.Triggers {
		if tr.Name == name {
			md, problems := prometheusTrigger(tr)
			if len(problems) > 0 {
				t.Fatal(strings.Join(problems, "\n"))
			}
			return md
		}
	}
	t.Fatalf("%s has no trigger named %s", ScaledObjectFile, name)
	return kedaPrometheusMetadata{}
}

// TestAutoscalingManifests: the HPA decodes strictly into autoscaling/v2 and
// scales on metrics that exist; the adapter config loads as the adapter
// loads it; the ScaledObject passes KEDA's CRD schema as the API server
// applies it, its triggers' metadata is what KEDA's Prometheus scaler reads,
// and it scales the same Deployment on the same figure as the HPA.
func TestAutoscalingManifests(t *testing.T) {
	cfg := readAdapterConfig(t)
	if p := adapterProblems(cfg); len(p) > 0 {
		t.Errorf("%s:\n%s", AdapterConfigFile, strings.Join(p, "\n"))
	}
	var served []string
	for _, r := range cfg.Rules {
		served = append(served, r.Name.As)
	}

	hpaDoc := onlyDoc(t, HPAFile)
	hpa := readHPA(t, hpaDoc)
	if p := hpaProblems(hpa, served); len(p) > 0 {
		t.Errorf("%s:\n%s", HPAFile, strings.Join(p, "\n"))
	}
	if len(hpa.Spec.Metrics) == 0 {
		t.Errorf("%s has no metric", HPAFile)
	}

	soDoc := onlyDoc(t, ScaledObjectFile)
	t.Run("KEDA CRD schema", func(t *testing.T) {
		v, err := newCRDValidator(kedaScaledObjectCRD(t), "v1alpha1")
		if err != nil {
			t.Fatal(err)
		}
		if p := v.validate(soDoc.Content); len(p) > 0 {
			t.Errorf("%s against KEDA %s's ScaledObject schema:\n%s", ScaledObjectFile, kedaVersion, strings.Join(p, "\n"))
		}
	})

	so := readScaledObject(t, soDoc)
	names := map[string]bool{}
	for _, tr := range so.Spec.Triggers {
		if tr.Type != "prometheus" {
			t.Errorf("trigger %s: type %s, want prometheus", tr.Name, tr.Type)
			continue
		}
		if tr.Name == "" || names[tr.Name] {
			t.Errorf("trigger names must be set and unique (KEDA's webhook refuses duplicates): %q", tr.Name)
		}
		names[tr.Name] = true
		if _, p := prometheusTrigger(tr); len(p) > 0 {
			t.Error(strings.Join(p, "\n"))
		}
	}
	if so.Spec.MinReplicaCount == nil || *so.Spec.MinReplicaCount != 0 {
		t.Errorf("%s: minReplicaCount %v, want 0 (the example scales to zero)", ScaledObjectFile, so.Spec.MinReplicaCount)
	}
	if so.Spec.ScaleTargetRef.Name != hpa.Spec.ScaleTargetRef.Name || so.Metadata.Namespace != hpa.Namespace {
		t.Errorf("the ScaledObject scales %s/%s, the HPA %s/%s: the two recipes must show the same Deployment",
			so.Metadata.Namespace, so.Spec.ScaleTargetRef.Name, hpa.Namespace, hpa.Spec.ScaleTargetRef.Name)
	}
	// Same figure, same target: KEDA's threshold is the HPA's averageValue.
	gpu := kedaTriggerByName(t, so, "gpu-utilization")
	for _, m := range hpa.Spec.Metrics {
		if m.Type == autoscalingv2.PodsMetricSourceType && m.Pods.Metric.Name == "gpu_utilization" {
			if th, _ := strconv.ParseFloat(gpu.Threshold, 64); m.Pods.Target.AverageValue.AsApproximateFloat64() != th {
				t.Errorf("KEDA threshold %s differs from the HPA's averageValue %s for gpu_utilization", gpu.Threshold, m.Pods.Target.AverageValue)
			}
		}
	}
	if gpu.IgnoreNullValues != "false" {
		t.Errorf("trigger gpu-utilization: ignoreNullValues %q, want \"false\" (no exporter must be an error, not idle)", gpu.IgnoreNullValues)
	}
}

// TestAutoscalingLintRejects proves the HPA and adapter checks are not
// vacuous.
func TestAutoscalingLintRejects(t *testing.T) {
	guide := &autoscalingv2.HorizontalPodAutoscaler{Spec: autoscalingv2.HorizontalPodAutoscalerSpec{Metrics: []autoscalingv2.MetricSpec{{
		Type: autoscalingv2.ResourceMetricSourceType,
		Resource: &autoscalingv2.ResourceMetricSource{Name: "nvidia.com/gpu",
			Target: autoscalingv2.MetricTarget{Type: autoscalingv2.UtilizationMetricType}}}}}}
	if p := hpaProblems(guide, nil); len(p) != 1 || !strings.Contains(p[0], "nvidia.com/gpu") {
		t.Errorf("a Resource metric on nvidia.com/gpu must be flagged, got %v", p)
	}
	unknown := &autoscalingv2.HorizontalPodAutoscaler{Spec: autoscalingv2.HorizontalPodAutoscalerSpec{Metrics: []autoscalingv2.MetricSpec{{
		Type: autoscalingv2.PodsMetricSourceType,
		Pods: &autoscalingv2.PodsMetricSource{Metric: autoscalingv2.MetricIdentifier{Name: "gpu_util"},
			Target: autoscalingv2.MetricTarget{Type: autoscalingv2.UtilizationMetricType}}}}}}
	if p := hpaProblems(unknown, promisedCustomMetrics); len(p) != 2 {
		t.Errorf("a Pods metric with a Utilization target on an unserved metric must give 2 problems, got %v", p)
	}
	zero := int32(0)
	pods := unknown.DeepCopy()
	pods.Spec.MinReplicas = &zero
	if p := hpaProblems(pods, promisedCustomMetrics); len(p) != 3 || !strings.Contains(p[2], "minReplicas 0") {
		t.Errorf("minReplicas 0 with only a Pods metric must be flagged, got %v", p)
	}
	var cfg adapterConfig
	if err := yamlv2.UnmarshalStrict([]byte("rules:\n- seriesQuery: x\n  metricQuery: y\n"), &cfg); err == nil {
		t.Error("the adapter config decoder accepted the misspelt field metricQuery")
	}
	bad := adapterConfig{Rules: []adapterRule{{SeriesQuery: "x{", Name: adapterNameMapping{Matches: "(", As: ""}, MetricsQuery: "<<.Series"}}}
	if p := adapterProblems(bad); len(p) < 5 {
		t.Errorf("a broken adapter rule must give several problems, got %v", p)
	}
}

// prometheusTargetLabels are added by Prometheus to every scraped series.
var prometheusTargetLabels = []string{"job", "instance"}

// selectorFamilies lists the metric names of the selectors under node.
func selectorFamilies(node parser.Node) []string {
	var out []string
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			out = append(out, selectorName(vs))
		}
		return nil
	})
	return out
}

func selectorName(vs *parser.VectorSelector) string {
	if vs.Name != "" {
		return vs.Name
	}
	for _, m := range vs.LabelMatchers {
		if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
			return m.Value
		}
	}
	return ""
}

// labelProblems checks that every label an expression names is one the
// exporter puts on the series it works on: a selector's matchers on that
// family, grouping and matching labels on some family beneath them
// (vector matching on a label one side lacks is legitimate: it is empty
// there). fams maps family names to their label names.
func labelProblems(expr string, fams map[string]map[string]bool) []string {
	e, err := promqlParser.ParseExpr(expr)
	if err != nil {
		return []string{err.Error()}
	}
	var out []string
	onSome := func(families []string, label string) bool {
		if slices.Contains(prometheusTargetLabels, label) {
			return true
		}
		for _, f := range families {
			if fams[f][label] {
				return true
			}
		}
		return false
	}
	check := func(what string, families []string, ls []string) {
		for _, l := range ls {
			if !onSome(families, l) {
				out = append(out, fmt.Sprintf("%s names label %s, which the exporter puts on none of %v", what, l, families))
			}
		}
	}
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		switch n := n.(type) {
		case *parser.VectorSelector:
			var ls []string
			for _, m := range n.LabelMatchers {
				if m.Name != labels.MetricName {
					ls = append(ls, m.Name)
				}
			}
			check("selector "+n.String(), []string{selectorName(n)}, ls)
		case *parser.AggregateExpr:
			check(n.Op.String()+" by/without", selectorFamilies(n.Expr), n.Grouping)
		case *parser.BinaryExpr:
			if n.VectorMatching != nil {
				fs := append(selectorFamilies(n.LHS), selectorFamilies(n.RHS)...)
				check("vector matching on/ignoring/group", fs, append(slices.Clone(n.VectorMatching.MatchingLabels), n.VectorMatching.Include...))
			}
		}
		return nil
	})
	return out
}

// autoscalingQueries is every PromQL query of the examples, the adapter's
// rendered for a request for two pods (as it renders them).
func autoscalingQueries(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, r := range readAdapterConfig(t).Rules {
		out["prometheus-adapter seriesQuery of "+r.Name.As] = r.SeriesQuery
		out["prometheus-adapter metricsQuery of "+r.Name.As] = adapterQuery(t, r, "llm", "vllm-a", "vllm-b")
	}
	so := readScaledObject(t, onlyDoc(t, ScaledObjectFile))
	for _, tr := range so.Spec.Triggers {
		out["KEDA trigger "+tr.Name] = tr.Metadata["query"]
	}
	return out
}

// TestAutoscalingQueries: every query parses with Prometheus' parser and
// names only metrics the exporter emits (the KEDA wake-up trigger may name
// its documented external metric) and labels it puts on them, as served by
// the daemon on the scenario's simulated node.
func TestAutoscalingQueries(t *testing.T) {
	emitted := exportedMetrics(t)
	fams := startAutoscaleNode(t).familyLabels(t)
	queries := autoscalingQueries(t)
	keys := make([]string, 0, len(queries))
	for k := range queries {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, where := range keys {
		expr := queries[where]
		names, err := metricNames(expr)
		if err != nil {
			t.Errorf("%s: PromQL does not parse: %v\n%s", where, err, expr)
			continue
		}
		external := false
		for _, n := range names {
			if trig, ok := externalMetrics[n]; ok {
				external = true
				if where != "KEDA trigger "+trig {
					t.Errorf("%s names %s, allowed only in KEDA trigger %s", where, n, trig)
				}
			}
		}
		if !external {
			checkExpr(t, where, expr, emitted)
			for _, p := range labelProblems(expr, fams) {
				t.Errorf("%s: %s", where, p)
			}
		}
		t.Logf("%s: %d metric(s) %v", where, len(names), names)
	}
	if !strings.Contains(strings.Join(keys, " "), "KEDA trigger gpu-utilization") {
		t.Errorf("no KEDA trigger gpu-utilization among %v", keys)
	}
}

// TestAutoscalingLabelCheckRejects proves the label check is not vacuous.
func TestAutoscalingLabelCheckRejects(t *testing.T) {
	fams := map[string]map[string]bool{"a": {"UUID": true}, "b": {"pod": true, "UUID": true}}
	for expr, bad := range map[string]int{
		`a{pod="x"}`:                       1,
		`sum by (pod) (a)`:                 1,
		`a * on (UUID) group_left (pod) b`: 0,
		`a * on (GPU) b`:                   1,
		`sum by (UUID, job) (a)`:           0,
	} {
		if p := labelProblems(expr, fams); len(p) != bad {
			t.Errorf("labelProblems(%q) = %v, want %d problem(s)", expr, p, bad)
		}
	}
}

// TestReadmeAutoscaling: docs/autoscaling.md's side-by-side shows the guide's HPA, which
// the API server accepts and the check above flags, and the working one,
// which is hpa.yaml's.
func TestReadmeAutoscaling(t *testing.T) {
	section := docSection(t, AutoscalingDoc, "autoscaling-side-by-side")
	blocks := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllStringSubmatch(section, -1)
	if len(blocks) != 2 {
		t.Fatalf("%s's autoscaling side-by-side has %d yaml blocks, want 2 (the guide's HPA, ours)", AutoscalingDoc, len(blocks))
	}
	guide := readHPA(t, Doc{Source: AutoscalingDoc + " guide HPA", Content: blocks[0][1]})
	if p := hpaProblems(guide, nil); len(p) == 0 || !strings.Contains(strings.Join(p, " "), "nvidia.com/gpu") {
		t.Errorf("the side-by-side's guide HPA should use a Resource metric on nvidia.com/gpu; problems found: %v", p)
	}
	ours := readHPA(t, Doc{Source: AutoscalingDoc + " working HPA", Content: blocks[1][1]})
	file := readHPA(t, onlyDoc(t, HPAFile))
	if !apiequality.Semantic.DeepEqual(ours.Spec.Metrics, file.Spec.Metrics) || ours.Spec.ScaleTargetRef != file.Spec.ScaleTargetRef {
		t.Errorf("the side-by-side's working HPA differs from %s in its metrics or target", HPAFile)
	}
	if guide.Spec.ScaleTargetRef != ours.Spec.ScaleTargetRef {
		t.Error("the side-by-side's two HPAs should scale the same Deployment")
	}
	for _, f := range []string{AdapterConfigFile, HPAFile, ScaledObjectFile} {
		if !strings.Contains(string(readFile(t, AutoscalingDoc)), f) {
			t.Errorf("%s does not name %s", AutoscalingDoc, f)
		}
	}
}
