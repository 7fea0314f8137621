// Package dra is the node's Dynamic Resource Allocation kubelet plugin
// (resource.k8s.io/v1), driver gpu.nvidia.com as NVIDIA's DRA driver: it
// publishes the GPUs and MIG devices the allocation mode gives to DRA in
// a ResourceSlice, with device taints for unhealthy ones, and prepares the
// claims the scheduler allocated from them with per-claim CDI specs.
//
// It serves the kubelet's gRPC APIs itself (k8s.io/kubelet's
// pluginregistration/v1 and dra/v1) and reaches the API server through
// internal/kube, not through k8s.io/dynamic-resource-allocation's
// kubeletplugin: that package links client-go, which would more than
// double the binary and add 15 to 35 MB of resident memory to every node,
// DRA or not (docs/dra.md has the figures).
package dra

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// DriverName is the DRA driver's name, NVIDIA's.
const DriverName = "gpu.nvidia.com"

// API is what the driver asks of the API server (a *kube.Client).
type API interface {
	GetResourceClaim(ctx context.Context, namespace, name string) (*kube.ResourceClaim, error)
	ListResourceSlices(ctx context.Context, driver, node string) ([]kube.ResourceSlice, error)
	CreateResourceSlice(ctx context.Context, s *kube.ResourceSlice) (*kube.ResourceSlice, error)
	UpdateResourceSlice(ctx context.Context, s *kube.ResourceSlice) (*kube.ResourceSlice, error)
	DeleteResourceSlice(ctx context.Context, name, uid string) error
	WatchResourceSlices(ctx context.Context, driver, node string, log *slog.Logger, onChange func(*kube.ResourceSlice))
	GetNode(ctx context.Context, name string) (*kube.Node, error)
}

// Options configure a Driver.
type Options struct {
	NodeName string
	// RegistrarDir is the kubelet's plugin registration directory;
	// PluginsDir its plugins directory (the DRA socket and the checkpoint
	// go to PluginsDir/gpu.nvidia.com).
	RegistrarDir, PluginsDir string
	// CDIDir is where the per-claim CDI specs are written.
	CDIDir string
	API    API
	Health *health.State
	Logger *slog.Logger

	// MPSRoot is --mps-root: claims shared through MPS get their daemon's
	// directories under it ("": such claims are refused). OnMPSChange is
	// called when the claims' MPS daemons (MPSSpecs) change, and MPSReady
	// reports whether a daemon (by MPSResource) is ready. MPSChanged, if
	// set, is closed at the next change of a daemon's state: the health
	// service then reports the devices of a claim whose daemon is down as
	// unhealthy at once, rather than at its next periodic send.
	MPSRoot     string
	OnMPSChange func()
	MPSReady    func(resource string) bool
	MPSChanged  func() <-chan struct{}

	// PublishAfter, when set, holds the first write of the slice (and the
	// deletion of a previous daemon's) until it is closed. The daemon
	// closes it once it knows which devices the device plugin's pods
	// hold, so that a daemon started in dra or split mode never publishes
	// a GPU a running pod has.
	PublishAfter <-chan struct{}
}

// Driver is the DRA side of the node.
type Driver struct {
	opts Options
	log  *slog.Logger

	// prepMu serializes NodePrepareResources and NodeUnprepareResources,
	// which the kubelet may call concurrently for different pods.
	prepMu sync.Mutex

	mu       sync.Mutex
	devices  []device          // offered now, in slice order
	byName   map[string]device // devices by slice name, incl. devices no longer offered but prepared
	nodeSpec *specs.Spec       // the node's GPU CDI spec
	claims   map[string]*preparedClaim
	// taintsDropped is set once the API server is seen to drop device
	// taints (DRADeviceTaints off): unhealthy devices are then left out
	// of the slice instead.
	taintsDropped bool
	taintSince    map[string]time.Time // device → when its taint was added
	pub           publishState
	lastStored    string // pub.stored, for the watch (sliceChanged)

	kick notify.Signal // wakes the publisher
	// devicesChanged wakes the health streams when the offered devices
	// change; stopping ends them.
	devicesChanged notify.Signal
	stopping       chan struct{}
	released       notify.Signal // a claim was unprepared: its devices may move
	status         status
}

