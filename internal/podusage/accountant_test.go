package podusage_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podusage"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

const (
	gpu0 = "GPU-00000000-0000-0000-0000-000000000000"
	gpu1 = "GPU-11111111-1111-1111-1111-111111111111"
	mig1 = "MIG-11111111-1111-1111-1111-000000000001"
)

// node is a fake /proc with processes in pod cgroups, a pod directory and
// the kubelet's allocations, for one whole GPU (gpu0) and one MIG device
// (mig1 on gpu1).
type node struct {
	t       *testing.T
	proc    string
	dir     *podusage.Directory
	holders map[string][]podresources.Holder
	acct    *podusage.Accountant
	layout  *telemetry.Layout
}

func newNode(t *testing.T) *node {
	inv := &nvml.Inventory{GPUs: []nvml.GPU{
		{Index: 0, UUID: gpu0, Name: "H100"},
		{Index: 1, UUID: gpu1, Name: "A100", MIGEnabled: true, MIGDevices: []nvml.MIGDevice{{UUID: mig1, Profile: "3g.20gb", GPUInstanceID: 1}}},
	}}
	n := &node{t: t, proc: t.TempDir(), dir: podusage.NewDirectory(), holders: map[string][]podresources.Holder{},
		layout: telemetry.NewLayout(inv, 0)}
	n.dir.MarkSynced()
	n.acct = podusage.NewAccountant(podusage.Options{
		Resolver: podusage.NewResolver(n.proc), Directory: n.dir,
		Holders: func() *podresources.Snapshot { return &podresources.Snapshot{ByUnit: n.holders} },
	})
	return n
}

// pod creates a running pod with one container, allocated units.
func (n *node) pod(name, uid string, units ...string) {
	n.dir.Set(podusage.Pod{UID: uid, Namespace: "ml", Name: name, Containers: map[string]string{ctrID(uid): "main"}})
	for _, u := range units {
		n.holders[u] = append(n.holders[u], podresources.Holder{Namespace: "ml", Pod: name, Container: "main", Resource: "nvidia.com/gpu"})
	}
}

func ctrID(uid string) string { return strings.Repeat(uid[:1], 64) }

// process writes /proc/<pid> for a process in pod uid's container ("":
// a host process).
func (n *node) process(pid int, uid string) {
	dir := filepath.Join(n.proc, fmt.Sprint(pid))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		n.t.Fatal(err)
	}
	cg := "0::/system.slice/sshd.service\n"
	if uid != "" {
		cg = fmt.Sprintf("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod%s.slice/cri-containerd-%s.scope\n",
			strings.ReplaceAll(uid, "-", "_"), ctrID(uid))
	}
	stat := fmt.Sprintf("%d (python) S 1 1 1 0 -1 4194560 100 0 0 0 1 1 0 0 20 0 1 0 %d 1000 100\n", pid, 1000+pid)
	for name, data := range map[string]string{"cgroup": cg, "stat": stat} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			n.t.Fatal(err)
		}
	}
}

func (n *node) exit(pid int) {
	if err := os.RemoveAll(filepath.Join(n.proc, fmt.Sprint(pid))); err != nil {
		n.t.Fatal(err)
	}
}

// round attributes one round in which each unit runs procs.
func (n *node) round(procs map[string][]telemetry.Process) *telemetry.Usage {
	snap := &telemetry.Snapshot{Layout: n.layout, Devices: make([]telemetry.DeviceSample, len(n.layout.Targets))}
	for i, t := range n.layout.Targets {
		d := &snap.Devices[i]
		d.Procs, d.ProcsRead, d.ProcUtil = procs[t.Key], procs[t.Key] != nil, t.MIG == nil
	}
	return n.acct.Attribute(snap)
}

func uid(k int) string { return fmt.Sprintf("%x%07d-0000-4000-8000-000000000000", k%16, k) }

// row is a PodUsage in short: pod, MiB, SM %, processes.
type row struct {
	pod   string
	mib   uint64
	sm    float64
	procs int
}

