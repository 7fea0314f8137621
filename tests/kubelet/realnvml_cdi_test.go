package kubelet

// The CDI spec on the production NVML path, checked against nvcdi itself:
// the fake libnvidia-ml.so.1 loaded in this process through go-nvml's real
// dlopen path, a driver root laid out for it, and the driver's mig-minors
// in /proc. nvcdi reading that library directly must describe every whole
// GPU and MIG device exactly as our spec does, which nvcdi generates from
// the daemon's inventory (MIG entries built from it).

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi"
	"github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi/transform"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/driverroot"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

func TestRealNVMLCDISpecMatchesNVCDI(t *testing.T) {
	requireKubeletNamespace(t)
	libDir := fakeNVMLDir(t)
	const gpus = 8
	mountMIGMinors(t, gpus)
	t.Setenv("FAKE_NVML_PROFILE", "dgx-a100-mig")
	t.Setenv("FAKE_NVML_SOCKET", filepath.Join(t.TempDir(), "ctl.sock"))
	lib := gonvml.New(gonvml.WithLibraryPath(filepath.Join(libDir, fakeNVMLSoname)))
	ours, err := nvml.Open(lib)
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	inv, err := nvml.Scan(ours, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	migs := 0
	for _, g := range inv.GPUs {
		migs += len(g.MIGDevices)
	}
	if migs == 0 {
		t.Fatalf("no MIG devices on dgx-a100-mig: %+v", inv.GPUs)
	}
	minors, err := os.ReadFile("/proc/driver/nvidia-caps/mig-minors")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if err := driverroot.Create(root, inv, minors); err != nil {
		t.Fatal(err)
	}

	got, err := cdi.Generate(inv, cdi.Options{DriverRoot: root})
	if err != nil {
		t.Fatal(err)
	}
	uuidNamer, _ := nvcdi.NewDeviceNamer(nvcdi.DeviceNameStrategyUUID)
	indexNamer, _ := nvcdi.NewDeviceNamer(nvcdi.DeviceNameStrategyIndex)
	gen, err := nvcdi.New(nvcdi.WithMode(nvcdi.ModeNvml), nvcdi.WithNvmlLib(lib), nvcdi.WithDriverRoot(root),
		nvcdi.WithVendor(cdi.Vendor), nvcdi.WithClass(cdi.Class), nvcdi.WithDeviceNamers(uuidNamer, indexNamer),
		nvcdi.WithLogger(quietNVCDI{}),
		nvcdi.WithMergedDeviceOptions(transform.WithName("all"), transform.WithSkipIfExists(true)))
	if err != nil {
		t.Fatal(err)
	}
	spec, err := gen.GetSpec()
	if err != nil {
		t.Fatal(err)
	}
	want := spec.Raw()
	want.Version = got[0].Version
	a, _ := json.Marshal(got[0])
	b, _ := json.Marshal(want)
	if string(a) != string(b) {
		t.Errorf("our spec differs from nvcdi's on the fake library (%d MIG devices)\nours:   %s\nnvcdi's: %s", migs, a, b)
	}
	t.Logf("%d GPUs, %d MIG devices, %d CDI devices: identical to nvcdi's", len(inv.GPUs), migs, len(want.Devices))
}

// quietNVCDI discards nvcdi's log.
type quietNVCDI struct{}

func (quietNVCDI) Debugf(string, ...any)   {}
func (quietNVCDI) Errorf(string, ...any)   {}
func (quietNVCDI) Infof(string, ...any)    {}
func (quietNVCDI) Warningf(string, ...any) {}
func (quietNVCDI) Tracef(string, ...any)   {}
