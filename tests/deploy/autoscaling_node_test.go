package deploy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	fake "github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// The simulated node the autoscaling queries are evaluated on: GPUs 0-3
// whole A100s, GPU 3 time-sliced 4 ways (as nvidia.com/gpu.shared), GPU 4
// split into two 3g.20gb MIG devices.
const (
	autoscaleProfile = `name: autoscale-test
description: 4 whole A100s, one split into two MIG devices
gpus:
  - {model: A100-SXM4-40GB, count: 4, numaNode: 0}
  - {model: A100-SXM4-40GB, numaNode: 1, migEnabled: true, migDevices: [3g.20gb, 3g.20gb]}
`
	autoscaleConfig = `version: v1
extensions: {resourceCustomization: true} # rename and devices below apply
flags:
  migStrategy: mixed
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        rename: nvidia.com/gpu.shared
        devices: ["3"]
        replicas: 4
`
	autoscaleHostname = "gpu-node-1"
	sharedResource    = "nvidia.com/gpu.shared"
	migResource       = "nvidia.com/mig-3g.20gb"
)

// device is one device a container holds: a whole GPU, a replica of the
// time-sliced GPU, or a MIG device (GPU index and MIG index).
type device struct {
	gpu     int
	replica int // -1: whole GPU
	mig     int // -1: not a MIG device
}

func whole(gpu int) device        { return device{gpu: gpu, replica: -1, mig: -1} }
func replica(gpu, r int) device   { return device{gpu: gpu, replica: r, mig: -1} }
func migDevice(gpu, m int) device { return device{gpu: gpu, replica: -1, mig: m} }
func (d device) isMIG() bool      { return d.mig >= 0 }

type scenarioContainer struct {
	Name    string
	Devices []device
}

type scenarioPod struct {
	Namespace, Name string
	Containers      []scenarioContainer
}

// autoscalePods: two pods on exclusive GPUs (one of them on two), two pods
// time-sharing GPU 3 (one with two containers holding a replica each) and a
// pod on a MIG device. The vllm-* pods are one Deployment.
var autoscalePods = []scenarioPod{
	{"llm", "vllm-6b7f9c8d5-2xkqp", []scenarioContainer{{"vllm", []device{whole(0), whole(1)}}}},
	{"llm", "vllm-6b7f9c8d5-9fztr", []scenarioContainer{{"vllm", []device{whole(2)}}}},
	{"llm", "vllm-6b7f9c8d5-h4wvn", []scenarioContainer{{"vllm", []device{replica(3, 0)}}}},
	{"llm", "embed-5d8c7b9f4-tq2lx", []scenarioContainer{{"embed", []device{replica(3, 1)}}, {"rerank", []device{replica(3, 2)}}}},
	{"llm", "vllm-6b7f9c8d5-m8rjd", []scenarioContainer{{"vllm", []device{migDevice(4, 0)}}}},
}

// Injected through /sim: utilization (%) and framebuffer used (MiB) of the
// whole GPUs. The simulator's MIG devices report no memory in use.
var (
	autoscaleUtil = map[int]uint32{0: 70, 1: 40, 2: 35, 3: 90}
	autoscaleFB   = map[int]uint64{0: 1000, 1: 3000, 2: 5000, 3: 6000}
)

// expectedPerPod computes what the adapter's per-pod metrics must be from the
// injected numbers: a pod's share of a device is its containers holding it
// over all containers holding it; utilization is averaged over the pod's
// whole GPUs (MIG devices have none), memory summed in bytes.
func expectedPerPod(pods []scenarioPod) (util, memBytes map[string]float64) {
	type unit struct{ gpu, mig int }
	holders := map[unit]int{}
	podHolds := map[string]map[unit]int{}
	for _, p := range pods {
		podHolds[p.Name] = map[unit]int{}
		for _, c := range p.Containers {
			seen := map[unit]bool{}
			for _, d := range c.Devices {
				u := unit{d.gpu, d.mig}
				if seen[u] {
					continue // replicas of one device in one container count once
				}
				seen[u] = true
				holders[u]++
				podHolds[p.Name][u]++
			}
		}
	}
	util, memBytes = map[string]float64{}, map[string]float64{}
	for _, p := range pods {
		var sum float64
		n := 0
		mem := 0.0
		for u, c := range podHolds[p.Name] {
			share := float64(c) / float64(holders[u])
			if u.mig < 0 {
				sum += share * float64(autoscaleUtil[u.gpu])
				n++
				mem += share * float64(autoscaleFB[u.gpu]) * (1 << 20)
			}
		}
		if n > 0 {
			util[p.Name] = sum / float64(n)
		}
		memBytes[p.Name] = mem
	}
	return util, memBytes
}