func rows(u *telemetry.Usage, target int) []row {
	var out []row
	for _, p := range u.Pods {
		if p.Target == target {
			out = append(out, row{p.Pod, p.MemoryBytes >> 20, p.SMUtil, p.Processes})
		}
	}
	return out
}

func proc(pid int, mib uint64, sm float64) telemetry.Process {
	return telemetry.Process{PID: uint32(pid), MemoryBytes: mib << 20, SMUtil: sm}
}

// TestTimeSliced: 2, 3 and 10 pods on one time-sliced GPU each get their
// own processes' use; an idle one reads 0.
func TestTimeSliced(t *testing.T) {
	for _, pods := range []int{2, 3, 10} {
		t.Run(fmt.Sprint(pods, " pods"), func(t *testing.T) {
			n := newNode(t)
			var procs []telemetry.Process
			var want []row
			for k := range pods {
				name := fmt.Sprintf("infer-%02d", k)
				n.pod(name, uid(k), gpu0)
				if k == pods-1 {
					want = append(want, row{name, 0, 0, 0}) // idle
					continue
				}
				// Two processes in the first pod, one in the others.
				n.process(100+k, uid(k))
				procs = append(procs, proc(100+k, uint64(1000*(k+1)), float64(5*(k+1))))
				w := row{name, uint64(1000 * (k + 1)), float64(5 * (k + 1)), 1}
				if k == 0 {
					n.process(200, uid(k))
					procs = append(procs, proc(200, 24, 1))
					w = row{name, w.mib + 24, w.sm + 1, 2}
				}
				want = append(want, w)
			}
			u := n.round(map[string][]telemetry.Process{gpu0: procs})
			if got := rows(u, 0); !slices.Equal(got, want) {
				t.Errorf("per-pod use:\n got %v\nwant %v", got, want)
			}
			for _, p := range u.Pods {
				if p.PodUID == "" || p.Container != "main" || !p.HasSMUtil {
					t.Errorf("%+v: want its UID, container main and SM utilization", p)
				}
			}
			if len(u.Unattributed) != 0 {
				t.Errorf("unattributed %+v, want none", u.Unattributed)
			}
		})
	}
}

// TestUnattributed: a host process and a pod's process on a GPU the pod
// was not allocated are counted apart, per device.
func TestUnattributed(t *testing.T) {
	n := newNode(t)
	n.pod("owner", uid(1), gpu0)
	n.pod("other", uid(2), mig1) // allocated the MIG device, not gpu0
	n.process(10, uid(1))
	n.process(11, "")     // host process
	n.process(12, uid(2)) // NVIDIA_VISIBLE_DEVICES=all
	n.process(13, uid(9)) // a pod the directory does not know
	u := n.round(map[string][]telemetry.Process{gpu0: {proc(10, 100, 10), proc(11, 200, 20), proc(12, 300, 30), proc(13, 400, 40)}, mig1: {}})
	if got, want := rows(u, 0), []row{{"owner", 100, 10, 1}}; !slices.Equal(got, want) {
		t.Errorf("per-pod use %v, want %v", got, want)
	}
	want := []telemetry.UnitUsage{{Target: 0, MemoryBytes: 900 << 20, SMUtil: 90, HasSMUtil: true, Processes: 3}}
	if !slices.Equal(u.Unattributed, want) {
		t.Errorf("unattributed %+v, want %+v", u.Unattributed, want)
	}
	// The MIG device's holder runs nothing there: a 0 series, memory only.
	if got := rows(u, 1); !slices.Equal(got, []row{{"other", 0, 0, 0}}) {
		t.Errorf("MIG device: %v, want other at 0", got)
	}
}

// TestMIGMemoryOnly: on a MIG device the pods get memory, never SM
// utilization.
func TestMIGMemoryOnly(t *testing.T) {
	n := newNode(t)
	n.pod("a", uid(1), mig1)
	n.pod("b", uid(2), mig1)
	n.process(10, uid(1))
	n.process(11, uid(2))
	u := n.round(map[string][]telemetry.Process{mig1: {proc(10, 512, 0), proc(11, 1024, 0)}})
	if got, want := rows(u, 1), []row{{"a", 512, 0, 1}, {"b", 1024, 0, 1}}; !slices.Equal(got, want) {
		t.Errorf("MIG per-pod use %v, want %v", got, want)
	}
	for _, p := range u.Pods {
		if p.HasSMUtil {
			t.Errorf("%s has SM utilization on a MIG device", p.Pod)
		}
	}
}

