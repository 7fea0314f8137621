package nodehealth

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
)

// Client is the little of the core/v1 API the publisher uses: its own
// Node, and Events. It is a REST client over core/v1 alone: client-go's
// typed clients register every API group and more than double the
// binary.
type Client struct {
	rc *rest.RESTClient
}

// scheme knows core/v1 and the meta types the API server answers with.
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
	return &Client{rc: c}, nil
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

// eventSink is client-go's record.EventSink over the Client: what the
// event broadcaster writes through.
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