// status is what /debug/devices and the metrics show.
type status struct {
	Registered   bool      `json:"registered"`
	RegisterErr  string    `json:"registrationError,omitempty"`
	LastPublish  time.Time `json:"lastPublish"`
	PublishErr   string    `json:"publishError,omitempty"`
	Slice        string    `json:"slice,omitempty"`
	Generation   int64     `json:"generation,omitempty"`
	Publishes    uint64    `json:"publishes"`
	TaintsViaAPI bool      `json:"deviceTaints"` // false: unhealthy devices are left out instead
}

// Status is the driver's state for /debug/devices.
type Status struct {
	status
	Devices  []DeviceStatus `json:"devices"`
	Prepared []ClaimStatus  `json:"preparedClaims"`
}

// DeviceStatus is one offered device.
type DeviceStatus struct {
	Name    string `json:"name"`
	UUID    string `json:"uuid"`
	Healthy bool   `json:"healthy"`
	Reason  string `json:"reason,omitempty"`
}

// ClaimStatus is one prepared claim.
type ClaimStatus struct {
	UID       string   `json:"uid"`
	Namespace string   `json:"namespace"`
	Name      string   `json:"name"`
	Devices   []string `json:"devices"`
}

// New loads the checkpoint of prepared claims. A checkpoint that cannot
// be read is moved aside and reported: the claims it held are prepared
// again when the kubelet asks (prepare is idempotent), and their CDI specs
// are removed when it unprepares them.
func New(opts Options) (*Driver, error) {
	if opts.NodeName == "" {
		return nil, errors.New("DRA needs the node's name: set NODE_NAME (the chart sets it from the pod's spec.nodeName)")
	}
	if opts.API == nil {
		return nil, errors.New("DRA needs the API server")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Driver{opts: opts, log: log, byName: map[string]device{}, taintSince: map[string]time.Time{}, stopping: make(chan struct{})}
	d.status.TaintsViaAPI = true
	if err := os.MkdirAll(d.pluginDir(), 0o750); err != nil {
		return nil, fmt.Errorf("DRA plugin directory: %w (--kubelet-plugins-directory-path)", err)
	}
	claims, err := loadCheckpoint(d.checkpointPath())
	if err != nil {
		aside := d.checkpointPath() + ".unreadable-" + time.Now().UTC().Format("20060102T150405")
		if rerr := os.Rename(d.checkpointPath(), aside); rerr != nil {
			return nil, fmt.Errorf("%v; and it cannot be moved aside: %v", err, rerr)
		}
		log.Error("DRA checkpoint unreadable: moved aside; claims are prepared again as the kubelet asks", "err", err, "movedTo", aside)
		claims = map[string]*preparedClaim{}
	}
	d.claims = claims
	for uid, c := range claims {
		for _, pd := range c.Devices {
			d.byName[pd.Device] = device{name: pd.Device, uuid: pd.UUID}
		}
		log.Debug("prepared claim restored from the checkpoint", "claim", c.Namespace+"/"+c.Name, "uid", uid)
	}
	return d, nil
}

func (d *Driver) pluginDir() string      { return filepath.Join(d.opts.PluginsDir, DriverName) }
func (d *Driver) checkpointPath() string { return filepath.Join(d.pluginDir(), "checkpoint.json") }

// DRASocket is the socket the kubelet calls NodePrepareResources on.
func (d *Driver) DRASocket() string { return filepath.Join(d.pluginDir(), "dra.sock") }

// RegistrationSocket is the socket the kubelet's plugin watcher finds.
func (d *Driver) RegistrationSocket() string {
	return filepath.Join(d.opts.RegistrarDir, DriverName+"-reg.sock")
}

// Update sets what the node offers through DRA: units (GPU and MIG UUIDs)
// of inv, and the node's GPU CDI spec to make claim specs from. The slice
// is republished when it changed.
func (d *Driver) Update(inv *nvml.Inventory, units []string, nodeSpec *specs.Spec) {
	var devs []device
	if inv != nil {
		devs = describe(inv, units)
	}
	d.mu.Lock()
	d.devices = devs
	for _, dev := range devs {
		d.byName[dev.name] = dev
	}
	changed := !sameSpec(d.nodeSpec, nodeSpec)
	d.nodeSpec = nodeSpec
	d.mu.Unlock()
	if changed && nodeSpec != nil {
		d.rewriteSpecs()
	}
	d.kick.Notify()
	d.devicesChanged.Notify()
}

// rewriteSpecs writes the spec of every prepared claim again from a new
// node spec (a new daemon, a driver upgrade): a container created from a
// prepared claim later (a second pod of a shared claim, a restart) gets
// the driver's files where they are now.
func (d *Driver) rewriteSpecs() {
	d.prepMu.Lock()
	defer d.prepMu.Unlock()
	d.mu.Lock()
	claims := make(map[string]preparedClaim, len(d.claims))
	for uid, c := range d.claims {
		claims[uid] = *c
	}
	d.mu.Unlock()
	for uid, c := range claims {
		if err := d.writeSpec(uid, c.Devices, c.MPS); err != nil {
			d.log.Error("cannot rewrite a prepared claim's CDI spec", "uid", uid, "err", err)
		}
	}
}

func sameSpec(a, b *specs.Spec) bool {
	if a == nil || b == nil {
		return a == b
	}
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}

// Held reports whether a GPU or MIG device is in a prepared claim.
func (d *Driver) Held(uuid string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.claims {
		for _, pd := range c.Devices {
			if pd.UUID == uuid {
				return true
			}
		}
	}
	return false
}

// UUIDOf is the GPU or MIG UUID of a device named in the slice (or in a
// prepared claim), for pod attribution.
func (d *Driver) UUIDOf(name string) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	dev, ok := d.byName[name]
	return dev.uuid, ok && dev.uuid != ""
}

