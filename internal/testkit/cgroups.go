package testkit

// Real kubelet-style pod cgroups holding real processes, for tests that
// resolve processes to pods through the real /proc (internal/podusage,
// tests/kubelet). They need root; a machine that cannot make them skips
// the test, except under CI=true, where the test fails instead.

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// CgroupDriver is the kubelet's cgroup driver: it decides how pod and
// container cgroups are named, and here also the hierarchy they are made in.
type CgroupDriver string

const (
	// Cgroupfs names them kubepods/<qos>/pod<uid>/<container ID> (as
	// containerd does under the cgroupfs driver), in a cgroup v1
	// hierarchy: the host's pids or cpu controller, or on a host without
	// v1 controllers a named hierarchy the test mounts.
	Cgroupfs CgroupDriver = "cgroupfs"
	// Systemd names them kubepods.slice/kubepods-<qos>.slice/
	// kubepods-<qos>-pod<uid with '_'>.slice/cri-containerd-<container ID>.scope,
	// in a cgroup2 filesystem the test mounts.
	Systemd CgroupDriver = "systemd"
)

// QoS is a pod's QoS class, which places its cgroup.
type QoS string

const (
	Guaranteed QoS = "guaranteed" // directly under kubepods
	Burstable  QoS = "burstable"
	BestEffort QoS = "besteffort"
)

// sleepFor bounds the life of a process that a crashed test leaves behind.
const sleepFor = "120"

// Cgroups is a set of kubelet-style pod cgroups under a directory of the
// test's own (podusage-test-<random>) in one hierarchy, and the processes
// in them. Everything is removed when the test ends: the processes are
// killed and reaped, the cgroups removed deepest first, a mount made for
// them unmounted. Use it from the test's goroutine.
type Cgroups struct {
	t      testing.TB
	Driver CgroupDriver
	// Dir is the test's directory in the hierarchy; the cgroups are made
	// under it.
	Dir   string
	made  []string // cgroups created, parents first
	procs map[int]*exec.Cmd
}

// PodCgroups makes an empty set of pod cgroups for driver. It skips the
// test (fails it under CI=true) if not run as root or if the hierarchy
// cannot be mounted.
func PodCgroups(t testing.TB, driver CgroupDriver) *Cgroups {
	t.Helper()
	if os.Geteuid() != 0 {
		skipUnlessCI(t, "needs root to create cgroups and move a process into them")
	}
	var root string
	switch driver {
	case Cgroupfs:
		root = v1Hierarchy(t)
	case Systemd:
		root = mountCgroup(t, "cgroup2", "")
	default:
		t.Fatalf("unknown cgroup driver %q", driver)
	}
	c := &Cgroups{t: t, Driver: driver, Dir: filepath.Join(root, "podusage-test-"+RandomHex(t, 6)), procs: map[int]*exec.Cmd{}}
	c.mkdir(c.Dir)
	t.Cleanup(c.cleanup) // before the unmount, registered earlier
	return c
}

// Add starts a process (sleep) in the container's cgroup of a Burstable
// pod, making the cgroups it needs, and returns its PID.
func (c *Cgroups) Add(podUID, containerID string) int {
	c.t.Helper()
	return c.AddQoS(Burstable, podUID, containerID)
}

// AddQoS is Add for a pod of the given QoS class. Calling it again for the
// same container adds another process to it.
func (c *Cgroups) AddQoS(qos QoS, podUID, containerID string) int {
	c.t.Helper()
	dir := c.Dir
	for _, name := range c.path(qos, podUID, containerID) {
		dir = filepath.Join(dir, name)
		if !slices.Contains(c.made, dir) {
			c.mkdir(dir)
		}
	}
	cmd := exec.Command("sleep", sleepFor)
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	pid := cmd.Process.Pid
	c.procs[pid] = cmd
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		c.t.Fatalf("moving pid %d into %s: %v", pid, dir, err)
	}
	return pid
}

// path is a container's cgroup, as components under Dir.
func (c *Cgroups) path(qos QoS, uid, cid string) []string {
	if c.Driver == Cgroupfs {
		if qos == Guaranteed {
			return []string{"kubepods", "pod" + uid, cid}
		}
		return []string{"kubepods", string(qos), "pod" + uid, cid}
	}
	pod := "pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"
	if qos == Guaranteed {
		return []string{"kubepods.slice", "kubepods-" + pod, "cri-containerd-" + cid + ".scope"}
	}
	q := "kubepods-" + string(qos)
	return []string{"kubepods.slice", q + ".slice", q + "-" + pod, "cri-containerd-" + cid + ".scope"}
}

