package driverroot_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gpu-plugin/gpu-plugin/internal/driverroot"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

func TestCreate(t *testing.T) {
	inv := &nvml.Inventory{DriverVersion: "570.86.15", GPUs: []nvml.GPU{{Minor: 0}, {Minor: 3}, {Minor: -1}}}
	dir := t.TempDir()
	err := driverroot.Create(dir, inv, nvml.DriverMIGMinors(1))
	if errors.Is(err, driverroot.ErrNoMknod) {
		t.Skipf("needs CAP_MKNOD: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	// Creating it again (a restart over the same directory) succeeds.
	if err := driverroot.Create(dir, inv, nvml.DriverMIGMinors(1)); err != nil {
		t.Fatalf("second Create: %v", err)
	}
	for _, tc := range []struct {
		path         string
		major, minor uint32 // 0, 0: a regular file
	}{
		{"usr/lib/x86_64-linux-gnu/libcuda.so.570.86.15", 0, 0},
		{"usr/lib/x86_64-linux-gnu/libnvidia-ml.so.570.86.15", 0, 0},
		{"usr/bin/nvidia-smi", 0, 0},
		{"proc/driver/nvidia-caps/mig-minors", 0, 0},
		{"dev/nvidiactl", 195, 255},
		{"dev/nvidia0", 195, 0},
		{"dev/nvidia3", 195, 3},
		{"dev/nvidia-caps/nvidia-cap1", 511, 1},
		{"dev/nvidia-caps/nvidia-cap3", 511, 3},
	} {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(dir, tc.path), &st); err != nil {
			t.Errorf("%s: %v", tc.path, err)
			continue
		}
		isChar := st.Mode&unix.S_IFMT == unix.S_IFCHR
		if tc.major == 0 {
			if isChar {
				t.Errorf("%s is a device, want a file", tc.path)
			}
			continue
		}
		if !isChar || unix.Major(st.Rdev) != tc.major || unix.Minor(st.Rdev) != tc.minor {
			t.Errorf("%s: char %v %d:%d, want %d:%d", tc.path, isChar, unix.Major(st.Rdev), unix.Minor(st.Rdev), tc.major, tc.minor)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "dev/nvidia-1")); err == nil {
		t.Error("a GPU without a minor got a node")
	}
}

func TestCreateRefusesBadInput(t *testing.T) {
	if err := driverroot.Create(t.TempDir(), &nvml.Inventory{}, nil); err == nil {
		t.Error("no driver version: accepted")
	}
	if err := driverroot.Create(t.TempDir(), &nvml.Inventory{DriverVersion: "1"}, []byte("config one\n")); err == nil {
		t.Error("a bad mig-minors: accepted")
	}
}
