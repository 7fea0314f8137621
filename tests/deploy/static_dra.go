package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// DRAValues turns on the chart's DRA mode (every GPU and MIG device through
// DRA); the static manifest's DRA section is the difference between this
// render and the default one.
func DRAValues() map[string]any {
	return map[string]any{"dra": map[string]any{"mode": "dra"}}
}

// DRAObjectPrefix starts each line of the objects the static manifest holds,
// commented out, for DRA: `sed -n 's/^#| //p'` extracts them.
const DRAObjectPrefix = "#| "

// DRADaemonSetChanges is what turning DRA on adds to the default DaemonSet:
// the pod's service account token, and container env entries, volume mounts
// and volumes, each listed whole. Applied to the default DaemonSet, they give
// the chart's DRA DaemonSet (draChanges checks that).
type DRADaemonSetChanges struct {
	AutomountToken bool
	Env            []corev1.EnvVar
	VolumeMounts   []corev1.VolumeMount
	Volumes        []corev1.Volume
}

// draChanges compares the default and the DRA DaemonSets and returns the
// additions, or an error when the two differ in any other way (the static
// manifest's instructions would then be incomplete).
func draChanges(def, dra *appsv1.DaemonSet) (DRADaemonSetChanges, error) {
	var ch DRADaemonSetChanges
	if len(def.Spec.Template.Spec.Containers) != 1 || len(dra.Spec.Template.Spec.Containers) != 1 {
		return ch, fmt.Errorf("want one container in each DaemonSet")
	}
	dc, rc := def.Spec.Template.Spec.Containers[0], dra.Spec.Template.Spec.Containers[0]
	ch.Env = added(dc.Env, rc.Env, func(e corev1.EnvVar) string { return e.Name })
	ch.VolumeMounts = added(dc.VolumeMounts, rc.VolumeMounts, func(m corev1.VolumeMount) string { return m.Name })
	ch.Volumes = added(def.Spec.Template.Spec.Volumes, dra.Spec.Template.Spec.Volumes, func(v corev1.Volume) string { return v.Name })
	if a := dra.Spec.Template.Spec.AutomountServiceAccountToken; a != nil && *a {
		ch.AutomountToken = true
	}
	// The DRA DaemonSet without the additions must be the default one.
	back := dra.DeepCopy()
	spec := &back.Spec.Template.Spec
	c := &spec.Containers[0]
	c.Env = removed(c.Env, ch.Env, func(e corev1.EnvVar) string { return e.Name })
	c.VolumeMounts = removed(c.VolumeMounts, ch.VolumeMounts, func(m corev1.VolumeMount) string { return m.Name })
	spec.Volumes = removed(spec.Volumes, ch.Volumes, func(v corev1.Volume) string { return v.Name })
	spec.AutomountServiceAccountToken = def.Spec.Template.Spec.AutomountServiceAccountToken
	if !reflect.DeepEqual(back, def) {
		a, _ := json.Marshal(back)
		b, _ := json.Marshal(def)
		return ch, fmt.Errorf("the DRA DaemonSet differs from the default one beyond added env, mounts, volumes and the token:\n dra minus additions %s\n default             %s", a, b)
	}
	return ch, nil
}

// added lists the entries of after whose key before lacks, in after's order.
func added[T any](before, after []T, key func(T) string) []T {
	var out []T
	for _, a := range after {
		if !slices.ContainsFunc(before, func(b T) bool { return key(b) == key(a) }) {
			out = append(out, a)
		}
	}
	return out
}

// removed is list without the entries whose key is one of drop's.
func removed[T any](list, drop []T, key func(T) string) []T {
	var out []T
	for _, l := range list {
		if !slices.ContainsFunc(drop, func(d T) bool { return key(d) == key(l) }) {
			out = append(out, l)
		}
	}
	return out
}

