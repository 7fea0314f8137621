package e2e

// Scenario 2b: the cdi-cri device list strategy on the real node. The
// daemon writes its CDI spec and answers Allocate with CDI device names
// only (AllocateResponse.cdi_devices); the kubelet passes them in the CRI
// CDIDevices field and containerd v2 applies the spec. With cdi-cri alone
// nothing else reaches the container, so every device node, mount,
// environment variable and hook the pod shows came through CDI.
//
// A simulated node's spec describes the driver root the daemon lays out
// (internal/driverroot: placeholder libraries and binaries, real device
// nodes with the driver's majors) in its TMPDIR, and names it by path: the
// container runtime, on the host, must find it there. The chart's pod has a
// read-only root file system and no capabilities, so the scenario sets, as
// values a user can set: TMPDIR to the one host directory the chart mounts
// read-write at the same path for this strategy, /var/run/cdi (the CDI
// scanners skip its subdirectories), and a securityContext that adds MKNOD
// to the chart's default. The spec's hooks run a stand-in nvidia-cdi-hook
// (--nvidia-cdi-hook-path) that records its arguments.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// cdiKind is the daemon's CDI kind for whole GPUs (internal/cdi.Kind).
const cdiKind = "k8s.device-plugin.nvidia.com/gpu"

// The parts of a CDI spec the scenario reads.
type cdiSpec struct {
	Kind    string `json:"kind"`
	Devices []struct {
		Name           string   `json:"name"`
		ContainerEdits cdiEdits `json:"containerEdits"`
	} `json:"devices"`
	ContainerEdits cdiEdits `json:"containerEdits"`
}

type cdiEdits struct {
	Env         []string `json:"env"`
	DeviceNodes []struct {
		Path     string `json:"path"`
		HostPath string `json:"hostPath"`
		Major    int64  `json:"major"`
		Minor    int64  `json:"minor"`
	} `json:"deviceNodes"`
	Mounts []struct {
		HostPath      string `json:"hostPath"`
		ContainerPath string `json:"containerPath"`
	} `json:"mounts"`
	Hooks []struct {
		HookName string   `json:"hookName"`
		Path     string   `json:"path"`
		Args     []string `json:"args"`
	} `json:"hooks"`
}

// cdiValues are the install values with deviceListStrategy cdi-cri on the
// simulated node (see above): TMPDIR, MKNOD, the stand-in hook.
func cdiValues(image, hook string) map[string]any {
	base := installValues(image)
	return map[string]any{
		"deviceListStrategy": "cdi-cri",
		"extraArgs":          append(slices.Clone(base["extraArgs"].([]any)), "--nvidia-cdi-hook-path="+hook),
		"extraEnv": append(slices.Clone(base["extraEnv"].([]any)),
			map[string]any{"name": "TMPDIR", "value": cdiSpecDir}),
		// The chart's default securityContext, plus MKNOD.
		"securityContext": map[string]any{
			"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false, "privileged": false,
			"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
			"seccompProfile": map[string]any{"type": "RuntimeDefault"},
			"capabilities":   map[string]any{"drop": []any{"ALL"}, "add": []any{"MKNOD"}},
		},
	}
}

// readCDISpec reads the daemon's spec of kind cdiKind from the node's
// /var/run/cdi, and its path.
func readCDISpec(t *testing.T) (*cdiSpec, string) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(cdiSpecDir, "*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var s cdiSpec
		if err := json.Unmarshal(b, &s); err != nil {
			t.Fatalf("CDI spec %s: %v", f, err)
		}
		if s.Kind == cdiKind {
			return &s, f
		}
	}
	t.Fatalf("no CDI spec of kind %s in %s (files: %v)", cdiKind, cdiSpecDir, files)
	return nil, ""
}

// cdiHook writes the stand-in nvidia-cdi-hook on the node (again, if it
// is there) and returns its path and the log it appends to.
func (s *suite) cdiHook(t *testing.T) (hook, hookLog string) {
	t.Helper()
	dir := s.n.path("cdi-hook")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	hook, hookLog = filepath.Join(dir, "nvidia-cdi-hook"), filepath.Join(dir, "hooks.log")
	// runc runs it with the container's state on stdin and argv[0] replaced
	// by the script's path: it records the rest, one run a line.
	script := "#!/bin/sh\ncat >/dev/null\nprintf '%s\\n' \"$*\" >> '" + hookLog + "'\n"
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return hook, hookLog
}

