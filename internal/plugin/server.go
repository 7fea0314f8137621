package plugin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Preferrer answers GetPreferredAllocation for a resource. available and
// mustInclude hold only known, healthy devices; mustInclude ⊆ available. It
// returns device IDs.
type Preferrer interface {
	Prefer(res *sharing.Resource, available, mustInclude []*sharing.Device, size int) []string
}

// FirstFit is the simplest correct Preferrer: the must-include devices, then
// the other available ones in the kubelet's order.
type FirstFit struct{}

// Prefer implements Preferrer.
func (FirstFit) Prefer(_ *sharing.Resource, available, mustInclude []*sharing.Device, size int) []string {
	out := make([]string, 0, size)
	for _, d := range mustInclude {
		out = append(out, d.ID)
	}
	for _, d := range available {
		if len(out) == size {
			break
		}
		if !slices.Contains(out, d.ID) {
			out = append(out, d.ID)
		}
	}
	return out
}

// server serves one resource on its own socket. Its gRPC server is replaced
// on every (re)start; its resource and the health table outlive restarts.
type server struct {
	pluginapi.UnimplementedDevicePluginServer

	name      string // resource name
	socket    string // full path of our socket
	log       *slog.Logger
	health    *health.State
	respond   atomic.Pointer[ResponseOptions]
	preferrer Preferrer
	events    Events

	res     atomic.Pointer[sharing.Resource]
	changed notify.Signal // the resource was replaced

	mu      sync.Mutex
	grpc    *grpc.Server
	gen     uint64         // counts starts, so a registration knows which server it announced
	streams map[uint64]int // open ListAndWatch streams by generation
	served  chan struct{}  // closed when the current Serve returns
	stopped chan struct{}  // closed by stop, ends ListAndWatch streams

	stats serverStats
}

// serverStats are counters read by metrics and /debug.
type serverStats struct {
	allocations      atomic.Uint64
	allocationErrors atomic.Uint64
	registrations    atomic.Uint64
	registered       atomic.Bool
	registeredAt     atomic.Int64 // unix nanoseconds of the last successful Register
	lastRegisterErr  atomic.Pointer[string]
	streams          atomic.Int64
}

// Events are optional hooks for other parts of the daemon.
type Events struct {
	// Allocated is called after a successful Allocate, e.g. to refresh pod
	// attribution early. It must not block.
	Allocated func(resource string, deviceIDs []string)
}

func newServer(res *sharing.Resource, dir string, h *health.State, respond ResponseOptions, p Preferrer, ev Events, log *slog.Logger) *server {
	s := &server{
		name:      res.Name,
		socket:    filepath.Join(dir, sharing.SocketName(res.Name)),
		log:       log.With("resource", res.Name),
		health:    h,
		preferrer: p,
		events:    ev,
	}
	s.res.Store(res)
	s.respond.Store(&respond)
	return s
}

// start removes a stale socket, listens and serves. Bind errors return at
// once.
func (s *server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.grpc != nil {
		return nil
	}
	if err := os.Remove(s.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing stale socket %s: %w", s.socket, err)
	}
	lis, err := net.Listen("unix", s.socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", s.socket, err)
	}
	// Only the kubelet (root) needs to connect.
	if err := os.Chmod(s.socket, 0o600); err != nil {
		lis.Close()
		return fmt.Errorf("restricting %s: %w", s.socket, err)
	}
	g := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(g, s)
	s.grpc, s.served, s.stopped = g, make(chan struct{}), make(chan struct{})
	s.gen++
	served := s.served
	go func() {
		defer close(served)
		if err := g.Serve(lis); err != nil {
			s.log.Error("plugin gRPC server stopped", "err", err)
		}
	}()
	s.log.Debug("plugin server listening", "socket", s.socket)
	return nil
}

// stop ends the gRPC server and its streams and removes the socket. It is
// idempotent.
func (s *server) stop() {
	s.mu.Lock()
	g, served, stopped := s.grpc, s.served, s.stopped
	s.grpc = nil
	s.mu.Unlock()
	if g == nil {
		return
	}
	// The socket goes first: nobody dials a server that is going away, and
	// a client that sees its stream end finds the socket already gone.
	if err := os.Remove(s.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("cannot remove plugin socket", "socket", s.socket, "err", err)
	}
	close(stopped)
	g.Stop()
	<-served
	s.stats.registered.Store(false)
}

