package deploy

import (
	"encoding/json"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
)

// runtimeEnv are read by the NVIDIA container runtime, not by the daemon.
var runtimeEnv = []string{"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_MIG_MONITOR_DEVICES"}

// TestManifestsAgreeWithDaemon: every flag and environment variable the
// DaemonSet sets is one the daemon reads (config.Options), and the daemon's
// default paths lie inside the host paths the DaemonSet mounts.
func TestManifestsAgreeWithDaemon(t *testing.T) {
	flags, envs, defaults := map[string]bool{}, map[string]bool{}, map[string]string{}
	for _, o := range config.Options() {
		for _, n := range append([]string{o.Name}, o.Aliases...) {
			flags[n] = true
		}
		for _, e := range o.Env {
			envs[e] = true
		}
		defaults[o.Name] = o.Default
	}
	for _, vals := range []string{"", "migStrategy: mixed\nfailOnInitError: false\ndeviceListStrategy: cdi-cri\ndriverRoot: /run/nvidia/driver\nwebConfig: {existingSecret: s}",
		"dra: {mode: split, devices: [\"0\"]}"} {
		r, err := RenderChart(chartDir(), values(t, vals))
		if err != nil {
			t.Fatal(err)
		}
		ds := objectOf[*appsv1.DaemonSet](t, decodeAll(t, r.Docs))
		c := ds.Spec.Template.Spec.Containers[0]
		for _, a := range c.Args {
			name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
			if !strings.HasPrefix(a, "--") || !flags[name] {
				t.Errorf("values %q: argument %q is not a daemon flag", vals, a)
			}
		}
		for _, e := range c.Env {
			if !envs[e.Name] && !slices.Contains(runtimeEnv, e.Name) {
				t.Errorf("values %q: environment variable %s is read by neither the daemon nor the NVIDIA runtime", vals, e.Name)
			}
		}
		mounts := map[string]bool{}
		for _, m := range c.VolumeMounts {
			mounts[m.MountPath] = true
		}
		for flag, path := range map[string]string{
			"kubelet-socket-dir":   defaults["kubelet-socket-dir"],
			"pod-resources-socket": filepath.Dir(defaults["pod-resources-socket"]),
			"cdi-spec-dir":         defaults["cdi-spec-dir"],
			"labels-file":          filepath.Dir(defaults["labels-file"]),
		} {
			if !mounts[path] {
				t.Errorf("values %q: the default of --%s lies in %s, which the DaemonSet does not mount", vals, flag, path)
			}
		}
		if (strings.Contains(vals, "driverRoot") || strings.Contains(vals, "dra:")) && !mounts[defaults["driver-root-ctr-path"]] {
			t.Errorf("values %q: the driver root is not mounted at --driver-root-ctr-path's default %s", vals, defaults["driver-root-ctr-path"])
		}
		if strings.Contains(vals, "dra:") {
			for _, flag := range []string{"kubelet-registrar-directory-path", "kubelet-plugins-directory-path"} {
				if d, ok := defaults[flag]; !ok || !mounts[d] {
					t.Errorf("values %q: the default of --%s (%q) is not a directory the DaemonSet mounts", vals, flag, d)
				}
			}
		}
	}
}

// TestChartDRASettingsLoad: the daemon's own configuration loader, given
// the DRA DaemonSet's arguments, environment and config file, reads the
// mode, the device list and the kubelet directories the chart meant, and
// accepts them; and the chart's modes are the daemon's.
func TestChartDRASettingsLoad(t *testing.T) {
	for _, tc := range []struct {
		values, mode string
		devices      int
	}{
		{"dra: {mode: dra}", "dra", 0},
		{"dra: {mode: split, devices: [GPU-0c8f6e43-61b4-4f55-9ddb-2f5bd0a1c0de, 3]}", "split", 2},
		{"dra: {mode: dra, kubeletRegistrarDirectoryPath: /var/lib/k0s/kubelet/plugins_registry, kubeletPluginsDirectoryPath: /var/lib/k0s/kubelet/plugins}", "dra", 0},
	} {
		r, err := RenderChart(chartDir(), values(t, tc.values))
		if err != nil {
			t.Fatal(err)
		}
		objs := decodeAll(t, r.Docs)
		c := objectOf[*appsv1.DaemonSet](t, objs).Spec.Template.Spec.Containers[0]
		file := filepath.Join(t.TempDir(), "config.yaml")
		writeFile(t, file, objectOf[*corev1.ConfigMap](t, objs).Data["config.yaml"])
		var args []string
		for _, a := range c.Args {
			if strings.HasPrefix(a, "--config=") {
				a = "--config=" + file
			}
			args = append(args, a)
		}
		envs := map[string]string{}
		for _, e := range c.Env {
			if e.ValueFrom == nil && !slices.Contains(runtimeEnv, e.Name) {
				envs[e.Name] = e.Value
			}
		}
		cfg, _, err := config.Load("gpu-plugin", args, func(k string) string { return envs[k] }, io.Discard)
		if err != nil {
			t.Errorf("values %q: the daemon refuses the DaemonSet's settings: %v", tc.values, err)
			continue
		}
		if got := cfg.AllocationMode(); got != tc.mode || len(cfg.DRA.Devices) != tc.devices {
			t.Errorf("values %q: the daemon reads mode %q with %d DRA devices, want %q with %d", tc.values, got, len(cfg.DRA.Devices), tc.mode, tc.devices)
		}
	}

	var modes []string
	for _, o := range config.Options() {
		if o.Name == "allocation-mode" {
			modes = o.Allowed
		}
	}
	var schema struct {
		Properties struct {
			DRA struct {
				Properties struct {
					Mode struct {
						Enum []string `json:"enum"`
					} `json:"mode"`
				} `json:"properties"`
			} `json:"dra"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(readFile(t, filepath.Join(ChartDir, "values.schema.json")), &schema); err != nil {
		t.Fatal(err)
	}
	if got := schema.Properties.DRA.Properties.Mode.Enum; len(modes) == 0 || !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(modes))) {
		t.Errorf("the chart's dra.mode values %v are not the daemon's --allocation-mode values %v", got, modes)
	}
}
