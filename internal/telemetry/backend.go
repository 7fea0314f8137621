// Package telemetry samples GPU telemetry into immutable snapshots and
// serves them to Prometheus under dcgm-exporter's metric names.
//
// The data path: a Sampler asks a Backend (NVML, or DCGM when it
// initialises) for every field of every GPU and MIG device once per
// interval and publishes a Snapshot; the Collector turns the latest
// Snapshot, plus the cached pod attribution, into metrics at scrape time.
// A scrape never calls NVML, DCGM or the kubelet.
package telemetry

import (
	"context"
	"errors"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Target is one group of series: a whole GPU, or a MIG device.
type Target struct {
	// Key is the unit's UUID: "GPU-…" for a whole GPU, "MIG-…" for a MIG
	// device. Pod attribution and per-device state are keyed by it.
	Key string
	GPU *nvml.GPU
	MIG *nvml.MIGDevice // nil for a whole GPU
}

// Values are one device's field values; a field is present only if its bit
// is set in Have. Absent means "not supported here", never zero.
type Values struct {
	Have Mask
	V    [NumFields]float64
}

// Set stores a field's value.
func (v *Values) Set(f Field, x float64) {
	v.V[f] = x
	v.Have = v.Have.With(f)
}

// Get returns a field's value and whether it is present.
func (v *Values) Get(f Field) (float64, bool) { return v.V[f], v.Have.Has(f) }

// Result is one target's outcome of a sampling round.
type Result struct {
	Values
	// Err is set when the device could not be read this round; its
	// previous values then age until they are no longer served.
	Err error
}

// Request is one sampling round.
type Request struct {
	Inventory *nvml.Inventory
	Targets   []Target
	Fields    Mask
	// Out has one entry per target, zeroed; the backend fills it and must
	// not keep it after Sample returns.
	Out []Result
}

// Backend reads telemetry. Sample must return by ctx's deadline even if a
// device hangs (mark what did not answer in time with an error); it
// returns an error only when the backend as a whole cannot answer, and
// ErrBackendLost when it never will again without reconnecting.
type Backend interface {
	Name() string
	Sample(ctx context.Context, req *Request) error
	Close() error
}

// Connector is a backend that must connect first and may lose its
// connection (DCGM). Connect is called again after a loss, with backoff.
type Connector interface {
	Backend
	Connect(ctx context.Context) error
}

// ErrBackendLost says a backend's connection is gone (e.g. DCGM's
// DCGM_ST_CONNECTION_NOT_VALID); the sampler falls back and reconnects.
var ErrBackendLost = errors.New("telemetry backend connection lost")

// ErrTimeout marks a device that did not answer within the round.
var ErrTimeout = errors.New("no answer within the sampling round")

// Backend names, as --telemetry-backend takes them and the info metric
// reports them.
const (
	BackendAuto = "auto"
	BackendNVML = "nvml"
	BackendDCGM = "dcgm"
	BackendNone = "none"
)

// Selection says which backends the sampler may use.
type Selection struct {
	// Configured is what the user asked for: auto, nvml or dcgm.
	Configured string
	// Primary is DCGM, or nil. It is used while connected.
	Primary Connector
	// Fallback is NVML, or nil (no NVML). It serves while the primary is
	// unavailable.
	Fallback Backend
	// RetryPrimary keeps trying to connect the primary with backoff when
	// the first attempt fails (explicit dcgm, or a remote address that may
	// come up later). After a lost connection the primary is always
	// retried.
	RetryPrimary bool
	// MinBackoff and MaxBackoff bound the reconnect delay (defaults 1 s,
	// 1 min).
	MinBackoff, MaxBackoff time.Duration
}