// Kill kills and reaps a process started by Add: its container exited.
// Its cgroups stay until the test ends.
func (c *Cgroups) Kill(pid int) {
	c.t.Helper()
	cmd, ok := c.procs[pid]
	if !ok {
		c.t.Fatalf("Kill(%d): not a process of these cgroups", pid)
	}
	delete(c.procs, pid)
	stop(cmd)
}

// StartSleeper starts a process (sleep) outside any pod cgroup, killed and
// reaped when the test ends, and returns its PID.
func StartSleeper(t testing.TB) int {
	t.Helper()
	cmd := exec.Command("sleep", sleepFor)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop(cmd) })
	return cmd.Process.Pid
}

func stop(cmd *exec.Cmd) {
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
}

func (c *Cgroups) mkdir(dir string) {
	c.t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		c.t.Fatal(err)
	}
	c.made = append(c.made, dir)
}

// cleanup kills the processes, then removes the cgroups deepest first.
func (c *Cgroups) cleanup() {
	for pid, cmd := range c.procs {
		stop(cmd)
		delete(c.procs, pid)
	}
	for i := len(c.made) - 1; i >= 0; i-- {
		// A process just killed can keep its cgroup busy for a moment.
		var err error
		for range 100 {
			if err = syscall.Rmdir(c.made[i]); err != syscall.EBUSY {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			c.t.Errorf("cgroup %s left behind: %v", c.made[i], err)
		}
	}
	c.made = nil
}

func skipUnlessCI(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s (CI=true: this test must run)", why)
	}
	t.Skip(why)
}

// v1Hierarchy returns a mounted cgroup v1 hierarchy: the host's pids or
// cpu controller, or on a host without v1 controllers (cgroup v2 only) a
// named hierarchy of the test's own, with no controller.
func v1Hierarchy(t testing.TB) string {
	const cgroupSuperMagic = 0x27e0eb
	for _, dir := range []string{"/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"} {
		var st syscall.Statfs_t
		if syscall.Statfs(dir, &st) == nil && st.Type == cgroupSuperMagic {
			return dir
		}
	}
	// A name of its own: tests running at once must not share (and
	// unmount) one hierarchy.
	return namedV1Hierarchy(t, "podusage-test-"+RandomHex(t, 4))
}

// namedV1Hierarchy mounts a cgroup v1 hierarchy with no controller. An
// unmounted hierarchy goes within milliseconds, unless removed child
// cgroups were still being released when it was unmounted: then the
// kernel keeps it, listed in every /proc/<pid>/cgroup, until it is
// mounted again and unmounted with no children.
func namedV1Hierarchy(t testing.TB, name string) string {
	listed := func() bool {
		own, _ := os.ReadFile("/proc/self/cgroup")
		return strings.Contains(string(own), ":name="+name+":")
	}
	t.Cleanup(func() { // runs after mountCgroup's unmount
		for range 5 {
			for range 50 {
				if !listed() {
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
			dir, err := os.MkdirTemp("", "podusage-cgroup")
			if err != nil {
				break
			}
			if syscall.Mount("none", dir, "cgroup", 0, "none,name="+name) == nil {
				syscall.Unmount(dir, 0)
			}
			os.Remove(dir)
		}
		t.Errorf("cgroup v1 hierarchy name=%s left behind", name)
	})
	return mountCgroup(t, "cgroup", "none,name="+name)
}

// mountCgroup mounts a cgroup filesystem on a temp dir until the test ends.
func mountCgroup(t testing.TB, fstype, data string) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("none", dir, fstype, 0, data); err != nil {
		skipUnlessCI(t, fmt.Sprintf("cannot mount %s (%q) at %s: %v", fstype, data, dir, err))
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// RandomHex is n random bytes in hex.
func RandomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// RandomPodUID is a random pod UID in the API server's form.
func RandomPodUID(t testing.TB) string {
	t.Helper()
	h := RandomHex(t, 16)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// RandomContainerID is a random 64-hex container runtime ID.
func RandomContainerID(t testing.TB) string {
	t.Helper()
	return RandomHex(t, 32)
}
