package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
)

func runCmd(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, func(k string) string { return env[k] }, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestVersionAndHelp(t *testing.T) {
	code, out, _ := runCmd(t, nil, "--version")
	if code != 0 || !strings.HasPrefix(out, "gpu-plugin ") {
		t.Errorf("--version: %d %q", code, out)
	}
	code, out, _ = runCmd(t, nil, "--help")
	if code != 0 {
		t.Errorf("--help exit %d", code)
	}
	// Every option is documented with its environment twin.
	for _, o := range config.Options() {
		if !strings.Contains(out, "--"+o.Name) || !strings.Contains(out, o.Env[0]) {
			t.Errorf("--help does not document --%s with %s", o.Name, o.Env[0])
		}
	}
	for _, sub := range []string{"inventory", "config check", "demo"} {
		if !strings.Contains(out, sub) {
			t.Errorf("--help does not mention the %s subcommand", sub)
		}
	}
}

func TestBadInvocations(t *testing.T) {
	tests := []struct {
		args []string
		env  map[string]string
		code int
		want string
	}{
		{[]string{"--no-such-flag"}, nil, 2, "no-such-flag"},
		{[]string{"--mig-strategy=odd"}, nil, 2, `"odd" is not one of none, single, mixed`},
		{nil, map[string]string{"MIG_STRATEGY": "odd"}, 2, "MIG_STRATEGY"},
		{[]string{"--fail-on-init-error=maybe"}, nil, 2, "true or false"},
		{[]string{"stray"}, nil, 2, `unexpected argument "stray"`},
		{[]string{"inventory", "-o", "xml"}, nil, 2, "want table, json or yaml"},
		{[]string{"inventory", "--simulate=nope"}, nil, 1, "dgx-h100"},
		{[]string{"config"}, nil, 2, "missing subcommand"},
		{[]string{"--simulate=/does/not/exist.yaml"}, nil, 1, "/does/not/exist.yaml"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, _, errOut := runCmd(t, tc.env, tc.args...)
			if code != tc.code || !strings.Contains(errOut, tc.want) {
				t.Errorf("exit %d, stderr %q; want exit %d mentioning %q", code, errOut, tc.code, tc.want)
			}
		})
	}
}

func TestDaemonWithoutNVMLExits(t *testing.T) {
	code, _, errOut := runCmd(t, nil, "--nvml-library="+filepath.Join(t.TempDir(), "libnvidia-ml.so.1"), "--metrics-address=")
	if code != 1 || !strings.Contains(errOut, "libnvidia-ml.so.1 was not found") || !strings.Contains(errOut, "--simulate") {
		t.Errorf("exit %d, stderr %q; want 1 with the cause and the fix", code, errOut)
	}
}

func TestInventoryTable(t *testing.T) {
	code, out, errOut := runCmd(t, nil, "inventory", "--simulate=dgx1-volta")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{
		"Driver 535.183.01, CUDA 12.2, 8 GPUs",
		"Tesla V100-SXM2-16GB",
		"GPU0  X     NV1   NV1   NV2   NV2   SYS   SYS   SYS   0",
		"GPU7  SYS   SYS   SYS   NV1   NV2   NV1   NV2   X     1",
		"Legend:",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("inventory output lacks %q:\n%s", want, out)
		}
	}
}

func TestInventoryJSONAndMIG(t *testing.T) {
	code, out, errOut := runCmd(t, map[string]string{"GPU_PLUGIN_SIMULATE": "dgx-a100-mig"}, "inventory", "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var doc daemon.DebugDevices
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatal(err)
	}
	if !doc.Simulated || len(doc.Inventory.GPUs) != 8 || len(doc.Inventory.GPUs[1].MIGDevices) != 4 {
		t.Errorf("inventory JSON: %+v", doc.Inventory)
	}
	code, out, _ = runCmd(t, nil, "inventory", "--simulate=dgx-a100-mig")
	if code != 0 || !strings.Contains(out, "MIG 1g.5gb+me") || !strings.Contains(out, "4 devices") {
		t.Errorf("inventory table does not list MIG devices:\n%s", out)
	}
	code, out, _ = runCmd(t, nil, "inventory", "--simulate=pcie-l4x4", "-o", "yaml")
	if code != 0 || !strings.Contains(out, "name: NVIDIA L4") {
		t.Errorf("inventory yaml:\n%s", out)
	}
}

func TestConfigCheck(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte("version: v1\nflags:\n  migStrategy: mixed\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCmd(t, nil, "config", "check", path)
	if code != 0 || !strings.Contains(out, "migStrategy: mixed") || !strings.Contains(out, "deviceIDStrategy: uuid") {
		t.Errorf("config check: %d\n%s\n%s", code, out, errOut)
	}
	if err := os.WriteFile(path, []byte("version: v1\nflags:\n  migStrategy: mixed\n  colour: red\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// An unknown key is a warning naming its path, as NVIDIA ignores it;
	// --strict turns warnings into exit 1.
	code, _, errOut = runCmd(t, nil, "config", "check", path)
	if code != 0 || !strings.Contains(errOut, "warning: flags.colour: unknown field") {
		t.Errorf("config check of a file with an unknown key: exit %d, %q; want 0 and a warning naming flags.colour", code, errOut)
	}
	code, _, errOut = runCmd(t, nil, "config", "check", path, "--strict")
	if code != 1 || !strings.Contains(errOut, "flags.colour") || !strings.Contains(errOut, "--strict") {
		t.Errorf("config check --strict of a file with an unknown key: exit %d, %q; want 1", code, errOut)
	}
	if err := os.WriteFile(path, []byte("version: v1\nflags:\n  migStrategy: odd\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = runCmd(t, nil, "config", "check", path)
	if code == 0 || !strings.Contains(errOut, "flags.migStrategy") || !strings.Contains(errOut, path) {
		t.Errorf("config check of a bad file: exit %d, %q; want failure naming the file and field", code, errOut)
	}
}

func TestDemoOnce(t *testing.T) {
	code, out, errOut := runCmd(t, nil, "demo", "--once", "--metrics-address=127.0.0.1:0")
	if code != 0 {
		t.Fatalf("demo exit %d: %s", code, errOut)
	}
	for _, want := range []string{"capacity 8, allocatable 8", "nvidia.com/gpu: 2 gets GPU-", "env NVIDIA_VISIBLE_DEVICES=GPU-", "/metrics"} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}
