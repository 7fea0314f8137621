package podusage_test

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podusage"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// simNode is the whole per-pod path on a simulated DGX A100 in mixed MIG
// mode: simulated NVML processes, the NVML backend, the sampler with the
// Accountant, the kubelet's pod-resources API served over a real unix
// socket, and the collector's exposition.
type simNode struct {
	*node
	sim       *sim.Node
	inv       *nvml.Inventory
	kubelet   *fakepodresources.Server
	cache     *podresources.Cache
	sampler   *telemetry.Sampler
	collector *telemetry.Collector
	whole     nvml.GPU       // a GPU without MIG
	mig       nvml.MIGDevice // a MIG device
	migGPU    int
}

func newSimNode(t *testing.T) *simNode {
	p, err := sim.LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	s := &simNode{node: newNode(t), sim: sim.NewNode(p, time.Now)}
	lib, err := nvml.Open(s.sim.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	if s.inv, err = nvml.Scan(lib, nvml.ScanOptions{}); err != nil {
		t.Fatal(err)
	}
	s.migGPU = -1
	for _, g := range s.inv.GPUs {
		switch {
		case len(g.MIGDevices) == 0 && s.whole.UUID == "":
			s.whole = g
		case len(g.MIGDevices) > 0 && s.migGPU < 0:
			s.mig, s.migGPU = g.MIGDevices[0], g.Index
		}
	}
	sock := filepath.Join(t.TempDir(), "kubelet.sock")
	if s.kubelet, err = fakepodresources.Start(sock); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.kubelet.Stop)
	s.cache = podresources.New(podresources.Options{Socket: sock})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.cache.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	backend := nvmlbackend.New(nvmlbackend.Options{Lib: lib})
	t.Cleanup(func() { backend.Close() })
	s.acct = podusage.NewAccountant(podusage.Options{Resolver: podusage.NewResolver(s.proc), Directory: s.dir, Holders: s.cache.Snapshot})
	s.sampler = telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory: func() *nvml.Inventory { return s.inv }, Backends: telemetry.Selection{Configured: "nvml", Fallback: backend},
		Attributor: s.acct,
	})
	s.collector = telemetry.NewCollector(telemetry.CollectorOptions{Sampler: s.sampler, Pods: s.cache.Snapshot, Hostname: "node-1", PerPodDCGM: true})
	return s
}

// allocate tells the kubelet stand-in who holds what, and waits until the
// cache has it.
func (s *simNode) allocate(t *testing.T, pods ...*fakepodresourcesPod) {
	var list []*podresourcesv1.PodResources
	for _, p := range pods {
		list = append(list, fakepodresources.Pod("ml", p.name, fakepodresources.Container{Name: "main",
			Devices: []fakepodresources.Devices{{Resource: p.resource, IDs: []string{p.id}}}}))
	}
	s.kubelet.SetPods(list...)
	s.cache.Refresh()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Wait for these holders, not for any refresh: one already in flight
	// may carry the previous list.
	has := func(snap *podresources.Snapshot, _ podresources.Status) bool {
		if snap == nil {
			return false
		}
		n := 0
		for _, hs := range snap.ByUnit {
			n += len(hs)
		}
		if n != len(pods) {
			return false
		}
		for _, p := range pods {
			unit, _, _ := strings.Cut(p.id, "::")
			if !slices.ContainsFunc(snap.Holders(unit), func(h podresources.Holder) bool { return h.Pod == p.name }) {
				return false
			}
		}
		return true
	}
	if err := s.cache.WaitFor(ctx, has); err != nil {
		t.Fatal(err)
	}
}

type fakepodresourcesPod struct{ name, resource, id string }

// scrape samples one round and returns the exposition's samples by
// family, each as "label=value,…" (sorted) → value. (That the text equals
// a registry's rendering of the same collector is the telemetry package's
// TestWriteTextMatchesRegistry.)
func (s *simNode) scrape(t *testing.T) map[string]map[string]float64 {
	s.sampler.SampleOnce(context.Background())
	var b bytes.Buffer
	s.collector.WriteText(&b)
	return testkit.Exposition(t, b.Bytes())
}

// find returns the values of a family's series whose labels include all of
// want ("name=value").
func find(fam map[string]float64, want ...string) []float64 {
	var out []float64
	for labels, v := range fam {
		ok := true
		for _, w := range want {
			if !strings.Contains(","+labels+",", ","+w+",") {
				ok = false
			}
		}
		if ok {
			out = append(out, v)
		}
	}
	return out
}

