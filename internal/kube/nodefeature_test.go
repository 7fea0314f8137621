package kube

import (
	"encoding/json"
	"testing"
)

// setNodeFeature sets only what the daemon owns, and setting the same
// again changes nothing (so ApplyNodeFeature writes nothing).
func TestSetNodeFeature(t *testing.T) {
	obj := map[string]any{
		"metadata": map[string]any{"name": "nvidia-features-for-n1", "resourceVersion": "7",
			"labels": map[string]any{"team": "ml"}},
		"spec": map[string]any{"features": map[string]any{"flags": map[string]any{"x": "y"}},
			"labels": map[string]any{"nvidia.com/gpu.count": "4", "stale": "1"}},
	}
	owner := &OwnerReference{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "gpu-plugin", UID: "u-1"}
	want := map[string]string{"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "NVIDIA-H100"}
	setNodeFeature(obj, "n1", want, owner)
	once, _ := json.Marshal(obj)
	setNodeFeature(obj, "n1", want, owner)
	twice, _ := json.Marshal(obj)
	if string(once) != string(twice) {
		t.Errorf("setting the same labels again changed the object:\n%s\n%s", once, twice)
	}
	var got struct {
		Metadata struct {
			ResourceVersion string            `json:"resourceVersion"`
			Labels          map[string]string `json:"labels"`
			OwnerReferences []OwnerReference  `json:"ownerReferences"`
		} `json:"metadata"`
		Spec struct {
			Features map[string]any    `json:"features"`
			Labels   map[string]string `json:"labels"`
		} `json:"spec"`
	}
	if err := json.Unmarshal(once, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Spec.Labels) != 2 || got.Spec.Labels["nvidia.com/gpu.count"] != "8" || got.Spec.Labels["stale"] != "" {
		t.Errorf("spec.labels %v, want exactly %v", got.Spec.Labels, want)
	}
	if got.Metadata.Labels[NodeNameLabel] != "n1" || got.Metadata.Labels["team"] != "ml" {
		t.Errorf("metadata.labels %v: want the node-name label added and the others kept", got.Metadata.Labels)
	}
	if len(got.Metadata.OwnerReferences) != 1 || got.Metadata.OwnerReferences[0].UID != "u-1" {
		t.Errorf("ownerReferences %+v, want the DaemonSet once", got.Metadata.OwnerReferences)
	}
	if got.Metadata.ResourceVersion != "7" || got.Spec.Features == nil {
		t.Errorf("the resourceVersion (%q) or another writer's features (%v) were not kept", got.Metadata.ResourceVersion, got.Spec.Features)
	}
}
