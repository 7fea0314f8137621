package config

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func loadDoc(t *testing.T, doc string, args []string, env map[string]string) (*Config, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	c, _, err := Load("gpu-plugin", append([]string{"--config=" + path}, args...), func(k string) string { return env[k] }, nil)
	return c, err
}

func hasWarning(ws []string, prefix string) bool {
	return slices.ContainsFunc(ws, func(w string) bool { return strings.HasPrefix(w, prefix) })
}

func TestUnknownKeysAreWarningsWithTheirPath(t *testing.T) {
	c, err := Parse([]byte(`version: v1
sharng: {}
flags:
  plugin:
    deviceListStrategyy: cdi-cri
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: 2
      replicaz: 3
`))
	if err != nil {
		t.Fatalf("unknown keys must not refuse the file (NVIDIA ignores them): %v", err)
	}
	w := c.Warnings()
	for _, want := range []string{
		`sharng: unknown field, ignored (as NVIDIA's device plugin ignores it); did you mean "sharing"?`,
		`flags.plugin.deviceListStrategyy: unknown field`,
		`sharing.timeSlicing.resources[0].replicaz: unknown field, ignored (as NVIDIA's device plugin ignores it); did you mean "replicas"? Allowed here: devices, name, rename, replicas`,
	} {
		if !hasWarning(w, want) {
			t.Errorf("no warning %q in %q", want, w)
		}
	}
	if len(w) != 3 {
		t.Errorf("%d warnings, want 3: %q", len(w), w)
	}
	want(t, "the known value still applies", c.Sharing.TimeSlicing.Resources[0].Replicas, 2)
}

func TestDuplicateKeysWarn(t *testing.T) {
	c, err := Parse([]byte(`version: v1
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: 2
      replicas: 8
flags: {migStrategy: none}
flags: {migStrategy: mixed}
`))
	if err != nil {
		t.Fatal(err)
	}
	w := c.Warnings()
	if !hasWarning(w, "sharing.timeSlicing.resources[0].replicas: written twice (lines 6 and 7); the last one (line 7) applies") {
		t.Errorf("no warning names the duplicate replicas: %q", w)
	}
	if !hasWarning(w, "flags: written twice (lines 8 and 9)") {
		t.Errorf("no warning names the duplicate flags: %q", w)
	}
	want(t, "the last value applies", c.Sharing.TimeSlicing.Resources[0].Replicas, 8)
	want(t, "the last mapping applies", c.MigStrategy(), MigMixed)
	// JSON is YAML too.
	c, err = Parse([]byte(`{"version": "v1", "version": "v1"}`))
	if err != nil || !hasWarning(c.Warnings(), "version: written twice") {
		t.Errorf("JSON duplicate: %v %q", err, c.Warnings())
	}
}

func TestSleepIntervalForms(t *testing.T) {
	for _, tc := range []struct {
		doc  string
		want Duration
	}{
		{"5", 5}, {"60000000000", Duration(time.Minute)}, {`"60s"`, Duration(time.Minute)}, {"infinite", Infinite}, {"1.5e9", Duration(1500 * time.Millisecond)},
	} {
		c, err := Parse([]byte("version: v1\nflags:\n  gfd:\n    sleepInterval: " + tc.doc + "\n"))
		if err != nil {
			t.Errorf("sleepInterval: %s: %v", tc.doc, err)
			continue
		}
		want(t, "sleepInterval "+tc.doc, *c.Flags.GFD.SleepInterval, tc.want)
	}
	for _, bad := range []string{`"soon"`, "[1]", "1e30"} {
		if _, err := Parse([]byte("version: v1\nflags:\n  gfd:\n    sleepInterval: " + bad + "\n")); err == nil || !strings.Contains(err.Error(), "flags.gfd.sleepInterval") {
			t.Errorf("sleepInterval: %s: %v; want an error naming the field", bad, err)
		}
	}
}

const customDoc = `version: v1
resources:
  gpus:
  - {pattern: "*H100*", name: h100}
sharing:
  timeSlicing:
    renameByDefault: true
    resources:
    - {name: nvidia.com/gpu, rename: gpu-small, devices: [0, 1], replicas: 2}
    - {name: nvidia.com/gpu, devices: 2, replicas: 4}
    - {name: nvidia.com/mig-1g.10gb, rename: nvidia.com/mig-1g.10gb.shared, devices: all, replicas: 3}
`

