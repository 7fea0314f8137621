package daemon

// Live changes after start: config reloads (file watch, ConfigMap symlink
// swaps, SIGHUP), periodic inventory re-scans that pick up a new MIG
// layout, and the node labels file. One goroutine (reloader.run) owns all
// three, so a reload and a re-scan never interleave, and hands the result
// to plugin.Manager.Update, which re-advertises only what changed.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/labels"
	"github.com/gpu-plugin/gpu-plugin/internal/notify"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// defaultReloadDebounce lets a burst of file events (an editor's
// write-and-rename, a ConfigMap's symlink swap) settle into one reload.
const defaultReloadDebounce = 100 * time.Millisecond

// reloader applies configuration and inventory changes while the daemon
// runs.
type reloader struct {
	d   *Daemon
	log *slog.Logger

	live     atomic.Pointer[config.Config] // the configuration in force
	requests chan struct{}                 // Reload: SIGHUP
	labels   chan nodeLabel                // the node's config label (--config-dir), latest only
	debounce time.Duration
	ws       *watchState // nil when the config file is not watched

	// Owned by run's goroutine.
	adv       *advert.Advertisement // what is published; its inventory keeps unreadable GPUs from earlier scans
	lastSum   [32]byte              // the config file content last acted on
	rescanErr string                // the last re-scan problem logged, to log each once
	labelErr  string                // the last labels problem logged
	node      nodeConfigState       // --config-dir (nodeconfig.go)
	lastLabel *nodeLabel            // the config label's last value seen

	stats   reloadStats
	changed notify.Signal // a reload, re-scan or labels write finished
}

type reloadStats struct {
	mu                     sync.Mutex
	reloadOK, reloadFailed uint64
	lastOK                 bool
	lastSuccess            time.Time
	lastError              string
	rescans                map[string]uint64 // by result
	rescanSeconds          float64
	labelWrites            map[string]uint64 // by result
	unchangedChecks        uint64            // config file checks that found nothing new (for tests)
	// --config-dir: the config in force, how it was chosen, and a label
	// value naming no file ("" when none).
	nodeConfig, nodeConfigBy, unknownLabel string
}

// ReloadStatus is what the live-change machinery has done so far.
type ReloadStatus struct {
	Successes, Failures uint64 // config reloads
	LastReloadOK        bool
	LastError           string            // why the last rejected reload was rejected
	Rescans             map[string]uint64 // by result: unchanged, changed, failure
	LabelWrites         map[string]uint64 // by result: success, failure
}

func newReloader(d *Daemon) *reloader {
	r := &reloader{
		d: d, log: d.log.With("component", "reload"),
		requests: make(chan struct{}, 1), labels: make(chan nodeLabel, 1), debounce: defaultReloadDebounce,
	}
	r.stats.lastOK = true
	r.stats.rescans = map[string]uint64{}
	r.stats.labelWrites = map[string]uint64{}
	r.live.Store(d.cfg)
	for _, w := range d.cfg.Warnings() {
		r.log.Warn("config setting accepted but not applied", "warning", w)
	}
	r.lastSum = d.cfg.FileSum()
	return r
}

// config is the configuration in force.
func (r *reloader) config() *config.Config { return r.live.Load() }

// build computes the advertisement for an inventory and a configuration
// and logs the warnings the current one does not have.
func (r *reloader) build(inv *nvml.Inventory, cfg *config.Config) (*advert.Advertisement, error) {
	a, err := r.d.buildAdvertisement(inv, cfg)
	if err != nil {
		return nil, err
	}
	for _, w := range a.Warnings {
		if r.adv == nil || !slices.Contains(r.adv.Warnings, w) {
			r.log.Warn("resource not advertised as configured", "warning", w)
		}
	}
	return a, nil
}