// decodeDaemonSet finds and decodes the DaemonSet among rendered objects.
func decodeDaemonSet(docs []Doc) (*appsv1.DaemonSet, error) {
	for _, d := range docs {
		if d.Kind == "DaemonSet" {
			ds := &appsv1.DaemonSet{}
			if err := yaml.UnmarshalStrict([]byte(d.Content), ds); err != nil {
				return nil, fmt.Errorf("%s: %w", d.Source, err)
			}
			return ds, nil
		}
	}
	return nil, fmt.Errorf("no DaemonSet rendered")
}

// draStaticSection is the end of the static manifest: how to turn DRA on by
// hand, from the chart's DRA render. The DaemonSet's additions are listed as
// one JSON (so YAML flow) entry a line; the objects DRA adds follow whole,
// each line commented out with DRAObjectPrefix.
func draStaticSection(def *Rendered, chart string) ([]byte, error) {
	dra, err := RenderChart(chart, DRAValues())
	if err != nil {
		return nil, fmt.Errorf("rendering the chart with dra.mode=dra: %w", err)
	}
	defDS, err := decodeDaemonSet(def.Docs)
	if err != nil {
		return nil, err
	}
	draDS, err := decodeDaemonSet(dra.Docs)
	if err != nil {
		return nil, err
	}
	ch, err := draChanges(defDS, draDS)
	if err != nil {
		return nil, err
	}
	if !ch.AutomountToken || len(ch.Env) == 0 || len(ch.VolumeMounts) == 0 || len(ch.Volumes) == 0 {
		return nil, fmt.Errorf("the chart's DRA mode adds nothing to the DaemonSet: %+v", ch)
	}
	var b bytes.Buffer
	b.WriteString(`---
# DRA: Dynamic Resource Allocation (resource.k8s.io/v1: Kubernetes 1.34 or newer, and a container
# runtime with CDI: containerd 1.7 with enable_cdi or 2.x, CRI-O 1.23 or newer). The DaemonSet above
# offers GPUs through the device plugin only. The Helm chart's dra.mode=dra (or split) turns DRA on;
# by hand, change the DaemonSet above:
# - in the pod: automountServiceAccountToken: true (the daemon then calls the API server);
`)
	list := func(what string, items any) error {
		fmt.Fprintf(&b, "# - %s, add:\n", what)
		v := reflect.ValueOf(items)
		for i := range v.Len() {
			j, err := json.Marshal(v.Index(i).Interface())
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, "#     %s\n", j)
		}
		return nil
	}
	if err := list("to the container's env", ch.Env); err != nil {
		return nil, err
	}
	b.WriteString(`#   (for split mode instead: GPU_PLUGIN_ALLOCATION_MODE=split, and GPU_PLUGIN_DRA_DEVICES with the
#   comma-separated GPU UUIDs, MIG UUIDs or GPU indexes that DRA gets; the rest stay with the plugin);
`)
	if err := list("to the container's volumeMounts", ch.VolumeMounts); err != nil {
		return nil, err
	}
	if err := list("to the volumes", ch.Volumes); err != nil {
		return nil, err
	}
	b.WriteString(`#   (/var/run/cdi, where the daemon writes each claim's CDI spec, is mounted already);
# and create the objects below: the RBAC DRA needs, the admission policy that lets the daemon write
# only its own node's ResourceSlices, and NVIDIA's DRA driver's DeviceClasses gpu.nvidia.com and
# mig.nvidia.com (leave those out when NVIDIA's DRA driver already created them):
#   sed -n 's/^` + DRAObjectPrefix + `//p' deployments/static/gpu-plugin.yaml | kubectl create -f -
`)
	for _, d := range dra.Docs {
		if slices.ContainsFunc(def.Docs, func(x Doc) bool { return x.Kind == d.Kind && x.Name == d.Name }) {
			continue
		}
		fmt.Fprintf(&b, "%s---\n%s# Source: %s\n", DRAObjectPrefix, DRAObjectPrefix, d.Source)
		for _, line := range strings.Split(d.Content, "\n") {
			line = strings.TrimRight(line, " \t")
			if isHelmOnlyLabel(line) || line == "" {
				continue
			}
			b.WriteString(DRAObjectPrefix + line + "\n")
		}
	}
	return b.Bytes(), nil
}
