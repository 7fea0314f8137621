package nvml

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// A MIG device is opened through two capability device nodes besides its
// parent's /dev/nvidia<minor>: its GPU instance's and its compute
// instance's /dev/nvidia-caps/nvidia-cap<N>. The driver lists the minor N of
// every possible capability in /proc/driver/nvidia-caps/mig-minors, one
// "<capability> <minor>" line each:
//
//	config 1
//	monitor 2
//	gpu0/gi0/access 3
//	gpu0/gi0/ci0/access 4
//	...
//
// where gpu<N> is the GPU's device minor (nvmlDeviceGetMinorNumber), gi<G>
// the GPU-instance ID and ci<C> the compute-instance ID.

// MIGMinorsFile is where the driver lists the MIG capability minors, under
// the proc root.
const MIGMinorsFile = "driver/nvidia-caps/mig-minors"

// MIGCapsDir is the directory of the capability device nodes.
const MIGCapsDir = "/dev/nvidia-caps"

// MIGCaps maps MIG capability names ("gpu0/gi1/access") to their device
// minors.
type MIGCaps map[string]int

// MIGMinorsSource supplies the contents of a mig-minors file. A simulated
// NVML implements it on its gonvml.Interface, so a simulated node's MIG
// devices get caps through the same parser as a real one.
type MIGMinorsSource interface {
	MIGMinors() []byte
}

// ReadMIGCaps reads procRoot/driver/nvidia-caps/mig-minors; an empty
// procRoot means /proc. A missing file (no MIG-capable driver loaded)
// returns nil caps and an error wrapping fs.ErrNotExist.
func ReadMIGCaps(procRoot string) (MIGCaps, error) {
	if procRoot == "" {
		procRoot = "/proc"
	}
	path := filepath.Join(procRoot, MIGMinorsFile)
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s does not exist: MIG devices get no /dev/nvidia-caps nodes (is the NVIDIA driver loaded, and /proc mounted?): %w", path, err)
		}
		return nil, fmt.Errorf("reading the MIG capability minors: %w", err)
	}
	defer f.Close()
	caps, err := ParseMIGMinors(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return caps, nil
}

// ParseMIGMinors parses the contents of a mig-minors file. A line that is
// not "<capability> <minor>" fails the parse with its line number.
func ParseMIGMinors(r io.Reader) (MIGCaps, error) {
	caps := MIGCaps{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("line %d %q: want \"<capability> <minor>\"", n, line)
		}
		minor, err := strconv.Atoi(f[1])
		if err != nil || minor < 0 {
			return nil, fmt.Errorf("line %d %q: the minor %q is not a number", n, line, f[1])
		}
		caps[f[0]] = minor
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading the MIG capability minors: %w", err)
	}
	return caps, nil
}

// GPUInstanceCap names a GPU instance's access capability.
func GPUInstanceCap(gpuMinor, gi int) string { return fmt.Sprintf("gpu%d/gi%d/access", gpuMinor, gi) }

// ComputeInstanceCap names a compute instance's access capability.
func ComputeInstanceCap(gpuMinor, gi, ci int) string {
	return fmt.Sprintf("gpu%d/gi%d/ci%d/access", gpuMinor, gi, ci)
}

// CapDevicePath is the device node of a capability minor.
func CapDevicePath(minor int) string { return fmt.Sprintf("%s/nvidia-cap%d", MIGCapsDir, minor) }

// DevicePaths returns the GPU-instance and compute-instance capability
// device nodes of a MIG device, in that order.
func (c MIGCaps) DevicePaths(gpuMinor, gi, ci int) ([]string, error) {
	var out []string
	for _, name := range []string{GPUInstanceCap(gpuMinor, gi), ComputeInstanceCap(gpuMinor, gi, ci)} {
		minor, ok := c[name]
		if !ok {
			return nil, fmt.Errorf("the MIG capability minors list no %s", name)
		}
		out = append(out, CapDevicePath(minor))
	}
	return out, nil
}

// The driver numbers the capabilities statically: config 1, monitor 2, then
// per GPU minor 15 GPU instances (IDs 0-14) of one access capability and 8
// compute instances (IDs 0-7) each.
const (
	driverMIGGIs       = 15
	driverMIGCIs       = 8
	driverMIGPerGI     = 1 + driverMIGCIs
	driverMIGPerGPU    = driverMIGGIs * driverMIGPerGI
	driverMIGFirstGPUs = 3
)

// DriverMIGMinors returns a mig-minors file as the driver writes it, for
// GPU minors 0 to gpus-1 (the driver lists 32).
func DriverMIGMinors(gpus int) []byte {
	var b bytes.Buffer
	b.WriteString("config 1\nmonitor 2\n")
	for g := 0; g < gpus; g++ {
		for gi := 0; gi < driverMIGGIs; gi++ {
			base := driverMIGFirstGPUs + g*driverMIGPerGPU + gi*driverMIGPerGI
			fmt.Fprintf(&b, "%s %d\n", GPUInstanceCap(g, gi), base)
			for ci := 0; ci < driverMIGCIs; ci++ {
				fmt.Fprintf(&b, "%s %d\n", ComputeInstanceCap(g, gi, ci), base+1+ci)
			}
		}
	}
	return b.Bytes()
}

// migCapsLoader asks for the caps at most once per scan, and only if a GPU
// has MIG on (the Library caches them across scans).
type migCapsLoader struct {
	once sync.Once
	load func() (MIGCaps, error)
	caps MIGCaps
	err  error
}

func (m *migCapsLoader) get() (MIGCaps, error) {
	m.once.Do(func() { m.caps, m.err = m.load() })
	return m.caps, m.err
}
