package kubelet

// Per-pod GPU accounting end to end on the production NVML path. Real
// `sleep` processes run in real kubelet-style cgroups made by the test
// (internal/testkit: the cgroupfs driver's paths in a cgroup v1
// hierarchy, the systemd driver's in a cgroup2 mount); their real PIDs
// are compute processes of the fake libnvidia-ml.so.1 (loaded through
// go-nvml's real dlopen), registered through its control socket; the
// kubelet's allocations come from the pod-resources stand-in over a real
// unix socket; the pods are in a Directory as the API server's pod watch
// would put them. The NVML backend, the sampler with the Accountant
// (Resolver on the real /proc) and the collector's exposition, parsed,
// are the daemon's own.

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podusage"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry/nvmlbackend"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// perPodChildEnv marks the child process TestRealNVMLPerPod runs its
// checks in.
const perPodChildEnv = "GPU_PLUGIN_PERPOD_CHILD"

// perPodRoundGap separates sampling rounds: the library stamps each
// utilization sample with the start of the driver's 1/6 s sampling
// period, and a round gets only samples newer than the previous round's
// newest (lastSeenTimeStamp), so two rounds within one period would read
// no SM utilization the second time.
const perPodRoundGap = 250 * time.Millisecond

// perPodCase is one device shared by pods.
type perPodCase struct {
	name string
	gpu  int // NVML index
	gi   int // ≥ 0: the MIG device of this GPU instance (compute instance 0) on gpu
	pods int
	// drivers are cycled over the pods: each pod's cgroups follow its
	// driver's layout, in its hierarchy.
	drivers []testkit.CgroupDriver
	// stayListed: NVML still lists the ending pod's process in the round
	// after it exited (the driver has not torn its context down yet).
	stayListed bool
}

// On dgx-a100-mig GPUs 5-7 have MIG off; GPU 1's 3g.20gb is GPU instance 2.
var perPodCases = []perPodCase{
	{name: "gpu-2", gpu: 5, gi: -1, pods: 2, drivers: []testkit.CgroupDriver{testkit.Cgroupfs}},
	{name: "gpu-3", gpu: 6, gi: -1, pods: 3, drivers: []testkit.CgroupDriver{testkit.Systemd}},
	{name: "gpu-10", gpu: 7, gi: -1, pods: 10, drivers: []testkit.CgroupDriver{testkit.Cgroupfs, testkit.Systemd}, stayListed: true},
	{name: "mig-2", gpu: 1, gi: 2, pods: 2, drivers: []testkit.CgroupDriver{testkit.Systemd, testkit.Cgroupfs}},
}

// TestRealNVMLPerPod: 2, 3 and 10 pods time-slicing a whole GPU and 2
// pods on a MIG device, each with a host process beside them: every pod's
// memory, SM utilization (none on MIG) and process count are its own
// processes', the host process is unattributed, and a pod that ends loses
// its series in the next round.
func TestRealNVMLPerPod(t *testing.T) {
	requireKubeletNamespace(t)
	libDir := fakeNVMLDir(t)
	if !inFakeNVMLChild(t, perPodChildEnv, libDir, "dgx-a100-mig") {
		return
	}
	n := newPerPodNode(t, libDir)
	for _, tc := range perPodCases {
		t.Run(tc.name, func(t *testing.T) { n.run(t, tc) })
	}
}

// perPodNode is the daemon's per-pod path on the fake library.
type perPodNode struct {
	inv       *nvml.Inventory
	ctlSocket string // the library's control socket
	kubelet   *fakepodresources.Server
	cache     *podresources.Cache
	dir       *podusage.Directory
	sampler   *telemetry.Sampler
	collector *telemetry.Collector
	lastRound time.Time
}

func newPerPodNode(t *testing.T, libDir string) *perPodNode {
	lib, inv := openFakeNVML(t, libDir)
	n := &perPodNode{inv: inv, ctlSocket: os.Getenv("FAKE_NVML_SOCKET"), dir: podusage.NewDirectory()}
	n.dir.MarkSynced() // the pod watch's first list is in

	sock := filepath.Join(t.TempDir(), "pod-resources.sock")
	var err error
	if n.kubelet, err = fakepodresources.Start(sock); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.kubelet.Stop)
	// A long interval: every refresh in this test is asked for.
	n.cache = podresources.New(podresources.Options{Socket: sock, Interval: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); n.cache.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	backend := nvmlbackend.New(nvmlbackend.Options{Lib: lib})
	t.Cleanup(func() { backend.Close() })
	acct := podusage.NewAccountant(podusage.Options{
		Resolver: podusage.NewResolver("/proc"), Directory: n.dir, Holders: n.cache.Snapshot,
	})
	n.sampler = telemetry.NewSampler(telemetry.SamplerOptions{
		Inventory:    func() *nvml.Inventory { return inv },
		Backends:     telemetry.Selection{Configured: "nvml", Fallback: backend},
		RoundTimeout: 10 * time.Second, // a loaded machine under -race
		Attributor:   acct,
	})
	n.collector = telemetry.NewCollector(telemetry.CollectorOptions{Sampler: n.sampler, Pods: n.cache.Snapshot, Hostname: "node-1"})
	return n
}