// publish makes next the node's advertisement: the CDI specs first (the
// kubelet may allocate a new device as soon as it is advertised, and its
// CDI name must resolve by then), then the kubelet's resources. It returns
// what changed; the caller writes the node labels when they did, after
// counting its reload or re-scan, so that labels on disk imply the count.
func (r *reloader) publish(next *advert.Advertisement, cfg *config.Config) advert.Diff {
	diff := advert.Compare(r.adv, next)
	if diff.CDI {
		if err := r.d.writeCDISpecs(cfg, next.CDISpecs); err != nil {
			r.log.Error("cannot rewrite the CDI spec; containers may not find new devices by CDI name", "err", err)
		}
	}
	r.d.applyMPS(cfg, next)
	r.d.offerDRA(next)
	if diff.Resources() || diff.Respond {
		r.d.plugins.Update(r.d.advertised(next.Resources), next.Respond)
	}
	r.adv = next
	return diff
}

// Reload asks the running daemon to re-read its config file and re-scan
// the GPUs (what SIGHUP does). It does not wait; a request made while one
// is pending is merged into it.
func (d *Daemon) Reload() {
	select {
	case d.rl.requests <- struct{}{}:
	default:
	}
}

// ReloadStatus reports config reloads, re-scans and label writes so far.
func (d *Daemon) ReloadStatus() ReloadStatus {
	s := &d.rl.stats
	s.mu.Lock()
	defer s.mu.Unlock()
	st := ReloadStatus{
		Successes: s.reloadOK, Failures: s.reloadFailed, LastReloadOK: s.lastOK, LastError: s.lastError,
		Rescans: map[string]uint64{}, LabelWrites: map[string]uint64{},
	}
	for k, v := range s.rescans {
		st.Rescans[k] = v
	}
	for k, v := range s.labelWrites {
		st.LabelWrites[k] = v
	}
	return st
}

// ReloadChanged returns a channel closed when the next reload, re-scan or
// label write finishes.
func (d *Daemon) ReloadChanged() <-chan struct{} { return d.rl.changed.C() }

// run owns live changes until ctx ends. resources are what Run advertised
// at start.
func (r *reloader) run(ctx context.Context, adv *advert.Advertisement) error {
	r.adv = adv
	events, errs, stop := r.watch()
	defer stop()
	// A change made after the file was read at start but before the watch
	// began raised no event: compare the content once now.
	r.reloadConfig(false)
	r.writeLabels()
	r.publishDRA(ctx)
	var tick <-chan time.Time
	if iv := r.d.cfg.Daemon.RescanInterval; iv > 0 {
		t := time.NewTicker(iv)
		defer t.Stop()
		tick = t.C
	}
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	var monitorRescan <-chan struct{}
	if r.d.monitor != nil {
		monitorRescan = r.d.monitor.Rescan()
	}
	mpsChanged := r.d.mps.Changed()
	var draReleased <-chan struct{}
	var drainTick <-chan time.Time
	var podsListed <-chan struct{}
	if r.d.dra != nil {
		draReleased = r.d.dra.Released()
		// Devices moving from the device plugin to DRA wait for their
		// pods to end, which pod-resources tells within its interval.
		t := time.NewTicker(drainCheckInterval)
		defer t.Stop()
		drainTick = t.C
		// The first pod-resources List after a start settles which
		// devices may move at once.
		if r.d.tel != nil && r.d.tel.pods != nil && r.d.tel.pods.Status().Successes+r.d.tel.pods.Status().Failures == 0 {
			podsListed = r.d.tel.pods.Changed()
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			if r.relevant(ev) {
				settle.Reset(r.debounce)
			}
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			r.log.Warn("config file watch error; changes are still picked up on SIGHUP and every --rescan-interval", "err", err)
		case <-settle.C:
			r.reloadConfig(false)
			r.rewatch()
		case <-r.requests:
			r.log.Info("reload requested (SIGHUP): re-reading the config file and re-scanning the GPUs")
			r.reloadConfig(true)
			r.rewatch()
			r.rescan()
		case <-tick:
			r.reloadConfig(false) // backs up the file watch
			r.rescan()
			r.writeLabels() // restores a file someone removed
		case <-monitorRescan:
			monitorRescan = r.d.monitor.Rescan()
			r.rescan()
		case <-mpsChanged:
			// Taken again before the state is read, so that a change
			// made meanwhile wakes the next round.
			mpsChanged = r.d.mps.Changed()
			// A daemon ready for the first time: offer its resource.
			// The manager re-sends only what changed.
			r.d.plugins.Update(r.d.advertised(r.adv.Resources), r.adv.Respond)
		case <-draReleased:
			// A claim was released: a device it held that the mode
			// gives to the device plugin can go there now.
			draReleased = r.d.dra.Released()
			r.rebuild("a DRA claim was released")
		case <-drainTick:
			if len(r.adv.Draining) > 0 {
				r.rebuild("devices moving between the device plugin and DRA")
			}
		case <-podsListed:
			podsListed = nil
			if len(r.adv.Draining) > 0 {
				r.rebuild("the kubelet listed which devices its pods hold")
			}
		case l := <-r.labels:
			r.lastLabel = &l
			r.selectConfig(l)
		}
	}
}

