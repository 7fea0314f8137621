package kubelet

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// Health conformance: NVML events and lost GPUs, injected into the
// simulated node, change what the real device manager may allocate.

// XID 79 (the GPU fell off the bus) takes that GPU out of allocatable at
// once; capacity stays; the manager refuses to hand it out.
func TestXID79LowersAllocatable(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t, "--health-quiet-period=1h")
	k.waitCapacity(gpuResource, dgxH100)
	sick := p.gpuUUIDs()[3]

	start := time.Now()
	if n, err := p.d.SimNode().InjectXID(3, 79, -1, -1); err != nil || n != 1 {
		t.Fatalf("XID 79 on GPU 3 reached %d event sets (want 1): %v", n, err)
	}
	k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 7})
	t.Logf("XID 79 → allocatable 7 in %s", time.Since(start))
	if _, ok := k.devices(gpuResource)[sick]; ok {
		t.Errorf("GPU 3 (%s) still allocatable after XID 79", sick)
	}
	if st := p.d.Health().Status(sick); st.Healthy || !strings.Contains(st.Reason, "XID 79") {
		t.Errorf("health of GPU 3: %+v, want unhealthy naming XID 79", st)
	}
	if _, err := k.admit(gpuPod("all-eight", gpuResource, 8)); err == nil || !strings.Contains(err.Error(), "Available: 7") {
		t.Errorf("a pod asking for 8 GPUs after XID 79: err %v, want a refusal with 7 available", err)
	}
}

// XID 13 is an application error: allocatable stays 8. Events are handled
// in order, so once a later XID 79 on another GPU has shown, the XID 13 has
// been seen and skipped.
func TestXID13KeepsAllocatable(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t, "--health-quiet-period=1h")
	k.waitCapacity(gpuResource, dgxH100)
	gpus := p.gpuUUIDs()

	for _, gpu := range []int{2, 2, 2, 6} {
		code := uint64(13)
		if gpu == 6 {
			code = 79
		}
		if _, err := p.d.SimNode().InjectXID(gpu, code, -1, -1); err != nil {
			t.Fatal(err)
		}
	}
	k.waitUntil(gpuResource, "allocatable 7 (GPU 6 only)", func(c counts) bool {
		if c.Allocatable < 7 {
			t.Errorf("allocatable %d: XID 13 took a GPU out", c.Allocatable)
		}
		return c == counts{Capacity: 8, Allocatable: 7}
	})
	devs := k.devices(gpuResource)
	if _, ok := devs[gpus[2]]; !ok {
		t.Errorf("GPU 2 (%s) not allocatable after three XID 13s", gpus[2])
	}
	if _, ok := devs[gpus[6]]; ok {
		t.Errorf("GPU 6 (%s) allocatable after XID 79", gpus[6])
	}
}

// A GPU lost without any event is found by probing; once it answers again
// and stays clean for the quiet period it returns to allocatable, with no
// restart of anything. The same after an XID 79 on a GPU that keeps
// answering.
func TestRecoveryReturnsAllocatable(t *testing.T) {
	const quiet = 300 * time.Millisecond
	k := startKubelet(t)
	p := startPlugin(t, "--health-probe-interval=20ms", "--health-quiet-period="+quiet.String())
	k.waitCapacity(gpuResource, dgxH100)
	node, gpus := p.d.SimNode(), p.gpuUUIDs()
	degraded := counts{Capacity: 8, Allocatable: 7}

	if err := node.SetLost(4, true); err != nil {
		t.Fatal(err)
	}
	k.waitCapacity(gpuResource, degraded)
	if st := p.d.Health().Status(gpus[4]); !strings.Contains(st.Reason, "GPU_IS_LOST") {
		t.Errorf("lost GPU's reason %q does not name GPU_IS_LOST", st.Reason)
	}
	back := time.Now()
	if err := node.SetLost(4, false); err != nil {
		t.Fatal(err)
	}
	took := k.waitCapacity(gpuResource, dgxH100)
	if took < quiet {
		t.Errorf("GPU 4 returned %s after answering again, before the %s quiet period", took, quiet)
	}
	t.Logf("recovered GPU → allocatable 8 in %s (quiet period %s)", time.Since(back), quiet)
	if _, ok := k.devices(gpuResource)[gpus[4]]; !ok {
		t.Errorf("GPU 4 (%s) not allocatable after recovering", gpus[4])
	}

	if _, err := node.InjectXID(1, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	k.waitCapacity(gpuResource, degraded)
	k.waitCapacity(gpuResource, dgxH100)
	pod := gpuPod("after-recovery", gpuResource, 8)
	if _, err := k.admit(pod); err != nil {
		t.Fatalf("a pod asking for all 8 GPUs after both recovered: %v", err)
	}
	if ids := k.allocated(pod, gpuResource); !slices.Contains(ids, gpus[1]) || !slices.Contains(ids, gpus[4]) {
		t.Errorf("allocated %v, want the recovered GPUs 1 and 4 among them", ids)
	}
}
