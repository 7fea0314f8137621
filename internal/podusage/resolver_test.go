package podusage

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// fakeProc is a procRoot in a temp dir: <pid>/stat and <pid>/cgroup
// files written by the test.
type fakeProc struct {
	t    testing.TB
	root string
}

func newFakeProc(t testing.TB) fakeProc { return fakeProc{t, t.TempDir()} }

func (p fakeProc) file(pid uint32, name string) string {
	return filepath.Join(p.root, strconv.FormatUint(uint64(pid), 10), name)
}

// set writes both files of a process.
func (p fakeProc) set(pid uint32, comm string, start uint64, cgroup string) {
	p.t.Helper()
	if err := os.MkdirAll(filepath.Dir(p.file(pid, "stat")), 0o755); err != nil {
		p.t.Fatal(err)
	}
	p.write(pid, "stat", statLine(pid, comm, start))
	p.write(pid, "cgroup", cgroup)
}

func (p fakeProc) write(pid uint32, name, content string) {
	p.t.Helper()
	if err := os.WriteFile(p.file(pid, name), []byte(content), 0o644); err != nil {
		p.t.Fatal(err)
	}
}

// statLine is a /proc/<pid>/stat line whose field 22 is start. The other
// numeric fields are 1000+their number, so reading a neighbour by mistake
// gives a wrong, recognisable value.
func statLine(pid uint32, comm string, start uint64) string {
	fields := make([]string, 50) // fields 3 to 52
	for i := range fields {
		fields[i] = strconv.Itoa(1000 + i + 3)
	}
	fields[0] = "S"
	fields[22-3] = strconv.FormatUint(start, 10)
	return fmt.Sprintf("%d (%s) %s\n", pid, comm, strings.Join(fields, " "))
}

func systemdCgroup(uid, cid string) string {
	return "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + strings.ReplaceAll(uid, "-", "_") +
		".slice/cri-containerd-" + cid + ".scope\n"
}

const otherUID = "b432e500-bc78-47f4-8e0f-414fd4ffbc88"

func TestParseStartTime(t *testing.T) {
	for _, tc := range []struct {
		name string
		stat string
		want uint64
		ok   bool
	}{
		{"real line", "29269 (cat) R 29248 29248 28407 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 4717758 3133440 405 18446744073709551615 94272400068608\n", 4717758, true},
		{"plain comm", statLine(7, "python3", 42), 42, true},
		{"comm with ') ('", statLine(7, "a) (b", 42), 42, true},
		{"comm that looks like fields", statLine(7, "x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 (", 42), 42, true},
		{"comm of one ')'", statLine(7, ")", 42), 42, true},
		{"comm with spaces", statLine(7, "nv worker 1", 42), 42, true},
		{"field 22 last, with newline", "1 (x) S 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 99\n", 99, true},
		{"only 21 fields", "1 (x) S 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21\n", 0, false},
		{"no ')'", "1 x S 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 99\n", 0, false},
		{"field 22 not a number", strings.Replace(statLine(7, "x", 42), " 42 ", " 4x2 ", 1), 0, false},
		{"field 22 negative", strings.Replace(statLine(7, "x", 42), " 42 ", " -42 ", 1), 0, false},
		{"field 22 overflows", strings.Replace(statLine(7, "x", 42), " 42 ", " 99999999999999999999 ", 1), 0, false},
		{"empty", "", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := parseStartTime([]byte(tc.stat))
			if got != tc.want || ok != tc.ok {
				t.Errorf("parseStartTime(%q) = %d, %v; want %d, %v", tc.stat, got, ok, tc.want, tc.ok)
			}
		})
	}
}

