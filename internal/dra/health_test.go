package dra_test

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	healthpb "k8s.io/kubelet/pkg/apis/dra-health/v1"
	registerpb "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
)

func taintsOf(s *kube.ResourceSlice, name string) []kube.DeviceTaint {
	for _, d := range s.Spec.Devices {
		if d.Name == name {
			return d.Taints
		}
	}
	return nil
}

func hasDevice(s *kube.ResourceSlice, name string) bool {
	for _, d := range s.Spec.Devices {
		if d.Name == name {
			return true
		}
	}
	return false
}

func TestHealthTaints(t *testing.T) {
	r := newRig(t, "dgx-h100")
	g := r.inv.GPUs[2]
	dev := "gpu-" + itoa(int64(g.Minor))
	var s *kube.ResourceSlice
	waitFor(t, "the slice", func() bool { s = r.api.slice(); return s != nil })
	gen := s.Spec.Pool.Generation
	for _, tc := range []struct {
		reason       string
		key, value   string
		healthyAgain bool
	}{
		{reason: health.XIDReason(48), key: "gpu.nvidia.com/xid", value: "48"},
		{reason: health.XIDReason(79), key: "gpu.nvidia.com/gpu-lost"}, // XID 79: fallen off the bus
		{reason: "lost: GPU is lost", key: "gpu.nvidia.com/gpu-lost"},
		{reason: "recovery held: quiet period (was: XID 31 (page fault))", key: "gpu.nvidia.com/xid", value: "31"},
		{reason: health.ReasonQuarantined, key: "gpu.nvidia.com/unhealthy"},
		{healthyAgain: true},
	} {
		if tc.healthyAgain {
			r.health.SetHealthy(g.UUID, "recovered")
			waitFor(t, "the taint to go", func() bool {
				s = r.api.slice()
				return s != nil && len(taintsOf(s, dev)) == 0 && s.Spec.Pool.Generation > gen
			})
			continue
		}
		// A new reason on a unit already unhealthy changes no state (the
		// health table keeps it quietly): start each case healthy.
		r.health.SetHealthy(g.UUID, "test")
		waitFor(t, "no taint", func() bool { s = r.api.slice(); return s != nil && len(taintsOf(s, dev)) == 0 })
		r.health.SetUnhealthy(g.UUID, tc.reason)
		waitFor(t, "taint "+tc.key, func() bool {
			s = r.api.slice()
			ts := taintsOf(s, dev)
			return len(ts) == 1 && ts[0].Key == tc.key && ts[0].Value == tc.value
		})
		ts := taintsOf(s, dev)
		if ts[0].Value != tc.value || ts[0].Effect != "NoSchedule" || ts[0].TimeAdded == nil {
			t.Errorf("reason %q: taint %+v, want %s=%s:NoSchedule with a time", tc.reason, ts[0], tc.key, tc.value)
		}
		if s.Spec.Pool.Generation <= gen {
			t.Errorf("generation %d did not grow past %d", s.Spec.Pool.Generation, gen)
		}
		gen = s.Spec.Pool.Generation
		for _, d := range s.Spec.Devices {
			if d.Name != dev && len(d.Taints) > 0 {
				t.Errorf("healthy device %s tainted: %+v", d.Name, d.Taints)
			}
		}
	}

	// An API server that drops device taints: the sick device leaves the
	// slice instead, and comes back when it recovers.
	r.api.mu.Lock()
	r.api.dropTaints = true
	r.api.mu.Unlock()
	r.health.SetUnhealthy(g.UUID, health.XIDReason(79))
	waitFor(t, "the device to leave the slice", func() bool { s = r.api.slice(); return s != nil && !hasDevice(s, dev) && len(s.Spec.Devices) == 7 })
	if st := r.drv.Status(); st.TaintsViaAPI {
		t.Error("status still says device taints are used")
	}
	r.health.SetHealthy(g.UUID, "recovered")
	waitFor(t, "the device to come back", func() bool { s = r.api.slice(); return s != nil && hasDevice(s, dev) })
}