// perPodProc is one process a test pod (or the host) runs on the device.
type perPodProc struct {
	pid int
	mib uint64
	sm  int // percent; registered on MIG devices too, where NVML reports none
}

type perPodPod struct {
	name, uid, cid string
	replica        int // the pod holds "<unit>::<replica>"
	procs          []perPodProc
	cgroups        *testkit.Cgroups
}

// perPodWant is a pod's expected series on the device: memory bytes, SM
// ratio, processes.
type perPodWant struct {
	mem   float64
	sm    float64
	procs float64
}

func (n *perPodNode) run(t *testing.T, tc perPodCase) {
	gpu := n.inv.GPUs[tc.gpu]
	unit, resource := gpu.UUID, "nvidia.com/gpu"
	device := []string{"UUID=" + gpu.UUID, "gpu=" + strconv.Itoa(gpu.Index), "Hostname=node-1"}
	procArgs := ""
	if tc.gi >= 0 {
		i := slices.IndexFunc(gpu.MIGDevices, func(m nvml.MIGDevice) bool { return m.GPUInstanceID == tc.gi })
		if !gpu.MIGEnabled || i < 0 {
			t.Fatalf("GPU %d: MIG %v, no GPU instance %d among %+v", tc.gpu, gpu.MIGEnabled, tc.gi, gpu.MIGDevices)
		}
		mig := gpu.MIGDevices[i]
		unit, resource = mig.UUID, "nvidia.com/mig-"+mig.Profile
		device = append(device, "GPU_I_ID="+strconv.Itoa(mig.GPUInstanceID), "GPU_I_PROFILE="+mig.Profile)
		procArgs = fmt.Sprintf(" %d %d", mig.GPUInstanceID, mig.ComputeInstanceID)
	} else if gpu.MIGEnabled {
		t.Fatalf("GPU %d has MIG on; the case wants it whole", tc.gpu)
	}
	ctl := fakeCtl(t, n.ctlSocket)
	onDevice := func(fam map[string]float64) map[string]float64 { return seriesWith(fam, device) }
	register := func(p perPodProc) {
		t.Helper()
		ctl(fmt.Sprintf("proc %d %d %d %d 1%s", tc.gpu, p.pid, p.mib, p.sm, procArgs))
	}
	unregister := func(pid int) { ctl(fmt.Sprintf("proc %d %d 0", tc.gpu, pid)) }

	// The pods: pod 0 runs two processes in its container, the others one;
	// every pod's memory and SM differ from the others'. The time-sliced
	// GPU's SM stays under 100% in all.
	cgroups := map[testkit.CgroupDriver]*testkit.Cgroups{}
	var pods []*perPodPod
	for k := range tc.pods {
		driver := tc.drivers[k%len(tc.drivers)]
		if cgroups[driver] == nil {
			cgroups[driver] = testkit.PodCgroups(t, driver)
		}
		p := &perPodPod{name: fmt.Sprintf("%s-%d", tc.name, k), uid: testkit.RandomPodUID(t), cid: testkit.RandomContainerID(t),
			replica: k, cgroups: cgroups[driver]}
		qos := []testkit.QoS{testkit.Burstable, testkit.BestEffort, testkit.Guaranteed}[k%3]
		nprocs := 1
		if k == 0 {
			nprocs = 2
		}
		for i := range nprocs {
			p.procs = append(p.procs, perPodProc{
				pid: p.cgroups.AddQoS(qos, p.uid, p.cid),
				mib: 256*uint64(k+1) + 64*uint64(i),
				sm:  2 + k + 10*i,
			})
		}
		n.dir.Set(podusage.Pod{UID: p.uid, Namespace: "ml", Name: p.name, Containers: map[string]string{p.cid: "main"}})
		pods = append(pods, p)
	}
	host := perPodProc{pid: testkit.StartSleeper(t), mib: 64, sm: 5}
	t.Cleanup(func() { // whatever happened, the next case starts clean
		for _, p := range pods {
			for _, pr := range p.procs {
				unregister(pr.pid)
			}
			n.dir.Delete(p.uid)
		}
		unregister(host.pid)
		n.kubelet.SetPods()
	})
	for _, p := range pods {
		for _, pr := range p.procs {
			register(pr)
		}
	}
	register(host)
	n.allocate(t, resource, unit, pods)

	want := map[string]perPodWant{}
	for _, p := range pods {
		var w perPodWant
		for _, pr := range p.procs {
			w.mem += float64(pr.mib << 20)
			w.sm += float64(pr.sm)
			w.procs++
		}
		w.sm /= 100
		want[p.name] = w
	}
	// check compares one round's series on the device with want, and the
	// unattributed ones with the host process.
	check := func(round string, got map[string]map[string]float64) {
		t.Helper()
		mem, sm, procs := onDevice(got[telemetry.PodMemoryName]), onDevice(got[telemetry.PodSMUtilName]), onDevice(got[telemetry.PodProcessesName])
		for name, w := range want {
			p := pods[slices.IndexFunc(pods, func(p *perPodPod) bool { return p.name == name })]
			labels := "namespace=ml,pod=" + name + ",pod_uid=" + p.uid + ",container=main"
			if v, ok := seriesValue(mem, labels); !ok || v != w.mem {
				t.Errorf("%s: %s{%s} = %v (present %v), want %v", round, telemetry.PodMemoryName, labels, v, ok, w.mem)
			}
			if v, ok := seriesValue(procs, labels); !ok || v != w.procs {
				t.Errorf("%s: %s{%s} = %v (present %v), want %v", round, telemetry.PodProcessesName, labels, v, ok, w.procs)
			}
			if tc.gi >= 0 {
				continue
			}
			if v, ok := seriesValue(sm, labels); !ok || math.Abs(v-w.sm) > 1e-9 {
				t.Errorf("%s: %s{%s} = %v (present %v), want %v", round, telemetry.PodSMUtilName, labels, v, ok, w.sm)
			}
		}
		// Nothing else: no series for a pod that ended, none on another
		// device (only this case's processes run), no SM on a MIG device.
		wantSM := len(want)
		if tc.gi >= 0 {
			wantSM = 0
		}
		for fam, count := range map[string]int{telemetry.PodMemoryName: len(want), telemetry.PodProcessesName: len(want), telemetry.PodSMUtilName: wantSM} {
			if all, here := got[fam], onDevice(got[fam]); len(all) != count || len(here) != count {
				t.Errorf("%s: %s has %d series, %d on the device, want %d:\n%s", round, fam, len(all), len(here), count, dump(all))
			}
		}
		// The host process, alone and unattributed.
		un := map[string]float64{telemetry.UnattributedMemoryName: float64(host.mib << 20), telemetry.UnattributedProcsName: 1}
		if tc.gi < 0 {
			un[telemetry.UnattributedSMUtilName] = float64(host.sm) / 100
		}
		for _, fam := range []string{telemetry.UnattributedMemoryName, telemetry.UnattributedProcsName, telemetry.UnattributedSMUtilName} {
			all, here := got[fam], onDevice(got[fam])
			w, ok := un[fam]
			if !ok {
				if len(all) != 0 {
					t.Errorf("%s: %s with SM utilization only on a MIG device:\n%s", round, fam, dump(all))
				}
				continue
			}
			if v, one := seriesValue(here, ""); !one || len(all) != 1 || math.Abs(v-w) > 1e-9 {
				t.Errorf("%s: %s:\n%s\nwant one series, the host process's %v on the device", round, fam, dump(all), w)
			}
		}
	}

	check("first round", n.scrape(t))
	// The next sampling period: SM utilization from its new samples.
	check("second round", n.scrape(t))

	// Pod 1 ends: its container's process exits and the driver drops it
	// (unless stayListed), the kubelet stops listing the pod, the pod
	// watch deletes it. Its series go in the next round.
	gone := pods[1]
	gone.cgroups.Kill(gone.procs[0].pid)
	if !tc.stayListed {
		unregister(gone.procs[0].pid)
	} else if listed, all := keyValues(ctl(fmt.Sprintf("get %d", tc.gpu)))["procs"], len(pods)+2; listed != strconv.Itoa(all) {
		t.Fatalf("NVML lists %s processes on GPU %d, want all %d, the exited one too", listed, tc.gpu, all)
	}
	delete(want, gone.name)
	n.allocate(t, resource, unit, slices.Delete(slices.Clone(pods), 1, 2))
	n.dir.Delete(gone.uid)
	got := n.scrape(t)
	check("the round after pod "+gone.name+" ended", got)
	for fam, series := range got { // gpu_plugin_pod_gpu_info too, and any other
		if s := seriesWith(series, []string{"pod=" + gone.name}); len(s) != 0 {
			t.Errorf("%s still has pod %s after it ended:\n%s", fam, gone.name, dump(s))
		}
	}

	// Everything ends: no per-pod or unattributed series remain.
	for _, p := range pods {
		for _, pr := range p.procs {
			unregister(pr.pid)
		}
		n.dir.Delete(p.uid)
	}
	unregister(host.pid)
	n.allocate(t, resource, unit, nil)
	got = n.scrape(t)
	for _, fam := range []string{telemetry.PodMemoryName, telemetry.PodSMUtilName, telemetry.PodProcessesName,
		telemetry.UnattributedMemoryName, telemetry.UnattributedSMUtilName, telemetry.UnattributedProcsName} {
		if s := got[fam]; len(s) != 0 {
			t.Errorf("after every pod and the host process ended, %s still has:\n%s", fam, dump(s))
		}
	}
	var cgs []string
	for _, p := range pods {
		cgs = append(cgs, string(p.cgroups.Driver))
	}
	t.Logf("%d pods (cgroup drivers %s) and a host process on %s", len(pods), strings.Join(cgs, ","), unit)
}