// TestPerPodSeries: three pods time-slice a whole GPU (one idle), two share
// a MIG device, and a host process runs on the GPU: each pod's own use is
// served in gpu_plugin_pod_gpu_* and as per-pod DCGM series beside the
// unchanged device series, and a pod's series go with it.
func TestPerPodSeries(t *testing.T) {
	s := newSimNode(t)
	gpu, mig := s.whole, s.mig
	for k, name := range []string{"a", "b", "idle", "m1", "m2"} {
		s.pod(name, uid(k+1))
	}
	s.allocate(t,
		&fakepodresourcesPod{"a", "nvidia.com/gpu", gpu.UUID + "::0"},
		&fakepodresourcesPod{"b", "nvidia.com/gpu", gpu.UUID + "::1"},
		&fakepodresourcesPod{"idle", "nvidia.com/gpu", gpu.UUID + "::2"},
		&fakepodresourcesPod{"m1", "nvidia.com/mig-" + mig.Profile, mig.UUID + "::0"},
		&fakepodresourcesPod{"m2", "nvidia.com/mig-" + mig.Profile, mig.UUID + "::1"},
	)
	s.process(101, uid(1))
	s.process(102, uid(2))
	s.process(103, "") // a host process
	s.process(104, uid(4))
	s.process(105, uid(5))
	must(t, s.sim.SetProcesses(gpu.Index, []sim.Process{
		{PID: 101, UsedMiB: 4096, SMUtil: 30}, {PID: 102, UsedMiB: 1024, SMUtil: 10}, {PID: 103, UsedMiB: 256, SMUtil: 5},
	}))
	must(t, s.sim.SetProcesses(s.migGPU, []sim.Process{
		{PID: 104, UsedMiB: 2048, MIG: mig.UUID}, {PID: 105, UsedMiB: 512, MIG: mig.UUID},
	}))
	got := s.scrape(t)

	gpuLabel := "UUID=" + gpu.UUID
	for _, tc := range []struct {
		family string
		labels []string
		want   float64
	}{
		{telemetry.PodMemoryName, []string{"pod=a", "pod_uid=" + uid(1), "container=main", gpuLabel}, 4096 << 20},
		{telemetry.PodMemoryName, []string{"pod=b", gpuLabel}, 1024 << 20},
		{telemetry.PodMemoryName, []string{"pod=idle", gpuLabel}, 0},
		{telemetry.PodSMUtilName, []string{"pod=a", gpuLabel}, 0.30},
		{telemetry.PodSMUtilName, []string{"pod=b"}, 0.10},
		{telemetry.PodSMUtilName, []string{"pod=idle"}, 0},
		{telemetry.PodProcessesName, []string{"pod=a"}, 1},
		{telemetry.PodMemoryName, []string{"pod=m1", "GPU_I_ID=" + fmt.Sprint(mig.GPUInstanceID)}, 2048 << 20},
		{telemetry.PodMemoryName, []string{"pod=m2"}, 512 << 20},
		{telemetry.UnattributedMemoryName, []string{gpuLabel}, 256 << 20},
		{telemetry.UnattributedProcsName, []string{gpuLabel}, 1},
		{"DCGM_FI_DEV_FB_USED", []string{"pod=a", "pod_uid=" + uid(1), "modelName=" + gpu.Name}, 4096},
		{"DCGM_FI_DEV_FB_USED", []string{"pod=m2", "GPU_I_PROFILE=" + mig.Profile}, 512},
		{"DCGM_FI_DEV_GPU_UTIL", []string{"pod=b", "pod_uid=" + uid(2)}, 10},
	} {
		vals := find(got[tc.family], tc.labels...)
		if len(vals) != 1 || vals[0] != tc.want {
			t.Errorf("%s{%s} = %v, want [%g]", tc.family, strings.Join(tc.labels, ","), vals, tc.want)
		}
	}
	// No SM utilization on MIG devices, per pod or not.
	if v := find(got[telemetry.PodSMUtilName], "pod=m1"); len(v) != 0 {
		t.Errorf("SM utilization for a pod on a MIG device: %v", v)
	}
	if v := find(got["DCGM_FI_DEV_GPU_UTIL"], "pod=m1"); len(v) != 0 {
		t.Errorf("DCGM_FI_DEV_GPU_UTIL for a pod on a MIG device: %v", v)
	}
	// The device series are still there, unlabelled by pod (shared).
	dev := find(got["DCGM_FI_DEV_FB_USED"], gpuLabel)
	if len(dev) != 4 { // the device's and three pods'
		t.Errorf("DCGM_FI_DEV_FB_USED on the shared GPU: %v, want the device series and 3 per-pod ones", dev)
	}

	// b ends: its process goes, the kubelet stops listing it.
	must(t, s.sim.SetProcesses(gpu.Index, []sim.Process{{PID: 101, UsedMiB: 4096, SMUtil: 30}, {PID: 103, UsedMiB: 256, SMUtil: 5}}))
	s.exit(102)
	s.allocate(t,
		&fakepodresourcesPod{"a", "nvidia.com/gpu", gpu.UUID + "::0"},
		&fakepodresourcesPod{"idle", "nvidia.com/gpu", gpu.UUID + "::2"},
	)
	got = s.scrape(t)
	for _, fam := range []string{telemetry.PodMemoryName, "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL"} {
		if v := find(got[fam], "pod=b"); len(v) != 0 {
			t.Errorf("%s still has pod b after it ended: %v", fam, v)
		}
	}
	if v := find(got[telemetry.PodMemoryName], "pod=a"); len(v) != 1 {
		t.Errorf("pod a's series went too: %v", v)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
