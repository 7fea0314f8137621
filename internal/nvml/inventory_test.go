package nvml_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

func scanProfile(t *testing.T, name string) (*nvml.Inventory, *nvml.Library) {
	t.Helper()
	p, err := sim.LoadProfile(name)
	if err != nil {
		t.Fatalf("loading profile %s: %v", name, err)
	}
	lib, err := nvml.Open(sim.NewNode(p, nil).NVML())
	if err != nil {
		t.Fatalf("opening simulated NVML for %s: %v", name, err)
	}
	t.Cleanup(func() { lib.Close() })
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatalf("scanning %s: %v", name, err)
	}
	return inv, lib
}

// scanMock scans a go-nvml mock server, with sysfs read under sysRoot
// ("": the host's).
func scanMock(t *testing.T, srv gonvml.Interface, sysRoot string) *nvml.Inventory {
	t.Helper()
	lib, err := nvml.Open(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	inv, err := nvml.Scan(lib, nvml.ScanOptions{SysRoot: sysRoot})
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

// row renders one topology row as nvidia-smi would.
func row(inv *nvml.Inventory, i int) string {
	cells := make([]string, len(inv.GPUs))
	for j := range cells {
		cells[j] = inv.Topology.Cell(i, j)
	}
	return strings.Join(cells, " ")
}

func TestInventoryBuiltinProfiles(t *testing.T) {
	tests := []struct {
		profile  string
		gpus     int
		name     string
		memMiB   uint64
		cc       string
		arch     string
		numa     []int
		topoRows map[int]string // GPU index → expected row
		migs     map[int][]string
		driver   string
		cuda     string
	}{
		{
			profile: "dgx-h100", gpus: 8, name: "NVIDIA H100 80GB HBM3", memMiB: 81920, cc: "9.0", arch: "hopper",
			numa:     []int{0, 0, 0, 0, 1, 1, 1, 1},
			topoRows: map[int]string{0: "X NV18 NV18 NV18 NV18 NV18 NV18 NV18", 7: "NV18 NV18 NV18 NV18 NV18 NV18 NV18 X"},
			driver:   "550.90.07", cuda: "12.4",
		},
		{
			profile: "dgx-a100", gpus: 8, name: "NVIDIA A100-SXM4-40GB", memMiB: 40960, cc: "8.0", arch: "ampere",
			numa:     []int{0, 0, 0, 0, 1, 1, 1, 1},
			topoRows: map[int]string{3: "NV12 NV12 NV12 X NV12 NV12 NV12 NV12"},
			driver:   "550.54.15", cuda: "12.4",
		},
		{
			profile: "dgx1-volta", gpus: 8, name: "Tesla V100-SXM2-16GB", memMiB: 16384, cc: "7.0", arch: "volta",
			numa: []int{0, 0, 0, 0, 1, 1, 1, 1},
			topoRows: map[int]string{
				0: "X NV1 NV1 NV2 NV2 SYS SYS SYS",
				5: "SYS NV2 SYS SYS NV1 X NV2 NV1",
				7: "SYS SYS SYS NV1 NV2 NV1 NV2 X",
			},
			driver: "535.183.01", cuda: "12.2",
		},
		{
			profile: "pcie-l4x4", gpus: 4, name: "NVIDIA L4", memMiB: 23034, cc: "8.9", arch: "ada-lovelace",
			numa:     []int{0, 0, 1, 1},
			topoRows: map[int]string{0: "X PIX SYS SYS", 2: "SYS SYS X PIX"},
			driver:   "550.90.07", cuda: "12.4",
		},
		{
			profile: "dgx-a100-mig", gpus: 8, name: "NVIDIA A100-SXM4-40GB", memMiB: 40960, cc: "8.0", arch: "ampere",
			numa: []int{0, 0, 0, 0, 1, 1, 1, 1},
			migs: map[int][]string{
				0: {"1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb"},
				1: {"3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"},
				2: {"3g.20gb", "3g.20gb"},
				3: {"7g.40gb"},
				4: {"4g.20gb", "2g.10gb", "1g.5gb+me"},
				5: nil,
			},
			driver: "550.54.15", cuda: "12.4",
		},
	}
	for _, tc := range tests {
		t.Run(tc.profile, func(t *testing.T) {
			inv, lib := scanProfile(t, tc.profile)
			if inv.DriverVersion != tc.driver || inv.CUDADriverVersion != tc.cuda {
				t.Errorf("versions: driver %q cuda %q, want %q %q", inv.DriverVersion, inv.CUDADriverVersion, tc.driver, tc.cuda)
			}
			if len(inv.GPUs) != tc.gpus {
				t.Fatalf("GPU count: got %d, want %d", len(inv.GPUs), tc.gpus)
			}
			seen := map[string]bool{}
			for i, g := range inv.GPUs {
				if g.Index != i || g.Minor != i {
					t.Errorf("GPU %d: index %d minor %d", i, g.Index, g.Minor)
				}
				if !strings.HasPrefix(g.UUID, "GPU-") || seen[g.UUID] {
					t.Errorf("GPU %d: UUID %q missing or duplicate", i, g.UUID)
				}
				seen[g.UUID] = true
				if g.Name != tc.name || g.MemoryBytes != tc.memMiB<<20 || g.ComputeCapability.String() != tc.cc || g.Architecture != tc.arch {
					t.Errorf("GPU %d: got %q %d MiB cc %s %s, want %q %d MiB cc %s %s", i, g.Name, g.MemoryBytes>>20,
						g.ComputeCapability, g.Architecture, tc.name, tc.memMiB, tc.cc, tc.arch)
				}
				if g.NUMANode != tc.numa[i] {
					t.Errorf("GPU %d: NUMA node %d, want %d", i, g.NUMANode, tc.numa[i])
				}
				if len(g.PCIBusID) != len("00000000:07:00.0") || seen[g.PCIBusID] {
					t.Errorf("GPU %d: PCI bus ID %q not in NVML form or duplicate", i, g.PCIBusID)
				}
				seen[g.PCIBusID] = true
				if g.Problem != "" || g.Lost {
					t.Errorf("GPU %d: unexpected problem %q lost %v", i, g.Problem, g.Lost)
				}
			}
			for i, want := range tc.topoRows {
				if got := row(inv, i); got != want {
					t.Errorf("topology row GPU%d:\n got  %s\n want %s", i, got, want)
				}
			}
			for i := range inv.GPUs {
				for j := range inv.GPUs {
					if inv.Topology.Links[i][j] != inv.Topology.Links[j][i] {
						t.Errorf("topology not symmetric at GPU%d-GPU%d", i, j)
					}
				}
			}
			for i, want := range tc.migs {
				g := inv.GPUs[i]
				var got []string
				for k, m := range g.MIGDevices {
					got = append(got, m.Profile)
					if m.Index != k || !strings.HasPrefix(m.UUID, "MIG-") || m.MemoryBytes == 0 {
						t.Errorf("GPU %d MIG %d: %+v", i, k, m)
					}
					if h, ok := inv.Handle(m.UUID); !ok || h == nil {
						t.Errorf("GPU %d MIG %d: no handle for %s", i, k, m.UUID)
					}
				}
				if strings.Join(got, ",") != strings.Join(want, ",") {
					t.Errorf("GPU %d MIG devices: got %v, want %v", i, got, want)
				}
				if g.MIGEnabled != (want != nil) {
					t.Errorf("GPU %d: MIG enabled %v, want %v", i, g.MIGEnabled, want != nil)
				}
			}
			if _, failed := lib.Stats(); failed != 0 {
				t.Errorf("the scan had %d failed NVML calls on a healthy node", failed)
			}
		})
	}
}

func TestInventoryStableAcrossRestarts(t *testing.T) {
	a, _ := scanProfile(t, "dgx-a100-mig")
	b, _ := scanProfile(t, "dgx-a100-mig")
	for i := range a.GPUs {
		if a.GPUs[i].UUID != b.GPUs[i].UUID {
			t.Errorf("GPU %d UUID changed between starts: %s vs %s", i, a.GPUs[i].UUID, b.GPUs[i].UUID)
		}
		for k := range a.GPUs[i].MIGDevices {
			if a.GPUs[i].MIGDevices[k].UUID != b.GPUs[i].MIGDevices[k].UUID {
				t.Errorf("GPU %d MIG %d UUID changed between starts", i, k)
			}
		}
	}
	c, _ := scanProfile(t, "dgx-a100")
	if a.GPUs[0].UUID == c.GPUs[0].UUID {
		t.Errorf("two profiles share UUID %s", a.GPUs[0].UUID)
	}
}

// TestInventoryGoNVMLMocks scans go-nvml's own ready-made servers, which
// implement only part of NVML: missing calls must degrade, not crash.
func TestInventoryGoNVMLMocks(t *testing.T) {
	tests := []struct {
		name   string
		server *server.Server
		model  string
		memMiB uint64
	}{
		{"dgxa100", dgxa100.New(), "Mock NVIDIA A100-SXM4-40GB", 40960},
		{"dgxh100", dgxh100.New(), "NVIDIA H100 80GB HBM3", 81920},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lib, err := nvml.Open(tc.server)
			if err != nil {
				t.Fatal(err)
			}
			defer lib.Close()
			inv, err := nvml.Scan(lib, nvml.ScanOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(inv.GPUs) != 8 {
				t.Fatalf("got %d GPUs, want 8", len(inv.GPUs))
			}
			for i, g := range inv.GPUs {
				want := tc.server.Devices[i].(*server.Device).UUID
				if g.UUID != want || g.Name != tc.model || g.MemoryBytes != tc.memMiB<<20 {
					t.Errorf("GPU %d: %s %q %d MiB, want %s %q %d MiB", i, g.UUID, g.Name, g.MemoryBytes>>20, want, tc.model, tc.memMiB)
				}
				if !g.MIGCapable || g.MIGEnabled {
					t.Errorf("GPU %d: MIG capable %v enabled %v, want capable and disabled", i, g.MIGCapable, g.MIGEnabled)
				}
				if g.NUMANode != -1 {
					t.Errorf("GPU %d: NUMA %d, want -1 (the mock has no NUMA call)", i, g.NUMANode)
				}
			}
			if inv.DriverVersion == "" || inv.CUDADriverVersion != "12.4" {
				t.Errorf("versions: driver %q cuda %q", inv.DriverVersion, inv.CUDADriverVersion)
			}
			// The mocks have no topology calls: pairs fall back to SYS, never NVLink.
			if got := inv.Topology.Cell(0, 1); got != "SYS" {
				t.Errorf("topology GPU0-GPU1 = %s, want SYS when NVML cannot tell", got)
			}
		})
	}
}

// TestInventoryMockMIG enumerates MIG devices on a go-nvml mock the way
// real NVML exposes them; the mock lacks the enumeration calls, so the test
// supplies them, as toolchain-notes §3.2 describes.
func TestInventoryMockMIG(t *testing.T) {
	srv := dgxa100.New()
	dev := srv.Devices[0].(*server.Device)
	if ret, _ := dev.SetMigMode(gonvml.DEVICE_MIG_ENABLE); ret != gonvml.SUCCESS {
		t.Fatal(ret)
	}
	var migs []*mock.Device
	gis := map[int]gonvml.GpuInstance{}
	var placed []gonvml.GpuInstancePlacement
	for _, profile := range []int{gonvml.GPU_INSTANCE_PROFILE_3_SLICE, gonvml.GPU_INSTANCE_PROFILE_1_SLICE} {
		info, _ := dev.GetGpuInstanceProfileInfo(profile)
		// The last possible placement: 3g at 4, 1g at 6, clear of each other.
		possible, _ := dev.GetGpuInstancePossiblePlacements(&info)
		if len(possible) == 0 {
			t.Fatalf("the mock has no placements for profile %d", profile)
		}
		placement := possible[len(possible)-1]
		placed = append(placed, placement)
		gi, _ := dev.CreateGpuInstanceWithPlacement(&info, &placement)
		giInfo, _ := gi.GetInfo()
		ciProfile, _ := gi.GetComputeInstanceProfileInfo(profile, gonvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
		ci, _ := gi.CreateComputeInstance(&ciProfile)
		ciInfo, _ := ci.GetInfo()
		gis[int(giInfo.Id)] = gi
		gi.(*server.GpuInstance).GetComputeInstanceByIdFunc = func(id int) (gonvml.ComputeInstance, gonvml.Return) {
			if id == int(ciInfo.Id) {
				return ci, gonvml.SUCCESS
			}
			return nil, gonvml.ERROR_NOT_FOUND
		}
		memMB := info.MemorySizeMB
		mig := &mock.Device{
			GetUUIDFunc:              func() (string, gonvml.Return) { return fmt.Sprintf("MIG-test-%d", giInfo.Id), gonvml.SUCCESS },
			GetGpuInstanceIdFunc:     func() (int, gonvml.Return) { return int(giInfo.Id), gonvml.SUCCESS },
			GetComputeInstanceIdFunc: func() (int, gonvml.Return) { return int(ciInfo.Id), gonvml.SUCCESS },
			GetMemoryInfoFunc: func() (gonvml.Memory, gonvml.Return) {
				return gonvml.Memory{Total: memMB << 20}, gonvml.SUCCESS
			},
		}
		migs = append(migs, mig)
	}
	dev.GetMaxMigDeviceCountFunc = func() (int, gonvml.Return) { return 7, gonvml.SUCCESS }
	dev.GetMigDeviceHandleByIndexFunc = func(i int) (gonvml.Device, gonvml.Return) {
		if i < len(migs) {
			return migs[i], gonvml.SUCCESS
		}
		return nil, gonvml.ERROR_NOT_FOUND
	}
	dev.GetGpuInstanceByIdFunc = func(id int) (gonvml.GpuInstance, gonvml.Return) {
		if gi, ok := gis[id]; ok {
			return gi, gonvml.SUCCESS
		}
		return nil, gonvml.ERROR_NOT_FOUND
	}

	inv := scanMock(t, srv, "")
	g := inv.GPUs[0]
	if !g.MIGEnabled || len(g.MIGDevices) != 2 {
		t.Fatalf("GPU 0: MIG enabled %v with %d devices (problem %q), want 2", g.MIGEnabled, len(g.MIGDevices), g.Problem)
	}
	if g.MIGDevices[0].Profile != "3g.20gb" || g.MIGDevices[1].Profile != "1g.5gb" {
		t.Errorf("profiles %s, %s; want 3g.20gb, 1g.5gb", g.MIGDevices[0].Profile, g.MIGDevices[1].Profile)
	}
	if g.MIGDevices[1].GPUInstanceID != 1 || g.MIGDevices[1].UUID != "MIG-test-1" {
		t.Errorf("second MIG device: %+v", g.MIGDevices[1])
	}
	for i, m := range g.MIGDevices {
		want := nvml.MIGPlacement{Start: int(placed[i].Start), Size: int(placed[i].Size)}
		if m.Placement != want || want.Size == 0 {
			t.Errorf("MIG device %d placement %+v, want the GPU instance's %+v", i, m.Placement, want)
		}
	}
	// The mock's profile IDs equal their indices (the driver's do not; the
	// fake library's tests check that side).
	if g.MIGDevices[0].GPUInstanceProfileID != gonvml.GPU_INSTANCE_PROFILE_3_SLICE || g.MIGDevices[1].GPUInstanceProfileID != gonvml.GPU_INSTANCE_PROFILE_1_SLICE {
		t.Errorf("GPU instance profile IDs %d, %d", g.MIGDevices[0].GPUInstanceProfileID, g.MIGDevices[1].GPUInstanceProfileID)
	}
}

func TestMIGProfileName(t *testing.T) {
	const gib = 1 << 30
	tests := []struct {
		index              int // NVML_GPU_INSTANCE_PROFILE_*, not the driver's ID
		giSlices, ciSlices uint32
		memMiB             uint64
		parentBytes        uint64
		want               string
	}{
		{gonvml.GPU_INSTANCE_PROFILE_1_SLICE, 1, 1, 4864, 40 * gib, "1g.5gb"},
		{gonvml.GPU_INSTANCE_PROFILE_2_SLICE, 2, 2, 9856, 40 * gib, "2g.10gb"},
		{gonvml.GPU_INSTANCE_PROFILE_3_SLICE, 3, 3, 19968, 40 * gib, "3g.20gb"},
		{gonvml.GPU_INSTANCE_PROFILE_7_SLICE, 7, 7, 40192, 40 * gib, "7g.40gb"},
		{gonvml.GPU_INSTANCE_PROFILE_1_SLICE, 1, 1, 9856, 80 * gib, "1g.10gb"},
		{gonvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1, 1, 1, 4864, 40 * gib, "1g.5gb+me"},
		{gonvml.GPU_INSTANCE_PROFILE_2_SLICE, 2, 1, 19968, 80 * gib, "1c.2g.20gb"},
		{gonvml.GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, 1, 1, 10240, 80 * gib, "1g.10gb-me"},
		{gonvml.GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, 1, 1, 9856, 80 * gib, "1g.10gb+me.all"},
		{gonvml.GPU_INSTANCE_PROFILE_2_SLICE_GFX, 2, 2, 19968, 80 * gib, "2g.20gb+gfx"},
		{gonvml.GPU_INSTANCE_PROFILE_1_SLICE, 1, 1, 4096, 0, "1g.4gb"},
	}
	for _, tc := range tests {
		if got := nvml.MIGProfileName(tc.index, tc.giSlices, tc.ciSlices, tc.memMiB, tc.parentBytes); got != tc.want {
			t.Errorf("MIGProfileName(index %d, %d/%d slices, %d MiB of %d GiB) = %q, want %q",
				tc.index, tc.giSlices, tc.ciSlices, tc.memMiB, tc.parentBytes/gib, got, tc.want)
		}
	}
}

func TestNormalizeBusID(t *testing.T) {
	for in, want := range map[string]string{
		"0000:07:00.0":     "00000000:07:00.0",
		"00000000:1b:00.0": "00000000:1B:00.0",
		"1:c3:00.0":        "00000001:C3:00.0",
		"garbage":          "garbage",
	} {
		if got := nvml.NormalizeBusID(in); got != want {
			t.Errorf("NormalizeBusID(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestGuards: no NVML call reaches the library after a failed Init or after
// Close; a panicking mock becomes an error.
func TestGuards(t *testing.T) {
	calls := 0
	failing := &mock.Interface{
		InitFunc:           func() gonvml.Return { return gonvml.ERROR_DRIVER_NOT_LOADED },
		DeviceGetCountFunc: func() (int, gonvml.Return) { calls++; return 1, gonvml.SUCCESS },
	}
	_, err := nvml.Open(failing)
	var ie *nvml.InitError
	if !errors.As(err, &ie) || !errors.Is(err, gonvml.ERROR_DRIVER_NOT_LOADED) {
		t.Fatalf("Open error %v, want an InitError for DRIVER_NOT_LOADED", err)
	}
	if !strings.Contains(err.Error(), "kernel driver is not loaded") {
		t.Errorf("init error %q does not explain the cause", err)
	}

	srv := dgxh100.New()
	lib, err := nvml.Open(srv)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nvml.Call(lib, "nvmlDeviceGetTemperature", func() (uint32, gonvml.Return) {
		return srv.Devices[0].GetTemperature(gonvml.TEMPERATURE_GPU) // unset in the mock: panics
	}); !nvml.IsNotSupported(err) {
		t.Errorf("a panicking mock call gave %v, want a not-supported error", err)
	}
	if err := lib.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = nvml.Call(lib, "nvmlDeviceGetCount", func() (int, gonvml.Return) {
		calls++
		return srv.DeviceGetCount()
	})
	if !errors.Is(err, nvml.ErrNotInitialized) || calls != 0 {
		t.Errorf("call after Close: err %v, %d calls reached NVML; want ErrNotInitialized and none", err, calls)
	}
}

// TestLostGPUAtScan: a GPU lost before discovery is listed for reporting
// and the others are still discovered.
func TestLostGPUAtScan(t *testing.T) {
	p, err := sim.LoadProfile("dgx-h100")
	if err != nil {
		t.Fatal(err)
	}
	node := sim.NewNode(p, nil)
	if err := node.SetLost(3, true); err != nil {
		t.Fatal(err)
	}
	lib, err := nvml.Open(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Close()
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i, g := range inv.GPUs {
		if i == 3 {
			if g.Usable() || !g.Lost || !strings.Contains(g.Problem, "GPU_IS_LOST") {
				t.Errorf("GPU 3: usable %v lost %v problem %q; want unusable, lost, GPU_IS_LOST named", g.Usable(), g.Lost, g.Problem)
			}
			continue
		}
		if !g.Usable() || g.Lost {
			t.Errorf("GPU %d should be discovered normally: %+v", i, g)
		}
	}
	if got := inv.Topology.Cell(2, 4); got != "NV18" {
		t.Errorf("topology between healthy GPUs: %s, want NV18", got)
	}
}

// setBusIDs gives the mock's GPUs the PCI bus IDs 0000:10:00.0,
// 0000:11:00.0, … (NVML writes them with an 8-digit domain) and returns
// them as sysfs names them.
func setBusIDs(srv *server.Server) []string {
	var out []string
	for i, d := range srv.Devices {
		bus := fmt.Sprintf("0000:%02x:00.0", 0x10+i)
		d.(*server.Device).GetPciInfoFunc = func() (gonvml.PciInfo, gonvml.Return) {
			var p gonvml.PciInfo
			for k, c := range "0000" + bus {
				p.BusId[k] = int8(c)
			}
			return p, gonvml.SUCCESS
		}
		out = append(out, bus)
	}
	return out
}

func TestSysfsNUMAFallback(t *testing.T) {
	root := t.TempDir()
	srv := dgxh100.New()
	for i, bus := range setBusIDs(srv) {
		dir := filepath.Join(root, "bus", "pci", "devices", bus)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "numa_node"), []byte(fmt.Sprintf("%d\n", i/4)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	inv := scanMock(t, srv, root)
	for i, g := range inv.GPUs {
		if g.NUMANode != i/4 {
			t.Errorf("GPU %d: NUMA %d from sysfs, want %d", i, g.NUMANode, i/4)
		}
	}
}

// TestSysfsPCIeRoot: each GPU's PCI Express root complex comes from its
// sysfs device path, as /sys/bus/pci/devices links it.
func TestSysfsPCIeRoot(t *testing.T) {
	root := t.TempDir()
	srv := dgxh100.New()
	for i, bus := range setBusIDs(srv) {
		if i == 7 {
			continue // no sysfs entry: unknown
		}
		// Two GPUs per root complex, behind a bridge.
		rc := fmt.Sprintf("pci0000:%02x", i/2)
		real := filepath.Join(root, "devices", rc, fmt.Sprintf("0000:%02x:01.0", i/2), bus)
		if err := os.MkdirAll(real, 0o755); err != nil {
			t.Fatal(err)
		}
		links := filepath.Join(root, "bus", "pci", "devices")
		if err := os.MkdirAll(links, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(real, filepath.Join(links, bus)); err != nil {
			t.Fatal(err)
		}
	}
	inv := scanMock(t, srv, root)
	for i, g := range inv.GPUs {
		want := fmt.Sprintf("pci0000:%02x", i/2)
		if i == 7 {
			want = ""
		}
		if g.PCIeRoot != want {
			t.Errorf("GPU %d: PCIe root %q, want %q", i, g.PCIeRoot, want)
		}
	}
}
