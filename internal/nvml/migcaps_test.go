package nvml_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

// writeProcRoot makes a proc root holding driver/nvidia-caps/mig-minors.
func writeProcRoot(t *testing.T, minors string) string {
	t.Helper()
	root := t.TempDir()
	path := filepath.Join(root, nvml.MIGMinorsFile)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(minors), 0o444); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestReadMIGCaps(t *testing.T) {
	tests := []struct {
		name      string
		minors    string
		gpu, gi   int
		ci        int
		want      []string
		wantErr   string // in ReadMIGCaps
		pathsErr  string // in DevicePaths
		wantEntry map[string]int
	}{
		{
			name:   "driver excerpt",
			minors: "config 1\nmonitor 2\ngpu0/gi0/access 3\ngpu0/gi0/ci0/access 4\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n",
			gpu:    0, gi: 1, ci: 0,
			want:      []string{"/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia-caps/nvidia-cap13"},
			wantEntry: map[string]int{"config": 1, "monitor": 2},
		},
		{
			name:   "blank lines and trailing spaces",
			minors: "\ngpu2/gi7/access 213 \n\ngpu2/gi7/ci0/access 214\n",
			gpu:    2, gi: 7, ci: 0,
			want: []string{"/dev/nvidia-caps/nvidia-cap213", "/dev/nvidia-caps/nvidia-cap214"},
		},
		{
			name:   "keyed by GPU minor: another GPU's caps do not match",
			minors: "gpu3/gi1/access 420\ngpu3/gi1/ci0/access 421\n",
			gpu:    1, gi: 1, ci: 0,
			pathsErr: "list no gpu1/gi1/access",
		},
		{
			name:   "compute instance missing",
			minors: "gpu0/gi2/access 21\n",
			gpu:    0, gi: 2, ci: 1,
			pathsErr: "list no gpu0/gi2/ci1/access",
		},
		{name: "not two words", minors: "config 1\ngpu0/gi0/access\n", wantErr: `line 2 "gpu0/gi0/access"`},
		{name: "minor not a number", minors: "gpu0/gi0/access three\n", wantErr: `the minor "three" is not a number`},
		{name: "negative minor", minors: "gpu0/gi0/access -3\n", wantErr: "is not a number"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			caps, err := nvml.ReadMIGCaps(writeProcRoot(t, tc.minors))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "mig-minors") {
					t.Fatalf("ReadMIGCaps: %v, want an error naming the file and %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tc.wantEntry {
				if caps[k] != v {
					t.Errorf("caps[%q] = %d, want %d", k, caps[k], v)
				}
			}
			got, err := caps.DevicePaths(tc.gpu, tc.gi, tc.ci)
			if tc.pathsErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.pathsErr) {
					t.Fatalf("DevicePaths: %v %v, want error %q", got, err, tc.pathsErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("DevicePaths(%d, %d, %d) = %v, %v; want %v", tc.gpu, tc.gi, tc.ci, got, err, tc.want)
			}
		})
	}
}

func TestReadMIGCapsMissing(t *testing.T) {
	caps, err := nvml.ReadMIGCaps(t.TempDir())
	if caps != nil || !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "nvidia-caps/mig-minors") {
		t.Fatalf("ReadMIGCaps on an empty root: %v, %v; want nil and a not-exist error naming the file", caps, err)
	}
}

// The driver numbers the minors statically; the examples are the lines
// NVIDIA's documentation and the driver's own listings show.
func TestDriverMIGMinors(t *testing.T) {
	caps, err := nvml.ParseMIGMinors(strings.NewReader(string(nvml.DriverMIGMinors(32))))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{
		"config": 1, "monitor": 2,
		"gpu0/gi0/access": 3, "gpu0/gi0/ci0/access": 4, "gpu0/gi0/ci2/access": 6,
		"gpu3/gi3/ci3/access": 439, "gpu3/gi3/ci5/access": 441,
		"gpu6/gi11/ci7/access":  920,
		"gpu31/gi14/ci6/access": 4321, "gpu31/gi14/ci7/access": 4322,
	}
	for k, v := range want {
		if got, ok := caps[k]; !ok || got != v {
			t.Errorf("%s = %d (present %v), want %d", k, got, ok, v)
		}
	}
	if len(caps) != 2+32*15*9 {
		t.Errorf("%d capabilities, want %d", len(caps), 2+32*15*9)
	}
	seen := map[int]string{}
	for k, v := range caps {
		if prev, dup := seen[v]; dup {
			t.Errorf("minor %d used by %s and %s", v, prev, k)
		}
		seen[v] = k
	}
}

