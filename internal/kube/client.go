// Package kube is the daemon's little API-server client: its own Node
// (read, watch, status patch, update) and Events about it. It speaks
// core/v1 alone: client-go's typed clients register every API group and
// more than double the binary. Only opt-in features use it
// (--node-health-condition, --config-dir); the default daemon never calls
// the API server.
package kube

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/go-logr/logr"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// Client is a REST client over core/v1.
type Client struct {
	rc     *rest.RESTClient
	scheme *runtime.Scheme
}

// newScheme knows core/v1 and the meta types the API server answers with.
func newScheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := corev1.AddToScheme(s); err != nil {
		return nil, err
	}
	metav1.AddToGroupVersion(s, corev1.SchemeGroupVersion)
	return s, nil
}

// NewClient makes a Client from a REST config (in-cluster or kubeconfig).
func NewClient(rc *rest.Config) (*Client, error) {
	s, err := newScheme()
	if err != nil {
		return nil, err
	}
	cfg := rest.CopyConfig(rc)
	cfg.APIPath = "/api"
	cfg.GroupVersion = &corev1.SchemeGroupVersion
	cfg.NegotiatedSerializer = serializer.NewCodecFactory(s).WithoutConversion()
	if cfg.UserAgent == "" {
		cfg.UserAgent = "gpu-plugin"
	}
	c, err := rest.RESTClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	return &Client{rc: c, scheme: s}, nil
}

// GetNode reads a Node.
func (c *Client) GetNode(ctx context.Context, name string) (*corev1.Node, error) {
	n := &corev1.Node{}
	err := c.rc.Get().Resource("nodes").Name(name).Do(ctx).Into(n)
	return n, err
}

// PatchNodeStatus applies a strategic merge patch to a Node's status.
func (c *Client) PatchNodeStatus(ctx context.Context, name string, patch []byte) error {
	return c.rc.Patch(types.StrategicMergePatchType).Resource("nodes").Name(name).SubResource("status").Body(patch).Do(ctx).Error()
}

// UpdateNode writes a Node read before (optimistic concurrency by its
// resourceVersion).
func (c *Client) UpdateNode(ctx context.Context, n *corev1.Node) error {
	return c.rc.Put().Resource("nodes").Name(n.Name).Body(n).Do(ctx).Error()
}

// Scheme is core/v1's, for an event recorder.
func (c *Client) Scheme() *runtime.Scheme { return c.scheme }

// EventSink is client-go's record.EventSink over the Client: what an event
// broadcaster writes through, with ctx for every request.
func (c *Client) EventSink(ctx context.Context) record.EventSink { return eventSink{c: c, ctx: ctx} }

type eventSink struct {
	c   *Client
	ctx context.Context
}

func (s eventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.c.rc.Post().Namespace(e.Namespace).Resource("events").Body(e).Do(s.ctx).Into(out)
	return out, err
}

func (s eventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.c.rc.Put().Namespace(e.Namespace).Resource("events").Name(e.Name).Body(e).Do(s.ctx).Into(out)
	return out, err
}

func (s eventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	out := &corev1.Event{}
	err := s.c.rc.Patch(types.StrategicMergePatchType).Namespace(e.Namespace).Resource("events").Name(e.Name).Body(data).Do(s.ctx).Into(out)
	return out, err
}

// WatchNode calls onChange with the Node named name when first listed and
// after every change, until ctx ends. client-go's informer lists, watches
// and re-lists after a broken watch by itself; only this one Node is asked
// for (a field selector), though RBAC cannot confine list and watch to it.
// The informer's own messages (a broken watch) go to log.
func (c *Client) WatchNode(ctx context.Context, name string, log *slog.Logger, onChange func(*corev1.Node)) {
	lw := cache.NewListWatchFromClient(c.rc, "nodes", metav1.NamespaceAll, fields.OneTermEqualSelector("metadata.name", name))
	logger := logr.FromSlogHandler(log.Handler())
	_, informer := cache.NewInformerWithOptions(cache.InformerOptions{
		Logger:        &logger,
		ListerWatcher: lw,
		ObjectType:    &corev1.Node{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { notifyNode(obj, onChange) },
			UpdateFunc: func(_, obj any) { notifyNode(obj, onChange) },
		},
	})
	informer.RunWithContext(ctx)
}

func notifyNode(obj any, onChange func(*corev1.Node)) {
	if n, ok := obj.(*corev1.Node); ok {
		onChange(n)
	}
}

// PodHandler hears of the pods on one node.
type PodHandler struct {
	// Set is called with a pod when first listed and after each change.
	Set func(*corev1.Pod)
	// Delete is called with a pod's UID when it is gone.
	Delete func(uid types.UID)
	// Synced, if set, is called once the first list has been handed to
	// Set.
	Synced func()
}

// WatchPods follows the pods scheduled to node (a field selector on
// spec.nodeName, as the kubelet itself watches them) until ctx ends. The
// informer keeps only what per-pod accounting reads: names, UID, phase
// and container IDs.
func (c *Client) WatchPods(ctx context.Context, node string, log *slog.Logger, h PodHandler) {
	lw := cache.NewListWatchFromClient(c.rc, "pods", metav1.NamespaceAll, fields.OneTermEqualSelector("spec.nodeName", node))
	logger := logr.FromSlogHandler(log.Handler())
	_, informer := cache.NewInformerWithOptions(cache.InformerOptions{
		Logger:        &logger,
		ListerWatcher: lw,
		ObjectType:    &corev1.Pod{},
		Transform:     trimPod,
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { setPod(obj, h.Set) },
			UpdateFunc: func(_, obj any) { setPod(obj, h.Set) },
			DeleteFunc: func(obj any) {
				if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
					obj = d.Obj
				}
				if p, ok := obj.(*corev1.Pod); ok {
					h.Delete(p.UID)
				}
			},
		},
	})
	if h.Synced != nil {
		done := make(chan struct{})
		defer func() { <-done }()
		go func() {
			defer close(done)
			if cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
				h.Synced()
			}
		}()
	}
	informer.RunWithContext(ctx)
}

func setPod(obj any, set func(*corev1.Pod)) {
	if p, ok := obj.(*corev1.Pod); ok {
		set(p)
	}
}

// trimPod keeps what WatchPods' handler reads, so the informer's cache of
// every pod on the node stays small.
func trimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{}
	out.Name, out.Namespace, out.UID, out.ResourceVersion = p.Name, p.Namespace, p.UID, p.ResourceVersion
	out.DeletionTimestamp = p.DeletionTimestamp
	out.Status.Phase = p.Status.Phase
	for _, list := range [][]corev1.ContainerStatus{p.Status.InitContainerStatuses, p.Status.ContainerStatuses} {
		for _, s := range list {
			out.Status.ContainerStatuses = append(out.Status.ContainerStatuses, corev1.ContainerStatus{Name: s.Name, ContainerID: s.ContainerID})
		}
	}
	return out, nil
}
