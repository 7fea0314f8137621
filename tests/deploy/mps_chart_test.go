package deploy

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
)

// mpsConfig is a config file that shares GPUs through MPS.
// mpsCaps are the capabilities the chart adds with MPS: SYS_ADMIN for the
// compute mode, SETUID and SETGID for the MPS servers started as their
// clients' users.
var mpsCaps = []string{"SYS_ADMIN", "SETUID", "SETGID"}

const mpsConfig = "version: v1\nsharing:\n  mps:\n    resources:\n      - name: nvidia.com/gpu\n        replicas: 4\n"

// TestChartMPS renders the chart's MPS settings (the mps values, and a
// sharing.mps section in the configs the chart holds): MPS_ROOT always
// (unless mps.root is empty); the MPS root at its own path, its shm at
// /dev/shm, hostPID (mps.enableHostPID), the compute driver capability and
// SYS_ADMIN, SETUID and SETGID only while MPS is on. Every render also passes the install
// policy, with the MPS mounts beside docs/install.md's.
func TestChartMPS(t *testing.T) {
	type want struct {
		mpsRoot string // MPS_ROOT; "" for none
		mounts  bool   // the MPS mounts, at mpsRoot
		hostPID bool
		caps    []string // capabilities added
		api     bool     // the pod mounts its token (config.map, perPodUsage)
	}
	const root = "/run/nvidia/mps"
	cases := []struct {
		name   string
		values string
		want   want
	}{
		{name: "defaults: MPS_ROOT only", want: want{mpsRoot: root}},
		{name: "commented-out sharing.mps stays off",
			values: "config:\n  inline: |\n    version: v1\n    # sharing:\n    #   mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n",
			want:   want{mpsRoot: root}},
		{name: "null sharing.mps stays off",
			values: "config:\n  inline: |\n    version: v1\n    sharing:\n      mps: null\n      timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n",
			want:   want{mpsRoot: root}},
		{name: "time-slicing stays off",
			values: "sharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}",
			want:   want{mpsRoot: root}},
		{name: "mps.enabled",
			values: "mps: {enabled: true}",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps}},
		{name: "sharing.mps in config.map",
			values: "config:\n  map:\n    whole: \"version: v1\\n\"\n    mps: " + quoteYAML(mpsConfig) + "\n  default: whole\n",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps, api: true}},
		{name: "sharing.mps in config.inline",
			values: "config:\n  inline: " + quoteYAML(mpsConfig),
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps}},
		{name: "sharing.mps in the sharing value",
			values: "sharing: {mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps}},
		{name: "existing ConfigMap is not seen",
			values: "config: {existingConfigMap: site-gpu-config}",
			want:   want{mpsRoot: root}},
		{name: "existing ConfigMap with mps.enabled",
			values: "config: {existingConfigMap: site-gpu-config}\nmps: {enabled: true}",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps}},
		{name: "enableHostPID false keeps the mounts",
			values: "mps: {enabled: true, enableHostPID: false}",
			want:   want{mpsRoot: root, mounts: true, caps: mpsCaps}},
		{name: "enableHostPID false with perPodUsage",
			values: "mps: {enabled: true, enableHostPID: false}\nperPodUsage: {enabled: true}",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps, api: true}},
		{name: "MPS and perPodUsage share one hostPID",
			values: "mps: {enabled: true}\nperPodUsage: {enabled: true}",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps, api: true}},
		{name: "enableHostPID without MPS adds nothing",
			values: "mps: {enableHostPID: true}",
			want:   want{mpsRoot: root}},
		{name: "another root, cleaned",
			values: "mps: {enabled: true, root: /run/gpu-mps/}",
			want:   want{mpsRoot: "/run/gpu-mps", mounts: true, hostPID: true, caps: mpsCaps}},
		{name: "empty root: no MPS_ROOT, no mounts",
			values: "mps: {root: \"\"}",
			want:   want{}},
		{name: "MIG and MPS add SYS_ADMIN once",
			values: "migStrategy: single\nmps: {enabled: true}",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps}},
		{name: "driver container and MPS",
			values: "driverRoot: /run/nvidia/driver\nmps: {enabled: true}",
			want:   want{mpsRoot: root, mounts: true, hostPID: true, caps: mpsCaps}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, err := RenderChart(chartDir(), values(t, tc.values))
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			objs := decodeAll(t, r.Docs)
			ds := objectOf[*appsv1.DaemonSet](t, objs)
			raw := r.Find("DaemonSet").Content
			p := policy{driverRoot: "/", metricsPort: 9400, hostPID: tc.want.hostPID, apiAccess: tc.want.api,
				allowedCaps: tc.want.caps, rawDaemonSet: raw}
			if strings.Contains(tc.values, "driverRoot:") {
				p.driverRoot = "/run/nvidia/driver"
			}
			if tc.want.mounts {
				p.mpsRoot = tc.want.mpsRoot
			}
			checkDaemonSetPolicy(t, ds, p)
			checkService(t, objectOf[*corev1.Service](t, objs), ds, p.metricsPort)

			spec := ds.Spec.Template.Spec
			c := spec.Containers[0]
			if v, ok := env(c, "MPS_ROOT"); v != tc.want.mpsRoot || ok != (tc.want.mpsRoot != "") {
				t.Errorf("MPS_ROOT = %q (set: %v), want %q", v, ok, tc.want.mpsRoot)
			}
			if got := strings.Count(raw, "hostPID:"); got > 1 {
				t.Errorf("hostPID is rendered %d times", got)
			}
			caps := []string{}
			if sc := c.SecurityContext; sc != nil && sc.Capabilities != nil {
				for _, c := range sc.Capabilities.Add {
					caps = append(caps, string(c))
				}
			}
			if !slices.Equal(caps, append([]string{}, tc.want.caps...)) {
				t.Errorf("capabilities.add = %v, want %v", caps, tc.want.caps)
			}
			wantCaps := "utility"
			if tc.want.mounts {
				wantCaps = "compute,utility"
			}
			if v, _ := env(c, "NVIDIA_DRIVER_CAPABILITIES"); v != wantCaps {
				t.Errorf("NVIDIA_DRIVER_CAPABILITIES = %q, want %q", v, wantCaps)
			}

			rootVol, shmVol := volume(ds, "mps-root"), volume(ds, "mps-shm")
			shmMounted := slices.ContainsFunc(c.VolumeMounts, func(vm corev1.VolumeMount) bool { return vm.MountPath == mpsShmMount })
			if !tc.want.mounts {
				if rootVol != nil || shmVol != nil || shmMounted {
					t.Errorf("MPS volumes %+v %+v (or a /dev/shm mount) without MPS", rootVol, shmVol)
				}
				return
			}
			dirOrCreate := corev1.HostPathDirectoryOrCreate
			for _, v := range []struct {
				vol              *corev1.Volume
				name, host, path string
			}{
				{rootVol, "mps-root", tc.want.mpsRoot, tc.want.mpsRoot},
				{shmVol, "mps-shm", tc.want.mpsRoot + "/shm", mpsShmMount},
			} {
				if v.vol == nil || v.vol.HostPath == nil || v.vol.HostPath.Path != v.host || v.vol.HostPath.Type == nil || *v.vol.HostPath.Type != dirOrCreate {
					t.Errorf("volume %s = %+v, want hostPath %s of type DirectoryOrCreate", v.name, v.vol, v.host)
					continue
				}
				i := slices.IndexFunc(c.VolumeMounts, func(vm corev1.VolumeMount) bool { return vm.Name == v.name })
				if i < 0 || c.VolumeMounts[i].MountPath != v.path || c.VolumeMounts[i].ReadOnly || c.VolumeMounts[i].SubPath != "" {
					t.Errorf("volume %s is not mounted read-write at %s: %+v", v.name, v.path, c.VolumeMounts)
				}
			}
		})
	}
}

