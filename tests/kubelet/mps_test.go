package kubelet

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	kubecontainer "k8s.io/kubernetes/pkg/kubelet/container"

	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// MPS conformance: CUDA MPS sharing (sharing.mps) on a simulated node, with
// the fake nvidia-cuda-mps-control of internal/testkit as the control
// daemon, under the real device manager: capacity, what a container gets,
// failRequestsGreaterThanOne, the shared-devices allocation policy, the
// limits the control daemon was given, and its end with the daemon.

const (
	// mpsContainerPipe is where an MPS client finds its resource's pipe
	// directory, as NVIDIA's plugin mounts it (the resource name whole).
	mpsContainerPipe = "/mps/nvidia.com/gpu/pipe"
	// mpsRefusal is the plugin's Allocate error for 2 replicas under
	// failRequestsGreaterThanOne.
	mpsRefusal = "MPS with failRequestsGreaterThanOne"
)

// placement is what the allocation policy must do with replicas when a
// container may ask for more than one.
type placement int

const (
	refuseTwo placement = iota // failRequestsGreaterThanOne: 2 replicas refused
	spread                     // distributed: least-used GPUs, distinct ones
	pack                       // packed: the most-used GPU that fits the request
)

// TestMPSThroughManager runs the daemon with sharing.mps under the real
// device manager, one case per config. Every case checks: the resource
// shows GPUs × replicas only once the control daemon is ready; a 1-replica
// container gets NVIDIA_VISIBLE_DEVICES of its replica's GPU,
// CUDA_MPS_PIPE_DIRECTORY and the pipe and /dev/shm mounts from the MPS
// root; the control daemon got the active thread percentage and each GPU's
// pinned memory limit; stopping the daemon quits the control daemon. Then,
// by placement: 2 replicas refused (failRequestsGreaterThanOne, the
// default for MPS), or allowed and placed by the policy.
func TestMPSThroughManager(t *testing.T) {
	cases := []struct {
		name     string
		profile  string
		replicas int
		// mpsExtra and flagsDoc are spliced into the config file: keys of
		// sharing.mps, and a flags: section.
		mpsExtra, flagsDoc string
		threads            int // set_default_active_thread_percentage expected
		placement          placement
	}{
		{name: "defaults refuse 2 replicas", profile: "pcie-l4x4", replicas: 4,
			threads: 25, placement: refuseTwo},
		{name: "explicit failRequestsGreaterThanOne on dgx-h100", profile: "dgx-h100", replicas: 2,
			mpsExtra: "    failRequestsGreaterThanOne: true\n", threads: 50, placement: refuseTwo},
		{name: "2 replicas, default policy distributed", profile: "pcie-l4x4", replicas: 4,
			mpsExtra: "    failRequestsGreaterThanOne: false\n", threads: 25, placement: spread},
		{name: "2 replicas, distributed", profile: "pcie-l4x4", replicas: 4,
			mpsExtra: "    failRequestsGreaterThanOne: false\n",
			flagsDoc: "flags:\n  plugin:\n    sharedDevicesAllocationPolicy: distributed\n",
			threads:  25, placement: spread},
		{name: "2 replicas, packed", profile: "pcie-l4x4", replicas: 4,
			mpsExtra: "    failRequestsGreaterThanOne: false\n",
			flagsDoc: "flags:\n  plugin:\n    sharedDevicesAllocationPolicy: packed\n",
			threads:  25, placement: pack},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			root := mpsRoot(t)
			pipe := filepath.Join(root, "nvidia.com", "gpu", "pipe")
			logFile := filepath.Join(root, "nvidia.com", "gpu", "log", "control.log")
			control := filepath.Join(pipe, "control")
			// A safety net, run after the daemon's own stop (cleanups run
			// last-registered first): a failure must not leave a fake
			// control daemon behind.
			t.Cleanup(func() {
				if err := testkit.KillFakeMPS(pipe); err != nil {
					t.Errorf("killing a fake MPS control daemon left behind: %v", err)
				}
			})
			doc := fmt.Sprintf("version: v1\n%ssharing:\n  mps:\n%s    resources:\n    - name: nvidia.com/gpu\n      replicas: %d\n",
				tc.flagsDoc, tc.mpsExtra, tc.replicas)
			k := startKubelet(t)
			p := startPlugin(t, "--simulate="+tc.profile, "--mps-root="+root,
				"--mps-control-binary="+testkit.FakeMPSControl(t), configFile(t, doc))

			// 1. Capacity: GPUs × replicas, once the control daemon is ready.
			gpus := p.d.Inventory().GPUs
			if len(gpus) == 0 {
				t.Fatalf("simulated %s has no GPUs", tc.profile)
			}
			total := int64(len(gpus) * tc.replicas)
			k.waitCapacity(gpuResource, counts{Capacity: total, Allocatable: total})
			if _, err := os.Stat(filepath.Join(root, "nvidia.com", "gpu", ".started")); err != nil {
				t.Errorf("the resource is advertised but the control daemon is not marked started: %v", err)
			}
			if fi, err := os.Lstat(control); err != nil || fi.Mode()&os.ModeSocket == 0 {
				t.Errorf("the control daemon's socket %s while advertised: %v (mode %v), want a socket", control, err, fi)
			}
			perGPU := map[string]int{}
			for id := range k.devices(gpuResource) {
				perGPU[replicaGPU(t, p, id)]++
			}
			for _, g := range gpus {
				if perGPU[g.UUID] != tc.replicas {
					t.Errorf("GPU %d (%s): the manager has %d replicas, want %d", g.Index, g.UUID, perGPU[g.UUID], tc.replicas)
				}
			}

			// 2. One replica: its GPU, the pipe directory and /dev/shm.
			one := gpuPod("one-replica", gpuResource, 1)
			opts, err := k.admit(one)
			if err != nil {
				t.Fatalf("a container asking for 1 MPS replica: %v", err)
			}
			ids := k.allocated(one, gpuResource)
			if len(ids) != 1 {
				t.Fatalf("the manager allocated %v, want 1 replica", ids)
			}
			first := replicaGPU(t, p, ids[0])
			checkMPSContainer(t, root, opts.Envs, opts.Mounts, []string{first})

			// 3./4. Two replicas in one container.
			two := gpuPod("two-replicas", gpuResource, 2)
			opts, err = k.admit(two)
			switch tc.placement {
			case refuseTwo:
				if err == nil || !strings.Contains(err.Error(), mpsRefusal) {
					t.Errorf("a container asking for 2 MPS replicas: err %v, want the plugin's refusal (%q)", err, mpsRefusal)
				}
				if got := k.allocated(two, gpuResource); len(got) != 0 {
					t.Errorf("the refused container holds replicas %v", got)
				}
			default:
				if err != nil {
					t.Fatalf("a container asking for 2 MPS replicas with failRequestsGreaterThanOne false: %v", err)
				}
				ids := k.allocated(two, gpuResource)
				if len(ids) != 2 {
					t.Fatalf("the manager allocated %v, want 2 replicas", ids)
				}
				var onGPUs []string
				for _, id := range ids {
					if g := replicaGPU(t, p, id); !slices.Contains(onGPUs, g) {
						onGPUs = append(onGPUs, g)
					}
				}
				slices.Sort(onGPUs)
				checkMPSContainer(t, root, opts.Envs, opts.Mounts, onGPUs)
				// A third container, 1 replica: where the policy sends it
				// with two GPUs (distributed) or one (packed) in use.
				third := gpuPod("third", gpuResource, 1)
				if _, err := k.admit(third); err != nil {
					t.Fatalf("a third container asking for 1 MPS replica: %v", err)
				}
				thirdIDs := k.allocated(third, gpuResource)
				if len(thirdIDs) != 1 {
					t.Fatalf("the manager allocated %v to the third container, want 1 replica", thirdIDs)
				}
				thirdGPU := replicaGPU(t, p, thirdIDs[0])
				if tc.placement == spread {
					// Distributed: each replica goes to a GPU with the
					// fewest in use: the first container's GPU has one, so
					// 2 replicas land on 2 other, idle GPUs, and the third
					// container on the GPU still idle (4 GPUs).
					if len(onGPUs) != 2 || slices.Contains(onGPUs, first) {
						t.Errorf("distributed: 2 replicas on GPUs %v (first container on %s), want 2 distinct idle GPUs", onGPUs, first)
					}
					if thirdGPU == first || slices.Contains(onGPUs, thirdGPU) {
						t.Errorf("distributed: the third container's replica on %s, a GPU in use (%s, %v); want the idle one", thirdGPU, first, onGPUs)
					}
				} else {
					// Packed: the most-used GPU that can hold the request
					// takes it: the first container's GPU (1 of 4 in use,
					// 3 free) takes both replicas, then the third one.
					if !slices.Equal(onGPUs, []string{first}) {
						t.Errorf("packed: 2 replicas on GPUs %v, want both on the first container's GPU %s", onGPUs, first)
					}
					if thirdGPU != first {
						t.Errorf("packed: the third container's replica on %s, want the busy GPU %s", thirdGPU, first)
					}
				}
			}

			// 5. The control daemon got the limits: per GPU (CUDA ordinal
			// under its CUDA_VISIBLE_DEVICES, every GPU shared: the index)
			// memory / replicas in MiB, and 100 / replicas percent of SMs.
			var want []string
			var uuids []string
			for i, g := range gpus {
				if g.MemoryBytes == 0 {
					t.Fatalf("GPU %d of %s: the inventory has no memory size", g.Index, tc.profile)
				}
				mib := g.MemoryBytes / (1 << 20) / uint64(tc.replicas)
				want = append(want, fmt.Sprintf("set_default_device_pinned_mem_limit %d %dM", i, mib))
				uuids = append(uuids, g.UUID)
			}
			want = append(want, "set_default_active_thread_percentage "+strconv.Itoa(tc.threads))
			cl := readControlLog(t, logFile)
			var sets []string
			for _, c := range cl.cmds {
				if strings.HasPrefix(c, "set_") && !slices.Contains(sets, c) {
					sets = append(sets, c)
				}
			}
			slices.Sort(sets)
			slices.Sort(want)
			if !slices.Equal(sets, want) {
				t.Errorf("the control daemon was told %q, want %q\n%s", sets, want, cl.text)
			}
			if wantStart := "CUDA_VISIBLE_DEVICES=" + strings.Join(uuids, ",") + ")"; !strings.Contains(cl.text, wantStart) {
				t.Errorf("the control daemon did not start with %s:\n%s", wantStart, cl.text)
			}

			// 6. Stopping the daemon quits the control daemon.
			pid := fakePID(t, pipe)
			if err := p.stop(); err != nil {
				t.Fatalf("daemon Run after cancel: %v", err)
			}
			if _, err := os.Lstat(control); !os.IsNotExist(err) {
				t.Errorf("the control socket %s after the daemon stopped: %v, want it removed", control, err)
			}
			if _, err := os.Lstat(filepath.Join(pipe, "fake.pid")); !os.IsNotExist(err) {
				t.Errorf("fake.pid after the daemon stopped: %v, want it removed by quit", err)
			}
			if _, err := os.Lstat(filepath.Join(root, "nvidia.com", "gpu", ".started")); !os.IsNotExist(err) {
				t.Errorf("the .started marker after the daemon stopped: %v, want it removed", err)
			}
			if cl := readControlLog(t, logFile); !slices.Contains(cl.cmds, "quit") {
				t.Errorf("the control daemon was never told quit:\n%s", cl.text)
			}
			if err := poll(10*time.Second, func() bool { return !fakeDaemonRunning(pid) }); err != nil {
				t.Errorf("the fake control daemon (pid %d) still runs 10s after the daemon stopped", pid)
			}
		})
	}
}