// TestLookupCache: a process is resolved once while its start time holds
// (even with a comm that has ") (" in it), and afresh when the PID is
// reused.
func TestLookupCache(t *testing.T) {
	p := newFakeProc(t)
	r := NewResolver(p.root)
	const pid = 4100
	const comm = "nv) (worker 1"
	first := Owner{testUID, testCID}
	p.set(pid, comm, 5000, systemdCgroup(testUID, testCID))

	steps := []struct {
		name   string
		change func()
		want   Owner
	}{
		{"first lookup reads the cgroup", func() {}, first},
		{"cgroup changed, same process: cached answer",
			func() { p.write(pid, "cgroup", systemdCgroup(otherUID, otherCID)) }, first},
		{"cgroup file gone, same process: a hit reads stat alone",
			func() { os.Remove(p.file(pid, "cgroup")) }, first},
		{"PID reused (new start time): read afresh",
			func() { p.set(pid, comm, 6000, systemdCgroup(otherUID, otherCID)) }, Owner{otherUID, otherCID}},
	}
	for _, s := range steps {
		s.change()
		got, err := r.Lookup(pid)
		if err != nil || got != s.want {
			t.Fatalf("%s: Lookup = %+v, %v; want %+v", s.name, got, err, s.want)
		}
		if r.Len() != 1 {
			t.Fatalf("%s: Len = %d, want 1", s.name, r.Len())
		}
	}
}

func TestLookupExited(t *testing.T) {
	p := newFakeProc(t)
	r := NewResolver(p.root)

	_, err := r.Lookup(4200)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("never existed: err = %v, want fs.ErrNotExist", err)
	}
	if !strings.Contains(err.Error(), "pid 4200") || !strings.Contains(err.Error(), p.file(4200, "")) {
		t.Errorf("error %q does not name the pid and file", err)
	}

	// Exited after NVML listed it but before its cgroup was read.
	p.set(4201, "x", 10, systemdCgroup(testUID, testCID))
	os.Remove(p.file(4201, "cgroup"))
	if _, err := r.Lookup(4201); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), p.file(4201, "cgroup")) {
		t.Fatalf("stat but no cgroup: err = %v, want fs.ErrNotExist naming the cgroup file", err)
	}

	// Exited while cached: the entry goes at once.
	p.set(4202, "x", 10, systemdCgroup(testUID, testCID))
	if _, err := r.Lookup(4202); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Dir(p.file(4202, "stat")))
	if _, err := r.Lookup(4202); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("exited while cached: err = %v, want fs.ErrNotExist", err)
	}
	if r.Len() != 0 {
		t.Errorf("Len = %d after every process exited, want 0", r.Len())
	}
}

func TestLookupNotInPod(t *testing.T) {
	p := newFakeProc(t)
	r := NewResolver(p.root)
	const pid = 4300
	p.set(pid, "sshd", 10, "0::/system.slice/sshd.service\n")

	_, err := r.Lookup(pid)
	if !errors.Is(err, ErrNotInPod) || errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v, want ErrNotInPod", err)
	}
	if !strings.Contains(err.Error(), "pid 4300") || !strings.Contains(err.Error(), p.file(pid, "cgroup")) {
		t.Errorf("error %q does not name the pid and file", err)
	}
	// Cached: the same process keeps its answer.
	p.write(pid, "cgroup", systemdCgroup(testUID, testCID))
	if _, err := r.Lookup(pid); !errors.Is(err, ErrNotInPod) || r.Len() != 1 {
		t.Fatalf("second lookup: err = %v, Len = %d; want cached ErrNotInPod", err, r.Len())
	}
	// A new process on the PID is read afresh.
	p.set(pid, "python", 11, systemdCgroup(testUID, testCID))
	if got, err := r.Lookup(pid); err != nil || got != (Owner{testUID, testCID}) {
		t.Fatalf("after PID reuse: Lookup = %+v, %v", got, err)
	}
}

func TestLookupBadStat(t *testing.T) {
	p := newFakeProc(t)
	r := NewResolver(p.root)
	const pid = 4400
	p.set(pid, "x", 10, systemdCgroup(testUID, testCID))
	p.write(pid, "stat", "4400 (x) S 1 2 3\n")

	_, err := r.Lookup(pid)
	if err == nil || errors.Is(err, fs.ErrNotExist) || errors.Is(err, ErrNotInPod) {
		t.Fatalf("err = %v, want a malformed-stat error", err)
	}
	if !strings.Contains(err.Error(), "pid 4400") || !strings.Contains(err.Error(), p.file(pid, "stat")) {
		t.Errorf("error %q does not name the pid and file", err)
	}
	if r.Len() != 0 {
		t.Errorf("Len = %d, want 0: a failed lookup is not cached", r.Len())
	}
}

