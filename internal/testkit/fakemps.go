package testkit

// A fake nvidia-cuda-mps-control (fakempscontrol/main.go documents what it
// does), built from source for tests of CUDA MPS sharing.

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

const modulePath = "github.com/gpu-plugin/gpu-plugin"

// fakeMPS is built once per test binary.
var fakeMPS struct {
	once sync.Once
	bin  string
	err  error
}

// FakeMPSControl builds internal/testkit/fakempscontrol once per test binary
// as an executable named nvidia-cuda-mps-control, and returns its path. It
// fails the test if the build fails.
//
// The binary is kept under the user's cache directory, keyed on the fake's
// source and the Go version, so that test binaries leave no temporary
// directory behind and later runs reuse it.
func FakeMPSControl(t testing.TB) string {
	t.Helper()
	fakeMPS.once.Do(func() { fakeMPS.bin, fakeMPS.err = buildFakeMPS() })
	if fakeMPS.err != nil {
		t.Fatal(fakeMPS.err)
	}
	return fakeMPS.bin
}

func buildFakeMPS() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	const pkg = "internal/testkit/fakempscontrol"
	src := filepath.Join(root, pkg)
	entries, err := os.ReadDir(src)
	if err != nil {
		return "", err
	}
	// The fake imports only the standard library, so its files and the Go
	// version decide the binary.
	h := sha256.New()
	fmt.Fprintln(h, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return "", err
		}
		fmt.Fprintln(h, e.Name(), len(b))
		h.Write(b)
	}
	var dir string
	if cache, err := os.UserCacheDir(); err == nil {
		dir = filepath.Join(cache, "gpu-plugin-testkit", "fakempscontrol-"+hex.EncodeToString(h.Sum(nil))[:16])
	} else if dir, err = os.MkdirTemp("", "fakempscontrol-"); err != nil { // no $HOME: one left behind per run
		return "", err
	}
	bin := filepath.Join(dir, "nvidia-cuda-mps-control")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	// Built under another name and renamed, so that test binaries building
	// it at once (go test ./...) never run a half-written file.
	tmp := bin + ".tmp" + strconv.Itoa(os.Getpid())
	cmd := exec.Command(goTool, "build", "-o", tmp, "./"+pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0") // static; no C toolchain needed
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("building the fake nvidia-cuda-mps-control (%s in %s): %v\n%s", cmd, root, err, out)
	}
	if err := os.Rename(tmp, bin); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return bin, nil
}

// moduleRoot walks up from the working directory to this module's go.mod,
// past the nested modules under tests/ that import testkit.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil {
			sc := bufio.NewScanner(bytes.NewReader(b))
			for sc.Scan() {
				if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == "module" && strings.Trim(f[1], `"`) == modulePath {
					return dir, nil
				}
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod of %s above the working directory", modulePath)
		}
		dir = parent
	}
}

// KillFakeMPS kills, with SIGKILL, the fake MPS control daemon whose pipe
// directory is pipeDir (its fake.pid), if one is running: for a test's
// cleanup, after a failure left a daemon behind. It checks the process's
// command line first, so that a stale pid file never kills another process.
func KillFakeMPS(pipeDir string) error {
	b, err := os.ReadFile(filepath.Join(pipeDir, "fake.pid"))
	if errors.Is(err, os.ErrNotExist) {
		return nil // never started, or quit
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("%s/fake.pid: %v", pipeDir, err)
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !isFakeDaemon(cmdline) {
		return nil // gone (or a zombie, with an empty cmdline), or reused
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	return nil
}

// isFakeDaemon: -d starts the fake's daemon as "<the fake> -fake-daemon",
// which no real program is. (One run with -f is the test's own child, to
// kill through its exec.Cmd.)
func isFakeDaemon(cmdline []byte) bool {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	return len(args) == 2 && args[1] == "-fake-daemon"
}
