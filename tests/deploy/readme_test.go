package deploy

import (
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
)

// TestReadmeConfigurationReference: docs/configuration.md's flag table (between the
// flags:begin/end markers) names every flag, alias and environment variable
// of config.Options(), and nothing else.
func TestReadmeConfigurationReference(t *testing.T) {
	table := docSection(t, ConfigurationDoc, "flags")
	documented := map[string]bool{}
	for _, line := range strings.Split(table, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "| `--") {
			continue
		}
		first := strings.Split(strings.Trim(strings.TrimSpace(line), "|"), "|")[0]
		for _, f := range codeSpans(first) {
			documented[strings.TrimPrefix(f, "--")] = true
		}
	}
	known := map[string]bool{}
	for _, o := range config.Options() {
		for _, name := range append([]string{o.Name}, o.Aliases...) {
			known[name] = true
			if !documented[name] {
				t.Errorf("%s's configuration reference lacks --%s (%s)", ConfigurationDoc, name, o.Usage)
			}
		}
		for _, e := range o.Env {
			if !strings.Contains(table, "`"+e+"`") {
				t.Errorf("%s's configuration reference lacks the environment variable %s of --%s", ConfigurationDoc, e, o.Name)
			}
		}
	}
	for name := range documented {
		if !known[name] {
			t.Errorf("%s documents --%s, which config.Options() does not have", ConfigurationDoc, name)
		}
	}
}

// genericFamilies are the Go runtime and process collectors' families:
// the docs name them by prefix rather than one by one.
var genericFamilies = []string{"go_", "process_", "promhttp_"}

// TestReadmeMetricsReference: the docs pages of MetricsDocs name every metric
// family the exporter emits, in backticks.
func TestReadmeMetricsReference(t *testing.T) {
	var all strings.Builder
	for _, rel := range MetricsDocs() {
		all.Write(readFile(t, rel))
	}
	readme := all.String()
	missingPrefix := map[string]bool{}
	for _, name := range exportedMetrics(t).Names() {
		generic := false
		for _, p := range genericFamilies {
			if strings.HasPrefix(name, p) {
				generic = true
				if !strings.Contains(readme, "`"+p+"*`") && !missingPrefix[p] {
					missingPrefix[p] = true
					t.Errorf("%v do not mention the `%s*` families (e.g. %s)", MetricsDocs(), p, name)
				}
			}
		}
		if !generic && !strings.Contains(readme, "`"+name+"`") && !strings.Contains(readme, "`"+name+"{") {
			t.Errorf("the metrics references in %v do not name %s", MetricsDocs(), name)
		}
	}
}

// TestReadmeInstall: the Install section lets a reader install and verify
// with nothing else: kubectl or Helm, then a Prometheus query and the node's
// capacity.
func TestReadmeInstall(t *testing.T) {
	section := docSection(t, ReadmePath, "install")
	for _, want := range []string{
		"kubectl create -f deployments/static/gpu-plugin.yaml",
		"helm install",
		"deployments/helm/gpu-plugin",
		"kubectl describe node",
		"nvidia.com/gpu",
		`up{job="gpu-plugin"}`,
		"DCGM_FI_DEV_GPU_UTIL",
		"deployments/static/monitoring.yaml",
		"make image",
		"docker build",
	} {
		if !strings.Contains(section, want) {
			t.Errorf("README's Install section does not show %q", want)
		}
	}
}

func codeSpans(s string) []string {
	var out []string
	for {
		i := strings.Index(s, "`")
		if i < 0 {
			return out
		}
		j := strings.Index(s[i+1:], "`")
		if j < 0 {
			return out
		}
		out = append(out, s[i+1:i+1+j])
		s = s[i+j+2:]
	}
}
