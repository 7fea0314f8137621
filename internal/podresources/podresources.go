// Package podresources tells which pod holds which GPU: it asks the
// kubelet's pod-resources API (v1 List) on its own schedule and right after
// our own Allocate calls, never per scrape, and keeps the answer as an
// immutable snapshot keyed by GPU or MIG UUID.
package podresources

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/notify"
)

// DefaultSocket is where the kubelet serves the pod-resources API.
const DefaultSocket = "/var/lib/kubelet/pod-resources/kubelet.sock"

// MaxReceiveBytes is the largest List reply accepted. gRPC's default of
// 4 MiB is too small for busy nodes (dcgm-exporter#509: 4.75 MB replies
// failed every scrape).
const MaxReceiveBytes = 64 << 20

// Defaults for Options.
const (
	DefaultInterval = 5 * time.Second
	defaultTimeout  = 5 * time.Second
	// afterAllocate is how soon after our Allocate the cache refreshes: the
	// kubelet records the assignment right after Allocate returns.
	afterAllocate = 250 * time.Millisecond
	// followUp is a second refresh after an Allocate, in case the first
	// came too early.
	followUp = 2 * time.Second
)

// Holder is a container holding a device.
type Holder struct {
	Namespace string
	Pod       string
	Container string
	Resource  string // the extended resource, e.g. nvidia.com/gpu.shared
	// DeviceIDs are the kubelet's IDs through which the container holds
	// the unit, sorted: one for a whole device ("GPU-…"), one per replica
	// of a shared one ("GPU-…::3"; see Replica). Empty in hand-built
	// snapshots, which then mean the unit held once.
	DeviceIDs []string
}

// Equal reports whether two holders are the same container holding the
// unit through the same resource and device IDs.
func (h Holder) Equal(o Holder) bool {
	return h.Namespace == o.Namespace && h.Pod == o.Pod && h.Container == o.Container && h.Resource == o.Resource &&
		slices.Equal(h.DeviceIDs, o.DeviceIDs)
}

// sameContainer reports whether two holders are one container holding
// through one resource.
func (h Holder) sameContainer(o Holder) bool {
	return h.Namespace == o.Namespace && h.Pod == o.Pod && h.Container == o.Container && h.Resource == o.Resource
}

// Replica is the replica number in a shared device's ID: "3" for
// "GPU-…::3" (the part after the first "::", as dcgm-exporter reads it
// for its vgpu label); ok is false for the ID of a whole device.
func Replica(deviceID string) (n string, ok bool) {
	_, n, ok = strings.Cut(deviceID, "::")
	return n, ok
}

// Snapshot is the attribution at one moment: who holds each unit (GPU or
// MIG UUID). Several holders share a time-sliced device. Immutable; a
// refresh that finds the same holders keeps the same snapshot.
type Snapshot struct {
	ByUnit map[string][]Holder // holders sorted by namespace, pod, container
	// Containers is how many containers hold at least one of our devices.
	Containers int
	// Taken is when this attribution was first listed (Status.LastSuccess
	// says when it was last confirmed).
	Taken time.Time
}

// Holders returns who holds a unit.
func (s *Snapshot) Holders(unit string) []Holder {
	if s == nil {
		return nil
	}
	return s.ByUnit[unit]
}

// Resolver maps a device as the kubelet reports it (resource name and
// device ID, e.g. "nvidia.com/gpu.shared", "GPU-…::3") to the GPU or MIG
// UUID it stands for; ok is false for devices that are not ours.
type Resolver func(resource, deviceID string) (unit string, ok bool)

// Options configure a Cache.
type Options struct {
	// Socket is the kubelet's pod-resources socket (DefaultSocket).
	Socket string
	// Interval is the refresh period (DefaultInterval).
	Interval time.Duration
	// Timeout bounds one List call (5 s).
	Timeout time.Duration
	// MaxAge is how long an attribution is kept while List fails
	// (default 3 × Interval); after that metrics go unattributed rather
	// than name pods that may be gone.
	MaxAge time.Duration
	// Resolver returns the resolver for one refresh (it may snapshot the
	// advertised resources); default: ResolveUUIDs(nil).
	Resolver func() Resolver
	Logger   *slog.Logger
	Now      func() time.Time
}

// Cache keeps the latest attribution. Run owns the refresh loop; Snapshot
// and Refresh are safe for concurrent use.
type Cache struct {
	opts    Options
	log     *slog.Logger
	snap    atomic.Pointer[Snapshot]
	trigger chan struct{}

	mu      sync.Mutex
	state   string // "", "ok", "missing", "failing": the last logged state
	st      Status
	changed notify.Signal // a refresh finished
}

// Status is the cache's health, for metrics and debugging.
type Status struct {
	Up          bool // the last List succeeded
	Successes   uint64
	Failures    uint64
	LastSuccess time.Time
	LastError   string
}

