package testkit_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// TestPodCgroups: processes land in the kubelet's paths of each driver
// and QoS class, Kill ends one, and the end of the test leaves no
// process, cgroup or mount behind.
func TestPodCgroups(t *testing.T) {
	uid, cid := testkit.RandomPodUID(t), testkit.RandomContainerID(t)
	systemdUID := strings.ReplaceAll(uid, "-", "_")
	for _, tc := range []struct {
		driver testkit.CgroupDriver
		want   map[testkit.QoS]string // the container's cgroup under Dir
	}{
		{testkit.Cgroupfs, map[testkit.QoS]string{
			testkit.Guaranteed: "kubepods/pod" + uid + "/" + cid,
			testkit.Burstable:  "kubepods/burstable/pod" + uid + "/" + cid,
			testkit.BestEffort: "kubepods/besteffort/pod" + uid + "/" + cid,
		}},
		{testkit.Systemd, map[testkit.QoS]string{
			testkit.Guaranteed: "kubepods.slice/kubepods-pod" + systemdUID + ".slice/cri-containerd-" + cid + ".scope",
			testkit.Burstable: "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + systemdUID +
				".slice/cri-containerd-" + cid + ".scope",
			testkit.BestEffort: "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + systemdUID +
				".slice/cri-containerd-" + cid + ".scope",
		}},
	} {
		var dir string
		var pids []int
		ran := t.Run(string(tc.driver), func(t *testing.T) {
			cg := testkit.PodCgroups(t, tc.driver)
			dir = cg.Dir
			for _, qos := range []testkit.QoS{testkit.Guaranteed, testkit.Burstable, testkit.BestEffort} {
				// Two processes in one container, then one of them ends.
				a, b := cg.AddQoS(qos, uid, cid), cg.AddQoS(qos, uid, cid)
				pids = append(pids, a, b)
				want := "/" + filepath.Base(dir) + "/" + tc.want[qos]
				for _, pid := range []int{a, b} {
					if got := cgroupOf(t, pid, tc.driver); got != want {
						t.Errorf("%s pod: pid %d in %q, want %q", qos, pid, got, want)
					}
				}
				cg.Kill(a)
				if alive(a) {
					t.Errorf("pid %d alive after Kill", a)
				}
				if !alive(b) {
					t.Errorf("pid %d ended with pid %d", b, a)
				}
			}
			host := testkit.StartSleeper(t)
			pids = append(pids, host)
			if got := cgroupOf(t, host, tc.driver); strings.Contains(got, filepath.Base(dir)) {
				t.Errorf("StartSleeper's pid %d is in %q, one of the test's cgroups", host, got)
			}
		})
		if !ran || dir == "" {
			continue // skipped or failed before any cgroup was made
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %s left behind (%v)", tc.driver, dir, err)
		}
		for _, pid := range pids {
			if alive(pid) {
				t.Errorf("%s: pid %d left running", tc.driver, pid)
			}
		}
	}
}

// cgroupOf is a process's cgroup path in the driver's hierarchy, from
// /proc/<pid>/cgroup: the cgroup2 line for systemd, the first v1 line
// that is not "/" for cgroupfs (the test's processes are elsewhere at
// the root).
func cgroupOf(t *testing.T, pid int, driver testkit.CgroupDriver) string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		id, rest, _ := strings.Cut(line, ":")
		_, path, _ := strings.Cut(rest, ":")
		if (driver == testkit.Systemd) == (id == "0") && strings.Contains(path, "/podusage-test-") {
			return path
		}
	}
	return ""
}

// alive reports whether pid names a process (a zombie counts).
func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }
