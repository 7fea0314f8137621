package daemon_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/mps"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// mpsConfig is a sharing.mps config file with the given replicas.
func mpsConfig(t testing.TB, path string, replicas int) {
	t.Helper()
	doc := fmt.Sprintf("version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: %d}\n", replicas)
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
}

// askMPS sends a control command to a resource's daemon as a client does.
func askMPS(bin, root, resource, line string) (string, error) {
	cmd := exec.Command(bin)
	cmd.Env = []string{"CUDA_MPS_PIPE_DIRECTORY=" + mps.DirsOf(root, resource).Pipe}
	cmd.Stdin = strings.NewReader(line)
	out, err := cmd.Output()
	return strings.TrimSpace(string(out)), err
}

// TestMPSDaemon runs the daemon on a simulated node with sharing.mps and
// the fake control binary under a stand-in kubelet: the resource appears
// only once its control daemon is ready, Allocate hands out the pipe and
// shm, a crash makes every replica unhealthy until the restart, a reload
// to fewer replicas restarts the daemon with the new limits, and stopping
// the plugin leaves no daemon.
func TestMPSDaemon(t *testing.T) {
	root := mpsRoot(t)
	bin := testkit.FakeMPSControl(t)
	t.Cleanup(func() { _ = testkit.KillFakeMPS(mps.DirsOf(root, "nvidia.com/gpu").Pipe) })
	const delay = 700 * time.Millisecond
	t.Setenv("FAKE_MPS_READY_DELAY", delay.String()) // the fake's -d returns only once it listens
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	mpsConfig(t, cfgPath, 10)

	began := time.Now()
	r := start(t, true, "--simulate=pcie-l4x4", "--config="+cfgPath, "--mps-root="+root, "--mps-control-binary="+bin, "--rescan-interval=0")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 40, 40); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(began); took < delay {
		t.Errorf("nvidia.com/gpu advertised %s after start, before its MPS daemon could be ready (%s)", took, delay)
	}

	// Allocate: the replica's GPU, the pipe directory and the shared memory.
	resp, err := r.kubelet.Allocate(ctx, "nvidia.com/gpu", r.kubelet.Devices("nvidia.com/gpu")[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Envs["CUDA_MPS_PIPE_DIRECTORY"]; got != "/mps/nvidia.com/gpu/pipe" {
		t.Errorf("CUDA_MPS_PIPE_DIRECTORY %q", got)
	}
	mounts := map[string]string{}
	for _, m := range resp.Mounts {
		mounts[m.ContainerPath] = m.HostPath
	}
	if mounts["/mps/nvidia.com/gpu/pipe"] != filepath.Join(root, "nvidia.com/gpu/pipe") || mounts["/dev/shm"] != filepath.Join(root, "shm") {
		t.Errorf("mounts %v: want the pipe directory and <root>/shm", mounts)
	}
	if _, err := r.kubelet.Allocate(ctx, "nvidia.com/gpu", r.kubelet.Devices("nvidia.com/gpu")[0].ID, r.kubelet.Devices("nvidia.com/gpu")[1].ID); err == nil ||
		!strings.Contains(err.Error(), "MPS with failRequestsGreaterThanOne") {
		t.Errorf("2 replicas: %v; want the failRequestsGreaterThanOne refusal", err)
	}

	// A crash: all 40 replicas unhealthy, then healthy after the restart.
	if _, err := askMPS(bin, root, "nvidia.com/gpu", "die"); err != nil {
		t.Logf("die: %v", err)
	}
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 40, 0); err != nil {
		t.Fatalf("after the MPS daemon died: %v", err)
	}
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 40, 40); err != nil {
		t.Fatalf("after the MPS daemon's restart: %v", err)
	}

	// A live reload from 10 to 4 replicas.
	mpsConfig(t, cfgPath, 4)
	r.d.Reload()
	if err := r.kubelet.WaitForAllocatable(ctx, "nvidia.com/gpu", 16, 16); err != nil {
		t.Fatalf("after the reload to 4 replicas: %v", err)
	}
	eventually(t, "the daemon's new thread percentage", func() (bool, string) {
		got, err := askMPS(bin, root, "nvidia.com/gpu", "get_default_active_thread_percentage")
		return got == "25.0", fmt.Sprintf("%q %v", got, err)
	})
	log, _ := os.ReadFile(filepath.Join(mps.DirsOf(root, "nvidia.com/gpu").Log, "control.log"))
	for _, want := range []string{"Cmd:set_default_active_thread_percentage 10", "Cmd:set_default_active_thread_percentage 25", "Cmd:quit"} {
		if !strings.Contains(string(log), want) {
			t.Errorf("control.log lacks %q", want)
		}
	}

	// Stopping the plugin quits the daemon.
	r.cancel()
	if err := <-r.done; err != nil {
		t.Errorf("Run: %v", err)
	}
	r.done <- nil // for the cleanup
	if _, err := os.Stat(filepath.Join(mps.DirsOf(root, "nvidia.com/gpu").Pipe, "control")); !os.IsNotExist(err) {
		t.Errorf("the control socket is left after the plugin stopped: %v", err)
	}
	if _, err := askMPS(bin, root, "nvidia.com/gpu", "get_default_active_thread_percentage"); err == nil {
		t.Error("an MPS daemon still answers after the plugin stopped")
	}
}

// TestMPSNeedsAControlBinaryOnASimulatedNode: without --mps-control-binary
// the resource is not advertised, and /debug/devices says why.
func TestMPSNeedsAControlBinaryOnASimulatedNode(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	mpsConfig(t, cfgPath, 2)
	r := start(t, true, "--simulate=pcie-l4x4", "--config="+cfgPath, "--mps-root="+mpsRoot(t), "--rescan-interval=0")
	eventually(t, "the MPS daemon's failure in /debug/devices", func() (bool, string) {
		_, body := get(t, "http://"+r.d.Addr()+"/debug/devices")
		return strings.Contains(body, `"state": "failed"`) && strings.Contains(body, "--mps-control-binary"), body
	})
	if rs := r.kubelet.Resources(); len(rs) != 0 {
		t.Errorf("advertised %v with no MPS daemon", rs)
	}
	_, metrics := get(t, "http://"+r.d.Addr()+"/metrics")
	if !strings.Contains(metrics, `gpu_plugin_mps_daemon_ready{resource="nvidia.com/gpu",state="failed"} 0`) {
		t.Errorf("no failed daemon in /metrics")
	}
}
