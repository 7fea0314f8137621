package dra

import (
	"context"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/kube"
)

// Device taints for unhealthy devices. xid and gpu-lost are NVIDIA's DRA
// driver's keys; it has none for the other reasons (quarantine, ECC, …),
// which get ours, unhealthy. NVIDIA's unmonitored (a device its health
// checks do not watch) is not set.
const (
	TaintXID       = DriverName + "/xid"
	TaintGPULost   = DriverName + "/gpu-lost"
	TaintUnhealthy = DriverName + "/unhealthy"
)

// publishState is what the publisher last wrote, so that an unchanged
// slice is not written again (the API server rewrites quantities, so what
// it stores is not compared with what is wanted).
type publishState struct {
	written *kube.ResourceSliceSpec // the spec last written, as sent
	stored  string                  // name/resourceVersion the server answered
	owner   *kube.OwnerReference
}

var xidInReason = regexp.MustCompile(`\bXID (\d+)\b`)

// taintFor is the taint of an unhealthy device, from its health reason.
func taintFor(reason string) kube.DeviceTaint {
	switch {
	case strings.HasPrefix(reason, "lost"):
		return kube.DeviceTaint{Key: TaintGPULost, Effect: kube.TaintEffectNoSchedule}
	case xidInReason.MatchString(reason):
		return kube.DeviceTaint{Key: TaintXID, Value: xidInReason.FindStringSubmatch(reason)[1], Effect: kube.TaintEffectNoSchedule}
	}
	return kube.DeviceTaint{Key: TaintUnhealthy, Effect: kube.TaintEffectNoSchedule}
}

// desired is the slice's device list now: every offered device, an
// unhealthy one tainted, or left out where the API server drops taints.
func (d *Driver) desired(now time.Time) []kube.SliceDevice {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]kube.SliceDevice, 0, len(d.devices))
	live := map[string]bool{}
	for _, dev := range d.devices {
		sd := dev.slice
		if ok, why := d.healthy(dev); !ok {
			if d.taintsDropped {
				continue
			}
			t := taintFor(why)
			since, seen := d.taintSince[dev.name+"\x00"+t.Key+"="+t.Value]
			if !seen {
				since = now
				d.taintSince[dev.name+"\x00"+t.Key+"="+t.Value] = since
			}
			live[dev.name+"\x00"+t.Key+"="+t.Value] = true
			at := kube.NewTime(since)
			t.TimeAdded = &at
			sd.Taints = []kube.DeviceTaint{t}
		}
		out = append(out, sd)
	}
	for k := range d.taintSince {
		if !live[k] {
			delete(d.taintSince, k)
		}
	}
	return out
}