func TestRenameDevicesAndResourcesIgnoredLikeNVIDIA(t *testing.T) {
	c, err := loadDoc(t, customDoc, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Resources != nil {
		t.Errorf("resources kept: %+v", c.Resources)
	}
	ts := c.Sharing.TimeSlicing
	want(t, "entries after merging the twice-listed resource", len(ts.Resources), 2)
	for _, r := range ts.Resources {
		if r.Rename != "" || r.Devices != nil {
			t.Errorf("%s: rename %q devices %v kept", r.Name, r.Rename, r.Devices)
		}
	}
	want(t, "largest replica count, as NVIDIA's map ends up with", ts.Resources[0].Replicas, 4)
	want(t, "renameByDefault name", ts.SharedName(ts.Resources[0]), "nvidia.com/gpu.shared")
	w := c.Warnings()
	for _, p := range []string{
		"resources: ignored, as NVIDIA's device plugin v0.20 ignores it",
		"sharing.timeSlicing.resources[0].rename: ignored",
		"sharing.timeSlicing.resources[0].devices: ignored",
		"sharing.timeSlicing.resources[1].devices: ignored",
		"sharing.timeSlicing.resources[1]: shares nvidia.com/gpu again",
	} {
		if !hasWarning(w, p) {
			t.Errorf("no warning %q: %q", p, w)
		}
	}
	// The <name>.shared rename that renameByDefault gives anyway, and
	// devices: all, are what NVIDIA keeps: no warning.
	if hasWarning(w, "sharing.timeSlicing.resources[2]") {
		t.Errorf("a rename equal to the default one warns: %q", w)
	}
	if !strings.Contains(strings.Join(w, "\n"), "--resource-customization") {
		t.Errorf("the warnings do not name the opt-in: %q", w)
	}
}

func TestResourceCustomizationOptIn(t *testing.T) {
	for _, tc := range []struct {
		name string
		doc  string
		args []string
		env  map[string]string
		want bool
	}{
		{"default", customDoc, nil, nil, false},
		{"file", customDoc + "extensions: {resourceCustomization: true}\n", nil, nil, true},
		{"env over file", customDoc + "extensions: {resourceCustomization: false}\n", nil, map[string]string{"GPU_PLUGIN_RESOURCE_CUSTOMIZATION": "true"}, true},
		{"flag over env", customDoc, []string{"--resource-customization=false"}, map[string]string{"GPU_PLUGIN_RESOURCE_CUSTOMIZATION": "true"}, false},
		{"flag", customDoc, []string{"--resource-customization"}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := loadDoc(t, tc.doc, tc.args, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			want(t, "opt-in", c.ResourceCustomization(), tc.want)
			ts := c.Sharing.TimeSlicing
			if !tc.want {
				return
			}
			want(t, "resources kept", c.Resources.GPUs[0].Name, "nvidia.com/h100")
			want(t, "rename kept", ts.Resources[0].Rename, "nvidia.com/gpu-small")
			want(t, "devices kept", ts.Resources[1].Devices.Count, 2)
			if w := c.Warnings(); len(w) != 0 {
				t.Errorf("with the opt-in nothing is ignored, so nothing warns: %q", w)
			}
		})
	}
	_, err := loadDoc(t, "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: gpu, devices: [], replicas: 2}\n", []string{"--resource-customization"}, nil)
	if err == nil || !strings.Contains(err.Error(), "sharing.timeSlicing.resources[0].devices: an empty list selects nothing") {
		t.Errorf("an empty devices list with the opt-in: %v", err)
	}
}

func TestReadConfigFileBounds(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(regular, []byte("version: v1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.yaml") // as in a mounted ConfigMap
	fifo := filepath.Join(dir, "fifo")
	zero := filepath.Join(dir, "zero.yaml")
	big := filepath.Join(dir, "big.yaml")
	for _, err := range []error{
		os.Symlink(regular, link),
		syscall.Mkfifo(fifo, 0o644),
		os.Symlink("/dev/zero", zero),
		os.WriteFile(big, make([]byte, MaxFileSize+1), 0o644),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		path, want string
	}{
		{regular, ""},
		{link, ""},
		{fifo, "is a FIFO (named pipe); want a regular file"},
		{zero, "is a character device; want a regular file"},
		{dir, "is a directory; want a regular file"},
		{big, "is larger than 1048576 bytes"},
		{filepath.Join(dir, "missing.yaml"), "no such file"},
	} {
		done := make(chan error, 1)
		go func() {
			_, err := ReadConfigFile(tc.path)
			done <- err
		}()
		select {
		case err := <-done:
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("%s: %v", tc.path, err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("%s: %v; want an error containing %q", tc.path, err, tc.want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: ReadConfigFile blocked", tc.path)
		}
	}
	// A start refuses the same, naming the file.
	_, _, err := Load("gpu-plugin", []string{"--config=" + fifo}, noEnv, nil)
	if err == nil || !strings.Contains(err.Error(), fifo) {
		t.Errorf("Load of a FIFO: %v", err)
	}
	if errors.Is(err, os.ErrNotExist) {
		t.Errorf("the FIFO is reported missing: %v", err)
	}
}

func TestQuoteCuts(t *testing.T) {
	want(t, "short", quote("abc"), `"abc"`)
	long := strings.Repeat("é", 100) // 200 bytes; the cut must not split a rune
	got := quote(long)
	want(t, "long", got, `"`+strings.Repeat("é", 32)+`"… (200 bytes)`)
}

func TestFlagsForNVIDIAOnly(t *testing.T) {
	c, _, err := Load("gpu-plugin", []string{"--kubelet-socket=/var/lib/kubelet/plugins/kubelet.sock"}, noEnv, nil)
	if err != nil {
		t.Fatal(err)
	}
	want(t, "socket dir follows --kubelet-socket", c.Daemon.KubeletSocketDir, "/var/lib/kubelet/plugins")
	c, _, err = Load("gpu-plugin", []string{"--kubelet-socket=/k/kubelet.sock", "--kubelet-socket-dir=/d"}, noEnv, nil)
	if err != nil {
		t.Fatal(err)
	}
	want(t, "an explicit socket dir wins", c.Daemon.KubeletSocketDir, "/d")
	c, _, err = Load("gpu-plugin", []string{"--kubelet-socket="}, noEnv, nil)
	if err != nil || !c.Daemon.SkipRegistration {
		t.Errorf("--kubelet-socket= (empty) must skip registration: %v", err)
	}
	if _, _, err := Load("gpu-plugin", []string{"--kubelet-socket=kubelet.sock"}, noEnv, nil); err == nil || !strings.Contains(err.Error(), "absolute") {
		t.Errorf("a relative --kubelet-socket: %v", err)
	}
	for _, args := range [][]string{{"--imex-channel-ids=1"}, {"--imex-channel-ids=0", "--imex-channel-ids=0"}, {"--imex-channel-ids=x"}} {
		if _, _, err := Load("gpu-plugin", args, noEnv, nil); err == nil || !strings.Contains(err.Error(), "imex") && !strings.Contains(err.Error(), "channel") {
			t.Errorf("%v: %v; want a refusal naming the IMEX channels", args, err)
		}
	}
	if _, _, err := Load("gpu-plugin", []string{"--device-discovery-strategy=tegra", "--simulate=dgx-h100"}, noEnv, nil); err == nil || !strings.Contains(err.Error(), "tegra is not supported") {
		t.Errorf("tegra: %v", err)
	}
	if _, _, err := Load("gpu-plugin", nil, func(k string) string { return map[string]string{"DEVICE_DISCOVERY_STRATEGY": "tegra"}[k] }, nil); err == nil {
		t.Error("tegra from the environment is accepted")
	}
}

func TestAliasBombRefused(t *testing.T) {
	doc := "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
	prev := "a"
	for _, n := range []string{"b", "c", "d", "e", "f", "g"} {
		doc += n + ": &" + n + " [" + strings.Repeat("*"+prev+", ", 9) + "*" + prev + "]\n"
		prev = n
	}
	_, err := Parse([]byte(doc + "version: v1\n"))
	if err == nil || !strings.Contains(err.Error(), "YAML aliases expand") {
		t.Errorf("a document that aliases expand to 10⁷ nodes: %v", err)
	}
	// Ordinary anchors, as some generated files have, are fine.
	c, err := Parse([]byte("version: v1\nx-common: &ts {name: gpu, replicas: 2}\nsharing:\n  timeSlicing:\n    resources: [*ts]\n"))
	if err != nil || c.Sharing.TimeSlicing.Resources[0].Replicas != 2 {
		t.Errorf("an anchor used once: %v", err)
	}
}
