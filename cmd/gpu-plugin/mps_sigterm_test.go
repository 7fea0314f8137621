package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// TestSIGTERMQuitsMPSDaemons runs the built binary on a simulated node with
// sharing.mps and the fake control binary, and sends it SIGTERM once its
// MPS control daemon is ready: the process exits 0 having quit the daemon,
// which leaves no process and no control socket behind.
func TestSIGTERMQuitsMPSDaemons(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("needs the go command to build the binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "gpu-plugin")
	if out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("building: %v\n%s", err, out)
	}
	root, err := os.MkdirTemp("/tmp", "mps")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	fake := testkit.FakeMPSControl(t)
	pipe := filepath.Join(root, "nvidia.com/gpu/pipe")
	t.Cleanup(func() { _ = testkit.KillFakeMPS(pipe) })
	cfg := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte("version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 2}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	sockets := filepath.Join(dir, "kubelet")
	if err := os.Mkdir(sockets, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--simulate=pcie-l4x4", "--config="+cfg, "--mps-root="+root, "--mps-control-binary="+fake,
		"--metrics-address="+addr, "--kubelet-socket-dir="+sockets, "--node-labels=false", "--pod-resources-socket=")
	logs := &testkit.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	var pid int
	deadline := time.Now().Add(30 * time.Second)
	for pid == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no ready MPS daemon in /debug/devices within 30 s; log:\n%s", logs)
		}
		time.Sleep(50 * time.Millisecond)
		resp, err := http.Get("http://" + addr + "/debug/devices")
		if err != nil {
			continue
		}
		var doc struct {
			MPS []struct {
				State string `json:"state"`
				PID   int    `json:"pid"`
			} `json:"mps"`
		}
		err = json.NewDecoder(resp.Body).Decode(&doc)
		resp.Body.Close()
		if err == nil && len(doc.MPS) == 1 && doc.MPS[0].State == "ready" {
			pid = doc.MPS[0].PID
		}
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v; log:\n%s", err, logs)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("still running 30 s after SIGTERM; log:\n%s", logs)
	}
	if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 && i+2 < len(stat) && stat[i+2] != 'Z' {
			t.Errorf("the MPS control daemon (pid %d) outlived the plugin", pid)
		}
	}
	if _, err := os.Stat(filepath.Join(pipe, "control")); !os.IsNotExist(err) {
		t.Errorf("control socket left behind: %v", err)
	}
	if !strings.Contains(logs.String(), "MPS control daemon stopped") {
		t.Errorf("no stop in the log:\n%s", logs)
	}
}
