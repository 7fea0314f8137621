// Package driverroot lays out a stand-in NVIDIA driver root: the files a
// CDI spec generator looks for on a GPU node, for a simulated node and for
// tests. The libraries and binaries are empty placeholders named as the
// driver installs them; the device nodes are real character devices
// (mknod, which needs CAP_MKNOD) with the driver's major numbers, so that a
// container runtime can create them in a container; the MIG capability
// minors are written where the driver lists them.
package driverroot

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// LibDir is where the placeholder libraries go, as on Debian and Ubuntu.
const LibDir = "usr/lib/x86_64-linux-gnu"

// Libraries are the driver libraries laid out, each as lib<name>.so.<driver
// version>: the compute set a CUDA container needs.
var Libraries = []string{
	"libcuda.so", "libcudadebugger.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so",
	"libnvidia-nvvm.so", "libnvidia-opencl.so", "libnvidia-cfg.so", "libnvidia-allocator.so",
	"libnvidia-gpucomp.so",
}

// Binaries are the driver utilities laid out under usr/bin.
var Binaries = []string{
	"nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server",
}

// The device majors: 195 is the NVIDIA driver's fixed one; nvidia-uvm and
// nvidia-caps get dynamic majors, and these are typical values.
const (
	majorNVIDIA = 195
	majorUVM    = 510
	majorCaps   = 511
)

// ErrNoMknod is returned, wrapped, when device nodes cannot be created
// because the process lacks CAP_MKNOD.
var ErrNoMknod = errors.New("creating device nodes needs CAP_MKNOD (run as root)")

// Create lays out a driver root under dir for inv: the libraries and
// binaries named for inv.DriverVersion, /dev/nvidiactl, nvidia-uvm,
// nvidia-uvm-tools, nvidia-modeset, /dev/nvidia<minor> per GPU and
// /dev/nvidia-caps/nvidia-cap<N> for every capability in migMinors (the
// contents of /proc/driver/nvidia-caps/mig-minors, written there too when
// not empty).
func Create(dir string, inv *nvml.Inventory, migMinors []byte) error {
	if inv == nil || inv.DriverVersion == "" {
		return errors.New("a driver root needs the driver version (the inventory has none)")
	}
	for _, lib := range Libraries {
		if err := placeholder(filepath.Join(dir, LibDir, lib+"."+inv.DriverVersion), 0o644); err != nil {
			return err
		}
	}
	for _, bin := range Binaries {
		if err := placeholder(filepath.Join(dir, "usr/bin", bin), 0o755); err != nil {
			return err
		}
	}
	nodes := []node{
		{"dev/nvidiactl", majorNVIDIA, 255},
		{"dev/nvidia-modeset", majorNVIDIA, 254},
		{"dev/nvidia-uvm", majorUVM, 0},
		{"dev/nvidia-uvm-tools", majorUVM, 1},
	}
	for _, g := range inv.GPUs {
		if g.Minor >= 0 {
			nodes = append(nodes, node{fmt.Sprintf("dev/nvidia%d", g.Minor), majorNVIDIA, uint32(g.Minor)})
		}
	}
	if len(migMinors) > 0 {
		caps, err := nvml.ParseMIGMinors(bytes.NewReader(migMinors))
		if err != nil {
			return fmt.Errorf("the mig-minors given for the driver root: %w", err)
		}
		if err := writeFile(filepath.Join(dir, "proc", nvml.MIGMinorsFile), migMinors, 0o444); err != nil {
			return err
		}
		for _, minor := range caps {
			nodes = append(nodes, node{fmt.Sprintf("dev/nvidia-caps/nvidia-cap%d", minor), majorCaps, uint32(minor)})
		}
	}
	for _, n := range nodes {
		if err := charDevice(filepath.Join(dir, n.path), n.major, n.minor); err != nil {
			return err
		}
	}
	return nil
}

type node struct {
	path         string
	major, minor uint32
}

func placeholder(path string, mode os.FileMode) error {
	return writeFile(path, nil, mode)
}

func writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating the driver root: %w", err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("creating the driver root: %w", err)
	}
	return nil
}

func charDevice(path string, major, minor uint32) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating the driver root: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		return nil
	}
	err := unix.Mknod(path, unix.S_IFCHR|0o666, int(unix.Mkdev(major, minor)))
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%s: %w", path, ErrNoMknod)
	}
	if err != nil {
		return fmt.Errorf("creating device node %s: %w", path, err)
	}
	return nil
}