// New builds a cache; Run starts it.
func New(opts Options) *Cache {
	if opts.Socket == "" {
		opts.Socket = DefaultSocket
	}
	if opts.Interval <= 0 {
		opts.Interval = DefaultInterval
	}
	if opts.Timeout <= 0 {
		opts.Timeout = defaultTimeout
	}
	if opts.MaxAge <= 0 {
		opts.MaxAge = 3 * opts.Interval
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Resolver == nil {
		opts.Resolver = func() Resolver { return ResolveUUIDs(nil) }
	}
	c := &Cache{opts: opts, log: opts.Logger, trigger: make(chan struct{}, 1)}
	c.snap.Store(&Snapshot{ByUnit: map[string][]Holder{}})
	return c
}

// Snapshot is the latest attribution; never nil.
func (c *Cache) Snapshot() *Snapshot { return c.snap.Load() }

// Changed returns a channel closed when the next refresh (or failed
// refresh) finishes. Take it before reading the snapshot.
func (c *Cache) Changed() <-chan struct{} { return c.changed.C() }

// Refresh asks for a refresh soon, e.g. after an Allocate. It never blocks.
func (c *Cache) Refresh() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// WaitFor blocks until cond holds for the snapshot and status, checking
// after every refresh, or until ctx ends.
func (c *Cache) WaitFor(ctx context.Context, cond func(*Snapshot, Status) bool) error {
	for {
		ch := c.changed.C()
		if cond(c.Snapshot(), c.Status()) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for pod attribution: %w", context.Cause(ctx))
		}
	}
}

// Status reports the cache's health.
func (c *Cache) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st
}

// Run refreshes until ctx ends. It never fails: without the socket,
// metrics are served unattributed.
func (c *Cache) Run(ctx context.Context) error {
	conn, err := grpc.NewClient("unix:"+c.opts.Socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxReceiveBytes)),
		// Reconnect promptly after a kubelet restart (gRPC's default
		// backoff grows to 2 minutes).
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: c.opts.Interval},
			MinConnectTimeout: c.opts.Timeout,
		}))
	if err != nil {
		// Only a malformed target fails here.
		c.log.Error("pod attribution off: bad pod-resources socket path", "socket", c.opts.Socket, "err", err)
		<-ctx.Done()
		return nil
	}
	defer conn.Close()
	client := podresourcesv1.NewPodResourcesListerClient(conn)

	tick := time.NewTicker(c.opts.Interval)
	defer tick.Stop()
	soon := time.NewTimer(time.Hour)
	soon.Stop()
	defer soon.Stop()
	pendingFollowUp := false
	c.refresh(ctx, client)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			c.refresh(ctx, client)
		case <-c.trigger:
			soon.Reset(afterAllocate)
			pendingFollowUp = true
		case <-soon.C:
			c.refresh(ctx, client)
			if pendingFollowUp {
				pendingFollowUp = false
				soon.Reset(followUp)
			}
		}
	}
}

// refresh lists the pods once and publishes the result.
func (c *Cache) refresh(ctx context.Context, client podresourcesv1.PodResourcesListerClient) {
	if _, err := os.Stat(c.opts.Socket); errors.Is(err, fs.ErrNotExist) {
		c.failed("missing", fmt.Errorf("socket %s does not exist", c.opts.Socket))
		return
	}
	lctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	resp, err := client.List(lctx, &podresourcesv1.ListPodResourcesRequest{})
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		c.failed("failing", err)
		return
	}
	snap := c.build(resp)
	if old := c.snap.Load(); old != nil && old.Containers == snap.Containers && maps.EqualFunc(old.ByUnit, snap.ByUnit, sameHolders) {
		// Unchanged: readers keep what they built for the snapshot they
		// have (the collector's labelled view) instead of rebuilding it.
		snap = old
	} else {
		c.snap.Store(snap)
	}
	defer c.changed.Notify()
	c.mu.Lock()
	prev := c.state
	c.state = "ok"
	c.st.Up, c.st.LastError = true, ""
	c.st.Successes++
	c.st.LastSuccess = c.opts.Now()
	c.mu.Unlock()
	if prev != "ok" {
		c.log.Info("pod attribution from the kubelet's pod-resources API", "socket", c.opts.Socket,
			"containers", snap.Containers)
	}
}

// failed records a failed refresh, logs once per state change, and drops
// an attribution older than MaxAge.
func (c *Cache) failed(state string, err error) {
	defer c.changed.Notify()
	c.mu.Lock()
	prev := c.state
	c.state = state
	c.st.Up, c.st.LastError = false, err.Error()
	c.st.Failures++
	last := c.st.LastSuccess
	c.mu.Unlock()
	if prev != state {
		if state == "missing" {
			c.log.Warn("pod-resources socket missing: metrics are served without pod labels until it appears",
				"socket", c.opts.Socket, "fix", "mount /var/lib/kubelet/pod-resources into the container, or set --pod-resources-socket")
		} else {
			c.log.Warn("pod-resources List failing: metrics are served without pod labels until it answers", "socket", c.opts.Socket, "err", err)
		}
	}
	if old := c.snap.Load(); len(old.ByUnit) > 0 && c.opts.Now().Sub(last) > c.opts.MaxAge {
		c.snap.Store(&Snapshot{ByUnit: map[string][]Holder{}, Taken: c.opts.Now()})
	}
}

