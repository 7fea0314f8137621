// Package podusage attributes GPU processes to the pods and containers
// they run in.
//
// A process's pod and container are read from its cgroup path
// (/proc/<pid>/cgroup), where the kubelet and the container runtime name
// them; see ParseCgroup and Resolver.
package podusage

import "bytes"

// Owner is the pod, and the container in it, that a process runs in.
type Owner struct {
	// PodUID is the pod's UID in canonical form
	// ("1b3f0f5e-6c3a-4c2e-9d7e-2b8a5c7d9e10"), as the API server reports it;
	// a static pod's is 32 hex digits.
	PodUID string
	// ContainerID is the container's 64-hex runtime ID, without a
	// "containerd://" scheme. It is "" for a process that sits in the pod's
	// cgroup but in no container's, and for CRI-O's conmon, which watches a
	// container but is not its workload.
	ContainerID string
}

// ParseCgroup reads the content of a /proc/<pid>/cgroup file and finds the
// pod and container the process runs in; ok is false for a process in no
// pod. The work is linear in len(data); the caller bounds the read.
//
// Every line is looked at ("hierarchy:controllers:path"), so cgroup v2
// ("0::path"), v1 and hybrid files all work; a line naming a container
// wins over one naming only the pod. Within a path the pod and container
// are matched anywhere, not from the root, so paths seen through a cgroup
// namespace ("/../../kubepods-…") or nested under another manager
// (kind's "/kubelet.slice/kubelet-kubepods.slice/…") resolve too. These
// layouts are recognised:
//
//	systemd driver: …/kubepods-burstable-pod<uid with '_'>.slice/cri-containerd-<id>.scope
//	                (also kubepods-besteffort-pod…, and kubepods-pod… for Guaranteed pods;
//	                 crio-<id>.scope, docker-<id>.scope)
//	cgroupfs driver: …/kubepods/burstable/pod<uid>/<id>  (and …/kubepods/pod<uid>/<id>)
//	mixed drivers:   …/kubepods-burstable-pod<uid with '_'>.slice:cri-containerd:<id>
//
// The pod is the last component naming one (a kubelet nested in a pod, as
// kind in a pod, makes the innermost pod the owner); the container is the
// first container component after it (a container's own sub-cgroups
// follow it). A pod UID must have the UUID shape after '_' becomes '-':
// static pods, whose UIDs are 32 hex digits without dashes, are not
// recognised. CRI-O's crio-conmon-<id>.scope yields the pod with no
// container: conmon is charged to the pod but runs no workload.
func ParseCgroup(data []byte) (Owner, bool) {
	var podOnly Owner
	found := false
	for len(data) > 0 {
		var line []byte
		line, data, _ = bytes.Cut(data, []byte("\n"))
		o, ok := parseLine(line)
		switch {
		case !ok:
		case o.ContainerID != "":
			return o, true
		case !found:
			podOnly, found = o, true
		}
	}
	return podOnly, found
}

// parseLine reads one "hierarchy-ID:controllers:path" line.
func parseLine(line []byte) (Owner, bool) {
	_, rest, ok := bytes.Cut(line, []byte(":"))
	if !ok {
		return Owner{}, false
	}
	_, path, ok := bytes.Cut(rest, []byte(":"))
	if !ok {
		return Owner{}, false
	}
	// cgroup v2 marks a removed cgroup (a zombie's) this way; the names still hold.
	path = bytes.TrimSuffix(path, []byte(" (deleted)"))

	var uid string
	var afterPod []byte // the components after the last pod component
	found := false
	for rest := path; len(rest) > 0; {
		var comp []byte
		comp, rest = nextComponent(rest)
		if u, ok := podUID(comp); ok {
			uid, afterPod, found = u, rest, true
		}
	}
	if !found {
		return Owner{}, false
	}
	o := Owner{PodUID: uid}
	for len(afterPod) > 0 {
		var comp []byte
		comp, afterPod = nextComponent(afterPod)
		id, conmon := runtimeID(comp)
		if conmon {
			break
		}
		if id != nil {
			o.ContainerID = string(id)
			break
		}
	}
	return o, true
}

// nextComponent splits a cgroup path at its first '/' or ':'. A ':' joins
// "<pod slice>:cri-containerd:<id>", the systemd-style name a kubelet on
// the systemd driver passes, which a runtime on the cgroupfs driver then
// uses verbatim as one directory, e.g.
// "/system.slice/containerd.service/kubepods-…-pod<uid>.slice:cri-containerd:<id>".
func nextComponent(path []byte) (comp, rest []byte) {
	i := bytes.IndexAny(path, "/:")
	if i < 0 {
		return path, nil
	}
	return path[:i], path[i+1:]
}

// podUID reads the UID from a pod's cgroup name: "pod<uid>" (cgroupfs) or
// "<parent>-pod<uid with '_'>.slice" (systemd). A UID is a UUID, or for a
// static pod the kubelet's 32-hex hash of its manifest.
func podUID(comp []byte) (string, bool) {
	comp = bytes.TrimSuffix(comp, []byte(".slice"))
	for _, size := range []int{36, 32} {
		n := len(comp) - size
		if n < 3 || string(comp[n-3:n]) != "pod" || (n > 3 && comp[n-4] != '-') {
			continue
		}
		if uid, ok := canonicalUID(comp[n:]); ok {
			return uid, true
		}
	}
	return "", false
}

// canonicalUID checks a 36-byte UUID (systemd's '_' turned back into
// '-') or a 32-hex static pod UID.
func canonicalUID(b []byte) (string, bool) {
	out := make([]byte, len(b))
	for i, c := range b {
		switch {
		case len(b) == 36 && (i == 8 || i == 13 || i == 18 || i == 23):
			if c != '-' && c != '_' {
				return "", false
			}
			c = '-' // kubelet's systemd names carry '_' for '-'
		case !isHex(c):
			return "", false
		}
		out[i] = c
	}
	return string(out), true
}

// runtimeID reads a container ID from a container's cgroup name, or
// reports CRI-O's conmon scope; id is nil for any other name.
func runtimeID(comp []byte) (id []byte, conmon bool) {
	comp = bytes.TrimSuffix(comp, []byte(".scope"))
	if bytes.HasPrefix(comp, []byte("crio-conmon-")) {
		return nil, true
	}
	// The systemd driver's scopes (and CRI-O's cgroupfs names, without
	// ".scope"); containerd and Docker under cgroupfs use the bare ID.
	for _, p := range [...]string{"cri-containerd-", "crio-", "docker-"} {
		if bytes.HasPrefix(comp, []byte(p)) {
			comp = comp[len(p):]
			break
		}
	}
	if len(comp) != 64 {
		return nil, false
	}
	for _, c := range comp {
		if !isHex(c) {
			return nil, false
		}
	}
	return comp, false
}

// isHex accepts lowercase hex only: UIDs and runtime IDs are written
// that way, and the API server reports them so.
func isHex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' }
