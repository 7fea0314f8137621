package nodehealth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Options configure a Publisher. NodeName, Client, Health and Inventory
// are required.
type Options struct {
	NodeName  string
	Client    *kube.Client
	Health    *health.State
	Inventory func() *nvml.Inventory
	// Taint sets TaintKey (NoSchedule) while no GPU is healthy. Off, a
	// taint left by an earlier run is removed.
	Taint  bool
	Logger *slog.Logger

	// Debounce gathers changes that come together (an XID storm over
	// several GPUs) into one write (default 500 ms).
	Debounce time.Duration
	// Resync writes again this often if the Node drifted, e.g. someone
	// removed the condition (default 5 min).
	Resync time.Duration
	// MinBackoff and MaxBackoff bound the retries after a failed write
	// (defaults 1 s and 1 min).
	MinBackoff, MaxBackoff time.Duration
	// EventBurst and EventInterval are the Event spam filter (client-go's
	// EventCorrelator's, per node and Event type): EventBurst Events at
	// once, then one per EventInterval (defaults 10 and 1 min).
	EventBurst    int
	EventInterval time.Duration
}

// Status is what the publisher last did, for /debug and tests.
type Status struct {
	Writes    uint64    `json:"writes"`    // condition patches and taint updates that changed the Node
	Failures  uint64    `json:"failures"`  // rounds that failed
	Events    uint64    `json:"events"`    // Events handed to the recorder (before its spam filter)
	LastError string    `json:"lastError"` // the last round's error; empty once a round succeeds
	LastWrite time.Time `json:"lastWrite,omitzero"`
}

// Publisher writes the node's GPU health to the API server.
type Publisher struct {
	opts Options
	log  *slog.Logger
	ref  *kube.ObjectReference

	mu     sync.Mutex
	status Status
}

// New checks the options and fills in defaults.
func New(opts Options) (*Publisher, error) {
	switch {
	case opts.NodeName == "":
		return nil, errors.New("node health: the node's name is unknown: set --node-name or NODE_NAME (the chart sets it from spec.nodeName)")
	case opts.Client == nil || opts.Health == nil || opts.Inventory == nil:
		return nil, errors.New("node health: Client, Health and Inventory are required")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.Debounce, 500*time.Millisecond)
	def(&opts.Resync, 5*time.Minute)
	def(&opts.MinBackoff, time.Second)
	def(&opts.MaxBackoff, time.Minute)
	def(&opts.EventInterval, time.Minute)
	if opts.EventBurst <= 0 {
		opts.EventBurst = 10
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Publisher{
		opts: opts,
		log:  opts.Logger,
		ref:  kube.NodeReference(opts.NodeName),
	}, nil
}

// Status reports the publisher's counters and last error.
func (p *Publisher) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status
}

// Run publishes at start, after every health change (debounced), after a
// failure (with backoff) and every Resync, until ctx ends.
func (p *Publisher) Run(ctx context.Context) error {
	// The recorder's spam filter keys on source, object and type: a storm
	// of transitions makes EventBurst Events, then one per EventInterval.
	// It sends from its own goroutine, never blocking here.
	rec := p.opts.Client.NewRecorder(ctx, kube.RecorderOptions{
		Source: kube.EventSource{Component: "gpu-plugin", Host: p.opts.NodeName},
		Burst:  p.opts.EventBurst, QPS: 1 / p.opts.EventInterval.Seconds(),
		Logger: p.log,
	})
	defer rec.Shutdown()

	timer := time.NewTimer(0) // the first round at once
	defer timer.Stop()
	due := time.Now()
	// schedule moves the next round to within d, never later than it is
	// already due: a stream of changes cannot postpone it.
	schedule := func(d time.Duration, force bool) {
		if at := time.Now().Add(d); force || at.Before(due) {
			timer.Reset(d)
			due = at
		}
	}
	backoff := p.opts.MinBackoff
	var last []gpuHealth // the previous round, for Events
	var lastErr string
	changed := p.opts.Health.Changed()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			changed = p.opts.Health.Changed()
			schedule(p.opts.Debounce, false)
			continue
		case <-timer.C:
		}
		// The channel is taken again before the state is read, so a change
		// made while this round runs (after its snapshot) wakes the loop;
		// taken after the round, it would be lost.
		changed = p.opts.Health.Changed()
		gpus := nodeGPUs(p.opts.Inventory(), p.opts.Health.Snapshot())
		for _, t := range transitions(last, gpus) {
			p.event(rec, t)
		}
		last = gpus
		wrote, err := p.sync(ctx, gpus)
		if ctx.Err() != nil {
			return nil
		}
		p.mu.Lock()
		if wrote > 0 {
			p.status.Writes += uint64(wrote)
			p.status.LastWrite = time.Now()
		}
		if err != nil {
			p.status.Failures++
			p.status.LastError = err.Error()
		} else {
			p.status.LastError = ""
		}
		p.mu.Unlock()
		switch {
		case err != nil:
			if err.Error() != lastErr {
				p.log.Warn("cannot publish GPU health to the node; retrying with backoff", "node", p.opts.NodeName, "err", err, "retry", backoff)
				lastErr = err.Error()
			}
			schedule(backoff, true)
			backoff = min(backoff*2, p.opts.MaxBackoff)
		default:
			if lastErr != "" {
				p.log.Info("GPU health published to the node again", "node", p.opts.NodeName)
				lastErr = ""
			}
			backoff = p.opts.MinBackoff
			schedule(p.opts.Resync, true)
		}
	}
}