func (s *server) running() bool {
	_, ok := s.generation()
	return ok
}

// generation identifies the running gRPC server; ok is false when stopped.
func (s *server) generation() (gen uint64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen, s.grpc != nil
}

// watched reports whether the kubelet streams ListAndWatch from the server
// generation gen, which is still the running one.
func (s *server) watched(gen uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.grpc != nil && s.gen == gen && s.streams[gen] > 0
}

// register announces the resource to the kubelet. It runs outside the
// manager's loop; should the server restart meanwhile, the kubelet may have
// dialled the old one, so the registration does not count.
func (s *server) register(ctx context.Context, kubeletSocket string) error {
	gen, ok := s.generation()
	if !ok {
		return fmt.Errorf("%s: plugin server not running", s.name)
	}
	conn, err := grpc.NewClient("unix:"+kubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connecting to the kubelet at %s: %w", kubeletSocket, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     filepath.Base(s.socket),
		ResourceName: s.name,
		Options:      s.options(),
	})
	if err != nil && strings.Contains(err.Error(), "already connected") && s.watched(gen) {
		// An earlier attempt reached the kubelet though its answer was
		// lost (cancelled when a new kubelet.sock appeared): the kubelet
		// is streaming from this very server, which is registration.
		err = nil
	}
	if err != nil {
		msg := err.Error()
		s.stats.lastRegisterErr.Store(&msg)
		return fmt.Errorf("registering %s with the kubelet at %s: %w", s.name, kubeletSocket, err)
	}
	s.stats.registrations.Add(1)
	if now, ok := s.generation(); !ok || now != gen {
		return fmt.Errorf("%s: plugin server restarted while registering; registering again", s.name)
	}
	s.stats.registeredAt.Store(time.Now().UnixNano())
	s.stats.registered.Store(true)
	s.stats.lastRegisterErr.Store(nil)
	return nil
}

func (s *server) options() *pluginapi.DevicePluginOptions {
	return &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: s.preferrer != nil}
}

// setResource swaps in a new device list; open streams resend it.
func (s *server) setResource(res *sharing.Resource) {
	s.res.Store(res)
	s.changed.Notify()
}

// GetDevicePluginOptions implements the DevicePlugin service.
func (s *server) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return s.options(), nil
}

// ListAndWatch sends the full device list now and after every change of
// the resource or of a device's health.
func (s *server) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	s.mu.Lock()
	stopped, gen := s.stopped, s.gen
	if s.streams == nil {
		s.streams = map[uint64]int{}
	}
	s.streams[gen]++
	s.mu.Unlock()
	s.stats.streams.Add(1)
	defer func() {
		s.stats.streams.Add(-1)
		s.mu.Lock()
		if s.streams[gen]--; s.streams[gen] == 0 {
			delete(s.streams, gen)
		}
		s.mu.Unlock()
	}()
	var last []*pluginapi.Device
	for {
		// Take the signals before reading, so no change slips between.
		healthChanged, resChanged := s.health.Changed(), s.changed.C()
		devs := s.deviceList()
		if !sameDevices(devs, last) {
			if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: devs}); err != nil {
				return err
			}
			s.log.Debug("sent device list", "devices", len(devs), "unhealthy", countUnhealthy(devs))
			last = devs
		}
		select {
		case <-healthChanged:
		case <-resChanged:
		case <-stream.Context().Done():
			return nil
		case <-stopped:
			return nil
		}
	}
}

func (s *server) deviceList() []*pluginapi.Device {
	res := s.res.Load()
	out := make([]*pluginapi.Device, len(res.Devices))
	for i := range res.Devices {
		d := &res.Devices[i]
		h := pluginapi.Healthy
		if ok, _ := s.health.Check(d.HealthUnits()...); !ok {
			h = pluginapi.Unhealthy
		}
		pd := &pluginapi.Device{ID: d.ID, Health: h}
		if d.NUMANode >= 0 {
			pd.Topology = &pluginapi.TopologyInfo{Nodes: []*pluginapi.NUMANode{{ID: int64(d.NUMANode)}}}
		}
		out[i] = pd
	}
	return out
}

func sameDevices(a, b []*pluginapi.Device) bool {
	return slices.EqualFunc(a, b, func(x, y *pluginapi.Device) bool {
		return x.ID == y.ID && x.Health == y.Health
	})
}

