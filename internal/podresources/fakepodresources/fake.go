// Package fakepodresources is a stand-in for the kubelet's pod-resources
// API (v1) over a real gRPC server on a unix socket, for tests and
// benchmarks of pod attribution.
package fakepodresources

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// Server serves List from a pod table the test sets.
type Server struct {
	podresourcesv1.UnimplementedPodResourcesListerServer

	socket string
	srv    *grpc.Server
	lis    net.Listener
	done   chan struct{}

	mu    sync.Mutex
	pods  []*podresourcesv1.PodResources
	calls atomic.Int64
	// listed is signalled (non-blocking) after every List.
	listed chan struct{}
}

// Start serves on socket (removing a stale file first).
func Start(socket string) (*Server, error) {
	_ = os.Remove(socket)
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("fake pod-resources: %w", err)
	}
	s := &Server{socket: socket, srv: grpc.NewServer(), lis: lis, done: make(chan struct{}), listed: make(chan struct{}, 1)}
	podresourcesv1.RegisterPodResourcesListerServer(s.srv, s)
	go func() {
		defer close(s.done)
		_ = s.srv.Serve(lis)
	}()
	return s, nil
}

// Stop stops serving and removes the socket, as a stopped kubelet would.
func (s *Server) Stop() {
	s.srv.Stop()
	<-s.done
	_ = os.Remove(s.socket)
}

// SetPods replaces the pod table.
func (s *Server) SetPods(pods ...*podresourcesv1.PodResources) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pods = pods
}

// Calls counts List calls so far.
func (s *Server) Calls() int64 { return s.calls.Load() }

// Listed is signalled after each List call (coalesced).
func (s *Server) Listed() <-chan struct{} { return s.listed }

// List implements the pod-resources API.
func (s *Server) List(context.Context, *podresourcesv1.ListPodResourcesRequest) (*podresourcesv1.ListPodResourcesResponse, error) {
	s.mu.Lock()
	resp := &podresourcesv1.ListPodResourcesResponse{PodResources: s.pods}
	s.mu.Unlock()
	s.calls.Add(1)
	select {
	case s.listed <- struct{}{}:
	default:
	}
	return resp, nil
}

// Pod builds a pod whose containers hold devices.
func Pod(namespace, name string, containers ...Container) *podresourcesv1.PodResources {
	p := &podresourcesv1.PodResources{Namespace: namespace, Name: name}
	for _, c := range containers {
		cr := &podresourcesv1.ContainerResources{Name: c.Name}
		for _, d := range c.Devices {
			cr.Devices = append(cr.Devices, &podresourcesv1.ContainerDevices{ResourceName: d.Resource, DeviceIds: d.IDs})
		}
		for _, cl := range c.Claims {
			dr := &podresourcesv1.DynamicResource{ClaimName: cl.Name, ClaimNamespace: namespace}
			for _, dev := range cl.Devices {
				dr.ClaimResources = append(dr.ClaimResources, &podresourcesv1.ClaimResource{DriverName: cl.Driver, PoolName: cl.Pool, DeviceName: dev})
			}
			cr.DynamicResources = append(cr.DynamicResources, dr)
		}
		p.Containers = append(p.Containers, cr)
	}
	return p
}

// Container is one container of a Pod and the devices it holds.
type Container struct {
	Name    string
	Devices []Devices
	// Claims are DRA claims the container uses.
	Claims []Claim
}

// Claim is a DRA claim: its driver's devices in one pool, by name.
type Claim struct {
	Name, Driver, Pool string
	Devices            []string
}

// Devices are device IDs of one resource.
type Devices struct {
	Resource string
	IDs      []string
}