// watch state: the directories watched for config changes.
type watchState struct {
	w    *fsnotify.Watcher
	dirs map[string]bool
	// names are the base names whose events matter: the config file, its
	// symlink target, and a ConfigMap volume's "..data" link.
	names map[string]bool
}

// watch starts watching the config file's directory (and its symlink
// target's), so both an in-place edit and a ConfigMap update (which swaps
// the "..data" symlink) are seen.
func (r *reloader) watch() (<-chan fsnotify.Event, <-chan error, func()) {
	path := r.watchedFile()
	if path == "" || !r.d.cfg.Daemon.WatchConfig {
		return nil, nil, func() {}
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		r.log.Warn("cannot watch the config file; changes are picked up on SIGHUP and every --rescan-interval", "file", path, "err", err)
		return nil, nil, func() {}
	}
	r.ws = &watchState{w: w, dirs: map[string]bool{}}
	r.rewatch()
	return w.Events, w.Errors, func() { w.Close() }
}

// rewatch follows the config file's symlinks again (a swap changes where
// they lead) and watches every directory on the way.
func (r *reloader) rewatch() {
	ws := r.ws
	if ws == nil {
		return
	}
	path, _ := filepath.Abs(r.watchedFile())
	want := map[string]bool{filepath.Dir(path): true}
	names := map[string]bool{filepath.Base(path): true, "..data": true}
	if target, err := filepath.EvalSymlinks(path); err == nil && target != path {
		want[filepath.Dir(target)] = true
		names[filepath.Base(target)] = true
	}
	for dir := range want {
		if !ws.dirs[dir] {
			if err := ws.w.Add(dir); err != nil {
				r.log.Debug("cannot watch a config directory", "dir", dir, "err", err)
				continue
			}
			ws.dirs[dir] = true
		}
	}
	for dir := range ws.dirs {
		if !want[dir] {
			_ = ws.w.Remove(dir) // may be gone already (an old ConfigMap generation)
			delete(ws.dirs, dir)
		}
	}
	ws.names = names
}

// watchedFile is the config file in force; with --config-dir and no file
// chosen, the directory's ..data link, which a ConfigMap update swaps.
func (r *reloader) watchedFile() string {
	c := r.config().Daemon
	if c.ConfigFile == "" && c.ConfigDir != "" {
		return filepath.Join(c.ConfigDir, "..data")
	}
	return c.ConfigFile
}

func (r *reloader) relevant(ev fsnotify.Event) bool {
	return r.ws != nil && (r.ws.names[filepath.Base(ev.Name)] || r.ws.dirs[ev.Name])
}

// reloadConfig re-reads the config file. force reloads even if the content
// is unchanged (SIGHUP). A rejected config is logged once per content.
func (r *reloader) reloadConfig(force bool) {
	if r.lastLabel != nil {
		// A ConfigMap update may add (or remove) the file the label names.
		r.selectConfig(*r.lastLabel)
	}
	path := r.config().Daemon.ConfigFile
	if path == "" {
		return
	}
	raw, readErr := config.ReadConfigFile(path) // bounded: regular file, 1 MiB, deadline
	sum := sha256.Sum256(raw)
	if readErr != nil {
		sum = sha256.Sum256([]byte(readErr.Error()))
	}
	if sum == r.lastSum && !force {
		r.stats.mu.Lock()
		r.stats.unchangedChecks++
		r.stats.mu.Unlock()
		r.changed.Notify()
		return
	}
	r.lastSum = sum
	if readErr == nil && len(bytes.TrimSpace(raw)) == 0 {
		// A truncation or a write caught half-way leaves an empty file,
		// which would otherwise parse as "all defaults" and drop sharing.
		r.reloadFailed(path, errors.New("the config file is empty (truncated, or still being written); to reset every setting to its default, write \"version: v1\""))
		return
	}
	next, err := r.config().Reload()
	r.apply(next, err, path, nil)
}

