package deploy

import (
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
)

// TestReadmeConfigurationReference: README's flag table (between the
// flags:begin/end markers) names every flag, alias and environment variable
// of config.Options(), and nothing else.
func TestReadmeConfigurationReference(t *testing.T) {
	table := readmeSection(t, "flags")
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
				t.Errorf("README's configuration reference lacks --%s (%s)", name, o.Usage)
			}
		}
		for _, e := range o.Env {
			if !strings.Contains(table, "`"+e+"`") {
				t.Errorf("README's configuration reference lacks the environment variable %s of --%s", e, o.Name)
			}
		}
	}
	for name := range documented {
		if !known[name] {
			t.Errorf("README documents --%s, which config.Options() does not have", name)
		}
	}
}

// genericFamilies are the Go runtime and process collectors' families:
// README names them by prefix rather than one by one.
var genericFamilies = []string{"go_", "process_", "promhttp_"}

// TestReadmeMetricsReference: README names every metric family the exporter
// emits, in backticks.
func TestReadmeMetricsReference(t *testing.T) {
	readme := string(readFile(t, ReadmePath))
	missingPrefix := map[string]bool{}
	for _, name := range exportedMetrics(t).Names() {
		generic := false
		for _, p := range genericFamilies {
			if strings.HasPrefix(name, p) {
				generic = true
				if !strings.Contains(readme, "`"+p+"*`") && !missingPrefix[p] {
					missingPrefix[p] = true
					t.Errorf("README does not mention the `%s*` families (e.g. %s)", p, name)
				}
			}
		}
		if !generic && !strings.Contains(readme, "`"+name+"`") && !strings.Contains(readme, "`"+name+"{") {
			t.Errorf("README's metrics references do not name %s", name)
		}
	}
}

// TestReadmeInstall: the Install section lets a reader install and verify
// with nothing else: kubectl or Helm, then a Prometheus query and the node's
// capacity.
func TestReadmeInstall(t *testing.T) {
	section := readmeSection(t, "install")
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
