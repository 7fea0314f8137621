// Package mps runs the CUDA MPS control daemons of the resources shared
// through MPS (sharing.mps): one nvidia-cuda-mps-control per resource,
// started and limited as NVIDIA's mps-control-daemon starts them, and
// supervised. A resource's replicas are fit only while its daemon is
// ready: the daemon's health unit (sharing.MPSHealthUnit) says so in the
// health table, and Ready gates the resource's first advertisement.
package mps

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Spec is what one control daemon serves.
type Spec struct {
	// Root is --mps-root as this process sees it (the chart mounts the
	// host directory at the same path).
	Root     string
	Resource string // e.g. nvidia.com/gpu
	Replicas int    // per GPU
	GPUs     []GPU  // in NVML index order; CUDA_VISIBLE_DEVICES lists them so
	// ThreadPercent and Limits, when set, replace what Replicas implies:
	// a DRA claim's mpsConfig names them.
	ThreadPercent int
	Limits        []Limit
}

// GPU is one GPU a daemon serves.
type GPU struct {
	Index       int
	UUID        string
	MemoryBytes uint64
}

// Limit is one set_default_device_pinned_mem_limit.
type Limit struct {
	Device string // the CUDA ordinal under the daemon's CUDA_VISIBLE_DEVICES
	Value  string // MiB with NVIDIA's "M" suffix
}

// ThreadPercentage is set_default_active_thread_percentage: each client's
// share of the SMs, 100 / replicas as NVIDIA's daemon computes it.
func (s Spec) ThreadPercentage() int {
	if s.ThreadPercent > 0 {
		return s.ThreadPercent
	}
	if s.Replicas < 1 {
		return 100
	}
	return 100 / s.Replicas
}

// PinnedLimits are the per-GPU pinned device memory limits: the GPU's
// memory / replicas, in whole MiB, as NVIDIA's daemon sets them. A GPU of
// unknown memory gets none. The device is named by its CUDA ordinal under
// CUDA_VISIBLE_DEVICES (the daemon sees only its GPUs, in this order); with
// every GPU shared that is the NVML index NVIDIA's daemon uses.
func (s Spec) PinnedLimits() []Limit {
	if s.Limits != nil {
		return s.Limits
	}
	var out []Limit
	for i, g := range s.GPUs {
		if g.MemoryBytes == 0 || s.Replicas < 1 {
			continue
		}
		out = append(out, Limit{Device: strconv.Itoa(i), Value: fmt.Sprintf("%dM", g.MemoryBytes/uint64(s.Replicas)/(1<<20))})
	}
	return out
}

// VisibleDevices is the daemon's CUDA_VISIBLE_DEVICES.
func (s Spec) VisibleDevices() string {
	uuids := make([]string, len(s.GPUs))
	for i, g := range s.GPUs {
		uuids[i] = g.UUID
	}
	return strings.Join(uuids, ",")
}

// Equal reports whether two specs need the same daemon.
func (s Spec) Equal(o Spec) bool {
	return s.Root == o.Root && s.Resource == o.Resource && s.Replicas == o.Replicas && slices.Equal(s.GPUs, o.GPUs) &&
		s.ThreadPercent == o.ThreadPercent && slices.Equal(s.Limits, o.Limits)
}

// Specs derives the daemons the resources need: one per resource shared
// through MPS, serving the GPUs behind its replicas.
func Specs(root string, resources []*sharing.Resource, inv *nvml.Inventory) []Spec {
	mem := map[string]uint64{}
	if inv != nil {
		for _, g := range inv.GPUs {
			mem[g.UUID] = g.MemoryBytes
		}
	}
	var out []Spec
	for _, r := range resources {
		if !r.MPS {
			continue
		}
		s := Spec{Root: root, Resource: r.Name, Replicas: r.Replicas}
		seen := map[string]bool{}
		for _, d := range r.Devices {
			if !seen[d.GPUUUID] {
				seen[d.GPUUUID] = true
				s.GPUs = append(s.GPUs, GPU{Index: d.GPUIndex, UUID: d.GPUUUID, MemoryBytes: mem[d.GPUUUID]})
			}
		}
		slices.SortFunc(s.GPUs, func(a, b GPU) int { return a.Index - b.Index })
		out = append(out, s)
	}
	return out
}

// Dirs are the spec's directories.
func (s Spec) Dirs() Dirs { return DirsOf(s.Root, s.Resource) }

// Dirs are a resource's directories under the MPS root, laid out as
// NVIDIA's mps-control-daemon lays them out.
type Dirs struct {
	Pipe, Log, Started string
}

// DirsOf returns the directories of a resource under root:
// <root>/<resource>/pipe, …/log and the …/.started marker.
func DirsOf(root, resource string) Dirs {
	base := filepath.Join(root, resource)
	return Dirs{Pipe: filepath.Join(base, "pipe"), Log: filepath.Join(base, "log"), Started: filepath.Join(base, ".started")}
}
