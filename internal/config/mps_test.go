package config

import (
	"strings"
	"testing"
)

// TestMPSLikeNVIDIA covers every shape of sharing.mps: what NVIDIA's plugin
// v0.20 accepts is accepted with the same meaning, what it refuses is
// refused with a message that names the field.
func TestMPSLikeNVIDIA(t *testing.T) {
	const gpuMPS = "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n"
	root := []string{"--mps-root=/run/nvidia/mps"}
	for _, tc := range []struct {
		name    string
		doc     string
		args    []string
		wantErr string // in the error; "" accepts
		check   func(t *testing.T, c *Config)
	}{
		{name: "accepted, failRequestsGreaterThanOne defaults to true", doc: gpuMPS, args: root, check: func(t *testing.T, c *Config) {
			rr, path := c.ReplicatedSharing()
			if path != "sharing.mps" || rr.Resources[0].Replicas != 4 || rr.FailRequestsGreaterThanOne == nil || !*rr.FailRequestsGreaterThanOne {
				t.Errorf("in force %s %+v; want sharing.mps, 4 replicas, failRequestsGreaterThanOne true", path, rr)
			}
			if !c.UsesMPS() || c.MPSRoot() != "/run/nvidia/mps" {
				t.Errorf("UsesMPS %v root %q", c.UsesMPS(), c.MPSRoot())
			}
		}},
		{name: "failRequestsGreaterThanOne false is kept", args: root,
			doc: "version: v1\nsharing:\n  mps:\n    failRequestsGreaterThanOne: false\n    resources:\n    - {name: gpu, replicas: 2}\n",
			check: func(t *testing.T, c *Config) {
				if v := c.Sharing.MPS.FailRequestsGreaterThanOne; v == nil || *v {
					t.Errorf("failRequestsGreaterThanOne %v, want false", v)
				}
				if c.Sharing.MPS.Resources[0].Name != "nvidia.com/gpu" {
					t.Errorf("name %q not qualified", c.Sharing.MPS.Resources[0].Name)
				}
			}},
		{name: "time-slicing beside MPS is ignored, with a warning", args: root,
			doc: gpuMPS + "  timeSlicing:\n    resources:\n    - {name: gpu, replicas: 8}\n",
			check: func(t *testing.T, c *Config) {
				if _, path := c.ReplicatedSharing(); path != "sharing.mps" {
					t.Errorf("in force: %s, want sharing.mps", path)
				}
				if !hasWarning(c.Warnings(), "sharing.timeSlicing: ignored because sharing.mps is set") {
					t.Errorf("no warning about the ignored time-slicing: %q", c.Warnings())
				}
				if v := c.Sharing.TimeSlicing.FailRequestsGreaterThanOne; v != nil {
					t.Errorf("time-slicing's failRequestsGreaterThanOne got a default: %v", *v)
				}
			}},
		{name: "rename and devices are ignored as NVIDIA ignores them", args: root,
			doc: "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: gpu, rename: mps-gpu, devices: [0], replicas: 2}\n",
			check: func(t *testing.T, c *Config) {
				r := c.Sharing.MPS.Resources[0]
				if r.Rename != "" || r.Devices != nil {
					t.Errorf("rename %q devices %+v kept", r.Rename, r.Devices)
				}
				for _, w := range []string{"sharing.mps.resources[0].rename: ignored", "sharing.mps.resources[0].devices: ignored"} {
					if !hasWarning(c.Warnings(), w) {
						t.Errorf("no warning %q in %q", w, c.Warnings())
					}
				}
			}},
		{name: "renameByDefault names the resource .shared", args: root,
			doc: "version: v1\nsharing:\n  mps:\n    renameByDefault: true\n    resources:\n    - {name: gpu, replicas: 2}\n",
			check: func(t *testing.T, c *Config) {
				if got := c.Sharing.MPS.SharedName(c.Sharing.MPS.Resources[0]); got != "nvidia.com/gpu.shared" {
					t.Errorf("shared name %q", got)
				}
			}},
		{name: "resource listed twice takes the larger count", args: root,
			doc: "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: gpu, replicas: 2}\n    - {name: gpu, replicas: 3}\n",
			check: func(t *testing.T, c *Config) {
				if r := c.Sharing.MPS.Resources; len(r) != 1 || r[0].Replicas != 3 {
					t.Errorf("resources %+v, want one with 3 replicas", r)
				}
			}},
		{name: "MPS root from the environment", doc: gpuMPS, check: func(t *testing.T, c *Config) {
			if c.MPSRoot() != "/env/mps" {
				t.Errorf("root %q", c.MPSRoot())
			}
		}},
		{name: "no MPS root", doc: gpuMPS, args: []string{"--mps-root="}, wantErr: "sharing.mps: MPS needs an MPS root: set --mps-root"},
		{name: "relative MPS root", doc: gpuMPS, args: []string{"--mps-root=run/mps"}, wantErr: `flags.mpsRoot: "run/mps" is not an absolute path`},
		{name: "mixed MIG strategy", doc: gpuMPS, args: append([]string{"--mig-strategy=mixed"}, root...), wantErr: "sharing.mps: MPS cannot be used with mig-strategy mixed"},
		{name: "single MIG strategy is accepted here (refused on a node with MIG devices)", doc: gpuMPS, args: append([]string{"--mig-strategy=single"}, root...)},
		{name: "no resources", doc: "version: v1\nsharing:\n  mps: {}\n", args: root, wantErr: "sharing.mps.resources: no resources listed"},
		{name: "one replica", doc: "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: gpu, replicas: 1}\n", args: root, wantErr: "sharing.mps.resources[0].replicas: 1 is not allowed"},
		{name: "no name", doc: "version: v1\nsharing:\n  mps:\n    resources:\n    - {replicas: 2}\n", args: root, wantErr: "sharing.mps.resources[0].name: required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{}
			if tc.args == nil {
				env["MPS_ROOT"] = "/env/mps"
			}
			c, err := loadDoc(t, tc.doc, tc.args, env)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
		})
	}
}

// TestNoMPSWithoutTheSection: time-slicing alone keeps its defaults and
// needs no MPS root.
func TestNoMPSWithoutTheSection(t *testing.T) {
	c, err := loadDoc(t, "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: gpu, replicas: 2}\n", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rr, path := c.ReplicatedSharing()
	if c.UsesMPS() || path != "sharing.timeSlicing" || rr.FailRequestsGreaterThanOne != nil {
		t.Errorf("UsesMPS %v, in force %s, failRequestsGreaterThanOne %v", c.UsesMPS(), path, rr.FailRequestsGreaterThanOne)
	}
}
