package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestQuarantineParse(t *testing.T) {
	c, err := Parse([]byte("version: v1\nhealth:\n  quarantine: [3, \"GPU-8a1b\", \"MIG-77\", \" 4 \"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	want(t, "file list", []string(c.Health.Quarantine), []string{"3", "GPU-8a1b", "MIG-77", "4"})

	bad := []struct{ name, doc, want string }{
		{"not a list", "version: v1\nhealth:\n  quarantine: GPU-1\n", "health.quarantine: wrong type: want a list of GPU UUIDs or indexes"},
		{"negative index", "version: v1\nhealth:\n  quarantine: [-1]\n", "health.quarantine: entry 0: -1 is neither a GPU index nor a UUID string"},
		{"empty entry", "version: v1\nhealth:\n  quarantine: [0, \"\"]\n", "health.quarantine: entry 1: empty entry"},
		{"two in one entry", "version: v1\nhealth:\n  quarantine: [\"GPU-1,GPU-2\"]\n", `health.quarantine: entry 0: "GPU-1,GPU-2" is not a GPU UUID or index`},
		{"a mapping entry", "version: v1\nhealth:\n  quarantine: [{uuid: GPU-1}]\n", "health.quarantine: entry 0:"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse error %v; want one containing %q", err, tc.want)
			}
		})
	}
}

// TestQuarantineFlagJoinsFileAndAppliesLive: --health-quarantine and the
// file's list are joined (flag first, no duplicates), and a change of the
// file's list needs no restart.
func TestQuarantineFlagJoinsFileAndAppliesLive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("version: v1\nhealth:\n  quarantine: [1, GPU-a]\n")
	c, _, err := Load("gpu-plugin", []string{"--config", path, "--health-quarantine=GPU-a, 7"}, noEnv, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.HealthSettings()
	if err != nil {
		t.Fatal(err)
	}
	want(t, "joined", s.Quarantine, []string{"GPU-a", "7", "1"})

	write("version: v1\n")
	n, err := c.Reload()
	if err != nil {
		t.Fatal(err)
	}
	s, _ = n.HealthSettings()
	want(t, "after the file's list is gone", s.Quarantine, []string{"GPU-a", "7"})
	want(t, "restart-required settings", len(c.RestartRequired(n)), 0)

	if _, _, err := Load("gpu-plugin", []string{"--health-quarantine=GPU-a,,GPU b"}, noEnv, nil); err == nil ||
		!strings.Contains(err.Error(), `--health-quarantine="GPU-a,,GPU b": "GPU b" is not a GPU UUID or index`) {
		t.Errorf("bad flag: %v", err)
	}
	env := map[string]string{"GPU_PLUGIN_HEALTH_QUARANTINE": "2"}
	c, _, err = Load("gpu-plugin", nil, func(k string) string { return env[k] }, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, _ = c.HealthSettings()
	want(t, "from the environment", s.Quarantine, []string{"2"})
}
