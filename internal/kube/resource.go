package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
)

// The resource.k8s.io/v1 objects a DRA driver reads (ResourceClaim) and
// writes (ResourceSlice), with only the fields the daemon uses. The names
// are the API's; tests/kubelet checks them against k8s.io/api's types.

// ResourceAPIVersion is the group version of the DRA objects.
const ResourceAPIVersion = "resource.k8s.io/v1"

const resourcePath = "/apis/" + ResourceAPIVersion

// ResourceClaim is a claim for devices and, once the scheduler allocated
// it, the devices it got.
type ResourceClaim struct {
	ObjectMeta `json:"metadata"`
	Status     ResourceClaimStatus `json:"status"`
}

// ResourceClaimStatus is a claim's allocation and its consumers.
type ResourceClaimStatus struct {
	Allocation  *AllocationResult       `json:"allocation,omitempty"`
	ReservedFor []ResourceClaimConsumer `json:"reservedFor,omitempty"`
}

// ResourceClaimConsumer is a pod (or other object) a claim is reserved for.
type ResourceClaimConsumer struct {
	APIGroup string `json:"apiGroup,omitempty"`
	Resource string `json:"resource"`
	Name     string `json:"name"`
	UID      string `json:"uid"`
}

// AllocationResult is what the scheduler allocated to a claim.
type AllocationResult struct {
	Devices DeviceAllocationResult `json:"devices"`
}

// DeviceAllocationResult lists the allocated devices and the
// configuration that goes with them.
type DeviceAllocationResult struct {
	Results []DeviceRequestAllocationResult `json:"results,omitempty"`
	Config  []DeviceAllocationConfiguration `json:"config,omitempty"`
}

// DeviceRequestAllocationResult is one allocated device: the request it
// answers and the driver, pool and name that identify it.
type DeviceRequestAllocationResult struct {
	Request     string `json:"request"`
	Driver      string `json:"driver"`
	Pool        string `json:"pool"`
	Device      string `json:"device"`
	AdminAccess *bool  `json:"adminAccess,omitempty"`
	ShareID     string `json:"shareID,omitempty"`
}

// DeviceAllocationConfiguration is configuration from the claim or its
// DeviceClass for some or all of the claim's requests.
type DeviceAllocationConfiguration struct {
	Source   string                     `json:"source"` // FromClass or FromClaim
	Requests []string                   `json:"requests,omitempty"`
	Opaque   *OpaqueDeviceConfiguration `json:"opaque,omitempty"`
}

// OpaqueDeviceConfiguration is a driver's own configuration object.
type OpaqueDeviceConfiguration struct {
	Driver     string          `json:"driver"`
	Parameters json.RawMessage `json:"parameters"`
}

// ResourceSlice publishes devices of one pool of a driver.
type ResourceSlice struct {
	APIVersion string `json:"apiVersion,omitempty"`
	Kind       string `json:"kind,omitempty"`
	ObjectMeta `json:"metadata"`
	Spec       ResourceSliceSpec `json:"spec"`
}

// ResourceSliceSpec is a slice's pool and devices.
type ResourceSliceSpec struct {
	Driver   string        `json:"driver"`
	Pool     ResourcePool  `json:"pool"`
	NodeName string        `json:"nodeName,omitempty"`
	Devices  []SliceDevice `json:"devices,omitempty"`
}

// ResourcePool names a pool and says how many slices of which generation
// describe it.
type ResourcePool struct {
	Name               string `json:"name"`
	Generation         int64  `json:"generation"`
	ResourceSliceCount int64  `json:"resourceSliceCount"`
}

// SliceDevice is one device in a ResourceSlice.
type SliceDevice struct {
	Name       string                     `json:"name"`
	Attributes map[string]DeviceAttribute `json:"attributes,omitempty"`
	Capacity   map[string]DeviceCapacity  `json:"capacity,omitempty"`
	Taints     []DeviceTaint              `json:"taints,omitempty"`
}

// DeviceAttribute holds exactly one of its fields.
type DeviceAttribute struct {
	Int     *int64  `json:"int,omitempty"`
	Bool    *bool   `json:"bool,omitempty"`
	String  *string `json:"string,omitempty"`
	Version *string `json:"version,omitempty"`
}

// DeviceCapacity is an amount of a device's resource, as a quantity
// ("80Gi", "132").
type DeviceCapacity struct {
	Value string `json:"value"`
}

// DeviceTaint keeps pods that do not tolerate it off a device.
type DeviceTaint struct {
	Key       string `json:"key"`
	Value     string `json:"value,omitempty"`
	Effect    string `json:"effect"`
	TimeAdded *Time  `json:"timeAdded,omitempty"`
}

