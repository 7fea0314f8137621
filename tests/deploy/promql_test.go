package deploy

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
)

// prometheusSynthesized are series Prometheus makes itself for every
// target; expressions may use them although no exporter emits them.
var prometheusSynthesized = []string{"up"}

var promqlParser = parser.NewParser(parser.Options{})

// metricNames parses a PromQL expression and returns the metric names its
// selectors name, by name or by a __name__ equality matcher.
func metricNames(expr string) ([]string, error) {
	e, err := promqlParser.ParseExpr(expr)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		if vs.Name != "" {
			seen[vs.Name] = true
		}
		for _, m := range vs.LabelMatchers {
			if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
				seen[m.Value] = true
			}
		}
		return nil
	})
	var out []string
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}

// checkExpr parses expr and requires every metric it names to be emitted by
// the exporter (or synthesised by Prometheus).
func checkExpr(t *testing.T, where, expr string, emitted Exported) {
	t.Helper()
	names, err := metricNames(expr)
	if err != nil {
		t.Errorf("%s: PromQL does not parse: %v\n%s", where, err, expr)
		return
	}
	if len(names) == 0 {
		t.Errorf("%s: names no metric: %s", where, expr)
	}
	for _, n := range names {
		if _, ok := emitted[n]; !ok && !slices.Contains(prometheusSynthesized, n) {
			t.Errorf("%s: names %s, which the exporter does not emit (TestExporterListCoversTheBasics -v lists what it does)", where, n)
		}
	}
}

// TestMetricNamesSeeSelectors guards the extractor the other tests rely on.
func TestMetricNamesSeeSelectors(t *testing.T) {
	for _, tc := range []struct {
		expr string
		want []string
	}{
		{`up{job="gpu-plugin"} == 0`, []string{"up"}},
		{`a / (b + on(x) c{y="1"})`, []string{"a", "b", "c"}},
		{`sum(increase({__name__="x_total", xid!~"13"}[5m])) or vector(0)`, []string{"x_total"}},
		{`x unless x offset 10m`, []string{"x"}},
	} {
		got, err := metricNames(tc.expr)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("metricNames(%q) = %v, %v; want %v", tc.expr, got, err, tc.want)
		}
	}
	if _, err := metricNames("sum(("); err == nil {
		t.Error("metricNames accepted invalid PromQL")
	}
}

// ruleFile is the part of a Prometheus rule file the tests read.
type ruleFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Record      string            `json:"record"`
			Expr        string            `json:"expr"`
			For         string            `json:"for"`
			Labels      map[string]string `json:"labels"`
			Annotations map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}

func readRules(t *testing.T) ruleFile {
	t.Helper()
	var rf ruleFile
	if err := yaml.Unmarshal(readFile(t, AlertsFile), &rf); err != nil {
		t.Fatalf("%s: %v", AlertsFile, err)
	}
	return rf
}

// requiredAlerts maps each alert the install promises (README, issue) to
// its name in the rule file.
var requiredAlerts = map[string]string{
	"GPU unhealthy":           "GPUDeviceUnhealthy",
	"fatal XID":               "GPUFatalXID",
	"exporter or plugin down": "GPUPluginDown",
	"temperature high":        "GPUTemperatureHigh",
	"framebuffer nearly full": "GPUFramebufferNearlyFull",
	"kubelet not connected":   "GPUPluginKubeletNotConnected",
}

// TestAlerts: every rule parses with the Prometheus parser and names only
// emitted metrics; the promised alerts exist with a severity, a summary and
// a description; and the fatal-XID filter equals the daemon's skip list.
func TestAlerts(t *testing.T) {
	emitted := exportedMetrics(t)
	rf := readRules(t)
	alerts := map[string]bool{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			alerts[r.Alert] = true
			where := fmt.Sprintf("%s alert %s", AlertsFile, r.Alert)
			checkExpr(t, where, r.Expr, emitted)
			if !slices.Contains([]string{"critical", "warning", "info"}, r.Labels["severity"]) {
				t.Errorf("%s: severity %q, want critical, warning or info", where, r.Labels["severity"])
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: needs a summary and a description", where)
			}
		}
	}
	for what, name := range requiredAlerts {
		if !alerts[name] {
			t.Errorf("no %s alert (%s) in %s", what, name, AlertsFile)
		}
	}

	var skip []string
	for _, x := range health.DefaultSkipXIDs {
		skip = append(skip, strconv.FormatUint(x, 10))
	}
	want := `xid!~"` + strings.Join(skip, "|") + `"`
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "GPUFatalXID" && strings.Count(r.Expr, want) != strings.Count(r.Expr, "xid!~") {
				t.Errorf("GPUFatalXID must filter out exactly the daemon's default skip list %s:\n%s", want, r.Expr)
			}
		}
	}
}

