package kubelet

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
)

// TestListAndWatchMessageLimit measures how many devices one ListAndWatch
// reply may carry before the real device manager drops it (its gRPC client
// receives with the default 4 MiB limit), with device IDs as long as the
// longest the daemon advertises: a replica of a GPU or MIG device,
// "GPU-<uuid>::<n>" with a 5-digit n, plus a NUMA node each. It binary
// searches the count with a bare plugin server (the daemon itself refuses
// such lists), and checks that config.MaxDevicesPerResource keeps a margin
// of at least a quarter below the measured limit.
//
// Measured (k8s.io/kubernetes v1.37.2, 2026-12): 63,437 devices get
// through, 63,906 do not (66 bytes per device on the wire); the bound's
// comment in internal/config/readfile.go records it.
func TestListAndWatchMessageLimit(t *testing.T) {
	k := startKubelet(t)
	fits := func(n int) bool {
		resource := fmt.Sprintf("example.com/limit%d", n)
		return serveDevices(t, k, resource, n)
	}
	lo, hi := config.MaxDevicesPerResource, 4*config.MaxDevicesPerResource
	if !fits(lo) {
		t.Fatalf("%d devices, the bound, do not reach the kubelet", lo)
	}
	if fits(hi) {
		t.Fatalf("%d devices reach the kubelet; the search needs a count that does not", hi)
	}
	for hi-lo > 500 {
		mid := (lo + hi) / 2
		if fits(mid) {
			lo = mid
		} else {
			hi = mid
		}
	}
	t.Logf("the kubelet takes a ListAndWatch reply of %d devices with %d-byte IDs, not one of %d; the bound is %d (%.0f%% of the limit)",
		lo, len(limitID(99999)), hi, config.MaxDevicesPerResource, 100*float64(config.MaxDevicesPerResource)/float64(lo))
	if config.MaxDevicesPerResource > lo*3/4 {
		t.Errorf("config.MaxDevicesPerResource = %d leaves less than a quarter of margin below the measured %d", config.MaxDevicesPerResource, lo)
	}
}

// limitID is a replica ID as long as the daemon's longest.
func limitID(i int) string {
	return fmt.Sprintf("GPU-%08x-1030-52db-b435-a137af0af2ed::%05d", i/100000, i%100000)
}

// listServer answers ListAndWatch with a fixed list and reports when the
// kubelet ends the stream.
type listServer struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
	ended   chan struct{}
}

func (s *listServer) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (s *listServer) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	defer close(s.ended)
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: s.devices}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

// serveDevices registers resource with n devices and reports whether the
// kubelet's capacity shows all n (true) or the kubelet ends the stream
// without them (false).
func serveDevices(t *testing.T, k *kubelet, resource string, n int) bool {
	t.Helper()
	s := &listServer{ended: make(chan struct{})}
	s.devices = make([]*pluginapi.Device, n)
	for i := range s.devices {
		s.devices[i] = &pluginapi.Device{ID: limitID(i), Health: pluginapi.Healthy,
			Topology: &pluginapi.TopologyInfo{Nodes: []*pluginapi.NUMANode{{ID: 1}}}}
	}
	endpoint := fmt.Sprintf("limit-%d.sock", n)
	sock := filepath.Join(pluginapi.DevicePluginPath, endpoint)
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, s)
	go func() { _ = srv.Serve(l) }()
	defer srv.Stop()

	conn, err := grpc.NewClient("unix:"+pluginapi.KubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if _, err := pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: endpoint, ResourceName: resource,
	}); err != nil {
		t.Fatalf("registering %s: %v", resource, err)
	}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		if c := k.capacity(resource); c.Capacity == int64(n) {
			return true
		}
		select {
		case <-s.ended:
			return k.capacity(resource).Capacity == int64(n)
		case <-ctx.Done():
			t.Fatalf("%s with %d devices: neither in the kubelet's capacity nor dropped within %v", resource, n, waitTimeout)
		case <-tick.C:
		}
	}
}