// apply puts next (or the error making it) in force: the advertisement,
// quarantine and labels follow. onApplied runs once it is in force.
func (r *reloader) apply(next *config.Config, err error, path string, onApplied func()) {
	cur := r.config()
	if err == nil {
		r.lastSum = next.FileSum() // what was applied, should the file have changed again meanwhile
	}
	var adv *advert.Advertisement
	if err == nil {
		adv, err = r.build(r.adv.Inventory, next)
	}
	if err != nil {
		r.reloadFailed(path, err)
		return
	}
	for _, w := range next.Warnings() {
		if !slices.Contains(cur.Warnings(), w) {
			r.log.Warn("config setting accepted but not applied", "warning", w)
		}
	}
	if restart := cur.RestartRequired(next); len(restart) > 0 {
		r.log.Warn("config reloaded, but these settings take effect only after a restart", "settings", restart)
	}
	r.live.Store(next)
	r.d.applyQuarantine(next, r.adv.Inventory)
	diff := r.publish(adv, next)
	r.log.Info("config reloaded", "file", path, "added", diff.Added, "removed", diff.Removed, "changed", diff.Changed,
		"allocateOptionsChanged", diff.Respond, "cdiSpecChanged", diff.CDI)
	if onApplied != nil {
		onApplied()
	}
	r.stats.mu.Lock()
	r.stats.reloadOK++
	r.stats.lastOK = true
	r.stats.lastSuccess = time.Now()
	r.stats.lastError = ""
	r.stats.mu.Unlock()
	if diff.Labels {
		r.writeLabels()
	}
	r.changed.Notify()
}

func (r *reloader) reloadFailed(path string, err error) {
	r.log.Error("config reload rejected; the previous configuration stays in force", "file", path, "err", err)
	r.stats.mu.Lock()
	r.stats.reloadFailed++
	r.stats.lastOK = false
	r.stats.lastError = err.Error()
	r.stats.mu.Unlock()
	r.changed.Notify()
}

// rescan scans the GPUs again; when the layout changed (a MIG
// re-partition, a GPU that came back) it re-advertises. Resources whose
// devices did not change keep their streams, so pods holding devices are
// not disturbed. A GPU that cannot be read now keeps its last known
// description: the health monitor owns that GPU's state.
func (r *reloader) rescan() {
	if r.d.lib == nil {
		return
	}
	start := time.Now()
	// Scan's per-GPU warnings would repeat every interval for a lost GPU;
	// the health monitor reports those once.
	inv, err := nvml.Scan(r.d.lib, nvml.ScanOptions{SysRoot: r.d.sysRoot(), Logger: slog.New(slog.DiscardHandler)})
	r.stats.mu.Lock()
	r.stats.rescanSeconds = time.Since(start).Seconds()
	r.stats.mu.Unlock()
	if err != nil {
		r.rescanDone("failure", "re-scan failed; keeping the advertised devices", err)
		return
	}
	merged, layout := mergeInventory(r.adv.Inventory, inv)
	if len(layout) == 0 {
		r.rescanDone("unchanged", "", nil)
		return
	}
	adv, err := r.build(merged, r.config())
	if err != nil {
		r.rescanDone("failure", "the GPUs changed but cannot be advertised under the current config; keeping the advertised devices", fmt.Errorf("%s: %w", strings.Join(layout, "; "), err))
		return
	}
	r.d.setInventory(inv)
	r.d.applyQuarantine(r.config(), merged)
	diff := r.publish(adv, r.config())
	r.log.Info("GPU layout changed: re-advertising", "changes", layout, "added", diff.Added, "removed", diff.Removed, "changed", diff.Changed,
		"cdiSpecChanged", diff.CDI)
	r.rescanDone("changed", "", nil)
	if diff.Labels {
		r.writeLabels()
	}
}