func (s *suite) cdiCRI(t *testing.T) {
	ctx := context.Background()
	c := s.n.client
	hook, hookLog := s.cdiHook(t)

	t0 := time.Now()
	s.replacePlugin(t, cdiValues(s.n.env.image, hook))
	s.waitAllocatable(t, nodeGPUs, "allocatable 8 with deviceListStrategy cdi-cri")
	s.timed("2b cdi-cri → new plugin pod Ready, allocatable 8", time.Since(t0))
	spec, specPath := readCDISpec(t)
	var root string
	for _, d := range spec.ContainerEdits.DeviceNodes {
		if !strings.HasPrefix(d.HostPath, cdiSpecDir+"/") {
			t.Fatalf("the spec's %s is at %s, outside the host's %s: the runtime cannot find it", d.Path, d.HostPath, cdiSpecDir)
		}
		root, _, _ = strings.Cut(strings.TrimPrefix(d.HostPath, cdiSpecDir+"/"), "/")
	}
	t.Logf("CDI spec %s: %d devices, simulated driver root %s/%s", specPath, len(spec.Devices), cdiSpecDir, root)

	// The pod reports its environment, every /dev/nvidia* node (type and
	// major:minor, in hex as stat prints them) and which of the spec's
	// mounts it has.
	pod := testPod("default", "cdi-gpu", 1)
	var sh strings.Builder
	sh.WriteString("env | sed 's/^/env=/'\n")
	sh.WriteString(`for f in /dev/nvidia* /dev/nvidia-caps/*; do [ -e "$f" ] && echo "node=$f $(stat -c '%F %t:%T' "$f")"; done` + "\n")
	for _, m := range spec.ContainerEdits.Mounts {
		fmt.Fprintf(&sh, "if [ -e '%[1]s' ]; then echo 'mounted=%[1]s'; else echo 'missing=%[1]s'; fi\n", m.ContainerPath)
	}
	sh.WriteString("echo done\nexec sleep 3600\n")
	pod.Spec.Containers[0].Command = []string{"/bin/sh", "-c", sh.String()}
	t1 := time.Now()
	if _, err := c.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CoreV1().Pods("default").Delete(context.Background(), pod.Name, metav1.DeleteOptions{}) })
	pod = s.waitPod(t, "default", pod.Name, "Running", 120*time.Second, running)
	s.timed("2b pod with 1 GPU by CDI: created → seen Running", time.Since(t1))
	var log string
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		b, err := c.CoreV1().Pods("default").GetLogs(pod.Name, &corev1.PodLogOptions{}).DoRaw(ctx)
		log = string(b)
		return err == nil && strings.Contains(log, "\ndone\n"), nil
	})
	if err != nil {
		t.Fatalf("pod %s did not finish its report: %v; log so far:\n%s", pod.Name, err, log)
	}
	env, nodes, missing := map[string]bool{}, map[string]string{}, []string{}
	for _, l := range strings.Split(log, "\n") {
		k, v, _ := strings.Cut(l, "=")
		switch k {
		case "env":
			env[v] = true
		case "node":
			path, desc, _ := strings.Cut(v, " ")
			nodes[path] = desc
		case "missing":
			missing = append(missing, v)
		}
	}
	t.Logf("pod %s's device nodes: %v", pod.Name, nodes)

	// Exactly one GPU's node, and it is a UUID-named device of the spec
	// (Allocate names GPUs by UUID).
	var gpuNodes []string
	for p := range nodes {
		if rest, ok := strings.CutPrefix(p, "/dev/nvidia"); ok && rest != "" && strings.Trim(rest, "0123456789") == "" {
			gpuNodes = append(gpuNodes, p)
		}
	}
	if len(gpuNodes) != 1 {
		t.Fatalf("pod %s has GPU device nodes %v, want exactly one (limits nvidia.com/gpu: 1)", pod.Name, gpuNodes)
	}
	want := spec.ContainerEdits
	var uuid string
	for _, d := range spec.Devices {
		if strings.HasPrefix(d.Name, "GPU-") && len(d.ContainerEdits.DeviceNodes) == 1 && d.ContainerEdits.DeviceNodes[0].Path == gpuNodes[0] {
			uuid = d.Name
			want.DeviceNodes = append(want.DeviceNodes, d.ContainerEdits.DeviceNodes...)
			want.Env = append(want.Env, d.ContainerEdits.Env...)
			want.Hooks = append(want.Hooks, d.ContainerEdits.Hooks...)
		}
	}
	if uuid == "" {
		t.Fatalf("no GPU of the spec has the device node %s", gpuNodes[0])
	}
	for _, d := range want.DeviceNodes {
		wantDesc := fmt.Sprintf("character special file %x:%x", d.Major, d.Minor)
		if nodes[d.Path] != wantDesc {
			t.Errorf("%s in pod %s: %q, want %q (from the spec)", d.Path, pod.Name, nodes[d.Path], wantDesc)
		}
	}
	if len(nodes) != len(want.DeviceNodes) {
		t.Errorf("pod %s has device nodes %v, want only the spec's %d for %s", pod.Name, nodes, len(want.DeviceNodes), uuid)
	}
	if len(missing) > 0 {
		t.Errorf("pod %s lacks the spec's mounts %v", pod.Name, missing)
	}
	for _, e := range want.Env {
		if !env[e] {
			t.Errorf("pod %s's environment lacks the spec's %s", pod.Name, e)
		}
	}
	b, err := os.ReadFile(hookLog)
	if err != nil {
		t.Fatalf("the stand-in nvidia-cdi-hook never ran: %v", err)
	}
	ran := strings.Split(strings.TrimSpace(string(b)), "\n")
	for _, h := range want.Hooks {
		if len(h.Args) < 2 || h.Path != hook {
			t.Errorf("spec hook %s %v: want %s with a subcommand", h.HookName, h.Args, hook)
			continue
		}
		if !slices.Contains(ran, strings.Join(h.Args[1:], " ")) {
			t.Errorf("the %s hook %q did not run (the stand-in ran: %q)", h.HookName, strings.Join(h.Args[1:], " "), ran)
		}
	}
	t.Logf("pod %s got %s by CDI name alone: %d device nodes, %d mounts, env %v, %d hooks run", pod.Name, uuid,
		len(want.DeviceNodes), len(want.Mounts), want.Env, len(want.Hooks))

	// Back to the install values; the spec left behind names a driver root
	// that went with the old pod.
	if err := c.CoreV1().Pods("default").Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	s.replacePlugin(t, nil)
	s.waitAllocatable(t, nodeGPUs, "allocatable 8 again")
	if err := os.Remove(specPath); err != nil {
		t.Error(err)
	}
	s.gpuPodUndisturbed(t)
}