func TestSweep(t *testing.T) {
	p := newFakeProc(t)
	r := NewResolver(p.root)
	for pid := uint32(1); pid <= 3; pid++ {
		p.set(pid, "x", 10, systemdCgroup(testUID, testCID))
		if _, err := r.Lookup(pid); err != nil {
			t.Fatal(err)
		}
	}
	lookup := func(pid uint32) Owner {
		t.Helper()
		o, err := r.Lookup(pid)
		if err != nil {
			t.Fatal(err)
		}
		return o
	}

	steps := []struct {
		name    string
		round   []uint32 // looked up before the Sweep
		keep    func(uint32) bool
		wantLen int
	}{
		{"all three looked up in the round", nil, nil, 3},
		{"only pid 1 looked up", []uint32{1}, nil, 1},
		{"none looked up, keep holds pid 1", nil, func(pid uint32) bool { return pid == 1 }, 1},
		{"none looked up", nil, nil, 0},
	}
	for _, s := range steps {
		for _, pid := range s.round {
			lookup(pid)
		}
		r.Sweep(s.keep)
		if r.Len() != s.wantLen {
			t.Fatalf("%s: Len = %d after Sweep, want %d", s.name, r.Len(), s.wantLen)
		}
	}

	// A swept process is read afresh: its changed cgroup is seen.
	p.write(2, "cgroup", systemdCgroup(otherUID, otherCID))
	if got := lookup(2); got != (Owner{otherUID, otherCID}) {
		t.Errorf("after Sweep dropped pid 2: Lookup = %+v, want the new cgroup's owner", got)
	}

	// The bound: with a Sweep per round, rounds of fresh PIDs never
	// leave more than one round's worth cached.
	r.Sweep(nil)
	r.Sweep(nil)
	for round := uint32(0); round < 5; round++ {
		for i := uint32(0); i < 20; i++ {
			pid := 1000 + round*20 + i
			p.set(pid, "x", 10, systemdCgroup(testUID, testCID))
			lookup(pid)
		}
		r.Sweep(nil)
		if r.Len() > 20 {
			t.Fatalf("round %d: Len = %d after Sweep, want at most 20", round, r.Len())
		}
	}
}

func BenchmarkLookupCached(b *testing.B) {
	p := newFakeProc(b)
	r := NewResolver(p.root)
	const n = 100
	for pid := uint32(1); pid <= n; pid++ {
		p.set(pid, "python3", 5000+uint64(pid), systemdCgroup(testUID, testCID))
		if _, err := r.Lookup(pid); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	pid := uint32(0)
	for b.Loop() {
		if _, err := r.Lookup(pid%n + 1); err != nil {
			b.Fatal(err)
		}
		pid++
	}
}

// The tests below put a real process into real kubelet-style cgroups
// (internal/testkit) and resolve it through the real /proc. They need
// root; a machine that cannot run them skips them, except under CI=true,
// where they must run.

func TestLookupRealCgroupV1(t *testing.T) {
	cg := testkit.PodCgroups(t, testkit.Cgroupfs)
	uid, cid := testkit.RandomPodUID(t), testkit.RandomContainerID(t)
	pid := cg.Add(uid, cid)
	checkLookup(t, uint32(pid), Owner{uid, cid})
}

func TestLookupRealCgroupV2(t *testing.T) {
	cg := testkit.PodCgroups(t, testkit.Systemd)
	uid, cid := testkit.RandomPodUID(t), testkit.RandomContainerID(t)
	pid := cg.AddQoS(testkit.BestEffort, uid, cid)
	checkLookup(t, uint32(pid), Owner{uid, cid})
}

func checkLookup(t *testing.T, pid uint32, want Owner) {
	t.Helper()
	content, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("/proc/%d/cgroup:\n%s", pid, content)
	r := NewResolver("/proc")
	for i := range 2 { // a miss, then a hit
		if got, err := r.Lookup(pid); err != nil || got != want {
			t.Fatalf("lookup %d: Lookup(%d) = %+v, %v; want %+v", i+1, pid, got, err, want)
		}
	}
}