// allocate makes the kubelet stand-in list pods as holding replica k (the
// pod's index) of unit, and waits until the cache has them. It waits for
// the content, not for a refresh count: a refresh already under way when
// the stand-in changed may still bring the previous list.
func (n *perPodNode) allocate(t *testing.T, resource, unit string, pods []*perPodPod) {
	t.Helper()
	var list []*podresourcesv1.PodResources
	var want []string
	for _, p := range pods {
		list = append(list, fakepodresources.Pod("ml", p.name, fakepodresources.Container{Name: "main",
			Devices: []fakepodresources.Devices{{Resource: resource, IDs: []string{unit + "::" + strconv.Itoa(p.replica)}}}}))
		want = append(want, p.name)
	}
	slices.Sort(want)
	n.kubelet.SetPods(list...)
	n.cache.Refresh()
	holders := func(snap *podresources.Snapshot) []string {
		var names []string
		for _, h := range snap.Holders(unit) {
			names = append(names, h.Pod)
		}
		slices.Sort(names)
		return names
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := n.cache.WaitFor(ctx, func(snap *podresources.Snapshot, _ podresources.Status) bool {
		return slices.Equal(holders(snap), want)
	}); err != nil {
		t.Fatalf("the pod-resources cache never had %v holding %s (it has %v): %v (%+v)",
			want, unit, holders(n.cache.Snapshot()), err, n.cache.Status())
	}
}

// scrape runs one sampling round (perPodRoundGap after the previous one)
// and returns the collector's exposition, parsed: family → series, each
// keyed "label=value,…" in the exposition's (sorted) label order.
func (n *perPodNode) scrape(t *testing.T) map[string]map[string]float64 {
	t.Helper()
	time.Sleep(time.Until(n.lastRound.Add(perPodRoundGap)))
	n.sampler.SampleOnce(context.Background())
	n.lastRound = time.Now()
	var b bytes.Buffer
	n.collector.WriteText(&b)
	return testkit.Exposition(t, b.Bytes())
}

// seriesWith returns the series having every label in want ("name=value").
func seriesWith(fam map[string]float64, want []string) map[string]float64 {
	out := map[string]float64{}
	for labels, v := range fam {
		if !slices.ContainsFunc(want, func(w string) bool { return !strings.Contains(","+labels+",", ","+w+",") }) {
			out[labels] = v
		}
	}
	return out
}

// seriesValue is the value of the one series having the labels in want
// (comma-separated "name=value"; "" for any); ok is false unless exactly
// one has them.
func seriesValue(series map[string]float64, want string) (v float64, ok bool) {
	var w []string
	if want != "" {
		w = strings.Split(want, ",")
	}
	s := seriesWith(series, w)
	for _, v := range s {
		return v, len(s) == 1
	}
	return 0, false
}

func dump(series map[string]float64) string {
	var lines []string
	for labels, v := range series {
		lines = append(lines, fmt.Sprintf("  {%s} %v", labels, v))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}
