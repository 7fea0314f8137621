package podusage

import (
	"cmp"
	"errors"
	"io/fs"
	"log/slog"
	"slices"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// Options configure an Accountant.
type Options struct {
	// Resolver finds the pod and container of a PID.
	Resolver *Resolver
	// Holders returns who was allocated each device (pod-resources).
	Holders func() *podresources.Snapshot
	// Directory names the node's pods by UID.
	Directory *Directory
	Logger    *slog.Logger
}

// Accountant attributes each round's GPU processes to pods: a process
// counts for a pod only if its cgroup names that pod and the kubelet
// allocated the pod the device; anything else is unattributed. It
// implements telemetry.Attributor and is used from the sampling loop
// alone.
type Accountant struct {
	opts Options
	log  *slog.Logger
	// reported are the unattributed PIDs already logged, so each is
	// logged once while it runs.
	reported map[uint32]bool
	seen     map[uint32]bool // PIDs of this round
}

// NewAccountant builds an Accountant.
func NewAccountant(opts Options) *Accountant {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Accountant{opts: opts, log: opts.Logger, reported: map[uint32]bool{}, seen: map[uint32]bool{}}
}

// podKey is one container's entry on one device.
type podKey struct{ namespace, pod, container string }

// Attribute implements telemetry.Attributor.
func (a *Accountant) Attribute(snap *telemetry.Snapshot) *telemetry.Usage {
	var holders *podresources.Snapshot
	if a.opts.Holders != nil {
		holders = a.opts.Holders()
	}
	clear(a.seen)
	u := &telemetry.Usage{}
	for i := range snap.Layout.Targets {
		d := &snap.Devices[i]
		if !d.ProcsRead {
			continue // unknown this round: no series rather than zeros
		}
		a.attributeDevice(u, i, snap.Layout.Targets[i].Key, d, holders.Holders(snap.Layout.Targets[i].Key))
	}
	a.opts.Resolver.Sweep(func(pid uint32) bool { return a.seen[pid] })
	for pid := range a.reported {
		if !a.seen[pid] {
			delete(a.reported, pid)
		}
	}
	return u
}

func (a *Accountant) attributeDevice(u *telemetry.Usage, target int, key string, d *telemetry.DeviceSample, holders []podresources.Holder) {
	blank := telemetry.UnitUsage{Target: target, HasSMUtil: d.ProcUtil}
	var pods map[podKey]*telemetry.PodUsage
	un := blank
	for _, p := range d.Procs {
		a.seen[p.PID] = true
		owner, err := a.opts.Resolver.Lookup(p.PID)
		if errors.Is(err, fs.ErrNotExist) {
			continue // ended since NVML listed it
		}
		var pod *Pod
		if err == nil {
			pod, _ = a.opts.Directory.ByUID(owner.PodUID)
		}
		if pod == nil || !holds(holders, pod) {
			add(&un, p)
			a.report(key, p.PID, owner, pod, err)
			continue
		}
		k := podKey{pod.Namespace, pod.Name, pod.Containers[owner.ContainerID]}
		if k.container == "" {
			k.container = onlyContainer(holders, pod)
		}
		if pods == nil {
			pods = map[podKey]*telemetry.PodUsage{}
		}
		e := pods[k]
		if e == nil {
			e = &telemetry.PodUsage{UnitUsage: blank, Namespace: k.namespace, Pod: k.pod, PodUID: pod.UID, Container: k.container}
			pods[k] = e
		}
		add(&e.UnitUsage, p)
	}
	// Allocated containers that run nothing on the device read 0, so a
	// query over a Deployment's pods sees every pod.
	for _, h := range holders {
		k := podKey{h.Namespace, h.Pod, h.Container}
		if pods[k] != nil {
			continue
		}
		uid := ""
		if pod, ok := a.opts.Directory.ByName(h.Namespace, h.Pod); ok {
			if pod.Finished {
				continue
			}
			uid = pod.UID
		}
		if pods == nil {
			pods = map[podKey]*telemetry.PodUsage{}
		}
		pods[k] = &telemetry.PodUsage{UnitUsage: blank, Namespace: h.Namespace, Pod: h.Pod, PodUID: uid, Container: h.Container}
	}
	start := len(u.Pods)
	for _, e := range pods {
		u.Pods = append(u.Pods, *e)
	}
	slices.SortFunc(u.Pods[start:], func(x, y telemetry.PodUsage) int {
		return cmp.Or(cmp.Compare(x.Namespace, y.Namespace), cmp.Compare(x.Pod, y.Pod), cmp.Compare(x.Container, y.Container))
	})
	if un.Processes > 0 {
		u.Unattributed = append(u.Unattributed, un)
	}
}

func add(u *telemetry.UnitUsage, p telemetry.Process) {
	u.MemoryBytes += p.MemoryBytes
	u.SMUtil += p.SMUtil
	u.Processes++
}

// holds reports whether the kubelet allocated the device to pod.
func holds(holders []podresources.Holder, pod *Pod) bool {
	for _, h := range holders {
		if h.Namespace == pod.Namespace && h.Pod == pod.Name {
			return true
		}
	}
	return false
}

// onlyContainer names the container for a process whose container ID the
// directory does not know yet (a container that just started): the pod's
// one container holding the device, or "" if it has several.
func onlyContainer(holders []podresources.Holder, pod *Pod) string {
	name := ""
	for _, h := range holders {
		if h.Namespace != pod.Namespace || h.Pod != pod.Name {
			continue
		}
		if name != "" && name != h.Container {
			return ""
		}
		name = h.Container
	}
	return name
}

// report logs an unattributed process once while it runs: a GPU used
// outside the kubelet's allocations is worth knowing about, every round
// is not.
func (a *Accountant) report(key string, pid uint32, owner Owner, pod *Pod, err error) {
	if a.reported[pid] {
		return
	}
	a.reported[pid] = true
	switch {
	case errors.Is(err, ErrNotInPod):
		a.log.Info("GPU process outside any pod (a host process?); counted as unattributed", "device", key, "pid", pid)
	case err != nil:
		a.log.Warn("GPU process not attributable: its cgroup could not be read; counted as unattributed (is hostPID on?)", "device", key, "pid", pid, "err", err)
	case pod == nil && !a.opts.Directory.Synced():
		a.log.Debug("GPU process of a pod not listed yet; unattributed this round", "device", key, "pid", pid, "podUID", owner.PodUID)
	case pod == nil:
		a.log.Info("GPU process of a pod the API server does not list on this node; counted as unattributed", "device", key, "pid", pid, "podUID", owner.PodUID)
	default:
		a.log.Info("GPU process of a pod not allocated this device (NVIDIA_VISIBLE_DEVICES=all, or a privileged pod?); counted as unattributed",
			"device", key, "pid", pid, "namespace", pod.Namespace, "pod", pod.Name)
	}
	if pod == nil && !a.opts.Directory.Synced() {
		delete(a.reported, pid) // say it properly once the pods are listed
	}
}
