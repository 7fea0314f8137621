package dra

import (
	"fmt"
	"time"

	healthpb "k8s.io/kubelet/pkg/apis/dra-health/v1"
)

// Device health reaches the kubelet over the DRA health service (the
// kubelet shows it in the status of pods using the device) as well as the
// scheduler through device taints.
const (
	// healthResend is how often the full list is sent again without a
	// change, well within healthTimeout, after which the kubelet takes a
	// device's health as unknown.
	healthResend  = 10 * time.Second
	healthTimeout = 30 * time.Second
)

// healthService streams the offered devices' health.
type healthService struct {
	healthpb.UnimplementedDRAResourceHealthServer
	d *Driver
}

// NodeWatchResources sends every offered device's health at once, after
// each health or device change, and every healthResend, until the kubelet
// or the daemon ends the stream.
func (h *healthService) NodeWatchResources(_ *healthpb.NodeWatchResourcesRequest, stream healthpb.DRAResourceHealth_NodeWatchResourcesServer) error {
	ctx := stream.Context()
	tick := time.NewTicker(healthResend)
	defer tick.Stop()
	for {
		var healthCh, mpsCh <-chan struct{}
		if h.d.opts.Health != nil {
			healthCh = h.d.opts.Health.Changed()
		}
		if h.d.opts.MPSChanged != nil {
			mpsCh = h.d.opts.MPSChanged()
		}
		devices := h.d.devicesChanged.C()
		if err := stream.Send(h.d.healthList()); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-h.d.stopping:
			return nil
		case <-healthCh:
		case <-mpsCh:
		case <-devices:
		case <-tick.C:
		}
	}
}

// healthList is the health of every offered device now. A device of a
// claim shared through MPS is unhealthy while the claim's control daemon
// is down (its clients cannot start; the daemon restarts it): the kubelet
// shows that in the status of the claim's pods, as the device plugin marks
// its MPS replicas unhealthy. The slice is left alone: the device is
// allocated, and a taint would only keep it from claims it is not in.
func (d *Driver) healthList() *healthpb.NodeWatchResourcesResponse {
	mpsDown := d.mpsDown()
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now().Unix()
	resp := &healthpb.NodeWatchResourcesResponse{}
	for _, dev := range d.devices {
		ok, why := d.healthy(dev)
		if down, in := mpsDown[dev.name]; ok && in {
			ok, why = false, down
		}
		st := healthpb.HealthStatus_HEALTHY
		if !ok {
			st = healthpb.HealthStatus_UNHEALTHY
		}
		resp.Devices = append(resp.Devices, &healthpb.DeviceHealth{
			Device:                    &healthpb.DeviceIdentifier{PoolName: d.opts.NodeName, DeviceName: dev.name},
			Health:                    st,
			LastUpdatedTime:           now,
			HealthCheckTimeoutSeconds: int64(healthTimeout / time.Second),
			Message:                   why,
		})
	}
	return resp
}

// mpsDown maps the devices of MPS-shared claims whose control daemon is
// not ready to why. MPSReady is called without d.mu held.
func (d *Driver) mpsDown() map[string]string {
	if d.opts.MPSReady == nil {
		return nil
	}
	type mpsClaim struct {
		uid, ns, name string
		devices       []string
	}
	var claims []mpsClaim
	d.mu.Lock()
	for uid, c := range d.claims {
		if c.MPS != nil {
			claims = append(claims, mpsClaim{uid, c.Namespace, c.Name, deviceNames(c.Devices)})
		}
	}
	d.mu.Unlock()
	var out map[string]string
	for _, c := range claims {
		if d.opts.MPSReady(MPSResource(c.uid)) {
			continue
		}
		if out == nil {
			out = map[string]string{}
		}
		for _, dev := range c.devices {
			out[dev] = fmt.Sprintf("the MPS control daemon of claim %s/%s is not running; the daemon restarts it", c.ns, c.name)
		}
	}
	return out
}