// quoteYAML writes s as a double-quoted YAML (JSON) string.
func quoteYAML(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	return `"` + r.Replace(s) + `"`
}

// TestChartMPSConfigParses: the MPS config the chart tests use is one the
// daemon reads as MPS sharing, so a render that turns MPS on from it turns
// it on for the daemon too.
func TestChartMPSConfigParses(t *testing.T) {
	c, err := config.Parse([]byte(mpsConfig))
	if err != nil {
		t.Fatalf("%v\n%s", err, mpsConfig)
	}
	if !c.UsesMPS() {
		t.Errorf("the daemon does not read %q as MPS sharing", mpsConfig)
	}
}

// TestChartRejectsMPSValues: MPS without a usable root fails the render,
// naming the values at fault.
func TestChartRejectsMPSValues(t *testing.T) {
	for _, tc := range []struct{ name, values, want string }{
		{"mps.enabled with an empty root", "mps: {enabled: true, root: \"\"}", "mps.enabled=true"},
		{"sharing.mps with an empty root", "mps: {root: \"\"}\nsharing: {mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}", "sharing.mps"},
		{"the host's root as MPS root", "mps: {enabled: true, root: /}", "mps.root"},
		{"a relative root", "mps: {root: run/nvidia/mps}", "root"},
		{"mps.enabled not a boolean", "mps: {enabled: \"yes\"}", "enabled"},
		{"misspelt mps value", "mps: {enable: true}", "enable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := RenderChart(chartDir(), values(t, tc.values))
			if err == nil {
				t.Fatalf("values %q rendered without error", tc.values)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %q", err, tc.want)
			}
			if strings.Contains(tc.values, "root: \"\"") && !strings.Contains(err.Error(), "mps.root") {
				t.Errorf("error %q does not name mps.root", err)
			}
		})
	}
}
