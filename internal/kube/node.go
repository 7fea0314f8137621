package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
)

// GetNode reads a Node.
func (c *Client) GetNode(ctx context.Context, name string) (*Node, error) {
	var raw []byte
	if err := c.do(ctx, request{method: http.MethodGet, path: "/api/v1/nodes/" + url.PathEscape(name)}, &raw); err != nil {
		return nil, err
	}
	n := &Node{raw: raw}
	if err := json.Unmarshal(raw, n); err != nil {
		return nil, fmt.Errorf("decoding node %s: %w", name, err)
	}
	return n, nil
}

// PatchNodeStatus applies a strategic merge patch to a Node's status.
func (c *Client) PatchNodeStatus(ctx context.Context, name string, patch []byte) error {
	return c.do(ctx, request{method: http.MethodPatch, path: "/api/v1/nodes/" + url.PathEscape(name) + "/status",
		contentType: strategicMergePatch, body: patch}, nil)
}

// UpdateNode writes back a Node read by GetNode with its spec.taints
// replaced by n.Spec.Taints, the one field the daemon updates. Every
// other field goes back exactly as read, those this package does not
// know included, and the resourceVersion read makes it a
// compare-and-swap (a conflict if the Node changed since).
func (c *Client) UpdateNode(ctx context.Context, n *Node) error {
	if n.raw == nil {
		return fmt.Errorf("updating node %s: it was not read from the API server", n.Name)
	}
	dec := json.NewDecoder(bytes.NewReader(n.raw))
	dec.UseNumber() // numbers go back as they came
	var obj map[string]any
	if err := dec.Decode(&obj); err != nil {
		return fmt.Errorf("updating node %s: %w", n.Name, err)
	}
	spec, _ := obj["spec"].(map[string]any)
	if spec == nil {
		spec = map[string]any{}
		obj["spec"] = spec
	}
	if len(n.Spec.Taints) == 0 {
		delete(spec, "taints")
	} else {
		spec["taints"] = n.Spec.Taints
	}
	body, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	return c.do(ctx, request{method: http.MethodPut, path: "/api/v1/nodes/" + url.PathEscape(n.Name), contentType: jsonBody, body: body}, nil)
}

// WatchNode calls onChange with the Node named name when first listed and
// after every change, until ctx ends. Only this one Node is asked for (a
// field selector), though RBAC cannot confine list and watch to it.
// Problems (a broken watch) go to log.
func (c *Client) WatchNode(ctx context.Context, name string, log *slog.Logger, onChange func(*Node)) {
	(&informer[Node]{
		c: c, path: "/api/v1/nodes", selector: fieldSelector("metadata.name", name), what: "node " + name, log: log,
		meta: func(n *Node) *ObjectMeta { return &n.ObjectMeta },
		set:  onChange,
	}).run(ctx)
}

// GetPod reads a Pod.
func (c *Client) GetPod(ctx context.Context, namespace, name string) (*Pod, error) {
	p := &Pod{}
	err := c.do(ctx, request{method: http.MethodGet, path: "/api/v1/namespaces/" + url.PathEscape(namespace) + "/pods/" + url.PathEscape(name)}, p)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// PodHandler hears of the pods on one node.
type PodHandler struct {
	// Set is called with a pod when first listed and after each change.
	Set func(*Pod)
	// Delete is called with a pod's UID when it is gone.
	Delete func(uid string)
	// Synced, if set, is called once the first list has been handed to
	// Set.
	Synced func()
}

// WatchPods follows the pods scheduled to node (a field selector on
// spec.nodeName, as the kubelet itself watches them) until ctx ends. Pod
// keeps only what per-pod accounting reads (names, UID, phase, container
// IDs), and the labels and owners it decodes are dropped, so the watch's
// copy of every pod on the node stays small.
func (c *Client) WatchPods(ctx context.Context, node string, log *slog.Logger, h PodHandler) {
	c.podInformer(node, log, h).run(ctx)
}

func (c *Client) podInformer(node string, log *slog.Logger, h PodHandler) *informer[Pod] {
	return &informer[Pod]{
		c: c, path: "/api/v1/pods", selector: fieldSelector("spec.nodeName", node), what: "pods on node " + node, log: log,
		meta: func(p *Pod) *ObjectMeta { return &p.ObjectMeta },
		set: func(p *Pod) {
			p.Labels, p.OwnerReferences = nil, nil
			h.Set(p)
		},
		del:    func(p *Pod) { h.Delete(p.UID) },
		synced: h.Synced,
	}
}
