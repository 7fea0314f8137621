package telemetry_test

import (
	"bytes"
	"math"
	"sort"
	"strings"
	"testing"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/podusage"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// TestMPSClientsPerPod: two pods share a simulated GPU through MPS, their
// CUDA programs real processes in real pod cgroups resolved through the
// real /proc, beside a host process. NVML lists the programs as MPS
// clients and the MPS server (the simulator's own process, in no pod) as
// a compute process: each pod is credited with its client, the server
// and the host process are unattributed, and gpu_plugin_mps_clients
// counts the clients on each device whose processes were read, as they
// come and go.
func TestMPSClientsPerPod(t *testing.T) {
	cg := testkit.PodCgroups(t, testkit.Cgroupfs) // skips without root, unless CI=true
	dir := podusage.NewDirectory()
	e := newSimEnv(t, "dgx-a100-mig", envOptions{attributor: func(e *simEnv) telemetry.Attributor {
		return podusage.NewAccountant(podusage.Options{
			Resolver: podusage.NewResolver("/proc"), Directory: dir,
			Holders: func() *podresources.Snapshot { return e.pods.Load() },
		})
	}})
	gpu, other := e.inv.GPUs[5], e.inv.GPUs[6] // whole GPUs
	type pod struct {
		name, uid, cid string
		pid            int
	}
	a, b := &pod{name: "mps-a"}, &pod{name: "mps-b"}
	var holders []podresources.Holder
	for _, p := range []*pod{a, b} {
		p.uid, p.cid = testkit.RandomPodUID(t), testkit.RandomContainerID(t)
		p.pid = cg.Add(p.uid, p.cid)
		dir.Set(podusage.Pod{UID: p.uid, Namespace: "ml", Name: p.name, Containers: map[string]string{p.cid: "main"}})
		holders = append(holders, podresources.Holder{Namespace: "ml", Pod: p.name, Container: "main", Resource: "nvidia.com/gpu"})
	}
	dir.MarkSynced()
	e.setPods(map[string][]podresources.Holder{gpu.UUID: holders})
	host := testkit.StartSleeper(t)
	clientA := sim.Process{PID: uint32(a.pid), UsedMiB: 512, SMUtil: 30, MPS: true}
	clientB := sim.Process{PID: uint32(b.pid), UsedMiB: 256, SMUtil: 10, MPS: true}
	hostProc := sim.Process{PID: uint32(host), UsedMiB: 64, SMUtil: 5}

	onGPU := []string{"UUID=" + gpu.UUID, "gpu=5", "Hostname=node-1"}
	type series struct {
		family string
		labels []string
		want   float64 // NaN: absent
	}
	absent := math.NaN()
	podSeries := func(p *pod, mib, sm, procs float64) []series {
		l := append([]string{"namespace=ml", "pod=" + p.name, "pod_uid=" + p.uid, "container=main"}, onGPU...)
		return []series{{telemetry.PodMemoryName, l, mib * (1 << 20)}, {telemetry.PodSMUtilName, l, sm}, {telemetry.PodProcessesName, l, procs}}
	}
	for _, step := range []struct {
		name  string
		procs []sim.Process
		kill  *pod
		fault gonvml.Return // on GPU 5's MPS list
		want  []series
	}{
		{
			name:  "two clients and a host process",
			procs: []sim.Process{clientA, clientB, hostProc},
			want: append(append(podSeries(a, 512, 0.30, 1), podSeries(b, 256, 0.10, 1)...),
				series{telemetry.MPSClientsName, onGPU, 2},
				series{telemetry.MPSClientsName, []string{"UUID=" + other.UUID}, 0},
				// The host process and the MPS server.
				series{telemetry.UnattributedProcsName, onGPU, 2},
				series{telemetry.UnattributedMemoryName, onGPU, 64 << 20},
				series{telemetry.UnattributedSMUtilName, onGPU, 0.05}),
		},
		{
			name:  "b's program ends",
			procs: []sim.Process{clientA, hostProc},
			kill:  b,
			want: append(append(podSeries(a, 512, 0.30, 1), podSeries(b, 0, 0, 0)...),
				series{telemetry.MPSClientsName, onGPU, 1},
				series{telemetry.UnattributedProcsName, onGPU, 2}),
		},
		{
			name:  "the last client ends, and the MPS server with it",
			procs: []sim.Process{hostProc},
			want: append(podSeries(a, 0, 0, 0),
				series{telemetry.MPSClientsName, onGPU, 0},
				series{telemetry.UnattributedProcsName, onGPU, 1},
				series{telemetry.UnattributedMemoryName, onGPU, 64 << 20}),
		},
		{
			name:  "the MPS list fails: the GPU's processes are not read",
			procs: []sim.Process{clientA, hostProc},
			fault: gonvml.ERROR_UNKNOWN,
			want: append(podSeries(a, absent, absent, absent),
				series{telemetry.MPSClientsName, onGPU, absent},
				series{telemetry.MPSClientsName, []string{"UUID=" + other.UUID}, 0},
				series{telemetry.UnattributedProcsName, onGPU, absent}),
		},
	} {
		t.Run(step.name, func(t *testing.T) {
			if step.kill != nil {
				cg.Kill(step.kill.pid)
			}
			must(t, e.node.SetProcesses(5, step.procs))
			must(t, e.node.SetFault(5, "GetMPSComputeRunningProcesses", step.fault))
			e.clk.Advance(time.Second)
			e.sample()
			var buf bytes.Buffer
			e.collector.WriteText(&buf)
			got := testkit.Exposition(t, buf.Bytes())
			for _, s := range step.want {
				vals := seriesWith(got[s.family], s.labels)
				switch {
				case math.IsNaN(s.want) && len(vals) != 0:
					t.Errorf("%s{%s}: %v, want absent", s.family, strings.Join(s.labels, ","), vals)
				case !math.IsNaN(s.want) && (len(vals) != 1 || math.Abs(vals[0]-s.want) > 1e-9):
					t.Errorf("%s{%s}: %v, want [%g]", s.family, strings.Join(s.labels, ","), vals, s.want)
				}
			}
			// The family is served with the rest: the registry writes the
			// same, and promlint finds nothing in it.
			if fast, slow := withoutScrapeFamilies(buf.String()), withoutScrapeFamilies(formatAll(t, e.collector)); fast != slow {
				t.Errorf("WriteText differs from the registry's exposition\n--- WriteText\n%s\n--- registry\n%s", fast, slow)
			}
			problems, err := testutil.CollectAndLint(e.collector, telemetry.MPSClientsName)
			if err != nil || len(problems) != 0 {
				t.Errorf("promlint on %s: %v %+v", telemetry.MPSClientsName, err, problems)
			}
		})
	}
}

// seriesWith returns the values of a family's series whose labels include
// all of want ("name=value"), sorted.
func seriesWith(fam map[string]float64, want []string) []float64 {
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
	sort.Float64s(out)
	return out
}
