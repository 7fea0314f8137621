package dra_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	registerpb "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	cdispecs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/dra"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

const node = "node-a"

// rig is one driver over a simulated node, its fake API and directories.
type rig struct {
	t       *testing.T
	api     *fakeAPI
	inv     *nvml.Inventory
	spec    *cdispecs.Spec
	health  *health.State
	dirs    dra.Options
	drv     *dra.Driver
	cancel  context.CancelFunc
	done    chan error
	units   []string
	profile string
}

func newRig(t *testing.T, profile string) *rig {
	t.Helper()
	_, _, inv := testkit.SimNode(t, profile)
	root := testkit.DriverRoot(t, inv)
	ss, err := cdi.Generate(inv, cdi.Options{DriverRoot: root})
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	r := &rig{t: t, api: newFakeAPI(), inv: inv, spec: cdi.NodeSpec(ss), health: health.NewState(nil, nil), profile: profile}
	r.dirs = dra.Options{NodeName: node, RegistrarDir: filepath.Join(tmp, "registry"), PluginsDir: filepath.Join(tmp, "plugins"), CDIDir: filepath.Join(tmp, "cdi")}
	for _, g := range inv.GPUs {
		if g.MIGEnabled {
			for _, m := range g.MIGDevices {
				r.units = append(r.units, m.UUID)
			}
			continue
		}
		r.units = append(r.units, g.UUID)
	}
	r.start()
	return r
}

func (r *rig) start() {
	r.t.Helper()
	o := r.dirs
	o.API, o.Health = r.api, r.health
	drv, err := dra.New(o)
	if err != nil {
		r.t.Fatal(err)
	}
	drv.Update(r.inv, r.units, r.spec)
	ctx, cancel := context.WithCancel(context.Background())
	r.drv, r.cancel, r.done = drv, cancel, make(chan error, 1)
	go func() { r.done <- drv.Run(ctx) }()
	r.t.Cleanup(r.stop)
	// Both sockets accept: a socket file exists a moment before it
	// listens, and the registration socket comes after the DRA one.
	for _, socket := range []string{drv.DRASocket(), drv.RegistrationSocket()} {
		waitFor(r.t, socket+" to accept", func() bool {
			c, err := net.Dial("unix", socket)
			if err == nil {
				c.Close()
			}
			return err == nil
		})
	}
}

