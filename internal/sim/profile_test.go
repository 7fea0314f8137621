package sim

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBuiltinProfilesParse(t *testing.T) {
	want := map[string]int{"dgx-a100": 8, "dgx-a100-mig": 8, "dgx-h100": 8, "dgx1-volta": 8, "pcie-l4x4": 4}
	names := BuiltinNames()
	if len(names) != len(want) {
		t.Errorf("built-in profiles %v, want %d of them", names, len(want))
	}
	for _, n := range names {
		p, err := LoadProfile(n)
		if err != nil {
			t.Errorf("%s: %v", n, err)
			continue
		}
		if p.Name != n || len(p.spec.gpus) != want[n] {
			t.Errorf("%s: name %q with %d GPUs, want %d", n, p.Name, len(p.spec.gpus), want[n])
		}
	}
}

const goodProfile = `
name: two
gpus:
  - model: A100-SXM4-80GB
    count: 2
    numaNode: 0
topology: |2
          GPU0  GPU1  NIC0  CPU Affinity  NUMA Affinity
  GPU0     X    NV12  PXB   0-63          0
  GPU1    NV12   X    SYS   0-63          0
  NIC0    PXB   SYS    X

  Legend:

    X    = Self
    SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes
    NV#  = Connection traversing a bonded set of # NVLinks
`

// TestPastedNvidiaSmiMatrix: a matrix pasted from nvidia-smi topo -m, with
// header, NIC columns and rows, affinity columns and the legend.
func TestPastedNvidiaSmiMatrix(t *testing.T) {
	p, err := ParseProfile("two.yaml", []byte(goodProfile))
	if err != nil {
		t.Fatal(err)
	}
	if got := p.spec.links[0][1].NVLinks; got != 12 {
		t.Errorf("GPU0-GPU1 NVLinks = %d, want 12", got)
	}
}

