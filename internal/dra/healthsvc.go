package dra

import (
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
		var healthCh <-chan struct{}
		if h.d.opts.Health != nil {
			healthCh = h.d.opts.Health.Changed()
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
		case <-devices:
		case <-tick.C:
		}
	}
}

// healthList is the health of every offered device now.
func (d *Driver) healthList() *healthpb.NodeWatchResourcesResponse {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now().Unix()
	resp := &healthpb.NodeWatchResourcesResponse{}
	for _, dev := range d.devices {
		ok, why := d.healthy(dev)
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
