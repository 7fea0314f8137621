package config

import (
	"io"
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