func TestProfileErrors(t *testing.T) {
	tests := []struct {
		name    string
		profile string
		want    []string // fragments the message must contain
	}{
		{"unknown field", "name: x\ngpus:\n  - model: L4\n    colour: red\n", []string{"bad.yaml", "line 4", "colour"}},
		{"unknown top-level field", "name: x\nnvlink: true\ngpus:\n  - model: L4\n", []string{"bad.yaml", "line 2", "nvlink"}},
		{"missing name", "gpus:\n  - model: L4\n", []string{"bad.yaml", "name", "required"}},
		{"no gpus", "name: x\n", []string{"bad.yaml", "gpus", "at least one"}},
		{"unknown model", "name: x\ngpus:\n  - model: Z9000\n", []string{"bad.yaml", "gpus[0].model", "Z9000", "H100-SXM5-80GB"}},
		{"unknown MIG profile", "name: x\ngpus:\n  - model: L4\n  - model: A100-SXM4-40GB\n    migEnabled: true\n    migDevices: [1g.5gb, 1g.7gb]\n",
			[]string{"bad.yaml", "gpus[1].migDevices[1]", `"1g.7gb"`, "3g.20gb"}},
		{"MIG on a GPU without MIG", "name: x\ngpus:\n  - model: L4\n    migEnabled: true\n", []string{"gpus[0].migEnabled", "does not support MIG"}},
		{"too many MIG slices", "name: x\ngpus:\n  - model: A100-SXM4-40GB\n    migEnabled: true\n    migDevices: [4g.20gb, 4g.20gb]\n",
			[]string{"gpus[0].migDevices", "8 compute slices", "has 7"}},
		{"MIG devices without MIG mode", "name: x\ngpus:\n  - model: A100-SXM4-40GB\n    migDevices: [1g.5gb]\n", []string{"migEnabled: true"}},
		{"non-square matrix", "name: x\ngpus:\n  - model: L4\n    count: 3\ntopology: |2\n  X   PIX\n  PIX X\n  SYS SYS\n",
			[]string{"bad.yaml", "topology", "line 6", "2 cells, want 3", "square"}},
		{"missing row", "name: x\ngpus:\n  - model: L4\n    count: 3\ntopology: |2\n  X   PIX SYS\n  PIX X   SYS\n",
			[]string{"bad.yaml", "topology", "2 rows for 3 GPUs"}},
		{"asymmetric matrix", "name: x\ngpus:\n  - model: L4\n    count: 2\ntopology: |2\n  X   NV2\n  NV1 X\n",
			[]string{"bad.yaml", "not symmetric", "GPU0-GPU1 is NV2 (line 6)", "GPU1-GPU0 is NV1 (line 7)"}},
		{"diagonal not X", "name: x\ngpus:\n  - model: L4\n    count: 2\ntopology: |2\n  SYS SYS\n  SYS X\n",
			[]string{"line 6", "GPU0's own cell", "want X"}},
		{"bad NV cell", "name: x\ngpus:\n  - model: L4\n    count: 2\ntopology: |2\n  X    NV0\n  NV0  X\n", []string{"topology", "line 6", `GPU0's cell 1 is "NV0"`}},
		{"nvswitch with uneven links", "name: x\nnvswitch: true\ngpus:\n  - model: L4\n    count: 3\ntopology: |2\n  X   NV2 NV2\n  NV2 X   NV1\n  NV2 NV1 X\n",
			[]string{"nvswitch", "GPU1-GPU2"}},
		{"duplicate uuid", "name: x\ngpus:\n  - {model: L4, uuid: GPU-11111111-2222-3333-4444-555555555555}\n  - {model: L4, uuid: GPU-11111111-2222-3333-4444-555555555555}\n",
			[]string{"gpus[1].uuid", "also used by GPU 0"}},
		{"bad uuid", "name: x\ngpus:\n  - {model: L4, uuid: nope}\n", []string{"gpus[0].uuid", `"nope"`}},
		{"uuid with count", "name: x\ngpus:\n  - {model: L4, count: 2, uuid: GPU-11111111-2222-3333-4444-555555555555}\n", []string{"gpus[0]", "count 1"}},
		{"bad cuda version", "name: x\ncudaDriverVersion: twelve\ngpus:\n  - model: L4\n", []string{"cudaDriverVersion", "twelve"}},
		{"not yaml", "name: [x\n", []string{"bad.yaml"}},
		{"empty", "", []string{"bad.yaml", "empty"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseProfile("bad.yaml", []byte(tc.profile))
			if err == nil {
				t.Fatalf("profile accepted; want an error mentioning %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestLoadProfile(t *testing.T) {
	if _, err := LoadProfile("dgx-z900"); err == nil || !strings.Contains(err.Error(), "dgx-h100") {
		t.Errorf("unknown built-in: %v; want the list of built-ins", err)
	}
	path := filepath.Join(t.TempDir(), "node.yaml")
	if err := os.WriteFile(path, []byte(goodProfile), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := LoadProfile(path)
	if err != nil || p.Name != "two" {
		t.Fatalf("loading %s: %v", path, err)
	}
	if _, err := LoadProfile(filepath.Join(t.TempDir(), "missing.yaml")); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Errorf("missing file: %v; want an error naming it", err)
	}
}

func FuzzParseProfile(f *testing.F) {
	f.Add([]byte(goodProfile))
	for _, n := range BuiltinNames() {
		raw, _ := builtinFS.ReadFile("profiles/" + n + ".yaml")
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		p, err := ParseProfile("fuzz.yaml", raw)
		if err != nil {
			return
		}
		// Whatever parses must run: a node whose NVML answers for every GPU.
		n := NewNode(p, nil)
		count, ret := n.NVML().DeviceGetCount()
		if int(ret) != 0 || count != len(p.spec.gpus) {
			t.Fatalf("parsed profile serves %d GPUs (ret %d), want %d", count, ret, len(p.spec.gpus))
		}
	})
}
