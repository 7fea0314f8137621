package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
)

// NFD's NodeFeature: a node's labelling request, which nfd-master turns
// into labels on the Node.
const (
	nodeFeaturePath = "/apis/nfd.k8s-sigs.io/v1alpha1/namespaces"
	// NodeNameLabel names the node a NodeFeature is about.
	NodeNameLabel = "nfd.node.kubernetes.io/node-name"
)

// NodeFeatureName is the object GFD writes for a node, so the switch from
// NVIDIA's GFD takes the object over instead of adding a second one.
func NodeFeatureName(node string) string { return "nvidia-features-for-" + node }

// ApplyNodeFeature makes the NodeFeature name in namespace request exactly
// labels for node, owned by owner (nil: none). It writes only when the
// object is missing or differs, and reports whether it wrote.
func (c *Client) ApplyNodeFeature(ctx context.Context, namespace, name, node string, labels map[string]string, owner *OwnerReference) (bool, error) {
	collection := nodeFeaturePath + "/" + url.PathEscape(namespace) + "/nodefeatures"
	path := collection + "/" + url.PathEscape(name)
	var raw []byte
	err := c.do(ctx, request{method: http.MethodGet, path: path}, &raw)
	if IsNotFound(err) {
		obj := map[string]any{
			"apiVersion": "nfd.k8s-sigs.io/v1alpha1",
			"kind":       "NodeFeature",
			"metadata":   map[string]any{"name": name, "namespace": namespace},
			"spec":       map[string]any{},
		}
		setNodeFeature(obj, node, labels, owner)
		body, _ := json.Marshal(obj)
		if err := c.do(ctx, request{method: http.MethodPost, path: collection, contentType: jsonBody, body: body}, nil); err != nil {
			return false, fmt.Errorf("creating NodeFeature %s/%s: %w", namespace, name, err)
		}
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading NodeFeature %s/%s: %w", namespace, name, err)
	}
	var obj map[string]any
	if err := json.Unmarshal(raw, &obj); err != nil {
		return false, fmt.Errorf("decoding NodeFeature %s/%s: %w", namespace, name, err)
	}
	before, _ := json.Marshal(obj)
	setNodeFeature(obj, node, labels, owner)
	after, _ := json.Marshal(obj)
	if string(before) == string(after) {
		return false, nil
	}
	// The resourceVersion read above makes this a compare-and-swap.
	if err := c.do(ctx, request{method: http.MethodPut, path: path, contentType: jsonBody, body: after}, nil); err != nil {
		return false, fmt.Errorf("updating NodeFeature %s/%s: %w", namespace, name, err)
	}
	return true, nil
}

// setNodeFeature sets what this daemon owns in a NodeFeature object:
// spec.labels, the node-name label and the owner; other fields (a
// features section someone else writes) stay.
func setNodeFeature(obj map[string]any, node string, labels map[string]string, owner *OwnerReference) {
	meta, _ := obj["metadata"].(map[string]any)
	if meta == nil {
		meta = map[string]any{}
		obj["metadata"] = meta
	}
	ml, _ := meta["labels"].(map[string]any)
	if ml == nil {
		ml = map[string]any{}
		meta["labels"] = ml
	}
	ml[NodeNameLabel] = node
	if owner != nil {
		refs, _ := meta["ownerReferences"].([]any)
		uid := owner.UID
		if !slices.ContainsFunc(refs, func(r any) bool { m, _ := r.(map[string]any); return m["uid"] == uid }) {
			var ref map[string]any
			b, _ := json.Marshal(owner)
			_ = json.Unmarshal(b, &ref)
			meta["ownerReferences"] = append(refs, ref)
		}
	}
	spec, _ := obj["spec"].(map[string]any)
	if spec == nil {
		spec = map[string]any{}
		obj["spec"] = spec
	}
	sl := make(map[string]any, len(labels))
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		sl[k] = labels[k]
	}
	spec["labels"] = sl
}