// StringAttribute, IntAttribute and VersionAttribute make attributes.
func StringAttribute(s string) DeviceAttribute  { return DeviceAttribute{String: &s} }
func IntAttribute(i int64) DeviceAttribute      { return DeviceAttribute{Int: &i} }
func VersionAttribute(v string) DeviceAttribute { return DeviceAttribute{Version: &v} }
func BoolAttribute(b bool) DeviceAttribute      { return DeviceAttribute{Bool: &b} }

// GetResourceClaim reads a ResourceClaim.
func (c *Client) GetResourceClaim(ctx context.Context, namespace, name string) (*ResourceClaim, error) {
	rc := &ResourceClaim{}
	path := resourcePath + "/namespaces/" + url.PathEscape(namespace) + "/resourceclaims/" + url.PathEscape(name)
	if err := c.do(ctx, request{method: http.MethodGet, path: path}, rc); err != nil {
		return nil, err
	}
	return rc, nil
}

// sliceSelector picks one driver's slices on one node.
func sliceSelector(driver, node string) string {
	return fieldSelector("spec.driver", driver) + "," + fieldSelector("spec.nodeName", node)
}

// ListResourceSlices lists one driver's ResourceSlices on one node.
func (c *Client) ListResourceSlices(ctx context.Context, driver, node string) ([]ResourceSlice, error) {
	var list struct {
		Items []ResourceSlice `json:"items"`
	}
	q := url.Values{"fieldSelector": {sliceSelector(driver, node)}}
	if err := c.do(ctx, request{method: http.MethodGet, path: resourcePath + "/resourceslices", query: q}, &list); err != nil {
		return nil, err
	}
	return list.Items, nil
}

// CreateResourceSlice creates s (named by metadata.generateName when its
// name is empty) and returns it as the API server stored it.
func (c *Client) CreateResourceSlice(ctx context.Context, s *ResourceSlice) (*ResourceSlice, error) {
	return c.writeSlice(ctx, http.MethodPost, resourcePath+"/resourceslices", s)
}

// UpdateResourceSlice replaces s; its resourceVersion makes the write a
// compare-and-swap (a conflict if the slice changed since it was read).
func (c *Client) UpdateResourceSlice(ctx context.Context, s *ResourceSlice) (*ResourceSlice, error) {
	return c.writeSlice(ctx, http.MethodPut, resourcePath+"/resourceslices/"+url.PathEscape(s.Name), s)
}

func (c *Client) writeSlice(ctx context.Context, method, path string, s *ResourceSlice) (*ResourceSlice, error) {
	in := *s
	in.APIVersion, in.Kind = ResourceAPIVersion, "ResourceSlice"
	body, err := json.Marshal(&in)
	if err != nil {
		return nil, err
	}
	out := &ResourceSlice{}
	if err := c.do(ctx, request{method: method, path: path, contentType: jsonBody, body: body}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// DeleteResourceSlice deletes the slice named name if its UID is still
// uid (a precondition: a slice re-created meanwhile is kept).
func (c *Client) DeleteResourceSlice(ctx context.Context, name, uid string) error {
	body := []byte(`{"kind":"DeleteOptions","apiVersion":"v1"}`)
	if uid != "" {
		body = []byte(fmt.Sprintf(`{"kind":"DeleteOptions","apiVersion":"v1","preconditions":{"uid":%q}}`, uid))
	}
	err := c.do(ctx, request{method: http.MethodDelete, path: resourcePath + "/resourceslices/" + url.PathEscape(name), contentType: jsonBody, body: body}, nil)
	if IsNotFound(err) {
		return nil
	}
	return err
}

// WatchResourceSlices calls onChange with each of one driver's slices on
// one node when listed and after every change to it, and with nil after
// the first list and after a deletion (by the kubelet, say), until ctx
// ends.
func (c *Client) WatchResourceSlices(ctx context.Context, driver, node string, log *slog.Logger, onChange func(*ResourceSlice)) {
	(&informer[ResourceSlice]{
		c: c, path: resourcePath + "/resourceslices", selector: sliceSelector(driver, node),
		what: "resource slices of " + driver + " on " + node, log: log,
		meta:   func(s *ResourceSlice) *ObjectMeta { return &s.ObjectMeta },
		set:    onChange,
		del:    func(*ResourceSlice) { onChange(nil) },
		synced: func() { onChange(nil) },
	}).run(ctx)
}

// IsInvalid reports whether the API server refused an object as invalid
// (422), e.g. a field its version does not know in a strict decode.
func IsInvalid(err error) bool { return statusCode(err) == http.StatusUnprocessableEntity }

// ResourceNotServed reports whether err says the API server does not serve
// resource.k8s.io/v1 (404 on the group's path with no object named).
func ResourceNotServed(err error) bool {
	return IsNotFound(err) && strings.Contains(err.Error(), "the server could not find the requested resource")
}