func (r *reloader) rescanDone(result, msg string, err error) {
	if err != nil && err.Error() != r.rescanErr {
		r.log.Error(msg, "err", err)
	}
	if err != nil {
		r.rescanErr = err.Error()
	} else {
		r.rescanErr = ""
	}
	r.stats.mu.Lock()
	r.stats.rescans[result]++
	r.stats.mu.Unlock()
	r.changed.Notify()
}

// mergeInventory takes the new scan for every GPU it could read and the
// previous description for every GPU it could not (lost, unidentified, or
// gone from the count), and lists what changed among the readable GPUs.
// The result is for building resources only: it has no NVML handles.
func mergeInventory(old, scan *nvml.Inventory) (*nvml.Inventory, []string) {
	merged := *scan
	merged.GPUs = nil
	oldByIndex := map[int]*nvml.GPU{}
	oldByUUID := map[string]*nvml.GPU{}
	if old != nil {
		for i := range old.GPUs {
			g := &old.GPUs[i]
			oldByIndex[g.Index] = g
			if g.Usable() {
				oldByUUID[g.UUID] = g
			}
		}
	}
	var diff []string
	seen := map[string]bool{}
	for i := range scan.GPUs {
		g := scan.GPUs[i]
		if !g.Usable() || g.Lost {
			if prev, ok := oldByIndex[g.Index]; ok && prev.Usable() {
				g = *prev
			}
		}
		if g.Usable() {
			seen[g.UUID] = true
			if prev, ok := oldByUUID[g.UUID]; !ok {
				diff = append(diff, fmt.Sprintf("GPU %d (%s) is new", g.Index, g.UUID))
			} else if a, b := migLayout(prev), migLayout(&g); a != b {
				diff = append(diff, fmt.Sprintf("GPU %d MIG %s → %s", g.Index, a, b))
			}
		}
		merged.GPUs = append(merged.GPUs, g)
	}
	// A GPU missing from the count altogether is kept: it is unhealthy,
	// not gone, until the daemon restarts.
	if old != nil {
		for i := range old.GPUs {
			if g := old.GPUs[i]; g.Usable() && !seen[g.UUID] {
				merged.GPUs = append(merged.GPUs, g)
			}
		}
	}
	slices.SortStableFunc(merged.GPUs, func(a, b nvml.GPU) int { return a.Index - b.Index })
	return &merged, diff
}

// migLayout describes a GPU's MIG mode and devices, for comparison and logs.
func migLayout(g *nvml.GPU) string {
	if !g.MIGEnabled {
		return "off"
	}
	if len(g.MIGDevices) == 0 {
		return "on, no devices"
	}
	var b strings.Builder
	for i, m := range g.MIGDevices {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, "%s(%s)", m.Profile, m.UUID)
	}
	return b.String()
}

// writeLabels writes the node labels file if its content would change.
func (r *reloader) writeLabels() {
	cfg := r.d.cfg
	nf := r.d.nodeFeature
	if !cfg.Daemon.NodeLabels || (cfg.Daemon.LabelsFile == "" && nf == nil) {
		return
	}
	if nf == nil && r.d.node != nil && cfg.Daemon.LabelsFile == config.DefaultLabelsFile {
		return // a simulated node must not label the real host; name a file to get them
	}
	l := r.adv.Labels
	where := cfg.Daemon.LabelsFile
	var wrote bool
	var err error
	if nf != nil {
		where = "NodeFeature " + nf.namespace + "/" + kube.NodeFeatureName(nf.node)
		wrote, err = nf.write(l)
	} else {
		wrote, err = labels.Write(cfg.Daemon.LabelsFile, l)
	}
	result := "success"
	if err != nil {
		result = "failure"
		if err.Error() != r.labelErr {
			level := slog.LevelError
			if errors.Is(err, labels.ErrNoDirectory) {
				level = slog.LevelWarn
			}
			r.log.Log(context.Background(), level, "node labels not written", "err", err)
		}
		r.labelErr = err.Error()
	} else {
		r.labelErr = ""
	}
	if !wrote && err == nil {
		return
	}
	if wrote {
		r.log.Info("node labels written", "to", where, "labels", len(l))
	}
	r.stats.mu.Lock()
	r.stats.labelWrites[result]++
	r.stats.mu.Unlock()
	r.changed.Notify()
}

