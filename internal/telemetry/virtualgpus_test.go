package telemetry_test

import (
	"bytes"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podusage"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// vpod is a container holding a device on a simulated node, with the
// process it runs there (none if mib is 0).
type vpod struct {
	ns, name, uid string
	gpu           int      // the GPU it holds
	mig           int      // 1 + the index of the MIG device of gpu it holds; 0: the whole GPU
	ids           []string // its device IDs: "" the device whole, "::n" a replica
	mib           uint64   // its process' memory (MiB)
	sm            uint32   // and SM utilization (%)
}

// vgpuNode is a simulated node with per-pod accounting on, a pod-resources
// snapshot of the given pods, and collectors with and without VirtualGPUs
// over the same sampler.
type vgpuNode struct {
	e       *simEnv
	on, off *telemetry.Collector
	dir     *podusage.Directory
	holders map[string][]podresources.Holder
}

func newVGPUNode(t testing.TB, profile string, pods []vpod) *vgpuNode {
	t.Helper()
	proc := t.TempDir()
	n := &vgpuNode{dir: podusage.NewDirectory(), holders: map[string][]podresources.Holder{}}
	n.e = newSimEnv(t, profile, envOptions{attributor: func(e *simEnv) telemetry.Attributor {
		return podusage.NewAccountant(podusage.Options{
			Resolver: podusage.NewResolver(proc), Directory: n.dir,
			Holders: func() *podresources.Snapshot { return e.pods.Load() },
		})
	}})
	e := n.e
	e.sample()
	n.dir.MarkSynced()
	procs := map[int][]sim.Process{}
	for i, p := range pods {
		uuid := e.inv.GPUs[p.gpu].UUID
		if p.mig > 0 {
			uuid = e.inv.GPUs[p.gpu].MIGDevices[p.mig-1].UUID
		}
		cid := strings.Repeat(fmt.Sprintf("%x", i+1), 64)
		n.dir.Set(podusage.Pod{UID: p.uid, Namespace: p.ns, Name: p.name, Containers: map[string]string{cid: "main"}})
		h := podresources.Holder{Namespace: p.ns, Pod: p.name, Container: "main", Resource: "nvidia.com/gpu"}
		for _, id := range p.ids {
			h.DeviceIDs = append(h.DeviceIDs, uuid+id)
			if id != "" {
				h.Resource = "nvidia.com/gpu.shared"
			}
		}
		n.holders[uuid] = append(n.holders[uuid], h)
		if p.mib == 0 {
			continue
		}
		pid := 2000 + i
		dir := filepath.Join(proc, fmt.Sprint(pid))
		must(t, os.MkdirAll(dir, 0o755))
		must(t, os.WriteFile(filepath.Join(dir, "cgroup"), []byte("0::/kubepods/burstable/pod"+p.uid+"/"+cid+"\n"), 0o644))
		must(t, os.WriteFile(filepath.Join(dir, "stat"), fmt.Appendf(nil, "%d (python) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 %d 0 0\n", pid, pid), 0o644))
		sp := sim.Process{PID: uint32(pid), UsedMiB: p.mib, SMUtil: p.sm}
		if p.mig > 0 {
			sp.MIG = uuid
		}
		procs[p.gpu] = append(procs[p.gpu], sp)
	}
	for _, hs := range n.holders {
		slices.SortFunc(hs, func(a, b podresources.Holder) int {
			return strings.Compare(a.Namespace+"/"+a.Pod, b.Namespace+"/"+b.Pod)
		})
	}
	e.setPods(n.holders)
	for gpu, list := range procs {
		must(t, e.node.SetProcesses(gpu, list))
	}
	opts := telemetry.CollectorOptions{Sampler: e.sampler, Hostname: "node-1", Now: e.clk.Now, Pods: func() *podresources.Snapshot { return e.pods.Load() }}
	n.off = telemetry.NewCollector(opts)
	opts.VirtualGPUs = true
	n.on = telemetry.NewCollector(opts)
	// Processes' utilization samples come from the round after they start.
	e.clk.Advance(time.Second)
	e.sample()
	return n
}

// text is a collector's exposition as the daemon writes it, checked to
// be what a pedantic registry makes of Collect (which fails on a repeated
// series or a bad label), to parse as Prometheus parses it, and to hold
// no series twice.
func text(t *testing.T, c *telemetry.Collector) string {
	t.Helper()
	var b bytes.Buffer
	c.WriteText(&b)
	fast := withoutScrapeFamilies(b.String())
	if slow := withoutScrapeFamilies(formatAll(t, c)); fast != slow {
		t.Fatalf("WriteText differs from the registry's exposition\n--- WriteText\n%s\n--- registry\n%s", fast, slow)
	}
	series := 0
	for l := range strings.Lines(fast) {
		if !strings.HasPrefix(l, "#") {
			series++
		}
	}
	parsed := 0
	for _, f := range testkit.Exposition(t, []byte(fast)) {
		parsed += len(f)
	}
	if parsed != series {
		t.Fatalf("%d series lines, %d distinct series: some repeat\n%s", series, parsed, fast)
	}
	return fast
}

func sortedLines(s string) string {
	return strings.Join(slices.Sorted(strings.Lines(s)), "")
}

// family is one family's lines of an exposition, without its header.
func family(expo, name string) string {
	var out strings.Builder
	for l := range strings.Lines(expo) {
		if strings.HasPrefix(l, name+"{") || strings.HasPrefix(l, name+" ") {
			out.WriteString(l)
		}
	}
	return out.String()
}

// TestVirtualGPUsShape: dcgm-exporter's --kubernetes-virtual-gpus series,
// exactly, on four GPUs: one time-sliced by three pods (one idle), one
// held by nobody, one held whole by one pod, one by a container holding
// two replicas.
func TestVirtualGPUsShape(t *testing.T) {
	pods := []vpod{
		{ns: "ml", name: "a", uid: "00000000-0000-4000-8000-00000000000a", gpu: 0, ids: []string{"::0"}, mib: 1024, sm: 30},
		{ns: "ml", name: "b", uid: "00000000-0000-4000-8000-00000000000b", gpu: 0, ids: []string{"::1"}, mib: 512, sm: 12},
		{ns: "dev", name: "c", uid: "00000000-0000-4000-8000-00000000000c", gpu: 0, ids: []string{"::2"}},
		{ns: "ml", name: "whole", uid: "00000000-0000-4000-8000-0000000000d0", gpu: 2, ids: []string{""}, mib: 2048, sm: 50},
		{ns: "ml", name: "two", uid: "00000000-0000-4000-8000-0000000000e0", gpu: 3, ids: []string{"::1", "::3"}, mib: 256, sm: 7},
	}
	n := newVGPUNode(t, "pcie-l4x4", pods)
	e := n.e
	for gpu := range 4 {
		e.setTelemetry(t, gpu, sim.TelemetryPatch{TemperatureC: ptr(uint32(40 + gpu)), GPUUtil: ptr(uint32(60 + gpu)), FBUsedMiB: ptr(uint64(10000 + gpu))})
	}
	e.clk.Advance(time.Second)
	e.sample()
	on, off := text(t, n.on), text(t, n.off)

	dev := func(gpu int) string {
		return fmt.Sprintf(`DCGM_FI_DRIVER_VERSION="550.90.07",Hostname="node-1",UUID="%s"`, e.inv.GPUs[gpu].UUID)
	}
	tail := func(gpu int) string {
		return fmt.Sprintf(`device="nvidia%d",gpu="%d",modelName="NVIDIA L4",`, gpu, gpu)
	}
	pci := func(gpu int) string { return fmt.Sprintf(`pci_bus_id="%s"`, e.inv.GPUs[gpu].PCIBusID) }
	// A held device's copy, a plain device series, a per-pod series.
	held := func(name string, gpu int, ns, pod, vgpu string, v any) string {
		s := name + "{" + dev(gpu) + `,container="main",` + tail(gpu) + `namespace="` + ns + `",` + pci(gpu) + `,pod="` + pod + `"`
		if vgpu != "" {
			s += `,vgpu="` + vgpu + `"`
		}
		return s + fmt.Sprintf("} %v\n", v)
	}
	plain := func(name string, gpu int, v any) string {
		return name + "{" + dev(gpu) + "," + tail(gpu) + pci(gpu) + fmt.Sprintf("} %v\n", v)
	}
	uidOf := func(pod string) string {
		for _, p := range pods {
			if p.name == pod {
				return p.uid
			}
		}
		t.Fatalf("no pod %s", pod)
		return ""
	}
	perPod := func(name string, gpu int, ns, pod, vgpu string, v any) string {
		s := name + "{" + dev(gpu) + `,container="main",` + tail(gpu) + `namespace="` + ns + `",` + pci(gpu) + `,pod="` + pod + `",pod_uid="` + uidOf(pod) + `"`
		if vgpu != "" {
			s += `,vgpu="` + vgpu + `"`
		}
		return s + fmt.Sprintf("} %v\n", v)
	}

	for _, tc := range []struct {
		name, family, want string
	}{
		{"(a) every family but FB_USED and GPU_UTIL: one copy per holder and replica; (b) an unheld GPU: its own series; (c) a whole GPU: its pod, no vgpu",
			"DCGM_FI_DEV_GPU_TEMP",
			held("DCGM_FI_DEV_GPU_TEMP", 0, "dev", "c", "2", 40) +
				held("DCGM_FI_DEV_GPU_TEMP", 0, "ml", "a", "0", 40) +
				held("DCGM_FI_DEV_GPU_TEMP", 0, "ml", "b", "1", 40) +
				plain("DCGM_FI_DEV_GPU_TEMP", 1, 41) +
				held("DCGM_FI_DEV_GPU_TEMP", 2, "ml", "whole", "", 42) +
				held("DCGM_FI_DEV_GPU_TEMP", 3, "ml", "two", "1", 43) +
				held("DCGM_FI_DEV_GPU_TEMP", 3, "ml", "two", "3", 43)},
		{"FB_USED: the device series without pod labels, and each pod's own MiB per replica (0 for an idle pod)",
			"DCGM_FI_DEV_FB_USED",
			// The simulated GPU counts its processes' memory as used.
			plain("DCGM_FI_DEV_FB_USED", 0, 10000+1024+512) +
				plain("DCGM_FI_DEV_FB_USED", 1, 10001) +
				plain("DCGM_FI_DEV_FB_USED", 2, 10002+2048) +
				plain("DCGM_FI_DEV_FB_USED", 3, 10003+256) +
				perPod("DCGM_FI_DEV_FB_USED", 0, "dev", "c", "2", 0) +
				perPod("DCGM_FI_DEV_FB_USED", 0, "ml", "a", "0", 1024) +
				perPod("DCGM_FI_DEV_FB_USED", 0, "ml", "b", "1", 512) +
				perPod("DCGM_FI_DEV_FB_USED", 2, "ml", "whole", "", 2048) +
				perPod("DCGM_FI_DEV_FB_USED", 3, "ml", "two", "1", 256) +
				perPod("DCGM_FI_DEV_FB_USED", 3, "ml", "two", "3", 256)},
		{"GPU_UTIL: the same, in percent",
			"DCGM_FI_DEV_GPU_UTIL",
			plain("DCGM_FI_DEV_GPU_UTIL", 0, 60) +
				plain("DCGM_FI_DEV_GPU_UTIL", 1, 61) +
				plain("DCGM_FI_DEV_GPU_UTIL", 2, 62) +
				plain("DCGM_FI_DEV_GPU_UTIL", 3, 63) +
				perPod("DCGM_FI_DEV_GPU_UTIL", 0, "dev", "c", "2", 0) +
				perPod("DCGM_FI_DEV_GPU_UTIL", 0, "ml", "a", "0", 30) +
				perPod("DCGM_FI_DEV_GPU_UTIL", 0, "ml", "b", "1", 12) +
				perPod("DCGM_FI_DEV_GPU_UTIL", 2, "ml", "whole", "", 50) +
				perPod("DCGM_FI_DEV_GPU_UTIL", 3, "ml", "two", "1", 7) +
				perPod("DCGM_FI_DEV_GPU_UTIL", 3, "ml", "two", "3", 7)},
		{"(d) off: a GPU several containers share carries no pod labels, one container's its pod's (replicas or not)",
			"off DCGM_FI_DEV_GPU_TEMP",
			plain("DCGM_FI_DEV_GPU_TEMP", 0, 40) +
				plain("DCGM_FI_DEV_GPU_TEMP", 1, 41) +
				held("DCGM_FI_DEV_GPU_TEMP", 2, "ml", "whole", "", 42) +
				held("DCGM_FI_DEV_GPU_TEMP", 3, "ml", "two", "", 43)},
		{"(d) off: FB_USED one series per device",
			"off DCGM_FI_DEV_FB_USED",
			plain("DCGM_FI_DEV_FB_USED", 0, 10000+1024+512) +
				plain("DCGM_FI_DEV_FB_USED", 1, 10001) +
				held("DCGM_FI_DEV_FB_USED", 2, "ml", "whole", "", 10002+2048) +
				held("DCGM_FI_DEV_FB_USED", 3, "ml", "two", "", 10003+256)},
	} {
		t.Run(tc.family, func(t *testing.T) {
			expo, name := on, tc.family
			if f, ok := strings.CutPrefix(name, "off "); ok {
				expo, name = off, f
			}
			// The order is the registry's, which text checked; it follows
			// the UUIDs.
			if got, want := sortedLines(family(expo, name)), sortedLines(tc.want); got != want {
				t.Errorf("%s\n--- got\n%s--- want\n%s", tc.name, got, want)
			}
		})
	}
	n.checkTransform(t, pods, off, on)
}

// checkTransform: in every DCGM family, the series without VirtualGPUs,
// transformed as dcgm-exporter transforms them, are the series with it:
// a held device's series replaced by one per holder and device ID (pod
// labels, vgpu for a replica), FB_USED and GPU_UTIL keeping the device
// series and adding one per holder and ID with pod_uid (their values are
// checked apart).
func (n *vgpuNode) checkTransform(t *testing.T, pods []vpod, off, on string) {
	t.Helper()
	uid := map[string]string{}
	for _, p := range pods {
		uid[p.ns+"/"+p.name] = p.uid
	}
	// unit names the GPU or MIG device of a series by its labels.
	unit := func(key string) string {
		for _, g := range n.e.inv.GPUs {
			if !strings.Contains(key, "UUID="+g.UUID+",") {
				continue
			}
			for _, m := range g.MIGDevices {
				if strings.Contains(key, fmt.Sprintf("GPU_I_ID=%d,", m.GPUInstanceID)) {
					return m.UUID
				}
			}
			return g.UUID
		}
		t.Fatalf("no device has the series %s", key)
		return ""
	}
	offSeries, onSeries := testkit.Exposition(t, []byte(off)), testkit.Exposition(t, []byte(on))
	podLabel := regexp.MustCompile(`,container=[^,]*|,namespace=[^,]*|,pod=[^,]*`)
	families := 0
	for _, m := range telemetry.DefaultMetricSet().Metrics {
		if m.Kind == telemetry.KindLabel {
			continue
		}
		perProcess := m.Name == "DCGM_FI_DEV_FB_USED" || m.Name == "DCGM_FI_DEV_GPU_UTIL"
		want := map[string]float64{}
		for key, v := range offSeries[m.Name] {
			key = podLabel.ReplaceAllString(key, "") // a single holder's pod labels
			hs := n.holders[unit(key)]
			if len(hs) == 0 || perProcess {
				want[key] = v
			}
			for _, h := range hs {
				for _, id := range h.DeviceIDs {
					labels := strings.Split(key, ",")
					labels = append(labels, "container="+h.Container, "namespace="+h.Namespace, "pod="+h.Pod)
					if perProcess {
						labels = append(labels, "pod_uid="+uid[h.Namespace+"/"+h.Pod])
					}
					if r, ok := podresources.Replica(id); ok {
						labels = append(labels, "vgpu="+r)
					}
					slices.SortFunc(labels, func(a, b string) int {
						return strings.Compare(strings.Split(a, "=")[0], strings.Split(b, "=")[0])
					})
					k := strings.Join(labels, ",")
					want[k] = v
					if perProcess {
						want[k] = onSeries[m.Name][k] // the pod's own value, checked apart
					}
				}
			}
		}
		if len(want) > 0 {
			families++
		}
		if got := onSeries[m.Name]; !maps.Equal(got, want) {
			t.Errorf("%s: series\n%s\nwant\n%s", m.Name, strings.Join(slices.Sorted(maps.Keys(got)), "\n"), strings.Join(slices.Sorted(maps.Keys(want)), "\n"))
		}
	}
	if families < 10 {
		t.Errorf("only %d DCGM families checked", families)
	}
}

// TestVirtualGPUsMIG: a MIG device shared through replicas ("MIG-…::n")
// gets vgpu copies with its GPU_I_* labels; NVML has no per-process
// utilization there, so GPU_UTIL (absent on MIG devices anyway) has no
// per-pod series, and FB_USED's per-pod series are the MIG device's.
func TestVirtualGPUsMIG(t *testing.T) {
	pods := []vpod{
		{ns: "ml", name: "a", uid: "00000000-0000-4000-8000-00000000000a", gpu: 0, mig: 3, ids: []string{"::0"}, mib: 300},
		{ns: "ml", name: "b", uid: "00000000-0000-4000-8000-00000000000b", gpu: 0, mig: 3, ids: []string{"::1"}, mib: 200},
		{ns: "ml", name: "whole", uid: "00000000-0000-4000-8000-0000000000c0", gpu: 5, ids: []string{""}, mib: 1000, sm: 40},
	}
	n := newVGPUNode(t, "dgx-a100-mig", pods)
	on, off := text(t, n.on), text(t, n.off)
	n.checkTransform(t, pods, off, on)
	mig := n.e.inv.GPUs[0].MIGDevices[2]
	fb := family(on, "DCGM_FI_DEV_FB_USED")
	for _, want := range []string{
		fmt.Sprintf(`,GPU_I_ID="%d",GPU_I_PROFILE="%s",`, mig.GPUInstanceID, mig.Profile),
		`,namespace="ml",pci_bus_id="00000000:07:00.0",pod="a",pod_uid="00000000-0000-4000-8000-00000000000a",vgpu="0"} 300` + "\n",
		`,namespace="ml",pci_bus_id="00000000:07:00.0",pod="b",pod_uid="00000000-0000-4000-8000-00000000000b",vgpu="1"} 200` + "\n",
	} {
		if !strings.Contains(fb, want) {
			t.Errorf("FB_USED lacks %s\n%s", want, fb)
		}
	}
	if got := family(on, "DCGM_FI_DEV_GPU_UTIL"); strings.Contains(got, "GPU_I_ID") || !strings.Contains(got, `pod="whole",pod_uid="00000000-0000-4000-8000-0000000000c0"} 40`) {
		t.Errorf("GPU_UTIL: per-pod series on a MIG device, or none on the whole GPU:\n%s", got)
	}
}

// TestVirtualGPUsOptions: with PerPodDCGM as well, VirtualGPUs' shape is
// served unchanged (it supersedes it); without per-pod accounting, FB_USED
// and GPU_UTIL keep the device series alone while the other families are
// still copied per holder.
func TestVirtualGPUsOptions(t *testing.T) {
	pods := []vpod{
		{ns: "ml", name: "a", uid: "00000000-0000-4000-8000-00000000000a", gpu: 0, ids: []string{"::0"}, mib: 100, sm: 10},
		{ns: "ml", name: "b", uid: "00000000-0000-4000-8000-00000000000b", gpu: 0, ids: []string{"::1"}, mib: 100, sm: 10},
	}
	n := newVGPUNode(t, "pcie-l4x4", pods)
	both := telemetry.NewCollector(telemetry.CollectorOptions{Sampler: n.e.sampler, Hostname: "node-1", Now: n.e.clk.Now,
		Pods: func() *podresources.Snapshot { return n.e.pods.Load() }, PerPodDCGM: true, VirtualGPUs: true})
	if got, want := text(t, both), text(t, n.on); got != want {
		t.Errorf("PerPodDCGM changed VirtualGPUs' exposition\n--- both\n%s\n--- VirtualGPUs\n%s", got, want)
	}

	e := newSimEnv(t, "pcie-l4x4", envOptions{virtualGPUs: true}) // no accounting
	e.sample()
	uuid := e.inv.GPUs[0].UUID
	e.setPods(map[string][]podresources.Holder{uuid: {
		{Namespace: "ml", Pod: "a", Container: "main", Resource: "nvidia.com/gpu.shared", DeviceIDs: []string{uuid + "::0"}},
		{Namespace: "ml", Pod: "b", Container: "main", Resource: "nvidia.com/gpu.shared", DeviceIDs: []string{uuid + "::1"}},
	}})
	expo := text(t, e.collector)
	for name, copies := range map[string]int{"DCGM_FI_DEV_FB_USED": 0, "DCGM_FI_DEV_GPU_UTIL": 0, "DCGM_FI_DEV_GPU_TEMP": 2, "DCGM_FI_DEV_POWER_USAGE": 2} {
		f := family(expo, name)
		if got := strings.Count(f, `pod="`); got != copies {
			t.Errorf("%s: %d series with pod labels, want %d\n%s", name, got, copies, f)
		}
		// 3 other GPUs, and GPU 0's copies or its own series.
		if got, want := strings.Count(f, "\n"), 3+max(1, copies); got != want {
			t.Errorf("%s: %d series, want %d\n%s", name, got, want, f)
		}
	}
}

// TestVirtualGPUsHostileNames: pod names and replica suffixes (the
// kubelet's device IDs) reach the copies' labels unchanged whatever they
// hold, and Prometheus' parser reads every series back.
func TestVirtualGPUsHostileNames(t *testing.T) {
	e := newSimEnv(t, "pcie-l4x4", envOptions{virtualGPUs: true})
	e.sample()
	uuid := e.inv.GPUs[0].UUID
	holders := []podresources.Holder{
		{Namespace: `a",namespace="kube-system`, Pod: `x"} 1` + "\nDCGM_FI_DEV_GPU_TEMP{pod=\"forged\"} 999\n# HELP", Container: `c",pod="other`,
			DeviceIDs: []string{uuid + `::0"} 5` + "\n"}},
		{Namespace: `back\slash\\`, Pod: "new\nline", Container: "ünïcødé-🚀", DeviceIDs: []string{uuid + `::\`, uuid + "::1::2"}},
	}
	e.setPods(map[string][]podresources.Holder{uuid: holders})
	expo := text(t, e.collector)
	var want, got []string
	for _, h := range holders {
		for _, id := range h.DeviceIDs {
			r, _ := podresources.Replica(id)
			want = append(want, h.Namespace+"\x00"+h.Pod+"\x00"+h.Container+"\x00"+r)
		}
	}
	parser := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(expo))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range fams["DCGM_FI_DEV_GPU_TEMP"].Metric {
		if l := labelMap(m); l["UUID"] == uuid {
			got = append(got, l["namespace"]+"\x00"+l["pod"]+"\x00"+l["container"]+"\x00"+l["vgpu"])
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("copies of GPU 0:\n got %q\nwant %q", got, want)
	}
}
