// Package nodehealth makes the node's GPU health visible in the cluster
// (opt-in): a GPUHealthy condition on the Node, an Event on the Node for
// each GPU that turns unhealthy or healthy again, and optionally a
// NoSchedule taint while no GPU of the node is healthy.
//
// It reads the health table the plugin servers read and writes to the API
// server from its own goroutine, so a slow or absent API server never
// delays the kubelet-facing paths.
package nodehealth

import (
	"fmt"
	"slices"
	"strings"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Names the cluster sees.
const (
	// ConditionType is the Node condition: True while every GPU is
	// healthy.
	ConditionType = "GPUHealthy"
	// ReasonHealthy and ReasonUnhealthy are the condition's reasons, and
	// the reasons of the per-GPU Events.
	ReasonHealthy   = "GPUHealthy"
	ReasonUnhealthy = "GPUUnhealthy"
	// TaintKey is the NoSchedule taint set while no GPU is healthy
	// (--node-health-taint).
	TaintKey = "gpu-plugin.io/no-healthy-gpu"
	// maxMessage bounds the condition's message: the GPUs beyond it are
	// counted, not listed.
	maxMessage = 1024
)

// gpuHealth is one GPU's health as the cluster sees it.
type gpuHealth struct {
	Index   int
	UUID    string
	Healthy bool   // the GPU and all its MIG devices are healthy
	Usable  bool   // some device of it can still be allocated
	Reason  string // why not healthy
}

// name is how messages and Events name the GPU.
func (g gpuHealth) name() string { return fmt.Sprintf("GPU %d (%s)", g.Index, g.UUID) }

// nodeGPUs reads every identified GPU's health from the table. As in
// `gpu-plugin health`, a GPU is unhealthy when its own unit is or any of
// its MIG devices is; its reason is the GPU's, else the first sick MIG
// device's. It stays usable while it is healthy itself and, in MIG mode,
// one of its MIG devices is.
func nodeGPUs(inv *nvml.Inventory, snap map[string]health.Status) []gpuHealth {
	if inv == nil {
		return nil
	}
	out := make([]gpuHealth, 0, len(inv.GPUs))
	for _, g := range inv.GPUs {
		if g.UUID == "" {
			continue
		}
		h := gpuHealth{Index: g.Index, UUID: g.UUID, Healthy: true, Usable: true}
		if st, ok := snap[g.UUID]; ok && !st.Healthy {
			h.Healthy, h.Usable, h.Reason = false, false, st.Reason
			out = append(out, h)
			continue
		}
		sick := 0
		for _, m := range g.MIGDevices {
			if st, ok := snap[m.UUID]; ok && !st.Healthy {
				if sick == 0 {
					h.Healthy, h.Reason = false, fmt.Sprintf("MIG device %s: %s", m.UUID, st.Reason)
				}
				sick++
			}
		}
		if len(g.MIGDevices) > 0 && sick == len(g.MIGDevices) {
			h.Usable = false
		}
		out = append(out, h)
	}
	return out
}

// condition is the GPUHealthy condition's status, reason and message for
// the GPUs.
type condition struct {
	Status  string // "True" or "False"
	Reason  string
	Message string
}

func conditionFor(gpus []gpuHealth) condition {
	var sick []gpuHealth
	for _, g := range gpus {
		if !g.Healthy {
			sick = append(sick, g)
		}
	}
	if len(sick) == 0 {
		return condition{Status: "True", Reason: ReasonHealthy, Message: fmt.Sprintf("all %d GPUs are healthy", len(gpus))}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d of %d GPUs unhealthy: ", len(sick), len(gpus))
	for i, g := range sick {
		item := fmt.Sprintf("%s: %s", g.name(), g.Reason)
		if i > 0 {
			item = "; " + item
		}
		more := fmt.Sprintf("; and %d more", len(sick)-i)
		if b.Len()+len(item)+len(more) > maxMessage {
			b.WriteString(more)
			break
		}
		b.WriteString(item)
	}
	return condition{Status: "False", Reason: ReasonUnhealthy, Message: b.String()}
}

// noneUsable reports whether the node has GPUs and none of them can be
// allocated: when the taint applies.
func noneUsable(gpus []gpuHealth) bool {
	return len(gpus) > 0 && !slices.ContainsFunc(gpus, func(g gpuHealth) bool { return g.Usable })
}

// transition is a GPU whose health changed since the last round: one
// Event.
type transition struct {
	gpuHealth
}

// transitions compares two rounds by UUID. A GPU first seen counts as
// healthy before, so a GPU unhealthy at start makes an Event and a healthy
// one does not.
func transitions(before, now []gpuHealth) []transition {
	was := make(map[string]bool, len(before))
	for _, g := range before {
		was[g.UUID] = g.Healthy
	}
	var out []transition
	for _, g := range now {
		healthy, seen := was[g.UUID]
		if !seen {
			healthy = true
		}
		if healthy != g.Healthy {
			out = append(out, transition{g})
		}
	}
	return out
}