// promtool returns promtool's path, or skips: it comes from the Debian
// package prometheus, which scripts/test.sh installs.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed (apt-get install prometheus; scripts/test.sh does it): alert checks skipped")
	}
	return p
}

// TestAlertsPromtool: `promtool check rules` accepts the rule file, `promtool
// test rules` passes, and every alert has at least one unit test.
func TestAlertsPromtool(t *testing.T) {
	bin := promtool(t)
	root := RepoRoot()
	for _, args := range [][]string{
		{"check", "rules", filepath.Join(root, AlertsFile)},
		{"test", "rules", filepath.Join(root, AlertsTestFile)},
	} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	var tests struct {
		RuleFiles []string `json:"rule_files"`
		Tests     []struct {
			Name          string `json:"name"`
			AlertRuleTest []struct {
				Alertname string `json:"alertname"`
				ExpAlerts []any  `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(readFile(t, AlertsTestFile), &tests); err != nil {
		t.Fatal(err)
	}
	if len(tests.RuleFiles) != 1 || filepath.Clean(filepath.Join(filepath.Dir(AlertsTestFile), tests.RuleFiles[0])) != AlertsFile {
		t.Errorf("%s tests %v, want %s", AlertsTestFile, tests.RuleFiles, AlertsFile)
	}
	fires := map[string]bool{}
	for _, tc := range tests.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			}
		}
	}
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			if !fires[r.Alert] {
				t.Errorf("alert %s has no unit test in %s that makes it fire", r.Alert, AlertsTestFile)
			}
		}
	}
}

// dashboard is the part of a Grafana dashboard the tests read.
type dashboard struct {
	Title      string  `json:"title"`
	UID        string  `json:"uid"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int     `json:"id"`
	Type       string  `json:"type"`
	Title      string  `json:"title"`
	Datasource any     `json:"datasource"`
	Panels     []panel `json:"panels"`
	Targets    []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

// grafanaVars are Grafana's built-in range variables; they stand where
// PromQL wants a duration.
var grafanaVars = regexp.MustCompile(`\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}`)

// labelValues matches a variable query label_values(SELECTOR, LABEL).
var labelValues = regexp.MustCompile(`^label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)$`)

// TestDashboard: every panel query and variable query parses with the
// Prometheus parser and names only emitted metrics; the panels cover what
// the install promises; every panel uses the dashboard's data source
// variable.
func TestDashboard(t *testing.T) {
	emitted := exportedMetrics(t)
	var d dashboard
	if err := json.Unmarshal(readFile(t, DashboardFile), &d); err != nil {
		t.Fatalf("%s: %v", DashboardFile, err)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard needs a uid and a title (uid %q, title %q)", d.UID, d.Title)
	}
	var all []panel
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			all = append(all, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)

	ids := map[int]bool{}
	var titles []string
	queries := 0
	for _, p := range all {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		titles = append(titles, strings.ToLower(p.Title))
		if p.Type == "row" {
			continue
		}
		if ds, _ := json.Marshal(p.Datasource); !strings.Contains(string(ds), "${datasource}") {
			t.Errorf("panel %q: datasource %s, want the ${datasource} variable", p.Title, ds)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for i, tg := range p.Targets {
			expr := grafanaVars.ReplaceAllString(tg.Expr, "5m")
			checkExpr(t, fmt.Sprintf("panel %q query %d", p.Title, i), expr, emitted)
			queries++
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q := v.Query
		if m, ok := q.(map[string]any); ok {
			q = m["query"]
		}
		s, _ := q.(string)
		m := labelValues.FindStringSubmatch(s)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(SELECTOR, LABEL)", v.Name, s)
			continue
		}
		checkExpr(t, "variable "+v.Name, m[1], emitted)
	}
	for _, want := range []string{"utilization", "memory", "power", "temperature", "xid", "health", "pod"} {
		if !slices.ContainsFunc(titles, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("no panel or row about %s (titles: %v)", want, titles)
		}
	}
	t.Logf("%d panels, %d queries checked against %d emitted families", len(all), queries, len(emitted))
}
