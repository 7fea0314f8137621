package kubelet

import (
	"os"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
)

// Sharing conformance: what the real device manager counts for time-sliced
// and MIG resources, and a live config reload.

// Time-sliced capacity is GPUs × replicas, under the shared name when
// renamed; a container asking for 2 under failRequestsGreaterThanOne is
// refused at admission with a message a user understands.
func TestTimeSlicedCapacity(t *testing.T) {
	k := startKubelet(t)
	startPlugin(t, configFile(t, `version: v1
sharing:
  timeSlicing:
    renameByDefault: true
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/gpu
      replicas: 4
`))
	k.waitCapacity("nvidia.com/gpu.shared", counts{Capacity: 8 * 4, Allocatable: 8 * 4})
	if c := k.capacity(gpuResource); c.Capacity != 0 {
		t.Errorf("renamed: %s still has %s", gpuResource, c)
	}
	if _, err := k.admit(gpuPod("two-replicas", "nvidia.com/gpu.shared", 2)); err == nil || !strings.Contains(err.Error(), "at most 1") {
		t.Errorf("a container asking for 2 shared GPUs: err %v, want the plugin's refusal (at most 1)", err)
	}
	one := gpuPod("one-replica", "nvidia.com/gpu.shared", 1)
	if _, err := k.admit(one); err != nil {
		t.Fatalf("a container asking for 1 shared GPU: %v", err)
	}
	if ids := k.allocated(one, "nvidia.com/gpu.shared"); len(ids) != 1 || !strings.Contains(ids[0], "::") {
		t.Errorf("allocated %v, want one replica ID <uuid>::<n>", ids)
	}
}

// Mixed MIG advertises each MIG profile as its own resource with the right
// count (the simulated dgx-a100-mig: GPUs 0-4 partitioned, 5-7 whole).
func TestMixedMIGCapacity(t *testing.T) {
	k := startKubelet(t)
	startPlugin(t, "--simulate=dgx-a100-mig", "--mig-strategy=mixed")
	for resource, n := range map[string]int64{
		"nvidia.com/gpu": 3, "nvidia.com/mig-1g.5gb": 9, "nvidia.com/mig-1g.5gb.me": 1, "nvidia.com/mig-2g.10gb": 2,
		"nvidia.com/mig-3g.20gb": 3, "nvidia.com/mig-4g.20gb": 1, "nvidia.com/mig-7g.40gb": 1,
	} {
		k.waitCapacity(resource, counts{Capacity: n, Allocatable: n})
	}
	pod := gpuPod("three-g", "nvidia.com/mig-3g.20gb", 2)
	if _, err := k.admit(pod); err != nil {
		t.Fatalf("a pod asking for two 3g.20gb: %v", err)
	}
	for _, id := range k.allocated(pod, "nvidia.com/mig-3g.20gb") {
		if !strings.HasPrefix(id, "MIG-") {
			t.Errorf("allocated %s, want a MIG device UUID", id)
		}
	}
}

// A config reload that changes replicas shows in the manager's capacity,
// without a daemon restart and without re-registering.
func TestReloadChangesReplicas(t *testing.T) {
	k := startKubelet(t)
	const doc = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n"
	flag := configFile(t, doc)
	p := startPlugin(t, flag)
	k.waitCapacity(gpuResource, counts{Capacity: 16, Allocatable: 16})
	p.waitRegistered("before the reload")
	before := p.registrations(gpuResource)

	path := strings.TrimPrefix(flag, "--config=")
	if err := os.WriteFile(path+".new", []byte(strings.Replace(doc, "replicas: 2", "replicas: 4", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
	took := k.waitCapacity(gpuResource, counts{Capacity: 32, Allocatable: 32})
	t.Logf("replicas 2 → 4 reached the device manager in %s", took)
	if after := p.registrations(gpuResource); after != before {
		t.Errorf("the reload re-registered %s (%d → %d registrations); it must update the open stream", gpuResource, before, after)
	}
	// The new list reaches the kubelet a moment before the reloader
	// counts the reload: wait for the count rather than read it at once.
	var st daemon.ReloadStatus
	if err := poll(waitTimeout, func() bool { st = p.d.ReloadStatus(); return st.Successes >= 1 }); err != nil || st.Successes != 1 || st.Failures != 0 {
		t.Errorf("reload status %+v, want one success", st)
	}
}