func TestMIGDevices(t *testing.T) {
	r := newRig(t, "dgx-a100-mig")
	var s *kube.ResourceSlice
	waitFor(t, "the slice", func() bool { s = r.api.slice(); return s != nil })
	if len(s.Spec.Devices) != len(r.units) || len(r.units) == 0 {
		t.Fatalf("%d devices, want the %d MIG devices", len(s.Spec.Devices), len(r.units))
	}
	g := r.inv.GPUs[0]
	m := g.MIGDevices[0]
	d := s.Spec.Devices[0]
	// NVIDIA's name: the 1g.5gb GPU instance's profile ID (19) and its
	// placement (the driver puts the first of seven at memory slice 6).
	if want := "gpu-" + itoa(int64(g.Minor)) + "-mig-19-6-1"; d.Name != want || m.Profile != "1g.5gb" {
		t.Errorf("MIG device (%s) named %s, want %s", m.Profile, d.Name, want)
	}
	if d.Capacity["memorySlice6"].Value != "1" || len(d.Capacity) != 8 {
		t.Errorf("capacity %v, want memory, SMs, five engine counts and memorySlice6", d.Capacity)
	}
	for name, v := range map[string]string{"type": "mig", "uuid": m.UUID, "parentUUID": g.UUID, "profile": m.Profile, "productName": g.Name, "architecture": "Ampere"} {
		if got := attr(d, name); got != v {
			t.Errorf("attribute %s = %q, want %q", name, got, v)
		}
	}
	if d.Capacity["memory"].Value != itoa(int64(m.MemoryBytes)) || (m.Attributes != nil && d.Capacity["multiprocessors"].Value != itoa(int64(m.Attributes.Multiprocessors))) {
		t.Errorf("capacity %v", d.Capacity)
	}
	// A parent GPU's fault taints each of its MIG devices.
	r.health.SetUnhealthy(g.UUID, health.XIDReason(79))
	waitFor(t, "the parent's MIG devices tainted", func() bool {
		s = r.api.slice()
		n := 0
		for _, d := range s.Spec.Devices {
			if attr(d, "parentUUID") == g.UUID && len(d.Taints) == 1 {
				n++
			}
		}
		return n == len(g.MIGDevices)
	})
	// And the claim spec of a MIG device carries its capability nodes.
	c := r.claim("mig", "uid-mig", d.Name)
	resp := r.prepare(c)["uid-mig"]
	if resp.Error != "" {
		t.Fatal(resp.Error)
	}
	oci, err := r.inject(resp.Devices[0].CdiDeviceIds...)
	if err != nil {
		t.Fatal(err)
	}
	nodes := strings.Join(deviceNodes(oci), " ")
	for _, p := range append([]string{"/dev/nvidia" + itoa(int64(g.Minor))}, m.CapDevicePaths...) {
		if !strings.Contains(nodes, p) {
			t.Errorf("MIG claim injects %s, missing %s", nodes, p)
		}
	}
}

// TestHealthStream: the DRA health service the kubelet watches lists every
// offered device's health, and a change is sent at once.
func TestHealthStream(t *testing.T) {
	r := newRig(t, "dgx-h100")
	info, err := registerpb.NewRegistrationClient(dial(t, r.drv.RegistrationSocket())).GetInfo(context.Background(), &registerpb.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(info.SupportedVersions, "v1.DRAResourceHealth") {
		t.Errorf("GetInfo lists %v, without the health service", info.SupportedVersions)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := healthpb.NewDRAResourceHealthClient(dial(t, r.drv.DRASocket())).NodeWatchResources(ctx, &healthpb.NodeWatchResourcesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Devices) != 8 {
		t.Fatalf("%d devices, want 8", len(first.Devices))
	}
	for _, d := range first.Devices {
		if d.Health != healthpb.HealthStatus_HEALTHY || d.Device.PoolName != node || d.HealthCheckTimeoutSeconds != 30 || d.LastUpdatedTime == 0 {
			t.Errorf("device %+v", d)
		}
	}
	g := r.inv.GPUs[6]
	dev := "gpu-" + itoa(int64(g.Minor))
	r.health.SetUnhealthy(g.UUID, health.XIDReason(48))
	for {
		next, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(next.Devices, func(d *healthpb.DeviceHealth) bool { return d.Device.DeviceName == dev })
		if i >= 0 && next.Devices[i].Health == healthpb.HealthStatus_UNHEALTHY {
			if !strings.Contains(next.Devices[i].Message, "XID 48") {
				t.Errorf("message %q, want the reason", next.Devices[i].Message)
			}
			break
		}
	}
	// Stopping the driver ends the stream (the kubelet reconnects to the
	// next daemon).
	r.stop()
	for {
		if _, err := stream.Recv(); err != nil {
			break
		}
	}
}

// TestMetrics: the plugin's state as metrics, as a scrape reads them.
func TestMetrics(t *testing.T) {
	r := newRig(t, "dgx-h100")
	waitFor(t, "the slice", func() bool { return r.api.slice() != nil })
	r.health.SetUnhealthy(r.inv.GPUs[0].UUID, health.XIDReason(48))
	r.prepare(r.claim("m", "uid-m", "gpu-"+itoa(int64(r.inv.GPUs[1].Minor))))
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(r.drv)
	waitFor(t, "the metrics", func() bool {
		got, err := testutil.GatherAndCount(reg)
		return err == nil && got == 6
	})
	want := `
# HELP gpu_plugin_dra_devices Devices offered through DRA in the node's ResourceSlice, by health (unhealthy ones carry a device taint, or are left out where the API server drops taints).
# TYPE gpu_plugin_dra_devices gauge
gpu_plugin_dra_devices{health="healthy"} 7
gpu_plugin_dra_devices{health="unhealthy"} 1
# HELP gpu_plugin_dra_prepared_claims ResourceClaims prepared on this node (in the checkpoint).
# TYPE gpu_plugin_dra_prepared_claims gauge
gpu_plugin_dra_prepared_claims 1
# HELP gpu_plugin_dra_slice_published 1 when the last attempt to publish the node's ResourceSlice succeeded; 0 while it fails (the reason is in /debug/devices and the log).
# TYPE gpu_plugin_dra_slice_published gauge
gpu_plugin_dra_slice_published 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "gpu_plugin_dra_devices", "gpu_plugin_dra_prepared_claims", "gpu_plugin_dra_slice_published"); err != nil {
		t.Error(err)
	}
}
