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
	// Procs are the compute processes on the target, when the request
	// asked for them (Request.Processes) and the backend could list them;
	// ProcsRead says it did (an empty list then means none run).
	Procs     []Process
	ProcsRead bool
	// ProcUtil says Procs carry per-process SM utilization. NVML has none
	// on MIG devices (and on MIG-enabled GPUs): memory only there.
	ProcUtil bool
	// MPSRead says Procs include the target's MPS clients: NVML's MPS
	// list was read with the processes (a driver without one leaves it
	// false: clients there are not told apart, nor counted).
	MPSRead bool
	// Err is set when the device could not be read this round; its
	// previous values then age until they are no longer served.
	Err error
}

// Process is one compute process on a GPU or MIG device, as NVML lists it
// (nvmlDeviceGetComputeRunningProcesses, nvmlDeviceGetMPSComputeRunningProcesses
// for MPS clients, and for utilization nvmlDeviceGetProcessUtilization).
type Process struct {
	// PID is as the driver reports it: a host PID when the daemon runs in
	// the host's PID namespace (hostPID), which per-pod accounting needs.
	PID uint32
	// MemoryBytes is the framebuffer the process uses; 0 when the driver
	// cannot tell (NVML_VALUE_NOT_AVAILABLE).
	MemoryBytes uint64
	// SMUtil is the process's SM utilization in percent, from its most
	// recent sample since the previous round; 0 when it had none (NVML
	// lists only processes that used the GPU). Meaningful only with
	// Result.ProcUtil.
	SMUtil float64
	// MPSClient: NVML lists the process as an MPS client (a CUDA program
	// that reaches the GPU through an MPS server). The MPS server itself
	// is an ordinary compute process.
	MPSClient bool
}

// Request is one sampling round.
type Request struct {
	Inventory *nvml.Inventory
	Targets   []Target
	Fields    Mask
	// Processes asks for each target's compute processes (Result.Procs),
	// for per-pod accounting. A backend that cannot list them leaves
	// Result.ProcsRead false.
	Processes bool
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
