// Package fakekubelet is a stand-in for the kubelet's device manager, over
// real gRPC and unix sockets: it serves Registration on kubelet.sock, dials
// each plugin back, keeps its ListAndWatch stream, and calls Allocate and
// GetPreferredAllocation. It behaves like the kubelet where the daemon can
// tell (socket clean-up on start, re-dial on re-registration) and powers
// `make demo` and fast tests; conformance against the real kubelet device
// manager lives in tests/kubelet.
package fakekubelet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/notify"
)

// Kubelet is the stand-in. Start it with Start, stop it with Stop.
type Kubelet struct {
	pluginapi.UnimplementedRegistrationServer

	dir string
	log *slog.Logger

	mu       sync.Mutex
	grpc     *grpc.Server
	served   chan struct{}
	plugins  map[string]*plugin // by resource name
	events   []Event
	changed  notify.Signal
	closing  bool
	streamWG sync.WaitGroup
	// replyAfterList holds Register's reply until the plugin's first
	// device list arrives, an order the real kubelet also shows (it
	// starts ListAndWatch in a goroutine while Register returns).
	replyAfterList bool
}

// Event is something the kubelet observed, with when.
type Event struct {
	At       time.Time
	Resource string
	Kind     string // "registered", "devices", "stream-ended"
	Healthy  int
	Total    int
}

type plugin struct {
	resource string
	endpoint string
	conn     *grpc.ClientConn
	client   pluginapi.DevicePluginClient
	options  *pluginapi.DevicePluginOptions
	devices  []*pluginapi.Device
	cancel   context.CancelFunc
	streamUp bool
}

// Start removes every socket in dir, as the kubelet does, and serves
// kubelet.sock there.
func Start(dir string, log *slog.Logger) (*Kubelet, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	k := &Kubelet{dir: dir, log: log.With("component", "fake-kubelet"), plugins: map[string]*plugin{}}
	if err := k.start(); err != nil {
		return nil, err
	}
	return k, nil
}

// SocketPath is the kubelet's registration socket.
func (k *Kubelet) SocketPath() string { return filepath.Join(k.dir, "kubelet.sock") }

func (k *Kubelet) start() error {
	entries, err := os.ReadDir(k.dir)
	if err != nil {
		return fmt.Errorf("reading the device-plugin directory: %w", err)
	}
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 {
			_ = os.Remove(filepath.Join(k.dir, e.Name()))
		}
	}
	lis, err := net.Listen("unix", k.SocketPath())
	if err != nil {
		return fmt.Errorf("listening on kubelet.sock: %w", err)
	}
	g := grpc.NewServer()
	pluginapi.RegisterRegistrationServer(g, k)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = g.Serve(lis)
	}()
	k.mu.Lock()
	k.grpc, k.served, k.closing = g, served, false
	k.mu.Unlock()
	return nil
}

// Stop stops serving and drops every plugin connection.
func (k *Kubelet) Stop() {
	k.mu.Lock()
	g, served := k.grpc, k.served
	k.grpc = nil
	k.closing = true
	plugins := k.plugins
	k.plugins = map[string]*plugin{}
	k.mu.Unlock()
	if g != nil {
		g.Stop()
		<-served
	}
	for _, p := range plugins {
		p.cancel()
		p.conn.Close()
	}
	k.streamWG.Wait()
	_ = os.Remove(k.SocketPath())
}

// Restart behaves like a kubelet restart: stop, delete every socket in the
// directory, serve a fresh kubelet.sock.
func (k *Kubelet) Restart() error {
	k.Stop()
	return k.start()
}