func countUnhealthy(devs []*pluginapi.Device) int {
	n := 0
	for _, d := range devs {
		if d.Health != pluginapi.Healthy {
			n++
		}
	}
	return n
}

// GetPreferredAllocation implements the DevicePlugin service. Unknown and
// unhealthy IDs in the available list are skipped: an error here fails the
// pod's admission, so only a malformed request gets one.
func (s *server) GetPreferredAllocation(_ context.Context, req *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	res := s.res.Load()
	resp := &pluginapi.PreferredAllocationResponse{}
	for _, cr := range req.ContainerRequests {
		size := int(cr.AllocationSize)
		if size < 1 || size > len(cr.AvailableDeviceIDs) {
			return nil, status.Errorf(codes.InvalidArgument,
				"allocation size %d is not within 1..%d, the number of available %s devices", size, len(cr.AvailableDeviceIDs), s.name)
		}
		if len(cr.MustIncludeDeviceIDs) > size {
			return nil, status.Errorf(codes.InvalidArgument,
				"%d must-include devices exceed the allocation size %d", len(cr.MustIncludeDeviceIDs), size)
		}
		var available, must []*sharing.Device
		var skipped []string
		for _, id := range cr.AvailableDeviceIDs {
			if d, ok := s.usable(res, id); ok {
				available = append(available, d)
			} else {
				skipped = append(skipped, id)
			}
		}
		for _, id := range cr.MustIncludeDeviceIDs {
			if !slices.Contains(cr.AvailableDeviceIDs, id) {
				return nil, status.Errorf(codes.InvalidArgument, "must-include device %q is not among the available devices", id)
			}
			if d, ok := s.usable(res, id); ok {
				must = append(must, d)
			}
		}
		if len(skipped) > 0 {
			s.log.Debug("preferred allocation skips unknown or unhealthy devices", "devices", skipped)
		}
		ids := []string{}
		if len(available) > 0 {
			ids = s.preferrer.Prefer(res, available, must, min(size, len(available)))
		}
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerPreferredAllocationResponse{DeviceIDs: ids})
	}
	return resp, nil
}

func (s *server) usable(res *sharing.Resource, id string) (*sharing.Device, bool) {
	d, ok := res.Lookup(id)
	if !ok {
		return nil, false
	}
	healthy, _ := s.health.Check(d.HealthUnits()...)
	return d, healthy
}

// Allocate implements the DevicePlugin service.
func (s *server) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp, err := s.allocate(req)
	if err != nil {
		s.stats.allocationErrors.Add(1)
		s.log.Warn("allocation refused", "err", err)
		return nil, err
	}
	s.stats.allocations.Add(1)
	return resp, nil
}

func (s *server) allocate(req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	res := s.res.Load()
	resp := &pluginapi.AllocateResponse{}
	for _, cr := range req.ContainerRequests {
		if len(cr.DevicesIds) == 0 {
			return nil, status.Errorf(codes.InvalidArgument, "empty allocation request for %s", s.name)
		}
		if res.FailRequestsGreaterThanOne && len(cr.DevicesIds) > 1 {
			return nil, status.Errorf(codes.InvalidArgument,
				"%s is shared (time-slicing with failRequestsGreaterThanOne): a container may request at most 1, it requested %d",
				s.name, len(cr.DevicesIds))
		}
		var devices []*sharing.Device
		seen := map[string]bool{}
		for _, id := range cr.DevicesIds {
			d, ok := res.Lookup(id)
			if !ok {
				return nil, status.Errorf(codes.InvalidArgument, "unknown device ID %q for resource %s", id, s.name)
			}
			if healthy, reason := s.health.Check(d.HealthUnits()...); !healthy {
				return nil, status.Errorf(codes.InvalidArgument, "device %q of %s is unhealthy: %s", id, s.name, reason)
			}
			// Replicas of one physical device reach the container once.
			if !seen[d.Physical] {
				seen[d.Physical] = true
				devices = append(devices, d)
			}
		}
		cresp, err := s.respond.Load().containerResponse(devices)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "building the allocation: %v", err)
		}
		resp.ContainerResponses = append(resp.ContainerResponses, cresp)
		if s.events.Allocated != nil {
			s.events.Allocated(s.name, cr.DevicesIds)
		}
	}
	return resp, nil
}

// PreStartContainer implements the DevicePlugin service; nothing is needed
// before a container starts, and the option says so.
func (s *server) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}