// Describe implements prometheus.Collector.
func (r *reloader) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range reloadDescs {
		ch <- d
	}
}

var (
	descReloads = prometheus.NewDesc("gpu_plugin_config_reloads_total",
		"Config reloads (file change, ConfigMap update, SIGHUP) by result; a failure leaves the previous config in force.", []string{"result"}, nil)
	descLastReloadOK = prometheus.NewDesc("gpu_plugin_config_last_reload_successful",
		"1 if the last config reload was applied (or none was tried), 0 if it was rejected.", nil, nil)
	descLastReloadTime = prometheus.NewDesc("gpu_plugin_config_last_reload_success_timestamp_seconds",
		"When the config was last reloaded successfully (0: never since start).", nil, nil)
	descRescans = prometheus.NewDesc("gpu_plugin_inventory_rescans_total",
		"Periodic GPU re-scans by result: unchanged, changed (re-advertised), failure.", []string{"result"}, nil)
	descRescanSeconds = prometheus.NewDesc("gpu_plugin_inventory_last_rescan_duration_seconds",
		"How long the last GPU re-scan took.", nil, nil)
	descLabelWrites = prometheus.NewDesc("gpu_plugin_node_labels_writes_total",
		"Writes of the node labels file by result.", []string{"result"}, nil)
	descConfigWarnings = prometheus.NewDesc("gpu_plugin_config_warnings",
		"Warnings the config in force gives: unknown keys, keys written twice, settings ignored as NVIDIA's plugin ignores them; each is logged and listed by `gpu-plugin config check`.", nil, nil)
	descNodeConfig = prometheus.NewDesc("gpu_plugin_node_config_info",
		"With --config-dir: 1 for the config file in force, chosen by the node label (by: label, default, only-file, none).", []string{"config", "by"}, nil)
	descUnknownLabel = prometheus.NewDesc("gpu_plugin_node_config_unknown_label",
		"With --config-dir: 1 while the node label names no config file (the previous configuration stays in force), else 0.", nil, nil)
	reloadDescs = []*prometheus.Desc{descReloads, descLastReloadOK, descLastReloadTime, descRescans, descRescanSeconds, descLabelWrites, descConfigWarnings,
		descNodeConfig, descUnknownLabel}
)

// Collect implements prometheus.Collector from the counters.
func (r *reloader) Collect(ch chan<- prometheus.Metric) {
	s := &r.stats
	s.mu.Lock()
	defer s.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descReloads, prometheus.CounterValue, float64(s.reloadOK), "success")
	ch <- prometheus.MustNewConstMetric(descReloads, prometheus.CounterValue, float64(s.reloadFailed), "failure")
	ok := 0.0
	if s.lastOK {
		ok = 1
	}
	ch <- prometheus.MustNewConstMetric(descLastReloadOK, prometheus.GaugeValue, ok)
	var ts float64
	if !s.lastSuccess.IsZero() {
		ts = float64(s.lastSuccess.UnixNano()) / 1e9
	}
	ch <- prometheus.MustNewConstMetric(descLastReloadTime, prometheus.GaugeValue, ts)
	for _, res := range []string{"unchanged", "changed", "failure"} {
		ch <- prometheus.MustNewConstMetric(descRescans, prometheus.CounterValue, float64(s.rescans[res]), res)
	}
	ch <- prometheus.MustNewConstMetric(descRescanSeconds, prometheus.GaugeValue, s.rescanSeconds)
	for _, res := range []string{"success", "failure"} {
		ch <- prometheus.MustNewConstMetric(descLabelWrites, prometheus.CounterValue, float64(s.labelWrites[res]), res)
	}
	ch <- prometheus.MustNewConstMetric(descConfigWarnings, prometheus.GaugeValue, float64(len(r.config().Warnings())))
	if s.nodeConfigBy != "" {
		ch <- prometheus.MustNewConstMetric(descNodeConfig, prometheus.GaugeValue, 1, s.nodeConfig, s.nodeConfigBy)
		unknown := 0.0
		if s.unknownLabel != "" {
			unknown = 1
		}
		ch <- prometheus.MustNewConstMetric(descUnknownLabel, prometheus.GaugeValue, unknown)
	}
}
