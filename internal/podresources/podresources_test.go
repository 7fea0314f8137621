package podresources_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/proto"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	fake "github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// socketPath is a short path for a unix socket (t.TempDir can exceed the
// 108-byte limit).
func socketPath(t testing.TB) string {
	dir, err := os.MkdirTemp("", "prs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "kubelet.sock")
}

// resolver stands in for the daemon's: our resources and their IDs (a
// renamed time-sliced resource with replica IDs, a MIG resource, whole
// GPUs), everything else unknown.
func resolver() podresources.Resolver {
	ours := map[string]map[string]string{
		"nvidia.com/gpu":           {"GPU-a": "GPU-a", "GPU-c": "GPU-c"},
		"nvidia.com/mig-1g.5gb":    {"MIG-m1": "MIG-m1", "MIG-m2": "MIG-m2"},
		"nvidia.com/gpu.shared":    {"GPU-b::0": "GPU-b", "GPU-b::1": "GPU-b", "GPU-b::2": "GPU-b"},
		"nvidia.com/mig-1g.5gb.sh": {"MIG-m3::0": "MIG-m3", "MIG-m3::1": "MIG-m3"},
		// DRA devices: the driver's name, the device's name in its slice.
		"gpu.nvidia.com": {"gpu-4": "GPU-d", "gpu-5": "GPU-e"},
	}
	fallback := podresources.ResolveUUIDs(func(u string) bool { return u == "GPU-old" })
	return func(resource, id string) (string, bool) {
		if u, ok := ours[resource][id]; ok {
			return u, true
		}
		return fallback(resource, id)
	}
}

// run starts a cache on socket and stops it when the test ends.
func run(t *testing.T, socket string, interval time.Duration) (*podresources.Cache, *testkit.Buffer) {
	t.Helper()
	logs := &testkit.Buffer{}
	c := podresources.New(podresources.Options{
		Socket: socket, Interval: interval, Resolver: resolver,
		Logger: slog.New(slog.NewTextHandler(logs, nil)),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after its context ended")
		}
	})
	return c, logs
}

func waitFor(t *testing.T, c *podresources.Cache, what string, cond func(*podresources.Snapshot, podresources.Status) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := c.WaitFor(ctx, cond); err != nil {
		t.Fatalf("%s: %v (snapshot %+v, status %+v)", what, err, c.Snapshot().ByUnit, c.Status())
	}
}

func holders(s *podresources.Snapshot, unit string) string {
	var out []string
	for _, h := range s.Holders(unit) {
		out = append(out, h.Namespace+"/"+h.Pod+"/"+h.Container+"@"+h.Resource+"["+strings.Join(h.DeviceIDs, ",")+"]")
	}
	return strings.Join(out, " ")
}

