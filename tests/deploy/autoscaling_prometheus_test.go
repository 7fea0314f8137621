package deploy

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

// promWait bounds each wait for Prometheus to show a change: a scrape every
// second, plus the daemon's sampling and attribution refresh.
const promWait = 60 * time.Second

// TestAutoscalingInPrometheus evaluates the examples' queries in a real
// Prometheus scraping the whole daemon every second on the scenario's node
// (two pods on exclusive GPUs, one of them on two; two pods time-sharing
// GPU 3, one with two containers on it; one pod on a MIG device), and
// compares them with the values computed from the numbers injected through
// /sim: prometheus-adapter's per-pod queries as the adapter renders them,
// its series discovery, and KEDA's triggers, also once the Deployment has no
// pods (0) and once no exporter is scraped (no sample: an error to KEDA).
func TestAutoscalingInPrometheus(t *testing.T) {
	bin := prometheusBinary(t)
	began := time.Now()
	n := startAutoscaleNode(t)
	p := startPrometheus(t, bin, n.d.Addr())
	ready := time.Since(began)

	cfg := readAdapterConfig(t)
	so := readScaledObject(t, onlyDoc(t, ScaledObjectFile))
	util, mem := expectedPerPod(autoscalePods)
	want := map[string]map[string]float64{"gpu_utilization": util, "gpu_memory_used_bytes": mem}
	var llmPods []string
	for _, pod := range autoscalePods {
		if pod.Namespace == "llm" {
			llmPods = append(llmPods, pod.Name)
		}
	}

	// Discovery: the adapter lists the rule's series and finds every pod's
	// namespace and pod label on them.
	for _, r := range cfg.Rules {
		p.eventually(t, promWait, "adapter discovery of "+r.Name.As, func() string {
			series, err := p.series(r.SeriesQuery)
			if err != nil {
				return err.Error()
			}
			seen := map[string]bool{}
			for _, s := range series {
				if s["namespace"] == "" || s["pod"] == "" {
					return fmt.Sprintf("series without namespace or pod: %v", s)
				}
				seen[s["namespace"]+"/"+s["pod"]] = true
			}
			for _, pod := range autoscalePods {
				if !seen[pod.Namespace+"/"+pod.Name] {
					return fmt.Sprintf("%s/%s not discovered (got %v)", pod.Namespace, pod.Name, seen)
				}
			}
			return ""
		})
	}
	settled := time.Since(began)

	// Per-pod values, for all the namespace's pods at once (pod=~"a|b|…")
	// and for each pod alone (pod="a").
	for _, r := range cfg.Rules {
		exp, ok := want[r.Name.As]
		if !ok {
			t.Errorf("no expected values for the adapter's metric %s", r.Name.As)
			continue
		}
		q := adapterQuery(t, r, "llm", llmPods...)
		p.eventually(t, promWait, "adapter metric "+r.Name.As, func() string { return comparePerPod(p, q, exp) })
		for _, pod := range llmPods {
			one := map[string]float64{}
			if v, ok := exp[pod]; ok {
				one[pod] = v
			}
			if diff := comparePerPod(p, adapterQuery(t, r, "llm", pod), one); diff != "" {
				t.Errorf("adapter metric %s for pod %s alone: %s", r.Name.As, pod, diff)
			}
		}
		t.Logf("%s per pod: %s", r.Name.As, formatValues(exp))
	}

	// KEDA: the GPU trigger's one sample is the sum of gpu_utilization over
	// the pods its pod matcher selects; the request trigger, with no ingress
	// metrics here, is its vector(0).
	gpu := kedaTriggerByName(t, so, "gpu-utilization")
	requests := kedaTriggerByName(t, so, "requests")
	deployment := podMatcher(t, gpu.Query)
	var sum float64
	var members []string
	for _, pod := range autoscalePods {
		if deployment.Matches(pod.Name) {
			members = append(members, pod.Name)
			sum += util[pod.Name] // a pod without utilization (MIG only) adds nothing
		}
	}
	if len(members) < 2 {
		t.Fatalf("the KEDA query's pod matcher %s selects %v: the scenario needs the Deployment's pods", deployment, members)
	}
	p.eventually(t, promWait, "KEDA gpu-utilization", func() string { return compareOne(p, gpu.Query, &sum) })
	zero := 0.0
	if diff := compareOne(p, requests.Query, &zero); diff != "" {
		t.Errorf("KEDA requests trigger: %s", diff)
	}
	activation, _ := strconv.ParseFloat(gpu.ActivationThreshold, 64)
	t.Logf("KEDA gpu-utilization over %v: %g (active: %v, activationThreshold %s)", members, sum, sum > activation, gpu.ActivationThreshold)

	// The Deployment scaled to zero: its pods are gone, the other pod stays.
	var others []scenarioPod
	for _, pod := range autoscalePods {
		if !deployment.Matches(pod.Name) {
			others = append(others, pod)
		}
	}
	n.setPods(t, others)
	p.eventually(t, promWait, "KEDA gpu-utilization with no pod of the Deployment", func() string { return compareOne(p, gpu.Query, &zero) })

	// No exporter scraped: no sample, which KEDA (ignoreNullValues false)
	// reports as an error and answers with its fallback.
	n.stop()
	p.eventually(t, promWait, "KEDA gpu-utilization with the exporter gone", func() string { return compareOne(p, gpu.Query, nil) })
	if diff := compareOne(p, requests.Query, &zero); diff != "" {
		t.Errorf("KEDA requests trigger with the exporter gone: %s", diff)
	}
	t.Logf("daemon and Prometheus up with every pod discovered in %s (Prometheus ready after %s); whole test %s",
		settled.Round(time.Millisecond), ready.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
}

// comparePerPod evaluates a per-pod query and compares its samples, by pod
// label, with want; "" when equal.
func comparePerPod(p *promServer, q string, want map[string]float64) string {
	samples, err := p.query(q)
	if err != nil {
		return err.Error()
	}
	got := map[string]float64{}
	for _, s := range samples {
		pod := s.Labels["pod"]
		if _, dup := got[pod]; dup || pod == "" || len(s.Labels) != 1 {
			return fmt.Sprintf("want one sample per pod labelled only with pod, got %v", samples)
		}
		got[pod] = s.Value
	}
	if len(got) != len(want) {
		return fmt.Sprintf("got %s, want %s", formatValues(got), formatValues(want))
	}
	for pod, v := range want {
		if g, ok := got[pod]; !ok || !approxEqual(g, v) {
			return fmt.Sprintf("got %s, want %s", formatValues(got), formatValues(want))
		}
	}
	return ""
}

// compareOne evaluates a KEDA query, which must give exactly one sample
// equal to *want, or none when want is nil; "" when so.
func compareOne(p *promServer, q string, want *float64) string {
	samples, err := p.query(q)
	if err != nil {
		return err.Error()
	}
	switch {
	case want == nil && len(samples) == 0:
		return ""
	case want == nil:
		return fmt.Sprintf("want no sample, got %v", samples)
	case len(samples) != 1:
		return fmt.Sprintf("want exactly one sample (KEDA refuses more and, with ignoreNullValues false, none), got %v", samples)
	case !approxEqual(samples[0].Value, *want):
		return fmt.Sprintf("got %g, want %g", samples[0].Value, *want)
	}
	return ""
}

// podMatcher returns the pod matcher of the query's gpu_plugin_pod_gpu_info
// selector that has one: how the query picks the Deployment's pods.
func podMatcher(t *testing.T, q string) *labels.Matcher {
	t.Helper()
	e, err := promqlParser.ParseExpr(q)
	if err != nil {
		t.Fatal(err)
	}
	var m *labels.Matcher
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok && selectorName(vs) == podInfoMetric {
			for _, lm := range vs.LabelMatchers {
				if lm.Name == "pod" {
					m = lm
				}
			}
		}
		return nil
	})
	if m == nil {
		t.Fatalf("the KEDA query selects no pods by name:\n%s", q)
	}
	return m
}

func formatValues(m map[string]float64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s=%g", k, m[k])
	}
	return "{" + b.String() + "}"
}
