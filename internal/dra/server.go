package dra

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	healthpb "k8s.io/kubelet/pkg/apis/dra-health/v1"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	registerpb "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// servers are the two gRPC servers the kubelet talks to.
type servers struct {
	d             *Driver
	dra, register *grpc.Server
	done          chan struct{}
}

// listen starts the DRA server, then the registration server: the kubelet
// dials the DRA socket as soon as the registration socket appears.
func (d *Driver) listen() (*servers, error) {
	if err := os.MkdirAll(d.opts.RegistrarDir, 0o750); err != nil {
		return nil, fmt.Errorf("DRA registration directory: %w (--kubelet-registrar-directory-path)", err)
	}
	draLis, err := listenUnix(d.DRASocket())
	if err != nil {
		return nil, err
	}
	regLis, err := listenUnix(d.RegistrationSocket())
	if err != nil {
		draLis.Close()
		os.Remove(d.DRASocket())
		return nil, err
	}
	s := &servers{d: d, dra: grpc.NewServer(), register: grpc.NewServer(), done: make(chan struct{})}
	drapb.RegisterDRAPluginServer(s.dra, &draService{d: d})
	healthpb.RegisterDRAResourceHealthServer(s.dra, &healthService{d: d})
	registerpb.RegisterRegistrationServer(s.register, &registrationService{d: d})
	served := make(chan struct{}, 2)
	for _, p := range []struct {
		g   *grpc.Server
		lis net.Listener
	}{{s.dra, draLis}, {s.register, regLis}} {
		go func() {
			defer func() { served <- struct{}{} }()
			if err := p.g.Serve(p.lis); err != nil {
				d.log.Error("DRA gRPC server stopped", "err", err)
			}
		}()
	}
	go func() { <-served; <-served; close(s.done) }()
	d.log.Info("DRA plugin serving", "driver", DriverName, "registration", d.RegistrationSocket(), "socket", d.DRASocket())
	return s, nil
}

// stop removes the registration socket first (the kubelet deregisters the
// plugin), then ends both servers, letting calls in flight finish for up
// to 5 s.
func (s *servers) stop() {
	for _, p := range []string{s.d.RegistrationSocket(), s.d.DRASocket()} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.d.log.Warn("cannot remove a DRA socket", "socket", p, "err", err)
		}
	}
	close(s.d.stopping) // ends the health streams, which GracefulStop waits for
	stopped := make(chan struct{})
	go func() { s.register.GracefulStop(); s.dra.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		s.register.Stop()
		s.dra.Stop()
	}
	<-s.done
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	// Only the kubelet (root) needs to connect.
	if err := os.Chmod(path, 0o600); err != nil {
		lis.Close()
		return nil, fmt.Errorf("restricting %s: %w", path, err)
	}
	return lis, nil
}

// registrationService answers the kubelet's plugin watcher.
type registrationService struct {
	registerpb.UnimplementedRegistrationServer
	d *Driver
}

func (r *registrationService) GetInfo(context.Context, *registerpb.InfoRequest) (*registerpb.PluginInfo, error) {
	return &registerpb.PluginInfo{
		Type:              registerpb.DRAPlugin,
		Name:              DriverName,
		Endpoint:          r.d.DRASocket(),
		SupportedVersions: []string{drapb.DRAPluginService, healthpb.DRAResourceHealthService},
	}, nil
}

func (r *registrationService) NotifyRegistrationStatus(_ context.Context, st *registerpb.RegistrationStatus) (*registerpb.RegistrationStatusResponse, error) {
	r.d.mu.Lock()
	r.d.status.Registered, r.d.status.RegisterErr = st.PluginRegistered, st.Error
	r.d.mu.Unlock()
	if st.PluginRegistered {
		r.d.log.Info("DRA plugin registered with the kubelet", "driver", DriverName)
	} else {
		r.d.log.Error("the kubelet refused the DRA plugin's registration", "driver", DriverName, "err", st.Error)
	}
	return &registerpb.RegistrationStatusResponse{}, nil
}

// draService serves NodePrepareResources and NodeUnprepareResources.
type draService struct {
	drapb.UnimplementedDRAPluginServer
	d *Driver
}

func (s *draService) NodePrepareResources(ctx context.Context, req *drapb.NodePrepareResourcesRequest) (*drapb.NodePrepareResourcesResponse, error) {
	resp := &drapb.NodePrepareResourcesResponse{Claims: map[string]*drapb.NodePrepareResourceResponse{}}
	for _, c := range req.GetClaims() {
		devs, err := s.d.Prepare(ctx, c.GetNamespace(), c.GetName(), c.GetUid())
		r := &drapb.NodePrepareResourceResponse{}
		if err != nil {
			r.Error = err.Error()
			s.d.log.Warn("DRA claim not prepared", "claim", c.GetNamespace()+"/"+c.GetName(), "uid", c.GetUid(), "err", err)
		}
		for _, pd := range devs {
			dev := &drapb.Device{RequestNames: pd.Requests, PoolName: pd.Pool, DeviceName: pd.Device, CdiDeviceIds: []string{claimDeviceID(pd.CDIName)}}
			if pd.ShareID != "" {
				id := pd.ShareID
				dev.ShareId = &id
			}
			r.Devices = append(r.Devices, dev)
		}
		resp.Claims[c.GetUid()] = r
	}
	return resp, nil
}

func (s *draService) NodeUnprepareResources(ctx context.Context, req *drapb.NodeUnprepareResourcesRequest) (*drapb.NodeUnprepareResourcesResponse, error) {
	resp := &drapb.NodeUnprepareResourcesResponse{Claims: map[string]*drapb.NodeUnprepareResourceResponse{}}
	for _, c := range req.GetClaims() {
		r := &drapb.NodeUnprepareResourceResponse{}
		if err := s.d.Unprepare(c.GetUid()); err != nil {
			r.Error = err.Error()
			s.d.log.Warn("DRA claim not unprepared", "claim", c.GetNamespace()+"/"+c.GetName(), "uid", c.GetUid(), "err", err)
		}
		resp.Claims[c.GetUid()] = r
	}
	return resp, nil
}
