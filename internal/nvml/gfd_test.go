package nvml_test

import (
	"os"
	"path/filepath"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

func scanNode(t *testing.T, node *sim.Node, opts nvml.ScanOptions) *nvml.Inventory {
	t.Helper()
	lib, err := nvml.Open(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	inv, err := nvml.Scan(lib, opts)
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

// TestScanFeatures: the PCI class, the fabric and the MIG attributes, and
// what a failing or unsupported call leaves (the field empty, the scan
// whole).
func TestScanFeatures(t *testing.T) {
	p, err := sim.LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	node := sim.NewNode(p, nil)
	cluster := [16]uint8{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(node.SetFabric(0, gonvml.GpuFabricInfo{ClusterUuid: cluster, CliqueId: 4, State: gonvml.GPU_FABRIC_STATE_COMPLETED}))
	must(node.SetFabric(1, gonvml.GpuFabricInfo{ClusterUuid: cluster, CliqueId: 4, State: gonvml.GPU_FABRIC_STATE_IN_PROGRESS}))
	must(node.SetFabric(2, gonvml.GpuFabricInfo{ClusterUuid: cluster, CliqueId: 4, State: gonvml.GPU_FABRIC_STATE_COMPLETED,
		Status: uint32(gonvml.ERROR_UNKNOWN)}))
	must(node.SetFault(1, "GetAttributes", gonvml.ERROR_NOT_SUPPORTED)) // attributes from the profiles instead
	must(node.SetFault(5, "GetPciInfoExt", gonvml.ERROR_UNKNOWN))       // class from sysfs
	sys := t.TempDir()
	dir := filepath.Join(sys, "bus", "pci", "devices", "0000:90:00.0")
	must(os.MkdirAll(dir, 0o755))
	must(os.WriteFile(filepath.Join(dir, "class"), []byte("0x030000\n"), 0o644))
	inv := scanNode(t, node, nvml.ScanOptions{SysRoot: sys})

	for i, g := range inv.GPUs {
		if g.Problem != "" {
			t.Errorf("GPU %d: %s", i, g.Problem)
		}
		want := uint32(nvml.PCIClass3D)
		if i == 5 {
			want = nvml.PCIClassVGA
		}
		if g.PCIBusID == "00000000:90:00.0" && i != 5 {
			t.Fatalf("GPU %d has the bus ID the test gave GPU 5", i)
		}
		if g.PCIClass != want {
			t.Errorf("GPU %d (%s): class %#06x, want %#06x", i, g.PCIBusID, g.PCIClass, want)
		}
		switch {
		case i == 0 && (g.Fabric == nil || *g.Fabric != nvml.Fabric{ClusterUUID: "01020304-0506-0708-090a-0b0c0d0e0f10", CliqueID: 4}):
			t.Errorf("GPU 0: fabric %+v", g.Fabric)
		case i != 0 && g.Fabric != nil:
			t.Errorf("GPU %d: fabric %+v; want none (not registered, failed, or not supported)", i, g.Fabric)
		}
	}
	// GPU 0 has seven 1g.5gb, GPU 1 3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb (from
	// its profiles): the same attributes either way.
	want := map[string]nvml.MIGAttributes{
		"1g.5gb":  {MemoryMiB: 4864, Multiprocessors: 14, GISlices: 1, CISlices: 1, CopyEngines: 1},
		"3g.20gb": {MemoryMiB: 19968, Multiprocessors: 42, GISlices: 3, CISlices: 3, CopyEngines: 3, Decoders: 2},
	}
	for _, gpu := range inv.GPUs[:2] {
		for _, m := range gpu.MIGDevices {
			w, ok := want[m.Profile]
			if !ok {
				continue
			}
			if m.Attributes == nil || *m.Attributes != w {
				t.Errorf("GPU %d %s: attributes %+v, want %+v", gpu.Index, m.Profile, m.Attributes, w)
			}
		}
	}
}
