package podusage

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"syscall"
)

// ErrNotInPod is Lookup's error for a process whose cgroup names no pod:
// a host process, or one of a container outside Kubernetes.
var ErrNotInPod = errors.New("process is in no pod")

// maxRead bounds each file read. A cgroup file is a few hundred bytes (a
// v1 host with a dozen hierarchies, a few KiB); a longer one is cut at
// its last whole line.
const maxRead = 64 << 10

// atFDCWD is Linux's AT_FDCWD, which package syscall leaves unexported:
// openat with it opens a path like open.
const atFDCWD = -100

// Resolver finds the pod and container of host PIDs from
// <procRoot>/<pid>/cgroup, which the caller must be able to see (a
// daemon in the host PID namespace, hostPID: true).
//
// Answers are cached by process: by PID and the process's start time
// (field 22 of /proc/<pid>/stat), so a reused PID is resolved afresh and
// a cached lookup costs one read of the small stat file. A process moved
// to another cgroup after its first lookup keeps its first answer while
// it stays cached; kubelet-managed processes are placed before they run.
// Call Sweep once per round of lookups to bound the cache.
//
// A Resolver is for one goroutine at a time (the sampler calls it from
// its loop); it shares a read buffer between calls.
type Resolver struct {
	procRoot string
	cache    map[uint32]entry
	buf      []byte // maxRead bytes, reused by every read
}

type entry struct {
	start    uint64 // with the PID, names one process across PID reuse
	statPath string // <procRoot>/<pid>/stat, kept so a cached lookup builds no path
	owner    Owner
	err      error // nil, or ErrNotInPod wrapped with the pid
	seen     bool  // looked up since the last Sweep
}

// NewResolver returns a Resolver reading procRoot: "/proc" in production.
func NewResolver(procRoot string) *Resolver {
	return &Resolver{procRoot: procRoot, cache: map[uint32]entry{}, buf: make([]byte, maxRead)}
}

// Lookup returns the pod and container the process pid runs in. If the
// process is gone, the error satisfies errors.Is(err, fs.ErrNotExist); if
// it runs in no pod, errors.Is(err, ErrNotInPod). Owners and ErrNotInPod
// are cached, failures are not; errors name the pid and the file.
func (r *Resolver) Lookup(pid uint32) (Owner, error) {
	if e, ok := r.cache[pid]; ok {
		start, err := r.startTime(pid, atFDCWD, e.statPath, e.statPath)
		if err != nil {
			delete(r.cache, pid)
			return Owner{}, err
		}
		if start == e.start {
			e.seen = true
			r.cache[pid] = e
			return e.owner, e.err
		}
	}
	e, err := r.resolve(pid)
	if err != nil {
		delete(r.cache, pid)
		return Owner{}, err
	}
	r.cache[pid] = e
	return e.owner, e.err
}

// resolve reads a process's start time and cgroup afresh. Both files are
// opened through one descriptor of its /proc/<pid> directory, which stays
// bound to that process: should it exit and its PID be reused in between,
// the second open fails rather than read the newcomer's cgroup.
func (r *Resolver) resolve(pid uint32) (entry, error) {
	dirPath := r.procRoot + "/" + strconv.FormatUint(uint64(pid), 10)
	dir, err := syscall.Open(dirPath, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return entry{}, fileError(pid, "open", dirPath, err)
	}
	defer syscall.Close(dir)

	e := entry{statPath: dirPath + "/stat", seen: true}
	if e.start, err = r.startTime(pid, dir, "stat", e.statPath); err != nil {
		return entry{}, err
	}
	cgroup, err := r.readFile(pid, dir, "cgroup", dirPath+"/cgroup")
	if err != nil {
		return entry{}, err
	}
	if len(cgroup) == maxRead {
		cgroup = cgroup[:bytes.LastIndexByte(cgroup, '\n')+1]
	}
	var ok bool
	if e.owner, ok = ParseCgroup(cgroup); !ok {
		e.err = fmt.Errorf("pid %d: %w (%s/cgroup)", pid, ErrNotInPod, dirPath)
	}
	return e, nil
}

// startTime reads field 22 of a stat file: name is opened relative to the
// directory descriptor dir (atFDCWD: name is a path), path names it in
// errors.
func (r *Resolver) startTime(pid uint32, dir int, name, path string) (uint64, error) {
	stat, err := r.readFile(pid, dir, name, path)
	if err != nil {
		return 0, err
	}
	start, ok := parseStartTime(stat)
	if !ok {
		return 0, fmt.Errorf("pid %d: %s: no start time in field 22", pid, path)
	}
	return start, nil
}

// readFile reads up to maxRead bytes of a file into r.buf; see startTime
// for dir, name and path. The syscalls are used directly because a cached
// lookup is one such read, and os.File would add several allocations
// and syscalls to each.
func (r *Resolver) readFile(pid uint32, dir int, name, path string) ([]byte, error) {
	fd, err := syscall.Openat(dir, name, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fileError(pid, "open", path, err)
	}
	defer syscall.Close(fd)
	n := 0
	for n < len(r.buf) {
		m, err := syscall.Read(fd, r.buf[n:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return nil, fileError(pid, "read", path, err)
		}
		if m == 0 {
			break
		}
		n += m
	}
	return r.buf[:n], nil
}

// fileError names the pid and the file. ESRCH, which procfs returns when
// the process exits while its files are read, becomes ENOENT: either way
// the process is gone, and callers test for fs.ErrNotExist alone.
func fileError(pid uint32, op, path string, err error) error {
	if err == syscall.ESRCH {
		err = syscall.ENOENT
	}
	return fmt.Errorf("pid %d: %w", pid, &fs.PathError{Op: op, Path: path, Err: err})
}

// parseStartTime returns field 22 (starttime) of a /proc/<pid>/stat line.
// Field 2, the command name in parentheses, may itself hold spaces and
// parentheses, so fields are counted from the last ')'.
func parseStartTime(stat []byte) (uint64, bool) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	rest := stat[i+1:]
	for field := 3; ; field++ {
		rest = bytes.TrimLeft(rest, " ")
		tok, next, _ := bytes.Cut(rest, []byte(" "))
		if len(tok) == 0 {
			return 0, false
		}
		if field == 22 {
			return parseUint(bytes.TrimRight(tok, "\n"))
		}
		rest = next
	}
}

// parseUint parses decimal digits without the allocation of
// strconv.ParseUint(string(b), …).
func parseUint(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 19 { // 19 digits always fit in a uint64
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return v, true
}

// Sweep ends a round of lookups: it forgets every PID not looked up since
// the previous Sweep, unless keep (which may be nil) returns true for it.
// Called once per round, it bounds the cache to the PIDs looked up in the
// last round plus those keep holds, however many processes come and go.
func (r *Resolver) Sweep(keep func(pid uint32) bool) {
	for pid, e := range r.cache {
		switch {
		case e.seen:
			e.seen = false
			r.cache[pid] = e
		case keep == nil || !keep(pid):
			delete(r.cache, pid)
		}
	}
}

// Len is the number of processes cached.
func (r *Resolver) Len() int { return len(r.cache) }
