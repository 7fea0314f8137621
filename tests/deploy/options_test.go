package deploy

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"

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
	for _, vals := range []string{"", "migStrategy: mixed\nfailOnInitError: false\ndeviceListStrategy: cdi-cri\ndriverRoot: /run/nvidia/driver\nwebConfig: {existingSecret: s}"} {
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
		if strings.Contains(vals, "driverRoot") && !mounts[defaults["driver-root-ctr-path"]] {
			t.Errorf("the driver root is not mounted at --driver-root-ctr-path's default %s", defaults["driver-root-ctr-path"])
		}
	}
}