// publishLoop keeps the node's slice as desired until ctx ends: after a
// change of devices or health, a change to the slices by someone else
// (the kubelet deletes a driver's slices when it deregisters), and again
// after a failure, with backoff. It starts once Options.PublishAfter is
// closed.
func (d *Driver) publishLoop(ctx context.Context) {
	if gate := d.opts.PublishAfter; gate != nil {
		select {
		case <-ctx.Done():
			return
		case <-gate:
		}
	}
	wait := time.Duration(0)
	var healthCh <-chan struct{}
	for {
		kick := d.kick.C()
		if d.opts.Health != nil {
			healthCh = d.opts.Health.Changed()
		}
		err := d.publish(ctx)
		switch {
		case err == nil:
			wait = 0
		case ctx.Err() != nil:
			return
		default:
			wait = min(max(2*wait, time.Second), 30*time.Second)
			d.log.Warn("cannot publish the DRA ResourceSlice; retrying", "err", err, "retryIn", wait)
		}
		var retry <-chan time.Time
		var t *time.Timer
		if wait > 0 {
			t = time.NewTimer(wait)
			retry = t.C
		}
		select {
		case <-ctx.Done():
		case <-kick:
		case <-healthCh:
		case <-retry:
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// publish makes the API server's slices of this driver on this node one
// slice holding the desired devices (none: no slice).
func (d *Driver) publish(ctx context.Context) error {
	devs := d.desired(time.Now())
	node := d.opts.NodeName
	existing, err := d.opts.API.ListResourceSlices(ctx, DriverName, node)
	if err != nil {
		d.setPublishErr(err)
		return err
	}
	slices.SortFunc(existing, func(a, b kube.ResourceSlice) int { return cmpStrings(a.Name, b.Name) })
	var keep *kube.ResourceSlice
	var gen int64
	for i := range existing {
		gen = max(gen, existing[i].Spec.Pool.Generation)
		if keep == nil && existing[i].Spec.Pool.Name == node && len(devs) > 0 {
			keep = &existing[i]
		}
	}
	spec := kube.ResourceSliceSpec{Driver: DriverName, NodeName: node, Devices: devs,
		Pool: kube.ResourcePool{Name: node, Generation: gen, ResourceSliceCount: 1}}
	wrote := false
	if keep != nil {
		spec.Pool.Generation = keep.Spec.Pool.Generation
		if d.pub.stored != keep.Name+"/"+keep.ResourceVersion || !reflect.DeepEqual(d.pub.written, &spec) {
			// The pool's generation grows with every change, so the
			// scheduler never mixes an old slice with a new one.
			spec.Pool.Generation = gen + 1
			next := *keep
			next.Spec = spec
			stored, err := d.opts.API.UpdateResourceSlice(ctx, &next)
			if err != nil {
				d.setPublishErr(err)
				return err
			}
			d.stored(&spec, stored)
			wrote = true
		}
	} else if len(devs) > 0 {
		spec.Pool.Generation = gen + 1
		s := &kube.ResourceSlice{ObjectMeta: kube.ObjectMeta{GenerateName: node + "-" + DriverName + "-"}, Spec: spec}
		if owner := d.nodeOwner(ctx); owner != nil {
			s.OwnerReferences = []kube.OwnerReference{*owner}
		}
		stored, err := d.opts.API.CreateResourceSlice(ctx, s)
		if err != nil {
			d.setPublishErr(err)
			return err
		}
		d.stored(&spec, stored)
		keep, wrote = stored, true
	}
	for _, s := range existing {
		if keep != nil && s.Name == keep.Name {
			continue
		}
		if err := d.opts.API.DeleteResourceSlice(ctx, s.Name, s.UID); err != nil {
			d.setPublishErr(err)
			return err
		}
		wrote = true
	}
	if keep == nil {
		d.pub = publishState{owner: d.pub.owner}
	}
	if wrote {
		name, gen := "", int64(0)
		if keep != nil {
			name, gen = keep.Name, spec.Pool.Generation
		}
		d.mu.Lock()
		d.status.LastPublish, d.status.PublishErr, d.status.Publishes = time.Now(), "", d.status.Publishes+1
		d.status.Slice, d.status.Generation = name, gen
		d.mu.Unlock()
		d.log.Debug("DRA ResourceSlice published", "slice", name, "devices", len(devs), "generation", gen)
	}
	return nil
}

// stored records a write, and notices an API server that dropped the
// device taints it was sent.
func (d *Driver) stored(spec *kube.ResourceSliceSpec, s *kube.ResourceSlice) {
	d.pub.written = spec
	d.pub.stored = s.Name + "/" + s.ResourceVersion
	d.mu.Lock()
	d.lastStored = d.pub.stored
	d.mu.Unlock()
	sent := 0
	for _, dev := range spec.Devices {
		sent += len(dev.Taints)
	}
	kept := 0
	for _, dev := range s.Spec.Devices {
		kept += len(dev.Taints)
	}
	if sent > 0 && kept == 0 {
		d.mu.Lock()
		d.taintsDropped = true
		d.mu.Unlock()
		d.log.Warn("the API server dropped the DRA device taints (feature gate DRADeviceTaints off): unhealthy devices are left out of the ResourceSlice instead")
		d.kick.Notify()
	}
}

func (d *Driver) setPublishErr(err error) {
	d.mu.Lock()
	d.status.PublishErr = err.Error()
	d.mu.Unlock()
}

// nodeOwner makes the Node the slice's owner, so that the slice goes with
// the Node; nil (no owner) when the Node cannot be read.
func (d *Driver) nodeOwner(ctx context.Context) *kube.OwnerReference {
	if d.pub.owner != nil {
		return d.pub.owner
	}
	n, err := d.opts.API.GetNode(ctx, d.opts.NodeName)
	if err != nil {
		d.log.Warn("cannot read the node to own the DRA ResourceSlice; it is published without an owner", "err", err)
		return nil
	}
	t := true
	d.pub.owner = &kube.OwnerReference{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID, Controller: &t}
	return d.pub.owner
}
