package cdi_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// probeImage is the image the test builds from busybox-static and imports;
// nothing is pulled from a registry.
const probeImage = "localhost/gpu-plugin-cdi-probe"

// TestPodmanRunsCDIDevices hands the generated spec to a real CDI consumer:
// podman (Debian's, installed by scripts/test.sh when run as root) runs a
// container with --device k8s.device-plugin.nvidia.com/gpu=<name> on a fake
// driver root. Inside the container every device node the spec names is the
// host's character device, with nothing else under /dev/nvidia*; every file
// it mounts is mounted, read-only; its environment is set; and the
// nvidia-cdi-hook stand-in recorded every hook the spec asks for.
func TestPodmanRunsCDIDevices(t *testing.T) {
	pm := newPodman(t)

	type node struct {
		inv  *nvml.Inventory
		spec *specs.Spec
		root string // the fake driver root
		dir  string // the CDI spec directory
		log  string // the hook stand-in's log
	}
	nodes := map[string]*node{}
	for _, profile := range []string{"pcie-l4x4", "dgx-a100-mig"} {
		inv := testkit.Inventory(t, profile)
		dir := t.TempDir()
		n := &node{inv: inv, root: testkit.DriverRoot(t, inv), dir: filepath.Join(dir, "cdi"), log: filepath.Join(dir, "hooks.log")}
		// The stand-in for nvidia-cdi-hook records its arguments (after
		// argv[0], which the kernel replaces with the script's path) and
		// succeeds, so the runtime really runs every hook of the spec.
		hook := filepath.Join(dir, "nvidia-cdi-hook")
		script := "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '" + n.log + "'\n"
		if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		ss, err := cdi.Generate(inv, cdi.Options{DriverRoot: n.root, HookPath: hook})
		if err != nil {
			t.Fatalf("%s: generating the spec: %v", profile, err)
		}
		if err := os.Mkdir(n.dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := cdi.WriteAll(n.dir, ss); err != nil {
			t.Fatalf("%s: %v", profile, err)
		}
		for _, s := range ss {
			if s.Kind == cdi.Kind {
				n.spec = s
			}
		}
		if n.spec == nil {
			t.Fatalf("%s: no %s spec generated", profile, cdi.Kind)
		}
		nodes[profile] = n
	}
	l4 := nodes["pcie-l4x4"].inv
	a100 := nodes["dgx-a100-mig"].inv
	mig := a100.GPUs[1].MIGDevices[2] // GI 3, CI 0 on GPU minor 1
	if len(mig.CapDevicePaths) != 2 {
		t.Fatalf("MIG device %s has caps %v, want its GPU and compute instances'", mig.UUID, mig.CapDevicePaths)
	}
	allL4 := []string{"/dev/nvidiactl"}
	for _, g := range l4.GPUs {
		allL4 = append(allL4, fmt.Sprintf("/dev/nvidia%d", g.Minor))
	}

	for _, tc := range []struct {
		name, profile, device string
		// wantNodes are the device nodes the container must have whatever
		// the spec says; the spec's own nodes are checked besides.
		wantNodes []string
	}{
		{"whole GPU by UUID", "pcie-l4x4", l4.GPUs[1].UUID,
			[]string{"/dev/nvidiactl", "/dev/nvidia-uvm", fmt.Sprintf("/dev/nvidia%d", l4.GPUs[1].Minor)}},
		{"whole GPU by index", "pcie-l4x4", "0",
			[]string{"/dev/nvidiactl", "/dev/nvidia-uvm", fmt.Sprintf("/dev/nvidia%d", l4.GPUs[0].Minor)}},
		{"all GPUs", "pcie-l4x4", "all", allL4},
		{"MIG device by UUID", "dgx-a100-mig", mig.UUID,
			append([]string{"/dev/nvidiactl", "/dev/nvidia-uvm", fmt.Sprintf("/dev/nvidia%d", a100.GPUs[1].Minor)}, mig.CapDevicePaths...)},
		{"MIG device by index", "dgx-a100-mig", fmt.Sprintf("%d:%d", a100.GPUs[1].Index, mig.Index),
			append([]string{"/dev/nvidiactl", fmt.Sprintf("/dev/nvidia%d", a100.GPUs[1].Minor)}, mig.CapDevicePaths...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := nodes[tc.profile]
			edits, err := deviceEdits(n.spec, tc.device)
			if err != nil {
				t.Fatal(err)
			}
			version := n.inv.DriverVersion
			for _, lib := range []string{"libcuda.so." + version, "libnvidia-ml.so." + version} {
				if !slices.ContainsFunc(edits.Mounts, func(m *specs.Mount) bool { return filepath.Base(m.ContainerPath) == lib }) {
					t.Errorf("the spec mounts no %s for %s", lib, tc.device)
				}
			}
			for _, hook := range []string{"create-symlinks", "update-ldcache"} {
				if !slices.ContainsFunc(edits.Hooks, func(h *specs.Hook) bool { return len(h.Args) > 1 && h.Args[1] == hook }) {
					t.Errorf("the spec has no %s hook for %s", hook, tc.device)
				}
			}
			specNodes := map[string]string{} // container path: host path
			for _, d := range edits.DeviceNodes {
				hostPath := d.HostPath
				if hostPath == "" {
					hostPath = d.Path
				}
				specNodes[d.Path] = hostPath
			}
			for _, p := range tc.wantNodes {
				if _, ok := specNodes[p]; !ok {
					t.Errorf("the spec for %s lacks device node %s (it has %v)", tc.device, p, keys(specNodes))
				}
			}

			if err := os.WriteFile(n.log, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			var paths []string
			for _, m := range edits.Mounts {
				paths = append(paths, m.ContainerPath)
			}
			out := pm.run(t, n.dir, cdi.QualifiedName(cdi.Class, tc.device), append(keys(specNodes), paths...))
			got := parseProbe(t, out)

			// Device nodes: exactly the spec's, each the host's device.
			if want := keys(specNodes); !slices.Equal(got.nvidiaNodes, want) {
				t.Errorf("/dev/nvidia* in the container: %v\nwant the spec's: %v", got.nvidiaNodes, want)
			}
			for p, hostPath := range specNodes {
				if want := describe(t, hostPath); !strings.HasPrefix(want, "chr ") || got.paths[p] != want {
					t.Errorf("%s in the container: %q, want the host's %s: %q", p, got.paths[p], hostPath, want)
				}
			}
			// Mounts: each one the host's file, a read-only mount point.
			for _, m := range edits.Mounts {
				if want := describe(t, m.HostPath); got.paths[m.ContainerPath] != want {
					t.Errorf("%s in the container: %q, want the host's %s: %q", m.ContainerPath, got.paths[m.ContainerPath], m.HostPath, want)
				}
				opts, ok := got.mounts[m.ContainerPath]
				if !ok {
					t.Errorf("%s is not a mount point in the container", m.ContainerPath)
				} else if slices.Contains(m.Options, "ro") && !slices.Contains(opts, "ro") {
					t.Errorf("%s is mounted %v in the container, want read-only", m.ContainerPath, opts)
				}
			}
			for _, e := range edits.Env {
				if !slices.Contains(got.env, e) {
					t.Errorf("the container's environment lacks %s", e)
				}
			}
			// Hooks: each one ran, with the spec's arguments.
			raw, err := os.ReadFile(n.log)
			if err != nil {
				t.Fatal(err)
			}
			ran := strings.FieldsFunc(string(raw), func(r rune) bool { return r == '\n' })
			for _, h := range edits.Hooks {
				if len(h.Args) == 0 {
					t.Fatalf("%s hook %s has no arguments", h.HookName, h.Path)
				}
				if want := strings.Join(h.Args[1:], " "); !slices.Contains(ran, want) {
					t.Errorf("%s hook %q did not run; the stand-in ran: %q", h.HookName, want, ran)
				}
			}
			if len(ran) != len(edits.Hooks) {
				t.Errorf("%d hook runs, want the spec's %d: %q", len(ran), len(edits.Hooks), ran)
			}
		})
	}
}

// deviceEdits are what a runtime applies for one device: the spec's common
// edits and the device's.
func deviceEdits(s *specs.Spec, name string) (specs.ContainerEdits, error) {
	i := slices.IndexFunc(s.Devices, func(d specs.Device) bool { return d.Name == name })
	if i < 0 {
		return specs.ContainerEdits{}, fmt.Errorf("the spec has no device %q", name)
	}
	e := s.ContainerEdits
	d := s.Devices[i].ContainerEdits
	e.Env = append(slices.Clone(e.Env), d.Env...)
	e.DeviceNodes = append(slices.Clone(e.DeviceNodes), d.DeviceNodes...)
	e.Mounts = append(slices.Clone(e.Mounts), d.Mounts...)
	e.Hooks = append(slices.Clone(e.Hooks), d.Hooks...)
	return e, nil
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// probeScript runs in the container: it lists /dev/nvidia* and
// /dev/nvidia-caps/*, describes each path it is given, and prints the
// mount table and the environment.
const probeScript = `
echo '== nodes'
for f in /dev/nvidia* /dev/nvidia-caps/*; do [ -c "$f" ] && echo "$f"; done
echo '== paths'
for p in "$@"; do
	if [ -c "$p" ]; then echo "$p	chr $(stat -c '%t:%T' "$p")"
	elif [ -f "$p" ]; then echo "$p	file"
	elif [ -d "$p" ]; then echo "$p	dir"
	else echo "$p	missing"; fi
done
echo '== mounts'
cat /proc/self/mountinfo
echo '== env'
env
`

type probe struct {
	nvidiaNodes []string
	paths       map[string]string   // path: as describe says, or "missing"
	mounts      map[string][]string // mount point: options
	env         []string
}

// describe says what path is on the host as the probe says it in the
// container: "chr <major>:<minor>" (hex), "file" or "dir".
func describe(t *testing.T, path string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("a host path of the spec: %v", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFCHR:
		return fmt.Sprintf("chr %x:%x", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	case unix.S_IFREG:
		return "file"
	case unix.S_IFDIR:
		return "dir"
	}
	return fmt.Sprintf("mode %o", st.Mode)
}

func parseProbe(t *testing.T, out []byte) probe {
	t.Helper()
	p := probe{paths: map[string]string{}, mounts: map[string][]string{}}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if s, ok := strings.CutPrefix(line, "== "); ok {
			section = s
			continue
		}
		switch section {
		case "nodes":
			p.nvidiaNodes = append(p.nvidiaNodes, line)
		case "paths":
			path, what, _ := strings.Cut(line, "\t")
			p.paths[path] = what
		case "mounts":
			// mountinfo: id parent major:minor root mount-point options ...
			if f := strings.Fields(line); len(f) > 5 {
				p.mounts[f[4]] = strings.Split(f[5], ",")
			}
		case "env":
			p.env = append(p.env, line)
		}
	}
	if len(p.mounts) == 0 || len(p.env) == 0 {
		t.Fatalf("the probe's output is incomplete:\n%s", out)
	}
	slices.Sort(p.nvidiaNodes)
	return p
}

// podman runs an isolated podman: its own storage, state and configuration
// under a temporary directory, and the CDI spec directories of the host
// replaced by the test's.
type podman struct {
	bin    string
	state  string
	global []string
	env    []string
}

// newPodman checks that podman can run here, builds and imports the probe
// image, and removes everything it started when the test ends; it skips the
// test with one line when this machine cannot run it.
func newPodman(t *testing.T) *podman {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("podman CDI test skipped: needs root (the fake driver root's device nodes and rootful podman); CI runs it as root")
	}
	bin, err := exec.LookPath("podman")
	if err != nil {
		t.Skip("podman CDI test skipped: podman not installed (apt-get install --no-install-recommends podman runc busybox-static; scripts/test.sh does it as root)")
	}
	busybox, err := staticBusybox()
	if err != nil {
		t.Skipf("podman CDI test skipped: %v (apt-get install busybox-static; scripts/test.sh does it as root)", err)
	}
	if _, err := exec.LookPath("mount"); err != nil {
		t.Skip("podman CDI test skipped: mount(8) not installed")
	}
	if tmp := filepath.Clean(os.TempDir()) + "/"; strings.HasPrefix(tmp, "/run/") || strings.HasPrefix(tmp, "/var/run/") {
		t.Skipf("podman CDI test skipped: the temporary directory %s is under /run, which the test's mount namespace replaces; set TMPDIR elsewhere", tmp)
	}

	state := t.TempDir()
	pm := &podman{bin: bin, state: state}
	for _, d := range []string{"hooks.d", "root"} {
		if err := os.Mkdir(filepath.Join(state, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// The test's own configuration files: the host's containers.conf and
	// storage.conf (runtime, storage options, hooks) do not apply. Podman
	// 4.3 wants the storage paths in the file, not only as flags.
	storageConf := fmt.Sprintf("[storage]\ndriver = \"vfs\"\ngraphroot = %q\nrunroot = %q\n",
		filepath.Join(state, "root"), nsRunRoot)
	for f, content := range map[string]string{"containers.conf": "", "storage.conf": storageConf} {
		if err := os.WriteFile(filepath.Join(state, f), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	pm.env = append(os.Environ(),
		"CONTAINERS_CONF="+filepath.Join(state, "containers.conf"),
		"CONTAINERS_STORAGE_CONF="+filepath.Join(state, "storage.conf"),
	)
	pm.global = []string{
		// Images and containers of this test only, removed with it.
		"--root", filepath.Join(state, "root"),
		// Run-time state on the namespace's /run (below): gone with the
		// call, and short, as podman wants (a runroot of 50 characters at
		// most; conmon's sockets live under --tmpdir).
		"--runroot", nsRunRoot,
		"--tmpdir", nsRunRoot + "/libpod",
		// vfs: plain directories; no overlay mounts, which need the
		// kernel's overlayfs and must be unmounted before the directory
		// can be removed.
		"--storage-driver", "vfs",
		// No systemd on CI machines: cgroups directly, no journald events.
		"--cgroup-manager", "cgroupfs",
		"--events-backend", "none",
		// No OCI hooks from the host (an installed nvidia-container-toolkit
		// hook would inject the devices itself): only the spec's hooks run.
		"--hooks-dir", filepath.Join(state, "hooks.d"),
	}

	// Podman 4.3 (Debian 12) reads CDI specs from /etc/cdi and /var/run/cdi
	// only (--cdi-spec-dir came in 4.5), so each podman call runs in a
	// private mount namespace where those show the test's spec directory.
	// Podman writes a blob-info cache to /var/lib/containers/cache whatever
	// --root says; a tmpfs over it there needs the directory to exist.
	const varLib = "/var/lib/containers"
	if _, err := os.Stat(varLib); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(varLib, 0o700); err != nil {
			t.Skipf("podman CDI test skipped: %v", err)
		}
		t.Cleanup(func() { os.Remove(varLib) }) // only if still empty
	}

	rootfs := filepath.Join(state, "probe.tar")
	if err := writeProbeRootfs(rootfs, busybox); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pm.cleanup(t) })
	if out, err := pm.podman(t, 60*time.Second, "", "import", "--change", "CMD=/bin/sh", rootfs, probeImage); err != nil {
		t.Skipf("podman CDI test skipped: podman cannot import an image here: %v: %s", err, lastLine(out))
	}
	if out, err := pm.podman(t, 60*time.Second, "", pm.runArgs(nil, "true")...); err != nil {
		t.Skipf("podman CDI test skipped: podman cannot run a container here: %v: %s", err, lastLine(out))
	}
	return pm
}

func (pm *podman) runArgs(devices []string, cmd ...string) []string {
	args := []string{
		"run", "--rm",
		// No network stack (CNI or netavark) needed.
		"--network", "none",
		// Podman raises a root container's RLIMIT_NOFILE and RLIMIT_NPROC
		// to 1048576, which needs CAP_SYS_RESOURCE; this sandbox and CI
		// lack it. Lowering a limit needs nothing.
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
	}
	for _, d := range devices {
		args = append(args, "--device", d)
	}
	return append(append(args, probeImage), cmd...)
}

// run runs the probe in a container given device, with the spec directory
// specDir, and returns its output.
func (pm *podman) run(t *testing.T, specDir, device string, paths []string) []byte {
	t.Helper()
	args := pm.runArgs([]string{device}, append([]string{"/bin/sh", "-c", probeScript, "probe"}, paths...)...)
	out, err := pm.podman(t, 30*time.Second, specDir, args...)
	if err != nil {
		t.Fatalf("podman run --device %s: %v\n%s", device, err, out)
	}
	return out
}

// nsRunRoot is podman's run-time state directory, on the tmpfs the
// namespace of each call mounts over /run.
const nsRunRoot = "/run/gpu-plugin-podman"

// nsScript prepares the private mount namespace a podman call runs in ($1:
// the CDI spec directory, or empty for none) and runs podman.
const nsScript = `set -e
spec=$1; shift
# /run: hides the host's CDI specs (/var/run/cdi), runc's state and any
# other podman's; holds this call's run-time state.
mount -t tmpfs -o mode=0755 tmpfs /run
[ -L /var/run ] || mount -t tmpfs -o mode=0755 tmpfs /var/run
mkdir -p /var/run/cdi
[ -z "$spec" ] || mount --bind "$spec" /var/run/cdi
[ ! -d /etc/cdi ] || mount -t tmpfs tmpfs /etc/cdi
# podman's lock segment (libpod_lock).
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /var/lib/containers
exec "$@"
`

// podman runs podman with args in a private mount namespace, bounded by
// timeout.
func (pm *podman) podman(t *testing.T, timeout time.Duration, specDir string, args ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	argv := append([]string{"-c", nsScript, "podman-ns", specDir, pm.bin}, pm.global...)
	cmd := exec.CommandContext(ctx, "/bin/sh", append(argv, args...)...)
	cmd.Env = pm.env
	// A private copy of the mount table (Go makes / private in it), so the
	// mounts above never reach the host and vanish with the last process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("podman %s: no answer in %s: %w", args[0], timeout, err)
	}
	return out, err
}

// cleanup removes the test's containers and images, then waits, bounded,
// for the podman processes started for this test (conmon and the cleanup
// it runs when a container exits) to end, killing any left, so that none
// outlives the test or writes into its directories while they are removed.
func (pm *podman) cleanup(t *testing.T) {
	for _, args := range [][]string{{"rm", "--all", "--force"}, {"rmi", "--all", "--force"}} {
		// The state directory goes with the test anyway; this is tidiness.
		if out, err := pm.podman(t, 60*time.Second, "", args...); err != nil {
			t.Logf("podman %s: %v: %s", strings.Join(args, " "), err, lastLine(out))
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		pids := pm.processes()
		if len(pids) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL)
			}
			t.Errorf("podman processes %v still running 30s after the test; killed", pids)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// processes lists the processes whose command line names this test's
// podman state directory.
func (pm *podman) processes() []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(pm.state)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// staticBusybox finds a statically linked busybox (busybox-static), which
// runs in an image holding nothing else.
func staticBusybox() (string, error) {
	path, err := exec.LookPath("busybox")
	if err != nil {
		return "", errors.New("busybox not installed")
	}
	f, err := elf.Open(path)
	if err != nil {
		return "", fmt.Errorf("reading %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return "", fmt.Errorf("%s is dynamically linked, not busybox-static", path)
		}
	}
	return path, nil
}

// writeProbeRootfs writes the probe image's root file system as a tarball:
// /bin/busybox and the applets the probe uses.
func writeProbeRootfs(path, busybox string) error {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdrs := []*tar.Header{{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755}}
	for _, applet := range []string{"sh", "ls", "cat", "stat", "env", "true"} {
		hdrs = append(hdrs, &tar.Header{Name: "bin/" + applet, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777})
	}
	if err := tw.WriteHeader(hdrs[0]); err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bb))}); err != nil {
		return err
	}
	if _, err := tw.Write(bb); err != nil {
		return err
	}
	for _, h := range hdrs[1:] {
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

func lastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}
