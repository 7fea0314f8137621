package nvml

import (
	"errors"
	"fmt"
	"runtime"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// ProcessInfo is one compute process on a GPU or MIG device
// (nvmlDeviceGetComputeRunningProcesses).
type ProcessInfo struct {
	PID uint32
	// UsedMemory is the framebuffer the process uses, in bytes; 0 when the
	// driver cannot tell (NVML_VALUE_NOT_AVAILABLE).
	UsedMemory uint64
	// GPUInstanceID and ComputeInstanceID place the process on a MIG
	// device; 0xFFFFFFFF when the GPU is not in MIG mode.
	GPUInstanceID, ComputeInstanceID uint32
}

// ProcessSample is one process's utilization over a driver sampling period
// (nvmlDeviceGetProcessUtilization).
type ProcessSample struct {
	PID       uint32
	Timestamp uint64 // µs, CPU clock: pass the newest one back as lastSeen
	SMUtil    uint32 // %
	MemUtil   uint32 // %
}

// valueNotAvailable is NVML_VALUE_NOT_AVAILABLE as an unsigned long long.
const valueNotAvailable = ^uint64(0)

// ComputeProcesses lists the compute processes on a GPU handle (all of
// them, with their MIG instance IDs on a MIG GPU) or on a MIG device
// handle (that device's). Under MPS it lists the MPS server, not its
// clients (MPSComputeProcesses).
func ComputeProcesses(lib *Library, h gonvml.Device) ([]ProcessInfo, error) {
	return processList(lib, "nvmlDeviceGetComputeRunningProcesses", h.GetComputeRunningProcesses)
}

// MPSComputeProcesses lists the MPS client processes on a GPU or MIG
// device handle: the CUDA programs that reach the GPU through an MPS
// server. NOT_SUPPORTED (IsNotSupported) where the driver has no such list
// (before Volta, vGPU hosts, an NVML without the call).
func MPSComputeProcesses(lib *Library, h gonvml.Device) ([]ProcessInfo, error) {
	return processList(lib, "nvmlDeviceGetMPSComputeRunningProcesses", h.GetMPSComputeRunningProcesses)
}

func processList(lib *Library, op string, call func() ([]gonvml.ProcessInfo, gonvml.Return)) ([]ProcessInfo, error) {
	ps, err := Call(lib, op, call)
	if err != nil || len(ps) == 0 {
		return nil, err
	}
	out := make([]ProcessInfo, len(ps))
	for i, p := range ps {
		mem := p.UsedGpuMemory
		if mem == valueNotAvailable {
			mem = 0
		}
		out[i] = ProcessInfo{PID: p.Pid, UsedMemory: mem, GPUInstanceID: p.GpuInstanceId, ComputeInstanceID: p.ComputeInstanceId}
	}
	return out, nil
}

// ProcessUtilization returns the utilization samples newer than lastSeen
// (µs; 0: everything the driver still buffers). NVML lists only processes
// that used the GPU in a period; none newer is (nil, nil). It is not
// supported on MIG devices nor on MIG-enabled GPUs (NOT_SUPPORTED).
func ProcessUtilization(lib *Library, h gonvml.Device, lastSeen uint64) ([]ProcessSample, error) {
	const op = "nvmlDeviceGetProcessUtilization"
	call := func() ([]gonvml.ProcessUtilizationSample, gonvml.Return) { return h.GetProcessUtilization(lastSeen) }
	// go-nvml asks for the count, then fills a buffer of that size. A
	// process that appears in between makes the fill call answer
	// INSUFFICIENT_SIZE with a larger count, which go-nvml slices past its
	// buffer (a runtime panic, which Call recovers): ask again.
	const attempts = 3
	for try := 1; ; try++ {
		s, err := Call(lib, op, call)
		switch {
		case err == nil:
		case errors.Is(err, gonvml.ERROR_NOT_FOUND):
			return nil, nil
		case errors.Is(err, gonvml.ERROR_INSUFFICIENT_SIZE) && len(s) == 0:
			// go-nvml's answer when the count call finds no samples.
			return nil, nil
		case countChanged(err):
			if try < attempts {
				continue
			}
			// Not wrapped: a recovered panic would read as "not
			// supported" and turn the call off for good.
			return nil, fmt.Errorf("%s: the sample count kept changing between NVML's count and fill calls (%d tries): %v", op, attempts, err)
		default:
			return nil, err
		}
		if len(s) == 0 {
			return nil, nil
		}
		out := make([]ProcessSample, len(s))
		for i, x := range s {
			out[i] = ProcessSample{PID: x.Pid, Timestamp: x.TimeStamp, SMUtil: x.SmUtil, MemUtil: x.MemUtil}
		}
		return out, nil
	}
}

// countChanged reports the failures of a fill call whose count grew after
// the count call: INSUFFICIENT_SIZE, or go-nvml's slice past its buffer.
// A mock's missing method also panics, but with a string, not a runtime
// error.
func countChanged(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	if e.Panic != nil {
		_, ok := e.Panic.(runtime.Error)
		return ok
	}
	return e.Return == gonvml.ERROR_INSUFFICIENT_SIZE
}