func TestAttribution(t *testing.T) {
	socket := socketPath(t)
	srv, err := fake.Start(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	dev := func(resource string, ids ...string) fake.Devices { return fake.Devices{Resource: resource, IDs: ids} }
	srv.SetPods(
		// A whole GPU, and an unrelated device of another plugin.
		fake.Pod("ml", "train-0", fake.Container{Name: "main", Devices: []fake.Devices{dev("nvidia.com/gpu", "GPU-a"), dev("example.com/nic", "mlx5_0")}}),
		// MIG devices, one per container.
		fake.Pod("ml", "infer-0",
			fake.Container{Name: "a", Devices: []fake.Devices{dev("nvidia.com/mig-1g.5gb", "MIG-m1")}},
			fake.Container{Name: "b", Devices: []fake.Devices{dev("nvidia.com/mig-1g.5gb", "MIG-m2")}}),
		// Three pods time-slice GPU-b through a renamed resource; one
		// container holds two replicas of it.
		fake.Pod("dev", "nb-1", fake.Container{Name: "jupyter", Devices: []fake.Devices{dev("nvidia.com/gpu.shared", "GPU-b::0", "GPU-b::2")}}),
		fake.Pod("dev", "nb-2", fake.Container{Name: "jupyter", Devices: []fake.Devices{dev("nvidia.com/gpu.shared", "GPU-b::1")}}),
		// A shared MIG device.
		fake.Pod("dev", "nb-3", fake.Container{Name: "x", Devices: []fake.Devices{dev("nvidia.com/mig-1g.5gb.sh", "MIG-m3::0")}}),
		fake.Pod("dev", "nb-4", fake.Container{Name: "x", Devices: []fake.Devices{dev("nvidia.com/mig-1g.5gb.sh", "MIG-m3::1")}}),
		// A device we advertised under a resource no longer served (the
		// UUID fallback), and an unknown UUID.
		fake.Pod("old", "legacy", fake.Container{Name: "c", Devices: []fake.Devices{dev("nvidia.com/gpu-old", "GPU-old::4"), dev("nvidia.com/gpu", "GPU-unknown")}}),
		// A pod without devices.
		fake.Pod("kube-system", "dns", fake.Container{Name: "coredns"}),
		// DRA: a claim of two GPUs, one of them shared with another pod's
		// claim, and a claim of another driver.
		fake.Pod("dra", "claimer", fake.Container{Name: "c", Claims: []fake.Claim{
			{Name: "two", Driver: "gpu.nvidia.com", Pool: "node-a", Devices: []string{"gpu-4", "gpu-5"}},
			{Name: "nic", Driver: "example.com", Pool: "node-a", Devices: []string{"gpu-4"}},
		}}),
		fake.Pod("dra", "sharer", fake.Container{Name: "c", Claims: []fake.Claim{{Name: "shared", Driver: "gpu.nvidia.com", Pool: "node-a", Devices: []string{"gpu-5"}}}}),
	)
	c, logs := run(t, socket, time.Hour)
	waitFor(t, c, "first refresh", func(_ *podresources.Snapshot, st podresources.Status) bool { return st.Successes > 0 })
	s := c.Snapshot()
	for _, tc := range []struct{ unit, want string }{
		{"GPU-a", "ml/train-0/main@nvidia.com/gpu[GPU-a]"},
		{"MIG-m1", "ml/infer-0/a@nvidia.com/mig-1g.5gb[MIG-m1]"},
		{"MIG-m2", "ml/infer-0/b@nvidia.com/mig-1g.5gb[MIG-m2]"},
		// One holder per container, with every replica it holds.
		{"GPU-b", "dev/nb-1/jupyter@nvidia.com/gpu.shared[GPU-b::0,GPU-b::2] dev/nb-2/jupyter@nvidia.com/gpu.shared[GPU-b::1]"},
		{"MIG-m3", "dev/nb-3/x@nvidia.com/mig-1g.5gb.sh[MIG-m3::0] dev/nb-4/x@nvidia.com/mig-1g.5gb.sh[MIG-m3::1]"},
		{"GPU-old", "old/legacy/c@nvidia.com/gpu-old[GPU-old::4]"},
		{"GPU-d", "dra/claimer/c@gpu.nvidia.com[gpu-4]"},
		{"GPU-e", "dra/claimer/c@gpu.nvidia.com[gpu-5] dra/sharer/c@gpu.nvidia.com[gpu-5]"},
		{"GPU-c", ""},
		{"GPU-unknown", ""},
		{"mlx5_0", ""},
	} {
		t.Run(tc.unit, func(t *testing.T) {
			if got := holders(s, tc.unit); got != tc.want {
				t.Errorf("holders of %s: %q, want %q", tc.unit, got, tc.want)
			}
		})
	}
	if s.Containers != 10 {
		t.Errorf("containers holding our devices: %d, want 10", s.Containers)
	}

	// The training pod finishes: its attribution goes with the next refresh.
	srv.SetPods(fake.Pod("dev", "nb-2", fake.Container{Name: "jupyter", Devices: []fake.Devices{dev("nvidia.com/gpu.shared", "GPU-b::1")}}))
	c.Refresh()
	waitFor(t, c, "refresh after the pods left", func(s *podresources.Snapshot, _ podresources.Status) bool {
		return len(s.Holders("GPU-a")) == 0
	})
	if got := holders(c.Snapshot(), "GPU-b"); got != "dev/nb-2/jupyter@nvidia.com/gpu.shared[GPU-b::1]" {
		t.Errorf("GPU-b after nb-1 left: %q", got)
	}

	// The same container on another replica (listed in another order) is
	// a new attribution: the replica numbers are dcgm-exporter's vgpu
	// label.
	before := c.Snapshot()
	srv.SetPods(fake.Pod("dev", "nb-2", fake.Container{Name: "jupyter", Devices: []fake.Devices{dev("nvidia.com/gpu.shared", "GPU-b::2", "GPU-b::0")}}))
	c.Refresh()
	waitFor(t, c, "refresh after the replicas changed", func(s *podresources.Snapshot, _ podresources.Status) bool { return s != before })
	if got := holders(c.Snapshot(), "GPU-b"); got != "dev/nb-2/jupyter@nvidia.com/gpu.shared[GPU-b::0,GPU-b::2]" {
		t.Errorf("GPU-b after nb-2 moved replicas: %q", got)
	}
	// An unchanged List keeps the snapshot (readers keep their views).
	same := c.Snapshot()
	st := c.Status()
	c.Refresh()
	waitFor(t, c, "another refresh", func(_ *podresources.Snapshot, s podresources.Status) bool { return s.Successes > st.Successes })
	if c.Snapshot() != same {
		t.Error("an unchanged List published a new snapshot")
	}
	if strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("warnings logged with a working kubelet:\n%s", logs)
	}
}