// TestPodExit: once a pod's processes end and the kubelet no longer lists
// it, its entries are gone at the next round; a finished pod still listed
// gets no zero entry; a device whose processes could not be read has none.
func TestPodExit(t *testing.T) {
	n := newNode(t)
	n.pod("a", uid(1), gpu0)
	n.pod("b", uid(2), gpu0)
	n.process(10, uid(1))
	n.process(11, uid(2))
	u := n.round(map[string][]telemetry.Process{gpu0: {proc(10, 1, 1), proc(11, 2, 2)}})
	if len(rows(u, 0)) != 2 {
		t.Fatalf("first round: %v", rows(u, 0))
	}
	// b ends: its process is gone, the kubelet drops it, the API server
	// says Succeeded meanwhile.
	n.exit(11)
	n.holders[gpu0] = n.holders[gpu0][:1]
	u = n.round(map[string][]telemetry.Process{gpu0: {proc(10, 1, 1)}})
	if got, want := rows(u, 0), []row{{"a", 1, 1, 1}}; !slices.Equal(got, want) {
		t.Errorf("after b exits: %v, want %v", got, want)
	}
	// a finished but is still listed by the kubelet: no zero entry.
	n.exit(10)
	n.dir.Set(podusage.Pod{UID: uid(1), Namespace: "ml", Name: "a", Finished: true})
	u = n.round(map[string][]telemetry.Process{gpu0: {}})
	if got := rows(u, 0); len(got) != 0 {
		t.Errorf("a finished pod: %v, want no entry", got)
	}
	// A process NVML listed that ended before its cgroup was read counts
	// nowhere.
	u = n.round(map[string][]telemetry.Process{gpu0: {proc(99, 5, 5)}})
	if len(u.Unattributed) != 0 {
		t.Errorf("an exited process counted: %+v", u.Unattributed)
	}
	// Processes not read this round: no entries rather than zeros.
	n.pod("c", uid(3), gpu0)
	u = n.round(nil)
	if len(u.Pods) != 0 || len(u.Unattributed) != 0 {
		t.Errorf("unread devices produced %+v", u)
	}
}

// TestNewContainerNamedByAllocation: a process whose container the
// directory does not know yet (just started) is named after the pod's
// one container holding the device.
func TestNewContainerNamedByAllocation(t *testing.T) {
	n := newNode(t)
	n.dir.Set(podusage.Pod{UID: uid(1), Namespace: "ml", Name: "a", Containers: map[string]string{}})
	n.holders[gpu0] = []podresources.Holder{{Namespace: "ml", Pod: "a", Container: "trainer"}}
	n.process(10, uid(1))
	u := n.round(map[string][]telemetry.Process{gpu0: {proc(10, 7, 3)}})
	if len(u.Pods) != 1 || u.Pods[0].Container != "trainer" || u.Pods[0].Processes != 1 {
		t.Errorf("got %+v, want the process under container trainer", u.Pods)
	}
}

// TestDirectory: a pod replaced under the same name keeps its name entry
// when the old one is deleted.
func TestDirectory(t *testing.T) {
	d := podusage.NewDirectory()
	d.Set(podusage.Pod{UID: "old", Namespace: "ns", Name: "web-0"})
	d.Set(podusage.Pod{UID: "new", Namespace: "ns", Name: "web-0"})
	d.Delete("old")
	if p, ok := d.ByName("ns", "web-0"); !ok || p.UID != "new" {
		t.Errorf("ByName after the old pod's deletion = %+v, %v; want the new pod", p, ok)
	}
	if _, ok := d.ByUID("old"); ok || d.Len() != 1 {
		t.Errorf("old pod still known (len %d)", d.Len())
	}
	if got := podusage.ContainerID("containerd://abc"); got != "abc" {
		t.Errorf("ContainerID = %q", got)
	}
}