// Released returns a channel closed when the next claim is unprepared.
func (d *Driver) Released() <-chan struct{} { return d.released.C() }

// Status reports the driver's state.
func (d *Driver) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := Status{status: d.status}
	st.TaintsViaAPI = !d.taintsDropped
	for _, dev := range d.devices {
		ok, why := d.healthy(dev)
		st.Devices = append(st.Devices, DeviceStatus{Name: dev.name, UUID: dev.uuid, Healthy: ok, Reason: why})
	}
	for uid, c := range d.claims {
		cs := ClaimStatus{UID: uid, Namespace: c.Namespace, Name: c.Name}
		for _, pd := range c.Devices {
			cs.Devices = append(cs.Devices, pd.Device)
		}
		st.Prepared = append(st.Prepared, cs)
	}
	slices.SortFunc(st.Prepared, func(a, b ClaimStatus) int {
		return cmpStrings(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return st
}

func cmpStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (d *Driver) healthy(dev device) (bool, string) {
	if d.opts.Health == nil {
		return true, ""
	}
	return d.opts.Health.Check(dev.units...)
}

// sliceChanged hears of the API's slices: anything but the echo of the
// publisher's own last write (same name and resourceVersion) makes it
// look again. Skipping the echo saves a List per write, which counts
// against the client's rate limit that claim reads share.
func (d *Driver) sliceChanged(s *kube.ResourceSlice) {
	if s != nil {
		d.mu.Lock()
		echo := d.lastStored == s.Name+"/"+s.ResourceVersion
		d.mu.Unlock()
		if echo {
			return
		}
	}
	d.kick.Notify()
}

// Run serves the kubelet and publishes the slice until ctx ends; then it
// removes its sockets. Prepared claims stay prepared (the checkpoint and
// their CDI specs stay), and so does the slice: a restarted daemon takes
// them over.
func (d *Driver) Run(ctx context.Context) error {
	srv, err := d.listen()
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		d.opts.API.WatchResourceSlices(ctx, DriverName, d.opts.NodeName, d.log, d.sliceChanged)
	}()
	go func() { defer wg.Done(); d.publishLoop(ctx) }()
	<-ctx.Done()
	srv.stop()
	wg.Wait()
	return nil
}