// build turns a List reply into a snapshot.
func (c *Cache) build(resp *podresourcesv1.ListPodResourcesResponse) *Snapshot {
	s := &Snapshot{ByUnit: map[string][]Holder{}, Taken: c.opts.Now()}
	resolve := c.opts.Resolver()
	for _, pod := range resp.GetPodResources() {
		for _, ctr := range pod.GetContainers() {
			holds := false
			add := func(resource, id string) {
				unit, ok := resolve(resource, id)
				if !ok {
					return
				}
				h := Holder{Namespace: pod.GetNamespace(), Pod: pod.GetName(), Container: ctr.GetName(), Resource: resource}
				// Replicas of one device held by one container count
				// once, with every replica's ID.
				hs := s.ByUnit[unit]
				if k := slices.IndexFunc(hs, h.sameContainer); k >= 0 {
					if !slices.Contains(hs[k].DeviceIDs, id) {
						hs[k].DeviceIDs = append(hs[k].DeviceIDs, id)
					}
				} else {
					h.DeviceIDs = []string{id}
					s.ByUnit[unit] = append(hs, h)
				}
				holds = true
			}
			for _, dev := range ctr.GetDevices() {
				for _, id := range dev.GetDeviceIds() {
					add(dev.GetResourceName(), id)
				}
			}
			// Devices from DRA claims: the driver's name is the
			// resource, the device's name in its ResourceSlice the ID.
			for _, dr := range ctr.GetDynamicResources() {
				for _, cr := range dr.GetClaimResources() {
					add(cr.GetDriverName(), cr.GetDeviceName())
				}
			}
			if holds {
				s.Containers++
			}
		}
	}
	for _, hs := range s.ByUnit {
		for _, h := range hs {
			slices.Sort(h.DeviceIDs)
		}
		slices.SortFunc(hs, func(a, b Holder) int {
			return strings.Compare(a.Namespace+"\x00"+a.Pod+"\x00"+a.Container+"\x00"+a.Resource,
				b.Namespace+"\x00"+b.Pod+"\x00"+b.Container+"\x00"+b.Resource)
		})
	}
	return s
}

func sameHolders(a, b []Holder) bool { return slices.EqualFunc(a, b, Holder.Equal) }

// ResolveUUIDs is the fallback resolver: a device ID that is a GPU or MIG
// UUID, possibly with a replica suffix ("GPU-…::3"), stands for that UUID
// if known reports it as one of ours (known nil accepts any).
func ResolveUUIDs(known func(uuid string) bool) Resolver {
	return func(_, id string) (string, bool) {
		base, _, _ := strings.Cut(id, "::")
		if !strings.HasPrefix(base, "GPU-") && !strings.HasPrefix(base, "MIG-") {
			return "", false
		}
		if known != nil && !known(base) {
			return "", false
		}
		return base, true
	}
}

var (
	upDesc = prometheus.NewDesc("gpu_plugin_pod_resources_up",
		"1 if the last List of the kubelet's pod-resources API succeeded (pod labels on GPU metrics are current), 0 if not.", nil, nil)
	refreshDesc = prometheus.NewDesc("gpu_plugin_pod_resources_refreshes_total",
		"Lists of the kubelet's pod-resources API by result.", []string{"result"}, nil)
	lastRefreshDesc = prometheus.NewDesc("gpu_plugin_pod_resources_last_success_timestamp_seconds",
		"When the pod attribution was last refreshed successfully (0: never).", nil, nil)
	containersDesc = prometheus.NewDesc("gpu_plugin_pod_resources_containers",
		"Containers holding at least one of this node's GPUs or MIG devices, as of the last refresh.", nil, nil)
)

// Describe implements prometheus.Collector.
func (c *Cache) Describe(ch chan<- *prometheus.Desc) {
	ch <- upDesc
	ch <- refreshDesc
	ch <- lastRefreshDesc
	ch <- containersDesc
}

// Collect implements prometheus.Collector.
func (c *Cache) Collect(ch chan<- prometheus.Metric) {
	st := c.Status()
	up := 0.0
	if st.Up {
		up = 1
	}
	ch <- prometheus.MustNewConstMetric(upDesc, prometheus.GaugeValue, up)
	ch <- prometheus.MustNewConstMetric(refreshDesc, prometheus.CounterValue, float64(st.Successes), "success")
	ch <- prometheus.MustNewConstMetric(refreshDesc, prometheus.CounterValue, float64(st.Failures), "failure")
	var ts float64
	if !st.LastSuccess.IsZero() {
		ts = float64(st.LastSuccess.UnixNano()) / 1e9
	}
	ch <- prometheus.MustNewConstMetric(lastRefreshDesc, prometheus.GaugeValue, ts)
	ch <- prometheus.MustNewConstMetric(containersDesc, prometheus.GaugeValue, float64(c.Snapshot().Containers))
}
