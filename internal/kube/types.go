package kube

import (
	"bytes"
	"encoding/json"
	"time"
)

// The API objects this package reads and writes, as small structs with
// the API's JSON names. Only the fields the daemon uses are here;
// encoding/json skips the rest on reading, and UpdateNode keeps them on
// writing (it writes the object as read).

// Time is a timestamp as the API writes it: RFC 3339 in UTC to the
// second; null when zero.
type Time struct{ time.Time }

// NewTime is t as a Time.
func NewTime(t time.Time) Time { return Time{t} }

func (t Time) MarshalJSON() ([]byte, error) {
	if t.IsZero() {
		return []byte("null"), nil
	}
	return json.Marshal(t.UTC().Format(time.RFC3339))
}

func (t *Time) UnmarshalJSON(b []byte) error {
	if bytes.Equal(b, []byte("null")) {
		t.Time = time.Time{}
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	pt, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return err
	}
	t.Time = pt.Local()
	return nil
}

// ObjectMeta is an object's metadata.
type ObjectMeta struct {
	Name              string            `json:"name,omitempty"`
	GenerateName      string            `json:"generateName,omitempty"`
	Namespace         string            `json:"namespace,omitempty"`
	UID               string            `json:"uid,omitempty"`
	ResourceVersion   string            `json:"resourceVersion,omitempty"`
	DeletionTimestamp *Time             `json:"deletionTimestamp,omitempty"`
	Labels            map[string]string `json:"labels,omitempty"`
	OwnerReferences   []OwnerReference  `json:"ownerReferences,omitempty"`
}

// OwnerReference names an object's owner.
type OwnerReference struct {
	APIVersion         string `json:"apiVersion"`
	Kind               string `json:"kind"`
	Name               string `json:"name"`
	UID                string `json:"uid"`
	Controller         *bool  `json:"controller,omitempty"`
	BlockOwnerDeletion *bool  `json:"blockOwnerDeletion,omitempty"`
}

// ControllerOf is the owner that controls an object, nil if none.
func ControllerOf(m *ObjectMeta) *OwnerReference {
	for i, r := range m.OwnerReferences {
		if r.Controller != nil && *r.Controller {
			return &m.OwnerReferences[i]
		}
	}
	return nil
}

// Node is a Node's metadata, taints and conditions. raw is the object as
// read, which UpdateNode writes back.
type Node struct {
	ObjectMeta `json:"metadata"`
	Spec       struct {
		Taints []Taint `json:"taints,omitempty"`
	} `json:"spec"`
	Status struct {
		Conditions []NodeCondition `json:"conditions,omitempty"`
	} `json:"status"`
	raw []byte
}

// Taint is a Node taint.
type Taint struct {
	Key       string `json:"key"`
	Value     string `json:"value,omitempty"`
	Effect    string `json:"effect"`
	TimeAdded *Time  `json:"timeAdded,omitempty"`
}

// TaintEffectNoSchedule is the taint effect that keeps new pods off.
const TaintEffectNoSchedule = "NoSchedule"

// NodeCondition is one of a Node's status conditions (fields in the API's
// order, so that a patch reads as one made from core/v1 types).
type NodeCondition struct {
	Type               string `json:"type"`
	Status             string `json:"status"`
	LastHeartbeatTime  Time   `json:"lastHeartbeatTime"`
	LastTransitionTime Time   `json:"lastTransitionTime"`
	Reason             string `json:"reason,omitempty"`
	Message            string `json:"message,omitempty"`
}

// Pod is what the daemon reads of a Pod: its metadata, phase and
// containers' IDs.
type Pod struct {
	ObjectMeta `json:"metadata"`
	Status     struct {
		Phase                 string            `json:"phase,omitempty"`
		InitContainerStatuses []ContainerStatus `json:"initContainerStatuses,omitempty"`
		ContainerStatuses     []ContainerStatus `json:"containerStatuses,omitempty"`
	} `json:"status"`
}

// Pod phases that end a pod.
const (
	PodSucceeded = "Succeeded"
	PodFailed    = "Failed"
)

// ContainerStatus names a container and its runtime ID.
type ContainerStatus struct {
	Name        string `json:"name"`
	ContainerID string `json:"containerID,omitempty"`
}

// ObjectReference names the object an Event is about.
type ObjectReference struct {
	Kind            string `json:"kind,omitempty"`
	Namespace       string `json:"namespace,omitempty"`
	Name            string `json:"name,omitempty"`
	UID             string `json:"uid,omitempty"`
	APIVersion      string `json:"apiVersion,omitempty"`
	ResourceVersion string `json:"resourceVersion,omitempty"`
	FieldPath       string `json:"fieldPath,omitempty"`
}

// NodeReference is how the kubelet names its Node in Events (the UID is
// the name): kubectl describe node finds them by it.
func NodeReference(name string) *ObjectReference {
	return &ObjectReference{Kind: "Node", APIVersion: "v1", Name: name, UID: name}
}

// EventSource is the component that reports an Event.
type EventSource struct {
	Component string `json:"component,omitempty"`
	Host      string `json:"host,omitempty"`
}

// Event types.
const (
	EventTypeNormal  = "Normal"
	EventTypeWarning = "Warning"
)

// Event is a core/v1 Event.
type Event struct {
	ObjectMeta          `json:"metadata"`
	InvolvedObject      ObjectReference `json:"involvedObject"`
	Reason              string          `json:"reason,omitempty"`
	Message             string          `json:"message,omitempty"`
	Source              EventSource     `json:"source,omitzero"`
	FirstTimestamp      Time            `json:"firstTimestamp"`
	LastTimestamp       Time            `json:"lastTimestamp"`
	Count               int32           `json:"count,omitempty"`
	Type                string          `json:"type,omitempty"`
	ReportingController string          `json:"reportingComponent"`
	ReportingInstance   string          `json:"reportingInstance"`
}