// TestLargeReply: a List reply beyond gRPC's default 4 MiB limit
// (dcgm-exporter#509) is read.
func TestLargeReply(t *testing.T) {
	socket := socketPath(t)
	srv, err := fake.Start(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	// Few messages with long IDs: over 4 MiB without making the race
	// detector spend seconds on protobuf.
	var pods []*podresourcesv1.PodResources
	for i := range 300 {
		var others []string
		for k := range 20 {
			others = append(others, fmt.Sprintf("vf-%d-%d-%s", i, k, strings.Repeat("y", 800)))
		}
		pods = append(pods, fake.Pod("batch", fmt.Sprintf("pod-%03d", i), fake.Container{Name: "main", Devices: []fake.Devices{
			{Resource: "nvidia.com/gpu.shared", IDs: []string{"GPU-b::" + fmt.Sprint(i%3)}}, {Resource: "example.com/sriov", IDs: others},
		}}))
	}
	var size int
	srv.SetPods(pods...)
	if n := proto.Size(&podresourcesv1.ListPodResourcesResponse{PodResources: pods}); n <= 4<<20 {
		t.Fatalf("the reply is %d bytes, not over gRPC's default 4 MiB limit", n)
	} else {
		size = n
	}
	c, _ := run(t, socket, time.Hour)
	waitFor(t, c, "a >4 MiB reply", func(_ *podresources.Snapshot, st podresources.Status) bool {
		return st.Successes > 0 || st.Failures > 0
	})
	if st := c.Status(); !st.Up {
		t.Fatalf("List of a %d-byte reply failed: %s", size, st.LastError)
	}
	if got := len(c.Snapshot().Holders("GPU-b")); got != len(pods) {
		t.Errorf("holders of GPU-b: %d, want %d (every pod)", got, len(pods))
	}
}

// TestMissingSocket: without the socket metrics go unattributed, the
// problem is logged once, and attribution starts when the kubelet appears.
func TestMissingSocket(t *testing.T) {
	socket := socketPath(t)
	c, logs := run(t, socket, 20*time.Millisecond)
	waitFor(t, c, "several failed refreshes", func(_ *podresources.Snapshot, st podresources.Status) bool { return st.Failures >= 5 })
	if n := strings.Count(logs.String(), "pod-resources socket missing"); n != 1 {
		t.Errorf("missing-socket warning logged %d times, want once:\n%s", n, logs)
	}
	if n := len(c.Snapshot().ByUnit); n != 0 {
		t.Errorf("attribution without a kubelet: %d units", n)
	}
	if err := testutil.CollectAndCompare(c, strings.NewReader(`
# HELP gpu_plugin_pod_resources_up 1 if the last List of the kubelet's pod-resources API succeeded (pod labels on GPU metrics are current), 0 if not.
# TYPE gpu_plugin_pod_resources_up gauge
gpu_plugin_pod_resources_up 0
`), "gpu_plugin_pod_resources_up"); err != nil {
		t.Error(err)
	}

	srv, err := fake.Start(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	srv.SetPods(fake.Pod("ml", "p", fake.Container{Name: "c", Devices: []fake.Devices{{Resource: "nvidia.com/gpu", IDs: []string{"GPU-a"}}}}))
	waitFor(t, c, "attribution once the kubelet is up", func(s *podresources.Snapshot, _ podresources.Status) bool {
		return len(s.Holders("GPU-a")) == 1
	})
	if !strings.Contains(logs.String(), "pod attribution from the kubelet") {
		t.Errorf("recovery not logged:\n%s", logs)
	}
}

// TestKubeletGoneDropsAttribution: while List fails, the last attribution
// is kept for MaxAge only.
func TestKubeletGoneDropsAttribution(t *testing.T) {
	socket := socketPath(t)
	srv, err := fake.Start(socket)
	if err != nil {
		t.Fatal(err)
	}
	srv.SetPods(fake.Pod("ml", "p", fake.Container{Name: "c", Devices: []fake.Devices{{Resource: "nvidia.com/gpu", IDs: []string{"GPU-a"}}}}))
	c, _ := run(t, socket, 20*time.Millisecond)
	waitFor(t, c, "attributed", func(s *podresources.Snapshot, _ podresources.Status) bool { return len(s.Holders("GPU-a")) == 1 })
	srv.Stop()
	waitFor(t, c, "attribution dropped after MaxAge", func(s *podresources.Snapshot, _ podresources.Status) bool {
		return len(s.ByUnit) == 0
	})
}

// TestRefreshAfterAllocate: Refresh makes the cache ask the kubelet at
// once, not at the next interval.
func TestRefreshAfterAllocate(t *testing.T) {
	socket := socketPath(t)
	srv, err := fake.Start(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	c, _ := run(t, socket, time.Hour)
	waitFor(t, c, "first refresh", func(_ *podresources.Snapshot, st podresources.Status) bool { return st.Successes == 1 })
	srv.SetPods(fake.Pod("ml", "new", fake.Container{Name: "c", Devices: []fake.Devices{{Resource: "nvidia.com/gpu", IDs: []string{"GPU-c"}}}}))
	start := time.Now()
	c.Refresh()
	waitFor(t, c, "refresh after Allocate", func(s *podresources.Snapshot, _ podresources.Status) bool {
		return len(s.Holders("GPU-c")) == 1
	})
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("attribution after Refresh took %s", took)
	}
}

func TestReplica(t *testing.T) {
	for _, tc := range []struct {
		id, n string
		ok    bool
	}{
		{"GPU-b::3", "3", true},
		{"MIG-m3::12", "12", true},
		{"0::1", "1", true}, // the index ID strategy's replicas
		{"GPU-a", "", false},
		{"MIG-m1", "", false},
		{"0", "", false},
	} {
		if n, ok := podresources.Replica(tc.id); n != tc.n || ok != tc.ok {
			t.Errorf("Replica(%q) = %q, %v; want %q, %v", tc.id, n, ok, tc.n, tc.ok)
		}
	}
}
