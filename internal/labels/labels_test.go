package labels_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/labels"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

func build(t *testing.T, profile, doc string) (*nvml.Inventory, []*sharing.Resource, labels.Options) {
	t.Helper()
	return buildFor(t, testkit.Inventory(t, profile), doc)
}

func buildFor(t *testing.T, inv *nvml.Inventory, doc string) (*nvml.Inventory, []*sharing.Resource, labels.Options) {
	t.Helper()
	c, err := config.Parse([]byte("version: v1\n" + doc))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := sharing.Build(inv, sharing.OptionsFrom(c))
	if err != nil {
		t.Fatal(err)
	}
	o := labels.OptionsFrom(c)
	o.MachineTypeFile = "" // the test host's DMI name is not the simulated node's
	o.Now = func() time.Time { return time.Unix(1700000000, 0) }
	return inv, rs, o
}

func TestCompute(t *testing.T) {
	tests := []struct {
		name, profile, config string
		want                  map[string]string // "" value: the key must be absent
	}{
		{"h100, unshared", "dgx-h100", "", map[string]string{
			"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8", "nvidia.com/gpu.memory": "81920",
			"nvidia.com/gpu.replicas": "1", "nvidia.com/gpu.sharing-strategy": "none", "nvidia.com/gpu.family": "hopper",
			"nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0",
			"nvidia.com/mig.capable": "true", "nvidia.com/mig.strategy": "", "nvidia.com/mps.capable": "false",
			"nvidia.com/cuda.driver-version.full": "550.90.07", "nvidia.com/cuda.driver-version.major": "550",
			"nvidia.com/cuda.driver-version.minor": "90", "nvidia.com/cuda.driver-version.revision": "07",
			"nvidia.com/cuda.runtime-version.full": "12.4", "nvidia.com/cuda.runtime-version.major": "12",
			"nvidia.com/cuda.runtime-version.minor": "4",
		}},
		{"h100, time-sliced", "dgx-h100", "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 4}]}}", map[string]string{
			"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED", "nvidia.com/gpu.count": "8",
			"nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "time-slicing",
		}},
		{"h100, time-sliced and renamed: no -SHARED", "dgx-h100", "sharing: {timeSlicing: {renameByDefault: true, resources: [{name: gpu, replicas: 4}]}}", map[string]string{
			"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "time-slicing",
		}},
		{"a100-mig mixed", "dgx-a100-mig", "flags: {migStrategy: mixed}\nsharing: {timeSlicing: {resources: [{name: mig-3g.20gb, replicas: 2}]}}", map[string]string{
			"nvidia.com/mig.strategy": "mixed", "nvidia.com/gpu.count": "8",
			"nvidia.com/mig-1g.5gb.count": "9", "nvidia.com/mig-1g.5gb.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
			"nvidia.com/mig-1g.5gb.memory": "4864", "nvidia.com/mig-1g.5gb.replicas": "1",
			"nvidia.com/mig-1g.5gb.me.count": "1", "nvidia.com/mig-1g.5gb.me.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb.me",
			"nvidia.com/mig-3g.20gb.count": "3", "nvidia.com/mig-3g.20gb.replicas": "2",
			"nvidia.com/mig-3g.20gb.sharing-strategy": "time-slicing", "nvidia.com/mig-3g.20gb.product": "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb-SHARED",
			"nvidia.com/mig-7g.40gb.count": "1",
		}},
		{"uniform single", "name: u\ngpus:\n  - {model: A100-SXM4-40GB, count: 2, migEnabled: true, migDevices: [3g.20gb, 3g.20gb]}\n",
			"flags: {migStrategy: single}", map[string]string{
				"nvidia.com/mig.strategy": "single", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb",
				"nvidia.com/gpu.count": "4", "nvidia.com/gpu.memory": "19968", "nvidia.com/mig-3g.20gb.count": "",
			}},
		{"l4: no MIG", "pcie-l4x4", "", map[string]string{
			"nvidia.com/mig.capable": "false", "nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.family": "ada-lovelace",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inv, rs, o := build(t, tc.profile, tc.config)
			l := labels.Compute(inv, rs, o)
			for k, v := range tc.want {
				got, ok := l[k]
				switch {
				case v == "" && ok:
					t.Errorf("%s=%s is set; want it absent", k, got)
				case v != "" && got != v:
					t.Errorf("%s=%q, want %q", k, got, v)
				}
			}
			for k, v := range l {
				if !strings.HasPrefix(k, labels.Prefix) || len(v) > 63 || strings.ContainsAny(v, " /+") {
					t.Errorf("invalid label %s=%q", k, v)
				}
			}
		})
	}
	if l := labels.Compute(nil, nil, labels.Options{}); len(l) != 0 {
		t.Errorf("no inventory gives no labels: %v", l)
	}
}

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "gpu-plugin")
	l := labels.Labels{"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
	wrote, err := labels.Write(path, l)
	if err != nil || !wrote {
		t.Fatalf("first write: %t %v", wrote, err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := "nvidia.com/gpu.count=8\nnvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3\n"; string(raw) != want {
		t.Errorf("file:\n%s\nwant:\n%s", raw, want)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o644 {
		t.Errorf("mode %v, want 0644 (NFD must read it)", st.Mode().Perm())
	}
	if wrote, err := labels.Write(path, l); wrote || err != nil {
		t.Errorf("an unchanged write: wrote=%t err=%v; want no write", wrote, err)
	}
	l["nvidia.com/gpu.count"] = "7"
	if wrote, err := labels.Write(path, l); !wrote || err != nil {
		t.Errorf("a changed write: wrote=%t err=%v", wrote, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left behind: %v", entries)
	}
	_, err = labels.Write(filepath.Join(dir, "missing", "gpu-plugin"), l)
	if !errors.Is(err, labels.ErrNoDirectory) || !strings.Contains(err.Error(), "--labels-file") {
		t.Errorf("missing directory: %v", err)
	}
}
