package daemon

// Per-node configuration (--config-dir): the node's --config-label label
// names one of the directory's files, as with NVIDIA's config-manager
// sidecar; a label change is applied live, like a config file reload.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/nodeconfig"
)

// nodeLabel is the config label's value on the node; ok false without it.
type nodeLabel struct {
	value string
	ok    bool
}

// selectStartConfig resolves cfg to the file the node's label picks. A
// label naming no file starts with the fallback choice (default, only
// file, none) and says so; the reloader reports it until it is fixed.
func selectStartConfig(ctx context.Context, cfg *config.Config, client *kube.Client, log *slog.Logger) (*config.Config, nodeconfig.Choice, *nodeLabel, error) {
	dcfg := cfg.Daemon
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	node, err := client.GetNode(ctx, dcfg.NodeName)
	if err != nil {
		return nil, nodeconfig.Choice{}, nil, fmt.Errorf("--config-dir: reading node %s for its %s label: %w", dcfg.NodeName, dcfg.ConfigLabel, err)
	}
	v, ok := node.Labels[dcfg.ConfigLabel]
	label := &nodeLabel{value: v, ok: ok}
	choice, err := nodeconfig.Choose(dcfg.ConfigDir, v, ok, dcfg.DefaultConfig)
	var unknown *nodeconfig.UnknownError
	if errors.As(err, &unknown) && ok && v != "" {
		log.Warn("node label names no config file: starting with the fallback", "label", dcfg.ConfigLabel, "err", err)
		choice, err = nodeconfig.Choose(dcfg.ConfigDir, "", false, dcfg.DefaultConfig)
	}
	if err != nil {
		return nil, choice, nil, fmt.Errorf("--config-dir: %w", err)
	}
	next, err := cfg.Select(choice.Path)
	if err != nil {
		return nil, choice, nil, fmt.Errorf("--config-dir: config %q (%s): %w", choice.Name, choice.Path, err)
	}
	log.Info("config chosen by node label", "label", dcfg.ConfigLabel, "value", v, "config", choiceName(choice), "by", choice.By)
	return next, choice, label, nil
}

// nodeConfigStart is what the start chose, for the reloader.
type nodeConfigStart struct {
	choice nodeconfig.Choice
	label  nodeLabel
	events *kube.Recorder
}

// selectStartConfig puts the configuration the node label picks in force
// (d.cfg) and starts the recorder of Events about the node.
func (d *Daemon) selectStartConfig() (*nodeConfigStart, error) {
	next, choice, label, err := selectStartConfig(context.Background(), d.cfg, d.kube, d.log.With("component", "node-config"))
	if err != nil {
		return nil, err
	}
	d.cfg = next
	rec := d.kube.NewRecorder(context.Background(), kube.RecorderOptions{
		Source: kube.EventSource{Component: "gpu-plugin", Host: next.Daemon.NodeName},
		Logger: d.log.With("component", "node-config"),
	})
	d.stopEvents = rec.Shutdown
	return &nodeConfigStart{choice: choice, label: *label, events: rec}, nil
}

// startNodeConfig hands the start's choice to the reloader, reporting a
// label that named no file.
func (r *reloader) startNodeConfig(s *nodeConfigStart) {
	name := r.d.cfg.Daemon.NodeName
	r.node = nodeConfigState{choice: s.choice, events: s.events, ref: kube.NodeReference(name)}
	l := s.label
	r.lastLabel = &l
	if l.ok && l.value != "" && s.choice.By != nodeconfig.ByLabel {
		r.node.unknown, r.node.reported = l.value, l.value
		s.events.Eventf(r.node.ref, kube.EventTypeWarning, "UnknownGPUConfig", "%s=%q names no config file; started with %s",
			r.d.cfg.Daemon.ConfigLabel, l.value, choiceName(s.choice))
	}
	r.setNodeStats()
}

// setNodeStats publishes the per-node config state to the metrics.
func (r *reloader) setNodeStats() {
	r.stats.mu.Lock()
	defer r.stats.mu.Unlock()
	r.stats.nodeConfig, r.stats.nodeConfigBy, r.stats.unknownLabel = choiceName(r.node.choice), r.node.choice.By, r.node.unknown
}

func choiceName(c nodeconfig.Choice) string {
	if c.Name == "" {
		return "(none: defaults)"
	}
	return c.Name
}

// watchConfigLabel hands every value the node's config label takes to the
// reloader, latest first: a slow reload never blocks the watch.
func (d *Daemon) watchConfigLabel(ctx context.Context) error {
	label := d.cfg.Daemon.ConfigLabel
	d.kube.WatchNode(ctx, d.cfg.Daemon.NodeName, d.log.With("component", "node-config"), func(n *kube.Node) {
		v, ok := n.Labels[label]
		select {
		case <-d.rl.labels:
		default:
		}
		d.rl.labels <- nodeLabel{value: v, ok: ok}
	})
	return nil
}

// selectConfig applies the file the node label now picks. A label naming
// no file keeps the configuration in force, reported in the log (once per
// value), gpu_plugin_node_config_unknown_label and an Event on the node.
func (r *reloader) selectConfig(l nodeLabel) {
	cur := r.config()
	dcfg := cur.Daemon
	choice, err := nodeconfig.Choose(dcfg.ConfigDir, l.value, l.ok, dcfg.DefaultConfig)
	if err != nil {
		r.node.unknown = l.value
		if r.node.reported != l.value {
			r.node.reported = l.value
			r.log.Warn("node label names no config file: the configuration in force stays", "label", dcfg.ConfigLabel, "err", err, "config", choiceName(r.node.choice))
			if r.node.events != nil {
				r.node.events.Eventf(r.node.ref, kube.EventTypeWarning, "UnknownGPUConfig", "%s: %v; %s stays in force", dcfg.ConfigLabel, err, choiceName(r.node.choice))
			}
		}
		r.setNodeStats()
		r.changed.Notify()
		return
	}
	r.node.unknown, r.node.reported = "", ""
	if choice.Path == r.node.choice.Path {
		r.setNodeStats()
		r.changed.Notify()
		return
	}
	next, err := cur.Select(choice.Path)
	from := r.node.choice
	r.apply(next, err, choice.Path, func() {
		r.node.choice = choice
		r.log.Info("node label changed the config", "label", dcfg.ConfigLabel, "value", l.value, "from", choiceName(from), "to", choiceName(choice), "by", choice.By)
		if r.node.events != nil {
			r.node.events.Eventf(r.node.ref, kube.EventTypeNormal, "GPUConfigApplied", "%s=%q: config %s applied (was %s)", dcfg.ConfigLabel, l.value, choiceName(choice), choiceName(from))
		}
	})
	r.setNodeStats()
	r.rewatch()
}

// nodeConfigState is the reloader's per-node config state (run's
// goroutine owns it).
type nodeConfigState struct {
	choice   nodeconfig.Choice
	unknown  string // the label value naming no file now, "" when none
	reported string // the value last logged as unknown
	events   *kube.Recorder
	ref      *kube.ObjectReference
}

// readinessNote is the /readyz detail of --config-dir: a node label naming
// no config file ("" when there is none).
func (r *reloader) readinessNote() string {
	r.stats.mu.Lock()
	defer r.stats.mu.Unlock()
	if r.stats.unknownLabel == "" {
		return ""
	}
	return fmt.Sprintf("node label %s=%q names no config file; %s stays in force", r.d.cfg.Daemon.ConfigLabel, r.stats.unknownLabel, r.stats.nodeConfig)
}