func (p *Publisher) event(rec *kube.Recorder, t transition) {
	p.mu.Lock()
	p.status.Events++
	p.mu.Unlock()
	if t.Healthy {
		rec.Eventf(p.ref, kube.EventTypeNormal, ReasonHealthy, "%s is healthy again", t.name())
		return
	}
	rec.Eventf(p.ref, kube.EventTypeWarning, ReasonUnhealthy, "%s is unhealthy: %s", t.name(), t.Reason)
}

// sync makes the Node show gpus: the condition, and the taint. It writes
// only what differs, so a round with nothing new costs one GET. It
// returns how many writes changed the Node.
func (p *Publisher) sync(ctx context.Context, gpus []gpuHealth) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	node, err := p.opts.Client.GetNode(ctx, p.opts.NodeName)
	if err != nil {
		return 0, fmt.Errorf("reading node %s: %w", p.opts.NodeName, err)
	}
	wrote := 0
	want := conditionFor(gpus)
	if patch := conditionPatch(node, want, time.Now()); patch != nil {
		if err := p.opts.Client.PatchNodeStatus(ctx, p.opts.NodeName, patch); err != nil {
			return wrote, fmt.Errorf("setting the %s condition on node %s: %w", ConditionType, p.opts.NodeName, err)
		}
		wrote++
		p.log.Info("node condition set", "node", p.opts.NodeName, "condition", ConditionType, "status", want.Status, "message", want.Message)
	}
	taint := p.opts.Taint && noneUsable(gpus)
	if hasTaint(node) != taint {
		if err := p.setTaint(ctx, taint); err != nil {
			return wrote, err
		}
		wrote++
		if taint {
			p.log.Warn("node tainted: no GPU is healthy", "node", p.opts.NodeName, "taint", TaintKey+":NoSchedule")
		} else {
			p.log.Info("node taint removed", "node", p.opts.NodeName, "taint", TaintKey)
		}
	}
	return wrote, nil
}

// conditionPatch is the strategic merge patch that sets the condition on
// node's status (conditions merge by type), or nil when it already reads
// want. The transition time is kept while the status stays.
func conditionPatch(node *kube.Node, want condition, now time.Time) []byte {
	transition := kube.NewTime(now)
	for _, c := range node.Status.Conditions {
		if c.Type != ConditionType {
			continue
		}
		if c.Status == want.Status && c.Reason == want.Reason && c.Message == want.Message {
			return nil
		}
		if c.Status == want.Status {
			transition = c.LastTransitionTime
		}
	}
	patch, _ := json.Marshal(map[string]any{"status": map[string]any{"conditions": []kube.NodeCondition{{
		Type: ConditionType, Status: want.Status, Reason: want.Reason, Message: want.Message,
		LastHeartbeatTime: kube.NewTime(now), LastTransitionTime: transition,
	}}}})
	return patch
}

func hasTaint(node *kube.Node) bool {
	return slices.ContainsFunc(node.Spec.Taints, func(t kube.Taint) bool { return t.Key == TaintKey })
}

// setTaint adds or removes TaintKey. Taints do not merge by key, so it is
// a read-modify-write, retried on a conflict with the kubelet's own
// writes.
func (p *Publisher) setTaint(ctx context.Context, on bool) error {
	err := kube.RetryOnConflict(ctx, func() error {
		node, err := p.opts.Client.GetNode(ctx, p.opts.NodeName)
		if err != nil {
			return err
		}
		if hasTaint(node) == on {
			return nil
		}
		node.Spec.Taints = slices.DeleteFunc(node.Spec.Taints, func(t kube.Taint) bool { return t.Key == TaintKey })
		if on {
			node.Spec.Taints = append(node.Spec.Taints, kube.Taint{Key: TaintKey, Effect: kube.TaintEffectNoSchedule})
		}
		return p.opts.Client.UpdateNode(ctx, node)
	})
	if err != nil {
		verb := "removing"
		if on {
			verb = "setting"
		}
		return fmt.Errorf("%s the %s taint on node %s: %w", verb, TaintKey, p.opts.NodeName, err)
	}
	return nil
}
