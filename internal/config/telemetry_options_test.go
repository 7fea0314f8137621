package config

import (
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestTelemetryOptions(t *testing.T) {
	load := func(args []string, env map[string]string) (*Config, error) {
		c, _, err := Load("gpu-plugin", args, func(k string) string { return env[k] }, io.Discard)
		return c, err
	}
	c, err := load(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Telemetry{CollectInterval: time.Second, Backend: TelemetryAuto, PodResourcesSocket: DefaultPodResourcesSocket, PodResourcesInterval: 5 * time.Second}
	if c.Telemetry != want {
		t.Errorf("defaults %+v, want %+v", c.Telemetry, want)
	}

	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want func(Telemetry) bool
	}{
		{"a duration", []string{"--collect-interval=250ms"}, nil, func(t Telemetry) bool { return t.CollectInterval == 250*time.Millisecond }},
		{"dcgm-exporter's milliseconds", nil, map[string]string{"DCGM_EXPORTER_INTERVAL": "30000"}, func(t Telemetry) bool { return t.CollectInterval == 30*time.Second }},
		{"milliseconds on the flag too", []string{"--collect-interval=2000"}, nil, func(t Telemetry) bool { return t.CollectInterval == 2*time.Second }},
		{"our variable beats dcgm-exporter's", nil, map[string]string{"GPU_PLUGIN_COLLECT_INTERVAL": "5s", "DCGM_EXPORTER_INTERVAL": "30000"}, func(t Telemetry) bool { return t.CollectInterval == 5*time.Second }},
		{"backend", []string{"--telemetry-backend=DCGM"}, nil, func(t Telemetry) bool { return t.Backend == TelemetryDCGM }},
		{"remote hostengine, dcgm-exporter's name", nil, map[string]string{"DCGM_REMOTE_HOSTENGINE_INFO": "nvidia-dcgm:5555"}, func(t Telemetry) bool { return t.DCGMAddress == "nvidia-dcgm:5555" }},
		{"alias", []string{"--remote-hostengine-info=h:1"}, nil, func(t Telemetry) bool { return t.DCGMAddress == "h:1" }},
		{"counters file", nil, map[string]string{"DCGM_EXPORTER_COLLECTORS": "/etc/dcgm-exporter/dcp-metrics-included.csv"}, func(t Telemetry) bool {
			return t.Collectors == "/etc/dcgm-exporter/dcp-metrics-included.csv"
		}},
		{"pod-resources socket", nil, map[string]string{"DCGM_POD_RESOURCES_KUBELET_SOCKET": "/x/kubelet.sock"}, func(t Telemetry) bool { return t.PodResourcesSocket == "/x/kubelet.sock" }},
		{"attribution off", []string{"--pod-resources-socket="}, nil, func(t Telemetry) bool { return t.PodResourcesSocket == "" }},
		{"no hostname", nil, map[string]string{"DCGM_EXPORTER_NO_HOSTNAME": "true"}, func(t Telemetry) bool { return t.NoHostname }},
		{"blanks", []string{"--replace-blanks-in-model-name"}, nil, func(t Telemetry) bool { return t.ReplaceBlanksInModelName }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(tc.args, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.want(c.Telemetry) {
				t.Errorf("got %+v", c.Telemetry)
			}
		})
	}

	for _, tc := range []struct{ arg, want string }{
		{"--collect-interval=3", "out of range"}, // dcgm-exporter#311: 3 ms
		{"--collect-interval=2h", "out of range"},
		{"--collect-interval=soon", "milliseconds"},
		{"--telemetry-backend=nvidia", "auto, nvml, dcgm, none"},
		{"--pod-resources-interval=1ms", "between 100ms and 1h"},
	} {
		if _, err := load([]string{tc.arg}, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error mentioning %q", tc.arg, err, tc.want)
		}
	}
	if s := (&Config{}).TelemetrySettings(); s.CollectInterval != time.Second || s.Backend != TelemetryAuto || s.PodResourcesSocket != "" {
		t.Errorf("settings of a hand-built config: %+v", s)
	}
}

// TestKubernetesVirtualGPUs: dcgm-exporter's --kubernetes-virtual-gpus,
// under its flag and environment names and ours; it needs --per-pod-usage
// whatever the source of either, and --help documents it.
func TestKubernetesVirtualGPUs(t *testing.T) {
	load := func(args []string, env map[string]string) (*Config, error) {
		c, _, err := Load("gpu-plugin", args, func(k string) string { return env[k] }, io.Discard)
		return c, err
	}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want bool   // KubernetesVirtualGPUs
		err  string // an error containing this, else none
	}{
		{"off by default", []string{"--per-pod-usage"}, nil, false, ""},
		{"the flag", []string{"--per-pod-usage", "--kubernetes-virtual-gpus"}, nil, true, ""},
		{"dcgm-exporter's variable", nil, map[string]string{"KUBERNETES_VIRTUAL_GPUS": "true", "GPU_PLUGIN_PER_POD_USAGE": "true"}, true, ""},
		{"ours", nil, map[string]string{"GPU_PLUGIN_KUBERNETES_VIRTUAL_GPUS": "1", "GPU_PLUGIN_PER_POD_USAGE": "true"}, true, ""},
		{"ours beats dcgm-exporter's", []string{"--per-pod-usage"}, map[string]string{"GPU_PLUGIN_KUBERNETES_VIRTUAL_GPUS": "false", "KUBERNETES_VIRTUAL_GPUS": "true"}, false, ""},
		{"the flag beats the environment", []string{"--per-pod-usage", "--kubernetes-virtual-gpus=false"}, map[string]string{"KUBERNETES_VIRTUAL_GPUS": "true"}, false, ""},
		{"with --per-pod-dcgm-series too", []string{"--per-pod-usage", "--per-pod-dcgm-series", "--kubernetes-virtual-gpus"}, nil, true, ""},
		{"flag order does not matter", []string{"--kubernetes-virtual-gpus", "--per-pod-usage"}, nil, true, ""},
		{"without per-pod accounting", []string{"--kubernetes-virtual-gpus"}, nil, false,
			`--kubernetes-virtual-gpus="true": needs --per-pod-usage (GPU_PLUGIN_PER_POD_USAGE=true`},
		{"without per-pod accounting, from the environment", nil, map[string]string{"KUBERNETES_VIRTUAL_GPUS": "true"}, false,
			`KUBERNETES_VIRTUAL_GPUS="true": needs --per-pod-usage`},
		{"per-pod accounting turned off explicitly", []string{"--kubernetes-virtual-gpus"}, map[string]string{"GPU_PLUGIN_PER_POD_USAGE": "false"}, false,
			"or drop --kubernetes-virtual-gpus"},
		{"not a boolean", []string{"--per-pod-usage", "--kubernetes-virtual-gpus=maybe"}, nil, false, "want true or false"},
		{"attribution off", []string{"--per-pod-usage", "--kubernetes-virtual-gpus", "--pod-resources-socket="}, nil, false, "per-pod-usage: needs the kubelet's pod-resources socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(tc.args, tc.env)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Telemetry.KubernetesVirtualGPUs != tc.want || c.TelemetrySettings().KubernetesVirtualGPUs != tc.want {
				t.Errorf("KubernetesVirtualGPUs %v, want %v", c.Telemetry.KubernetesVirtualGPUs, tc.want)
			}
		})
	}

	// The check reads PerPodUsage when the option is set: per-pod-usage
	// must come first in the table.
	names := []string{}
	for _, o := range Options() {
		names = append(names, o.Name)
	}
	if slices.Index(names, "per-pod-usage") > slices.Index(names, "kubernetes-virtual-gpus") {
		t.Error("kubernetes-virtual-gpus is set before per-pod-usage: its check would read a stale PerPodUsage")
	}

	var help strings.Builder
	PrintUsage(&help, "gpu-plugin")
	for _, want := range []string{"--kubernetes-virtual-gpus  (env GPU_PLUGIN_KUBERNETES_VIRTUAL_GPUS, KUBERNETES_VIRTUAL_GPUS; default \"false\")", "vgpu", "needs --per-pod-usage", "supersedes --per-pod-dcgm-series"} {
		if !strings.Contains(help.String(), want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}