// Register implements the Registration service: it dials the plugin back,
// reads its options and starts ListAndWatch, as the kubelet does.
func (k *Kubelet) Register(ctx context.Context, req *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	if req.Version != pluginapi.Version {
		return nil, fmt.Errorf("unsupported device plugin API version %q", req.Version)
	}
	conn, err := grpc.NewClient("unix:"+filepath.Join(k.dir, req.Endpoint), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	client := pluginapi.NewDevicePluginClient(conn)
	octx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	opts, err := client.GetDevicePluginOptions(octx, &pluginapi.Empty{})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("dialling plugin %s: %w", req.Endpoint, err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	p := &plugin{resource: req.ResourceName, endpoint: req.Endpoint, conn: conn, client: client, options: opts, cancel: scancel}

	k.mu.Lock()
	if k.closing {
		k.mu.Unlock()
		scancel()
		conn.Close()
		return nil, errors.New("kubelet is stopping")
	}
	if old, ok := k.plugins[req.ResourceName]; ok {
		old.cancel()
		old.conn.Close()
	}
	k.plugins[req.ResourceName] = p
	k.events = append(k.events, Event{At: time.Now(), Resource: req.ResourceName, Kind: "registered"})
	k.streamWG.Add(1)
	k.mu.Unlock()
	k.changed.Notify()
	k.log.Debug("plugin registered", "resource", req.ResourceName, "endpoint", req.Endpoint)

	go k.watch(sctx, p)
	k.mu.Lock()
	wait := k.replyAfterList
	k.mu.Unlock()
	if wait {
		_ = k.WaitFor(octx, func(*Kubelet) bool { return k.streamUp(p) })
	}
	return &pluginapi.Empty{}, nil
}

// ReplyAfterFirstList makes Register answer only once the plugin's first
// device list has arrived (or after 10 s), so the stream is open before
// the plugin learns it is registered.
func (k *Kubelet) ReplyAfterFirstList(on bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.replyAfterList = on
}

// streamUp reports whether p's stream has delivered a list and is open;
// WaitFor conditions run without k.mu held.
func (k *Kubelet) streamUp(p *plugin) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return p.streamUp
}

func (k *Kubelet) watch(ctx context.Context, p *plugin) {
	defer k.streamWG.Done()
	stream, err := p.client.ListAndWatch(ctx, &pluginapi.Empty{})
	if err != nil {
		return
	}
	for {
		resp, err := stream.Recv()
		k.mu.Lock()
		if err != nil {
			p.streamUp = false
			if k.plugins[p.resource] == p {
				// The kubelet marks a resource's devices unhealthy when its
				// stream ends.
				for _, d := range p.devices {
					d.Health = pluginapi.Unhealthy
				}
			}
			k.events = append(k.events, Event{At: time.Now(), Resource: p.resource, Kind: "stream-ended"})
			k.mu.Unlock()
			k.changed.Notify()
			return
		}
		p.streamUp = true
		p.devices = resp.Devices
		healthy := 0
		for _, d := range resp.Devices {
			if d.Health == pluginapi.Healthy {
				healthy++
			}
		}
		k.events = append(k.events, Event{At: time.Now(), Resource: p.resource, Kind: "devices", Healthy: healthy, Total: len(resp.Devices)})
		k.mu.Unlock()
		k.changed.Notify()
	}
}

// DropStream closes a resource's plugin connection without a restart, as
// the kubelet does when its ListAndWatch receive fails (a device list over
// its 4 MiB message limit): the stream ends, the devices turn unhealthy,
// and only a new registration brings them back.
func (k *Kubelet) DropStream(resource string) error {
	k.mu.Lock()
	p, ok := k.plugins[resource]
	k.mu.Unlock()
	if !ok {
		return fmt.Errorf("resource %s is not registered", resource)
	}
	p.cancel()
	return p.conn.Close()
}

// Resources lists the registered resource names.
func (k *Kubelet) Resources() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for name := range k.plugins {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

// Devices returns the last device list a resource sent.
func (k *Kubelet) Devices(resource string) []*pluginapi.Device {
	k.mu.Lock()
	defer k.mu.Unlock()
	p, ok := k.plugins[resource]
	if !ok {
		return nil
	}
	// Copies: the stream goroutine rewrites health in place when it ends.
	out := make([]*pluginapi.Device, len(p.devices))
	for i, d := range p.devices {
		out[i] = &pluginapi.Device{ID: d.ID, Health: d.Health, Topology: d.Topology}
	}
	return out
}

// Events returns everything observed so far.
func (k *Kubelet) Events() []Event {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]Event(nil), k.events...)
}

// Capacity returns a resource's device count and healthy count (the
// kubelet's capacity and allocatable).
func (k *Kubelet) Capacity(resource string) (capacity, allocatable int) {
	for _, d := range k.Devices(resource) {
		capacity++
		if d.Health == pluginapi.Healthy {
			allocatable++
		}
	}
	return capacity, allocatable
}

// WaitFor blocks until cond holds or ctx ends; cond is re-evaluated after
// every registration and device list.
func (k *Kubelet) WaitFor(ctx context.Context, cond func(k *Kubelet) bool) error {
	for {
		ch := k.changed.C()
		if cond(k) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the kubelet condition: %w", context.Cause(ctx))
		}
	}
}

// WaitForAllocatable waits until a resource reports the given capacity and
// allocatable counts.
func (k *Kubelet) WaitForAllocatable(ctx context.Context, resource string, capacity, allocatable int) error {
	return k.WaitFor(ctx, func(k *Kubelet) bool {
		c, a := k.Capacity(resource)
		return c == capacity && a == allocatable
	})
}

func (k *Kubelet) client(resource string) (pluginapi.DevicePluginClient, *pluginapi.DevicePluginOptions, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	p, ok := k.plugins[resource]
	if !ok {
		return nil, nil, fmt.Errorf("resource %s is not registered", resource)
	}
	return p.client, p.options, nil
}

// Allocate asks the plugin for one container's devices.
func (k *Kubelet) Allocate(ctx context.Context, resource string, ids ...string) (*pluginapi.ContainerAllocateResponse, error) {
	c, _, err := k.client(resource)
	if err != nil {
		return nil, err
	}
	resp, err := c.Allocate(ctx, &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids}}})
	if err != nil {
		return nil, err
	}
	if len(resp.ContainerResponses) != 1 {
		return nil, fmt.Errorf("allocate returned %d container responses for 1 request", len(resp.ContainerResponses))
	}
	return resp.ContainerResponses[0], nil
}

// Preferred asks the plugin which devices it prefers.
func (k *Kubelet) Preferred(ctx context.Context, resource string, available, mustInclude []string, size int) ([]string, error) {
	c, opts, err := k.client(resource)
	if err != nil {
		return nil, err
	}
	if !opts.GetPreferredAllocationAvailable {
		return nil, fmt.Errorf("%s does not offer GetPreferredAllocation", resource)
	}
	resp, err := c.GetPreferredAllocation(ctx, &pluginapi.PreferredAllocationRequest{
		ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{
			AvailableDeviceIDs: available, MustIncludeDeviceIDs: mustInclude, AllocationSize: int32(size),
		}},
	})
	if err != nil {
		return nil, err
	}
	return resp.ContainerResponses[0].DeviceIDs, nil
}