// mpsRoot is a short MPS root under /tmp: the control socket's path must
// fit in a unix socket address (108 bytes), which t.TempDir's may not.
func mpsRoot(t *testing.T) string {
	t.Helper()
	root, err := os.MkdirTemp("/tmp", "mps")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	return root
}

// replicaGPU is the physical GPU (UUID) of a replica ID <uuid>::<n>; it
// fails the test unless the UUID is a GPU of the simulated node.
func replicaGPU(t *testing.T, p *plugin, id string) string {
	t.Helper()
	uuid, n, ok := strings.Cut(id, sharing.ReplicaSeparator)
	if !ok || n == "" {
		t.Fatalf("device %q is not a replica ID <uuid>%s<n>", id, sharing.ReplicaSeparator)
	}
	return gpuByUUID(t, p, uuid).UUID
}

// checkMPSContainer checks a container's run options from the manager for
// MPS replicas on gpus (sorted UUIDs): exactly NVIDIA_VISIBLE_DEVICES and
// CUDA_MPS_PIPE_DIRECTORY, and exactly the pipe and /dev/shm mounts from
// the MPS root, both directories that exist on the host.
func checkMPSContainer(t *testing.T, root string, envs []kubecontainer.EnvVar, mounts []kubecontainer.Mount, gpus []string) {
	t.Helper()
	gotEnv := envMap(envs)
	if got := sortedList(gotEnv["NVIDIA_VISIBLE_DEVICES"]); !slices.Equal(got, gpus) {
		t.Errorf("NVIDIA_VISIBLE_DEVICES=%q, want the replicas' GPUs %v", gotEnv["NVIDIA_VISIBLE_DEVICES"], gpus)
	}
	wantEnv := map[string]string{"NVIDIA_VISIBLE_DEVICES": gotEnv["NVIDIA_VISIBLE_DEVICES"], "CUDA_MPS_PIPE_DIRECTORY": mpsContainerPipe}
	if len(gotEnv) != len(wantEnv) || gotEnv["CUDA_MPS_PIPE_DIRECTORY"] != mpsContainerPipe {
		t.Errorf("container environment %v, want exactly %v", gotEnv, wantEnv)
	}
	wantMounts := map[string]string{ // container path → host path
		mpsContainerPipe: filepath.Join(root, "nvidia.com", "gpu", "pipe"),
		"/dev/shm":       filepath.Join(root, "shm"),
	}
	gotMounts := map[string]string{}
	for _, m := range mounts {
		ctr, host := m.ContainerPath, m.HostPath
		if _, dup := gotMounts[ctr]; dup {
			t.Errorf("two mounts at %s", ctr)
		}
		gotMounts[ctr] = host
	}
	if len(gotMounts) != len(wantMounts) {
		t.Errorf("container mounts %v, want exactly %v", gotMounts, wantMounts)
	}
	for ctr, host := range wantMounts {
		if gotMounts[ctr] != host {
			t.Errorf("mount at %s from %q, want %q (all mounts: %v)", ctr, gotMounts[ctr], host, gotMounts)
			continue
		}
		if fi, err := os.Stat(host); err != nil || !fi.IsDir() {
			t.Errorf("mount source %s for %s: %v, want a directory on the host", host, ctr, err)
		}
	}
}

// controlLog is the fake control daemon's control.log.
type controlLog struct {
	text string
	cmds []string // the commands it received ("Cmd:<command>"), in order
}

func readControlLog(t *testing.T, path string) controlLog {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the MPS control daemon's log: %v", err)
	}
	l := controlLog{text: string(b)}
	for line := range bytes.Lines(b) {
		if _, cmd, ok := strings.Cut(strings.TrimSpace(string(line)), "] Cmd:"); ok {
			l.cmds = append(l.cmds, cmd)
		}
	}
	return l
}

// fakePID is the running fake control daemon's pid from its fake.pid.
func fakePID(t *testing.T, pipe string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(pipe, "fake.pid"))
	if err != nil {
		t.Fatalf("the fake control daemon's pid file: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("fake.pid: %v", err)
	}
	return pid
}

// fakeDaemonRunning reports whether pid is still the fake control daemon
// ("<binary> -fake-daemon"); a zombie's command line is empty.
func fakeDaemonRunning(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	return len(args) == 2 && args[1] == "-fake-daemon"
}
