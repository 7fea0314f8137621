package deploy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	monv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// Object is one strictly decoded manifest object.
type Object struct {
	Doc  Doc
	Obj  any // *corev1.ConfigMap, *appsv1.DaemonSet, ...
	Meta *metav1.ObjectMeta
}

// newTyped returns the Go type an apiVersion/kind decodes into; every kind
// the chart may render must be listed.
func newTyped(apiVersion, kind string) (any, *metav1.ObjectMeta, error) {
	switch apiVersion + "/" + kind {
	case "v1/ServiceAccount":
		o := &corev1.ServiceAccount{}
		return o, &o.ObjectMeta, nil
	case "v1/ConfigMap":
		o := &corev1.ConfigMap{}
		return o, &o.ObjectMeta, nil
	case "v1/Secret":
		o := &corev1.Secret{}
		return o, &o.ObjectMeta, nil
	case "v1/Service":
		o := &corev1.Service{}
		return o, &o.ObjectMeta, nil
	case "apps/v1/DaemonSet":
		o := &appsv1.DaemonSet{}
		return o, &o.ObjectMeta, nil
	case "autoscaling/v2/HorizontalPodAutoscaler":
		o := &autoscalingv2.HorizontalPodAutoscaler{}
		return o, &o.ObjectMeta, nil
	case "rbac.authorization.k8s.io/v1/Role":
		o := &rbacv1.Role{}
		return o, &o.ObjectMeta, nil
	case "rbac.authorization.k8s.io/v1/RoleBinding":
		o := &rbacv1.RoleBinding{}
		return o, &o.ObjectMeta, nil
	case "rbac.authorization.k8s.io/v1/ClusterRole":
		o := &rbacv1.ClusterRole{}
		return o, &o.ObjectMeta, nil
	case "rbac.authorization.k8s.io/v1/ClusterRoleBinding":
		o := &rbacv1.ClusterRoleBinding{}
		return o, &o.ObjectMeta, nil
	case "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy":
		o := &admissionv1.ValidatingAdmissionPolicy{}
		return o, &o.ObjectMeta, nil
	case "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicyBinding":
		o := &admissionv1.ValidatingAdmissionPolicyBinding{}
		return o, &o.ObjectMeta, nil
	case "resource.k8s.io/v1/DeviceClass":
		o := &resourcev1.DeviceClass{}
		return o, &o.ObjectMeta, nil
	case "monitoring.coreos.com/v1/ServiceMonitor":
		o := &monv1.ServiceMonitor{}
		return o, &o.ObjectMeta, nil
	case "monitoring.coreos.com/v1/PrometheusRule":
		o := &monv1.PrometheusRule{}
		return o, &o.ObjectMeta, nil
	}
	return nil, nil, fmt.Errorf("unexpected object %s %s: add its Go type to newTyped", apiVersion, kind)
}

// decodeStrict decodes one YAML object into its k8s.io/api (or Prometheus
// Operator) type; an unknown, duplicate or wrongly cased field is an error.
func decodeStrict(d Doc) (Object, error) {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal([]byte(d.Content), &head); err != nil {
		return Object{}, fmt.Errorf("%s: not YAML: %w", d.Source, err)
	}
	obj, meta, err := newTyped(head.APIVersion, head.Kind)
	if err != nil {
		return Object{}, fmt.Errorf("%s: %w", d.Source, err)
	}
	// As the API server's strict field validation: duplicate keys, unknown
	// fields and fields in the wrong case are errors.
	js, err := yaml.YAMLToJSONStrict([]byte(d.Content))
	if err != nil {
		return Object{}, fmt.Errorf("%s (%s %s): %w", d.Source, head.Kind, d.Name, err)
	}
	strict, err := kjson.UnmarshalStrict(js, obj, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err == nil && len(strict) > 0 {
		err = errors.Join(strict...)
	}
	if err != nil {
		return Object{}, fmt.Errorf("%s (%s %s): strict decoding into %T: %w", d.Source, head.Kind, d.Name, obj, err)
	}
	return Object{Doc: d, Obj: obj, Meta: meta}, nil
}

// decodeAll strictly decodes every rendered object.
func decodeAll(t *testing.T, docs []Doc) []Object {
	t.Helper()
	var out []Object
	for _, d := range docs {
		o, err := decodeStrict(d)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, o)
	}
	return out
}

// splitYAMLFile splits a multi-document YAML file into objects, skipping
// documents that hold only comments.
func splitYAMLFile(path string) ([]Doc, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var docs []Doc
	for i, part := range strings.Split("\n"+string(raw), "\n---\n") {
		body := strings.TrimSpace(part)
		if onlyComments(body) {
			continue
		}
		var head struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(body), &head); err != nil {
			return nil, fmt.Errorf("%s document %d: %w", path, i, err)
		}
		docs = append(docs, Doc{Source: fmt.Sprintf("%s#%d", filepath.Base(path), i), Kind: head.Kind, Name: head.Metadata.Name, Content: body})
	}
	return docs, nil
}

func onlyComments(s string) bool {
	for _, l := range strings.Split(s, "\n") {
		if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "#") {
			return false
		}
	}
	return true
}

func objectOf[T any](t *testing.T, objs []Object) T {
	t.Helper()
	var zero T
	for _, o := range objs {
		if v, ok := o.Obj.(T); ok {
			return v
		}
	}
	t.Fatalf("no %T among the rendered objects", zero)
	return zero
}

func objectsOf[T any](objs []Object) []T {
	var out []T
	for _, o := range objs {
		if v, ok := o.Obj.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// TestStrictDecodingRejectsUnknownFields proves the decoder is strict: a
// misspelt field must fail, or every other test would accept it silently.
func TestStrictDecodingRejectsUnknownFields(t *testing.T) {
	for _, tc := range []struct{ name, yaml string }{
		{"misspelt field", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIPs: [None], publishNotReady: true}\n"},
		{"wrong case", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIp: None}\n"},
		{"field at the wrong level", "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec: {priorityClassName: system-node-critical}\n"},
		{"duplicate field", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\ndata: {c: d}\n"},
		{"unknown kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := decodeStrict(Doc{Source: "inline", Content: tc.yaml}); err == nil {
				t.Errorf("decodeStrict accepted %q", tc.yaml)
			}
		})
	}
}