func (r *rig) stop() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	if err := <-r.done; err != nil {
		r.t.Errorf("Run: %v", err)
	}
	r.cancel = nil
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func dial(t *testing.T, socket string) *grpc.ClientConn {
	t.Helper()
	c, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// claim adds an allocated claim of the given slice devices to the API.
func (r *rig) claim(name, uid string, devices ...string) *drapb.Claim {
	c := &kube.ResourceClaim{}
	c.Namespace, c.Name, c.UID = "default", name, uid
	c.Status.Allocation = &kube.AllocationResult{}
	for i, d := range devices {
		c.Status.Allocation.Devices.Results = append(c.Status.Allocation.Devices.Results,
			kube.DeviceRequestAllocationResult{Request: "gpu" + string(rune('a'+i)), Driver: dra.DriverName, Pool: node, Device: d})
	}
	r.api.addClaim(c)
	return &drapb.Claim{Namespace: "default", Name: name, Uid: uid}
}

func (r *rig) prepare(claims ...*drapb.Claim) map[string]*drapb.NodePrepareResourceResponse {
	r.t.Helper()
	resp, err := drapb.NewDRAPluginClient(dial(r.t, r.drv.DRASocket())).NodePrepareResources(context.Background(), &drapb.NodePrepareResourcesRequest{Claims: claims})
	if err != nil {
		r.t.Fatal(err)
	}
	return resp.Claims
}

func (r *rig) unprepare(claims ...*drapb.Claim) map[string]*drapb.NodeUnprepareResourceResponse {
	r.t.Helper()
	resp, err := drapb.NewDRAPluginClient(dial(r.t, r.drv.DRASocket())).NodeUnprepareResources(context.Background(), &drapb.NodeUnprepareResourcesRequest{Claims: claims})
	if err != nil {
		r.t.Fatal(err)
	}
	return resp.Claims
}

// inject applies CDI device names to an empty OCI spec through the CDI
// library, as a runtime does.
func (r *rig) inject(names ...string) (*specs.Spec, error) {
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(r.dirs.CDIDir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return nil, err
	}
	oci := &specs.Spec{Process: &specs.Process{}, Linux: &specs.Linux{}}
	_, err = cache.InjectDevices(oci, names...)
	return oci, err
}

func deviceNodes(s *specs.Spec) []string {
	var out []string
	for _, d := range s.Linux.Devices {
		out = append(out, d.Path)
	}
	slices.Sort(out)
	return out
}

func attr(d kube.SliceDevice, name string) string {
	a, ok := d.Attributes[name]
	switch {
	case !ok:
		return "<none>"
	case a.String != nil:
		return *a.String
	case a.Version != nil:
		return "v" + *a.Version
	case a.Int != nil:
		return itoa(*a.Int)
	}
	return "?"
}

func itoa(i int64) string { return strconv.FormatInt(i, 10) }

func TestRegistrationAndSlice(t *testing.T) {
	r := newRig(t, "dgx-h100")
	info, err := registerpb.NewRegistrationClient(dial(t, r.drv.RegistrationSocket())).GetInfo(context.Background(), &registerpb.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != "DRAPlugin" || info.Name != "gpu.nvidia.com" || info.Endpoint != r.drv.DRASocket() || !slices.Equal(info.SupportedVersions, []string{"v1.DRAPlugin", "v1.DRAResourceHealth"}) {
		t.Errorf("GetInfo = %+v", info)
	}
	if got, want := filepath.Base(r.drv.RegistrationSocket()), "gpu.nvidia.com-reg.sock"; got != want {
		t.Errorf("registration socket %s, want %s", got, want)
	}
	var s *kube.ResourceSlice
	waitFor(t, "the slice", func() bool { s = r.api.slice(); return s != nil })
	if s.Spec.Driver != "gpu.nvidia.com" || s.Spec.NodeName != node || s.Spec.Pool.Name != node || s.Spec.Pool.ResourceSliceCount != 1 || s.Spec.Pool.Generation != 1 {
		t.Errorf("slice spec %+v", s.Spec)
	}
	if len(s.OwnerReferences) != 1 || s.OwnerReferences[0].Kind != "Node" || s.OwnerReferences[0].UID != "node-uid-1" {
		t.Errorf("owner %+v, want the node", s.OwnerReferences)
	}
	if len(s.Spec.Devices) != 8 {
		t.Fatalf("%d devices, want 8", len(s.Spec.Devices))
	}
	g := r.inv.GPUs[3]
	d := s.Spec.Devices[3]
	for name, want := range map[string]string{
		"type": "gpu", "uuid": g.UUID, "productName": g.Name, "architecture": "Hopper", "cudaComputeCapability": "v9.0.0",
		"index": "3", "minor": itoa(int64(g.Minor)), "resource.kubernetes.io/pciBusID": strings.ToLower(g.PCIBusID[4:]),
	} {
		if got := attr(d, name); got != want {
			t.Errorf("device %s attribute %s = %q, want %q", d.Name, name, got, want)
		}
	}
	if d.Name != "gpu-"+itoa(int64(g.Minor)) || d.Capacity["memory"].Value != itoa(int64(g.MemoryBytes)) {
		t.Errorf("device %s capacity %v, want gpu-%d with memory %d", d.Name, d.Capacity, g.Minor, g.MemoryBytes)
	}
	// Unchanged: not written again, even though the watch fires.
	writes := r.api.writes
	r.drv.Update(r.inv, r.units, r.spec)
	time.Sleep(100 * time.Millisecond)
	if r.api.writes != writes {
		t.Errorf("an unchanged slice was written again (%d writes, was %d)", r.api.writes, writes)
	}
	// Deleted by someone (the kubelet after a deregistration): published again.
	r.api.deleteAll()
	waitFor(t, "the slice to be published again", func() bool { s = r.api.slice(); return s != nil && len(s.Spec.Devices) == 8 })
	// Fewer devices offered (split mode): the slice shrinks; none: it goes.
	r.drv.Update(r.inv, r.units[:2], r.spec)
	waitFor(t, "2 devices", func() bool { s = r.api.slice(); return s != nil && len(s.Spec.Devices) == 2 })
	if s.Spec.Pool.Generation < 2 {
		t.Errorf("generation %d after a change, want it to grow", s.Spec.Pool.Generation)
	}
	r.drv.Update(r.inv, nil, r.spec)
	waitFor(t, "no slice", func() bool {
		l, _ := r.api.ListResourceSlices(context.Background(), dra.DriverName, node)
		return len(l) == 0
	})
}

// TestPublishAfter: a driver started with PublishAfter neither rewrites
// nor deletes the slice a previous daemon left until the gate closes (the
// daemon closes it once it knows which GPUs the device plugin's pods
// hold, which its first advertisement does not), then publishes.
func TestPublishAfter(t *testing.T) {
	for _, tc := range []struct {
		name  string
		units func(all []string) []string
		want  int // devices in the slice once the gate is open; 0: no slice
	}{
		{"fewer GPUs", func(all []string) []string { return all[2:] }, 6},
		{"no GPU", func([]string) []string { return nil }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, "dgx-h100")
			var old *kube.ResourceSlice
			waitFor(t, "the first daemon's slice of 8 GPUs", func() bool { old = r.api.slice(); return old != nil && len(old.Spec.Devices) == 8 })
			r.stop()
			r.api.mu.Lock()
			writes := r.api.writes
			r.api.mu.Unlock()

			gate := make(chan struct{})
			r.dirs.PublishAfter = gate
			r.units = tc.units(r.units)
			r.start()
			// A negative: the publisher had time to write, and must not have.
			time.Sleep(200 * time.Millisecond)
			r.api.mu.Lock()
			after := r.api.writes
			r.api.mu.Unlock()
			if s := r.api.slice(); after != writes || s == nil || s.ResourceVersion != old.ResourceVersion {
				got := "none"
				if s != nil {
					got = fmt.Sprintf("%s resourceVersion %s with %d devices", s.Name, s.ResourceVersion, len(s.Spec.Devices))
				}
				t.Fatalf("before PublishAfter closed: %d slice writes (was %d), slice %s; want the old one untouched (%s resourceVersion %s)",
					after, writes, got, old.Name, old.ResourceVersion)
			}

			close(gate)
			waitFor(t, fmt.Sprintf("%d devices once the gate is open", tc.want), func() bool {
				s := r.api.slice()
				if tc.want == 0 {
					l, _ := r.api.ListResourceSlices(context.Background(), dra.DriverName, node)
					return len(l) == 0
				}
				return s != nil && s.Name == old.Name && len(s.Spec.Devices) == tc.want
			})
		})
	}
}