// A simulated node supplies its own mig-minors (numbered as the driver
// does); a proc root given to Scan wins over it, so the daemon's real path
// and --simulate read caps through the same parser.
func TestScanMIGCaps(t *testing.T) {
	p, err := sim.LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		procRoot func(t *testing.T) string
		// want: GPU 1's MIG devices (3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb at
		// the simulator's GI IDs 1-4, CI 0) → cap device paths
		want    [][]string
		problem string
		allGPUs bool // every MIG device of the node has two caps
	}{
		{
			name:     "simulated driver numbering",
			procRoot: func(*testing.T) string { return "" },
			want: [][]string{
				{"/dev/nvidia-caps/nvidia-cap147", "/dev/nvidia-caps/nvidia-cap148"},
				{"/dev/nvidia-caps/nvidia-cap156", "/dev/nvidia-caps/nvidia-cap157"},
				{"/dev/nvidia-caps/nvidia-cap165", "/dev/nvidia-caps/nvidia-cap166"},
				{"/dev/nvidia-caps/nvidia-cap174", "/dev/nvidia-caps/nvidia-cap175"},
			},
			allGPUs: true,
		},
		{
			name: "proc root fixture",
			procRoot: func(t *testing.T) string {
				return writeProcRoot(t, "gpu1/gi1/access 901\ngpu1/gi1/ci0/access 902\ngpu1/gi2/access 903\ngpu1/gi2/ci0/access 904\n"+
					"gpu1/gi3/access 905\ngpu1/gi3/ci0/access 906\ngpu1/gi4/access 907\ngpu1/gi4/ci0/access 908\n")
			},
			want: [][]string{
				{"/dev/nvidia-caps/nvidia-cap901", "/dev/nvidia-caps/nvidia-cap902"},
				{"/dev/nvidia-caps/nvidia-cap903", "/dev/nvidia-caps/nvidia-cap904"},
				{"/dev/nvidia-caps/nvidia-cap905", "/dev/nvidia-caps/nvidia-cap906"},
				{"/dev/nvidia-caps/nvidia-cap907", "/dev/nvidia-caps/nvidia-cap908"},
			},
		},
		{
			name:     "no mig-minors",
			procRoot: func(t *testing.T) string { return t.TempDir() },
			want:     [][]string{nil, nil, nil, nil},
			problem:  "mig-minors does not exist",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lib, err := nvml.Open(sim.NewNode(p, nil).NVML())
			if err != nil {
				t.Fatal(err)
			}
			defer lib.Close()
			inv, err := nvml.Scan(lib, nvml.ScanOptions{ProcRoot: tc.procRoot(t)})
			if err != nil {
				t.Fatal(err)
			}
			g := inv.GPUs[1]
			if len(g.MIGDevices) != len(tc.want) {
				t.Fatalf("GPU 1: %d MIG devices, want %d (problem %q)", len(g.MIGDevices), len(tc.want), g.Problem)
			}
			for k, m := range g.MIGDevices {
				if !slices.Equal(m.CapDevicePaths, tc.want[k]) {
					t.Errorf("GPU 1 MIG %d (%s gi %d ci %d): caps %v, want %v", k, m.Profile, m.GPUInstanceID, m.ComputeInstanceID, m.CapDevicePaths, tc.want[k])
				}
			}
			if tc.problem == "" && g.Problem != "" || !strings.Contains(g.Problem, tc.problem) {
				t.Errorf("GPU 1 problem %q, want %q", g.Problem, tc.problem)
			}
			if tc.allGPUs {
				for _, g := range inv.GPUs {
					for _, m := range g.MIGDevices {
						if len(m.CapDevicePaths) != 2 {
							t.Errorf("GPU %d MIG %s: caps %v", g.Index, m.UUID, m.CapDevicePaths)
						}
					}
				}
			}
		})
	}
}

