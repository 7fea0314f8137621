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
	"google.golang.org/protobuf/proto"
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
	// streamed is notified whenever a ListAndWatch stream opens or ends
	// (the manager's stream-liveness check); nil in no manager.
	streamed *notify.Signal

	mu      sync.Mutex
	grpc    *grpc.Server
	gen     uint64         // counts starts, so a registration knows which server it announced
	streams map[uint64]int // open ListAndWatch streams by generation
	// When the newest stream of the current generation opened, and when
	// the last one of it ended; zero when none did.
	streamOpened, streamEnded time.Time
	served                    chan struct{} // closed when the current Serve returns
	stopped                   chan struct{} // closed by stop, ends ListAndWatch streams

	// Owned by the manager's loop: why the server could not start, as last
	// logged ("" while it serves).
	startCause string

	stats serverStats
}

// listInfo describes the last device list ListAndWatch tried to send.
type listInfo struct {
	devices int
	bytes   int       // encoded size; the kubelet refuses more than kubeletMaxMessage
	sent    time.Time // when Send returned without error; zero before
}

// deliverable reports whether the kubelet can receive the list at all.
func (l *listInfo) deliverable() bool { return l.bytes <= kubeletMaxMessage }

// kubeletMaxMessage is the largest message the kubelet's device manager
// receives on a ListAndWatch stream: gRPC's default receive limit, 4 MiB,
// which the kubelet does not raise (tests/kubelet/liveness_test.go sends it
// a bigger list and watches it drop the stream).
const kubeletMaxMessage = 4 << 20

// serverStats are counters read by metrics and /debug.
type serverStats struct {
	allocations      atomic.Uint64
	allocationErrors atomic.Uint64
	registrations    atomic.Uint64
	// linked: Register succeeded for the running server generation and the
	// kubelet has not dropped its stream since. registered: linked, and
	// counted as such (readiness, metrics). They differ after a dropped
	// stream: the resource then counts as registered again only once the
	// kubelet has held a new stream for the manager's grace window.
	linked          atomic.Bool
	registered      atomic.Bool
	confirm         atomic.Bool  // a drop was reported: wait for a held stream
	attemptAt       atomic.Int64 // unix nanoseconds when the last Register call began
	registeredAt    atomic.Int64 // unix nanoseconds of the last successful Register
	lastRegisterErr atomic.Pointer[string]
	streams         atomic.Int64
	lastList        atomic.Pointer[listInfo]
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
	s.streamOpened, s.streamEnded = time.Time{}, time.Time{}
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
	s.unlink()
}

// unlink forgets the registration: the kubelet must be told again.
func (s *server) unlink() {
	s.stats.linked.Store(false)
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

// streamInfo reports the open streams of the running generation, when the
// newest of them opened and when the last one ended.
func (s *server) streamInfo() (open int, opened, ended time.Time, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.grpc == nil {
		return 0, time.Time{}, time.Time{}, false
	}
	return s.streams[s.gen], s.streamOpened, s.streamEnded, true
}

// register announces the resource to the kubelet. It runs outside the
// manager's loop; should the server restart meanwhile, the kubelet may have
// dialled the old one, so the registration does not count. counted says
// whether the resource now counts as registered: not yet after a dropped
// stream (see serverStats).
func (s *server) register(ctx context.Context, kubeletSocket string) (counted bool, err error) {
	gen, ok := s.generation()
	if !ok {
		return false, fmt.Errorf("%s: plugin server not running", s.name)
	}
	conn, err := grpc.NewClient("unix:"+kubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false, fmt.Errorf("connecting to the kubelet at %s: %w", kubeletSocket, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s.stats.attemptAt.Store(time.Now().UnixNano())
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
		return false, fmt.Errorf("registering %s with the kubelet at %s: %w", s.name, kubeletSocket, err)
	}
	s.stats.registrations.Add(1)
	if now, ok := s.generation(); !ok || now != gen {
		return false, fmt.Errorf("%s: plugin server restarted while registering; registering again", s.name)
	}
	s.stats.registeredAt.Store(time.Now().UnixNano())
	s.stats.linked.Store(true)
	if s.stats.confirm.Load() {
		return false, nil
	}
	s.stats.registered.Store(true)
	s.stats.lastRegisterErr.Store(nil)
	return true, nil
}

// setCause records why the resource is not registered ("" clears it).
func (s *server) setCause(cause string) {
	if cause == "" {
		s.stats.lastRegisterErr.Store(nil)
		return
	}
	s.stats.lastRegisterErr.Store(&cause)
}

// dropCause says why the kubelet's stream ended, naming an oversized
// device list when that is the likely reason.
func (s *server) dropCause() string {
	if l := s.stats.lastList.Load(); l != nil && l.bytes > kubeletMaxMessage {
		return fmt.Sprintf("the kubelet dropped the ListAndWatch stream: the device list (%d devices, %d bytes) is over the kubelet's %d-byte gRPC message limit; lower replicas or split the resource",
			l.devices, l.bytes, kubeletMaxMessage)
	}
	return "the kubelet dropped the ListAndWatch stream without restarting"
}

func (s *server) notifyStreamed() {
	if s.streamed != nil {
		s.streamed.Notify()
	}
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
	s.streamOpened = time.Now()
	s.mu.Unlock()
	s.stats.streams.Add(1)
	s.notifyStreamed()
	defer func() {
		s.stats.streams.Add(-1)
		s.mu.Lock()
		if s.streams[gen]--; s.streams[gen] == 0 {
			delete(s.streams, gen)
		}
		if gen == s.gen {
			s.streamEnded = time.Now()
		}
		s.mu.Unlock()
		s.notifyStreamed()
	}()
	var last []*pluginapi.Device
	for {
		// Take the signals before reading, so no change slips between.
		healthChanged, resChanged := s.health.Changed(), s.changed.C()
		devs := s.deviceList()
		if !sameDevices(devs, last) {
			resp := &pluginapi.ListAndWatchResponse{Devices: devs}
			info := &listInfo{devices: len(devs), bytes: proto.Size(resp)}
			s.stats.lastList.Store(info)
			if err := stream.Send(resp); err != nil {
				s.log.Debug("device list not delivered; the kubelet's stream ended", "devices", info.devices, "bytes", info.bytes, "err", err)
				return err
			}
			s.stats.lastList.Store(&listInfo{devices: info.devices, bytes: info.bytes, sent: time.Now()})
			s.notifyStreamed()
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
			how := "time-slicing"
			if res.MPS {
				how = "MPS"
			}
			return nil, status.Errorf(codes.InvalidArgument,
				"%s is shared (%s with failRequestsGreaterThanOne): a container may request at most 1, it requested %d",
				s.name, how, len(cr.DevicesIds))
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
		opts := s.respond.Load()
		cresp, err := opts.containerResponse(devices)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "building the allocation: %v", err)
		}
		if res.MPS {
			opts.addMPS(cresp, res.Name)
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
