package config

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

// TestSelect: --config-dir's chosen file is read as the config file, flags
// still win over it, a Reload re-reads the chosen file, and choosing none
// gives the defaults.
func TestSelect(t *testing.T) {
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared")
	write := func(content string) {
		if err := os.WriteFile(shared, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("version: v1\nflags: {migStrategy: mixed}\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 4}]}}\n")
	env := map[string]string{"CONFIG_FILE": "/ignored/with/config-dir"}
	_, _, err := Load("gpu-plugin", []string{"--config-dir=" + dir, "--mig-strategy=single"}, func(k string) string { return env[k] }, io.Discard)
	if err == nil {
		t.Fatal("CONFIG_FILE with --config-dir was accepted")
	}
	delete(env, "CONFIG_FILE")
	c, _, err := Load("gpu-plugin", []string{"--config-dir=" + dir, "--mig-strategy=single"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Daemon.ConfigFile != "" || c.Sharing.TimeSlicing != nil {
		t.Fatalf("before Select: file %q, sharing %+v; want none", c.Daemon.ConfigFile, c.Sharing.TimeSlicing)
	}
	sel, err := c.Select(shared)
	if err != nil {
		t.Fatal(err)
	}
	if sel.Daemon.ConfigFile != shared || sel.Sharing.TimeSlicing == nil || sel.Sharing.TimeSlicing.Resources[0].Replicas != 4 {
		t.Fatalf("Select read file %q, sharing %+v; want %s with replicas 4", sel.Daemon.ConfigFile, sel.Sharing.TimeSlicing, shared)
	}
	if got := sel.MigStrategy(); got != "single" {
		t.Errorf("migStrategy %q: the command line's single must win over the file's mixed", got)
	}
	write("version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}\n")
	re, err := sel.Reload()
	if err != nil {
		t.Fatal(err)
	}
	if re.Daemon.ConfigFile != shared || re.Sharing.TimeSlicing.Resources[0].Replicas != 2 {
		t.Errorf("Reload after Select read %q with %+v, want the chosen file's new replicas 2", re.Daemon.ConfigFile, re.Sharing.TimeSlicing)
	}
	none, err := sel.Select("")
	if err != nil {
		t.Fatal(err)
	}
	if none.Daemon.ConfigFile != "" || none.Sharing.TimeSlicing != nil {
		t.Errorf("Select(\"\"): file %q sharing %+v, want the defaults", none.Daemon.ConfigFile, none.Sharing.TimeSlicing)
	}
}