// A GPU instance whose profile ID matches none of the GPU's profiles is not
// advertised under a guessed name: the device is left out, the GPU's
// Problem says why and the failure is counted.
func TestScanMIGUnknownProfileID(t *testing.T) {
	p, err := sim.LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	base := sim.NewNode(p, nil).NVML()
	dev0, _ := base.DeviceGetHandleByIndex(0)
	lib, err := nvml.Open(oneGPU{Interface: base, dev: badProfileDevice{Device: dev0}})
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Close()
	inv, err := nvml.Scan(lib, nvml.ScanOptions{ProcRoot: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	g := inv.GPUs[0]
	if len(g.MIGDevices) != 0 || !strings.Contains(g.Problem, "no GPU-instance profile has ID 77") {
		t.Errorf("GPU 0: MIG devices %v, problem %q; want none and the unknown ID named", g.MIGDevices, g.Problem)
	}
	if n := lib.FailedCalls()["nvmlDeviceGetGpuInstanceProfileInfo"]; n == 0 {
		t.Errorf("failed calls %v: the unresolved profile is not counted", lib.FailedCalls())
	}
}

// oneGPU serves dev as GPU 0 of a library.
type oneGPU struct {
	gonvml.Interface
	dev gonvml.Device
}

func (o oneGPU) DeviceGetCount() (int, gonvml.Return) { return 1, gonvml.SUCCESS }
func (o oneGPU) DeviceGetHandleByIndex(int) (gonvml.Device, gonvml.Return) {
	return o.dev, gonvml.SUCCESS
}

// badProfileDevice's GPU instances report a profile ID the GPU lacks.
type badProfileDevice struct{ gonvml.Device }

func (d badProfileDevice) GetGpuInstanceById(id int) (gonvml.GpuInstance, gonvml.Return) {
	gi, ret := d.Device.GetGpuInstanceById(id)
	if ret != gonvml.SUCCESS {
		return gi, ret
	}
	return badProfileGI{gi}, ret
}

type badProfileGI struct{ gonvml.GpuInstance }

func (g badProfileGI) GetInfo() (gonvml.GpuInstanceInfo, gonvml.Return) {
	info, ret := g.GpuInstance.GetInfo()
	info.ProfileId = 77
	return info, ret
}

// TestScanReadsMIGMinorsOnce: the driver writes mig-minors once, when it
// loads, so a session reads it once and re-scans reuse it; a missing file
// is looked for again at the next scan.
func TestScanReadsMIGMinorsOnce(t *testing.T) {
	p, err := sim.LoadProfile("dgx-a100-mig")
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvml.Open(sim.NewNode(p, nil).NVML())
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Close()
	root := t.TempDir()
	caps := func() []string {
		t.Helper()
		inv, err := nvml.Scan(lib, nvml.ScanOptions{ProcRoot: root})
		if err != nil {
			t.Fatal(err)
		}
		return inv.GPUs[1].MIGDevices[0].CapDevicePaths
	}
	if got := caps(); got != nil {
		t.Fatalf("caps %v without a mig-minors file", got)
	}
	path := filepath.Join(root, nvml.MIGMinorsFile)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("gpu1/gi1/access 901\ngpu1/gi1/ci0/access 902\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	want := []string{"/dev/nvidia-caps/nvidia-cap901", "/dev/nvidia-caps/nvidia-cap902"}
	if got := caps(); !slices.Equal(got, want) {
		t.Fatalf("after the file appeared: caps %v, want %v", got, want)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if got := caps(); !slices.Equal(got, want) {
		t.Fatalf("a re-scan read mig-minors again: caps %v, want the cached %v", got, want)
	}
}