// autoscaleNode is the whole daemon, in process, on the scenario's node
// against a stand-in kubelet and pod-resources API.
type autoscaleNode struct {
	d       *daemon.Daemon
	kubelet *fakekubelet.Kubelet
	pods    *fake.Server
	base    string
	stop    func() // stops the daemon; safe to call twice
	// ids maps a scenario device to the device ID the plugin advertised.
	ids map[device]string
	// units maps a scenario device to its GPU or MIG UUID.
	units map[device]string
}

func startAutoscaleNode(t *testing.T) *autoscaleNode {
	t.Helper()
	sock, err := tempSocketDir()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sock.cleanup)
	dir := t.TempDir()
	profile, cfgFile := filepath.Join(dir, "autoscale.yaml"), filepath.Join(dir, "config.yaml")
	for f, body := range map[string]string{profile: autoscaleProfile, cfgFile: autoscaleConfig} {
		if err := os.WriteFile(f, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	kubelet, err := fakekubelet.Start(sock.path, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kubelet.Stop)
	prSocket := filepath.Join(sock.path, "pr.sock")
	pods, err := fake.Start(prSocket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pods.Stop)

	args := []string{"--simulate=" + profile, "--config=" + cfgFile, "--metrics-address=127.0.0.1:0",
		"--kubelet-socket-dir=" + sock.path, "--node-name=" + autoscaleHostname, "--node-labels=false",
		"--pod-resources-socket=" + prSocket, "--pod-resources-interval=100ms", "--collect-interval=200ms"}
	cfg, _, err := config.Load("gpu-plugin", args, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := daemon.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	n := &autoscaleNode{d: d, kubelet: kubelet, pods: pods, base: "http://" + d.Addr(),
		stop: func() { once.Do(func() { cancel(); <-done; d.Close() }) }}
	t.Cleanup(n.stop)

	wait, cancelWait := context.WithTimeout(ctx, 20*time.Second)
	defer cancelWait()
	want := map[string]int{"nvidia.com/gpu": 3, sharedResource: 4, migResource: 2}
	if err := kubelet.WaitFor(wait, func(k *fakekubelet.Kubelet) bool {
		for r, c := range want {
			if got, _ := k.Capacity(r); got != c {
				return false
			}
		}
		return true
	}); err != nil {
		t.Fatalf("registration (want %v): %v", want, err)
	}
	n.resolveDevices(t)
	pods.SetPods(n.podResources(autoscalePods)...)

	for gpu, u := range autoscaleUtil {
		body := fmt.Sprintf(`{"gpu_util": %d, "fb_used_mib": %d}`, u, autoscaleFB[gpu])
		if err := call(http.MethodPut, fmt.Sprintf("%s/sim/gpus/%d/telemetry", n.base, gpu), body); err != nil {
			t.Fatal(err)
		}
	}
	n.waitAttribution(t, autoscalePods)
	if err := d.Telemetry().WaitFor(wait, func(s *telemetry.Snapshot) bool {
		if s == nil {
			return false
		}
		for gpu, u := range autoscaleUtil {
			if v, ok := sampled(s, n.units[whole(gpu)], telemetry.GPUUtil); !ok || v != float64(u) {
				return false
			}
			if v, ok := sampled(s, n.units[whole(gpu)], telemetry.FBUsed); !ok || v != float64(autoscaleFB[gpu]) {
				return false
			}
		}
		return true
	}); err != nil {
		t.Fatalf("injected telemetry not sampled: %v", err)
	}
	return n
}

// sampled is a device's field value in a snapshot, by GPU or MIG UUID.
func sampled(s *telemetry.Snapshot, key string, f telemetry.Field) (float64, bool) {
	for i, tg := range s.Layout.Targets {
		if tg.Key == key {
			return s.Devices[i].Get(f)
		}
	}
	return 0, false
}

// resolveDevices maps the scenario's devices to the UUIDs of the inventory
// and the IDs the plugin advertised to the kubelet.
func (n *autoscaleNode) resolveDevices(t *testing.T) {
	t.Helper()
	inv := n.d.Inventory()
	n.ids, n.units = map[device]string{}, map[device]string{}
	advertised := func(resource, id string) string {
		for _, d := range n.kubelet.Devices(resource) {
			if d.ID == id {
				return id
			}
		}
		t.Fatalf("%s does not advertise %s", resource, id)
		return ""
	}
	for _, p := range autoscalePods {
		for _, c := range p.Containers {
			for _, d := range c.Devices {
				gpu := inv.GPUs[d.gpu]
				switch {
				case d.isMIG():
					m := gpu.MIGDevices[d.mig]
					n.units[d], n.ids[d] = m.UUID, advertised(migResource, m.UUID)
				case d.replica >= 0:
					n.units[d], n.ids[d] = gpu.UUID, advertised(sharedResource, fmt.Sprintf("%s::%d", gpu.UUID, d.replica))
				default:
					n.units[d], n.ids[d] = gpu.UUID, advertised("nvidia.com/gpu", gpu.UUID)
				}
			}
		}
	}
	for gpu := range autoscaleUtil {
		n.units[whole(gpu)] = inv.GPUs[gpu].UUID
	}
}

// podResources is what the kubelet's pod-resources List answers for pods.
func (n *autoscaleNode) podResources(pods []scenarioPod) []*podresourcesv1.PodResources {
	var out []*podresourcesv1.PodResources
	for _, p := range pods {
		var cs []fake.Container
		for _, c := range p.Containers {
			byRes := map[string][]string{}
			var order []string
			for _, d := range c.Devices {
				res := "nvidia.com/gpu"
				switch {
				case d.isMIG():
					res = migResource
				case d.replica >= 0:
					res = sharedResource
				}
				if _, ok := byRes[res]; !ok {
					order = append(order, res)
				}
				byRes[res] = append(byRes[res], n.ids[d])
			}
			fc := fake.Container{Name: c.Name}
			for _, r := range order {
				fc.Devices = append(fc.Devices, fake.Devices{Resource: r, IDs: byRes[r]})
			}
			cs = append(cs, fc)
		}
		out = append(out, fake.Pod(p.Namespace, p.Name, cs...))
	}
	return out
}

// setPods replaces the kubelet's pods and waits until attribution shows them.
func (n *autoscaleNode) setPods(t *testing.T, pods []scenarioPod) {
	t.Helper()
	n.pods.SetPods(n.podResources(pods)...)
	n.waitAttribution(t, pods)
}

// waitAttribution waits until the daemon attributes every device to exactly
// the containers that hold it.
func (n *autoscaleNode) waitAttribution(t *testing.T, pods []scenarioPod) {
	t.Helper()
	want := map[string][]string{}
	for _, p := range pods {
		for _, c := range p.Containers {
			for _, d := range c.Devices {
				h := p.Namespace + "/" + p.Name + "/" + c.Name
				if !slices.Contains(want[n.units[d]], h) {
					want[n.units[d]] = append(want[n.units[d]], h)
				}
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := n.d.PodAttribution().WaitFor(ctx, func(s *podresources.Snapshot, _ podresources.Status) bool {
		if s == nil || len(s.ByUnit) != len(want) {
			return false
		}
		for unit, hs := range want {
			var got []string
			for _, h := range s.Holders(unit) {
				got = append(got, h.Namespace+"/"+h.Pod+"/"+h.Container)
			}
			slices.Sort(got)
			exp := slices.Clone(hs)
			slices.Sort(exp)
			if !slices.Equal(got, exp) {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatalf("pod attribution never matched %v: %v", want, err)
	}
}

// familyLabels scrapes /metrics and returns each family's label names.
func (n *autoscaleNode) familyLabels(t *testing.T) map[string]map[string]bool {
	t.Helper()
	fams, err := scrape(n.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]bool{}
	for name, f := range fams {
		out[name] = labelNames(f)
	}
	return out
}

func labelNames(f *dto.MetricFamily) map[string]bool {
	out := map[string]bool{}
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			out[l.GetName()] = true
		}
	}
	return out
}

// approxEqual compares query results with expected values computed in Go.
func approxEqual(a, b float64) bool {
	return math.Abs(a-b) <= 1e-9*math.Max(1, math.Max(math.Abs(a), math.Abs(b)))
}
