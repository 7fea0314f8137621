package kubelet

// The harness: the real device manager as the kubelet runs it, our daemon
// in process, bounded waits, and a leak check. Scenarios live in
// conformance_test.go; new ones should need nothing else.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	kubeletconfig "k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	gpuplugin "github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

const (
	gpuResource = "nvidia.com/gpu"
	// containerName is the one container of every test pod.
	containerName = "cuda"
	// pollInterval paces waits on the device manager: it has no change
	// notification, so GetCapacity (a map read under a mutex) is polled.
	pollInterval = 2 * time.Millisecond
	// waitTimeout bounds every wait on the manager or the daemon.
	waitTimeout = 30 * time.Second
)

// requireKubeletNamespace skips unless the test binary runs under
// nsexec.sh: the device manager deletes every socket in
// /var/lib/kubelet/device-plugins, which must never happen on a real node.
func requireKubeletNamespace(tb testing.TB) {
	tb.Helper()
	if os.Getenv("IN_KUBELET_NS") != "1" {
		tb.Skip(`needs a private mount namespace over /var/lib/kubelet: run "go test -exec $PWD/nsexec.sh ./..." in tests/kubelet (as root)`)
	}
}

// counts is one resource as the kubelet writes it into the node status.
type counts struct{ Capacity, Allocatable int64 }

func (c counts) String() string {
	return fmt.Sprintf("capacity %d / allocatable %d", c.Capacity, c.Allocatable)
}

// kubelet is the real device manager (ManagerImpl), started the way the
// kubelet's container manager starts it, with a pod list standing in for
// the kubelet's pod manager.
type kubelet struct {
	tb     testing.TB
	logger klog.Logger

	mu   sync.Mutex
	m    *devicemanager.ManagerImpl
	pods []*v1.Pod // active pods: admitted and not deleted
}

// startKubelet starts a device manager on a fresh node: the device-plugin
// directory is emptied first (sockets and checkpoint), then Start creates
// kubelet.sock. Start the kubelet before the daemon, as on a node: the
// daemon needs the directory to exist. The manager stops at cleanup.
func startKubelet(tb testing.TB) *kubelet {
	tb.Helper()
	return startKubeletLogged(tb, kubeletLogger(tb))
}

// startKubeletLogged is startKubelet with the manager (and every manager
// after a restart) logging to logger.
func startKubeletLogged(tb testing.TB, logger klog.Logger) *kubelet {
	tb.Helper()
	requireKubeletNamespace(tb)
	if err := os.RemoveAll(pluginapi.DevicePluginPath); err != nil {
		tb.Fatalf("emptying the device-plugin directory for a fresh node: %v", err)
	}
	k := &kubelet{tb: tb, logger: logger}
	k.start()
	tb.Cleanup(k.stop)
	return k
}

func (k *kubelet) start() {
	k.tb.Helper()
	m, err := devicemanager.NewManagerImpl(k.logger, nil, topologymanager.NewFakeManager(k.logger))
	if err != nil {
		k.tb.Fatalf("creating the device manager: %v", err)
	}
	allReady := kubeletconfig.NewSourcesReady(func(sets.Set[string]) bool { return true })
	if err := m.Start(k.logger, k.activePods, allReady, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		k.tb.Fatalf("starting the device manager: %v", err)
	}
	k.mu.Lock()
	k.m = m
	k.mu.Unlock()
}

// stop stops the manager: its registration server goes and every plugin
// connection is closed, as when the kubelet exits. Safe to call twice.
func (k *kubelet) stop() {
	k.mu.Lock()
	m := k.m
	k.m = nil
	k.mu.Unlock()
	if m != nil {
		if err := m.Stop(k.logger); err != nil {
			k.tb.Errorf("stopping the device manager: %v", err)
		}
	}
}

// restart is a kubelet restart: the manager stops and a new one starts over
// the same directory, reading the checkpoint and deleting every plugin
// socket.
func (k *kubelet) restart() {
	k.tb.Helper()
	k.stop()
	k.start()
}

func (k *kubelet) manager() *devicemanager.ManagerImpl {
	k.tb.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.m == nil {
		k.tb.Fatal("the device manager is stopped")
	}
	return k.m
}

func (k *kubelet) activePods() []*v1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.pods)
}

// capacity is what the kubelet would report for resource right now.
func (k *kubelet) capacity(resource string) counts {
	c, a, _ := k.manager().GetCapacity(k.logger)
	capacity, allocatable := c[v1.ResourceName(resource)], a[v1.ResourceName(resource)]
	return counts{Capacity: capacity.Value(), Allocatable: allocatable.Value()}
}

// waitCapacity waits until resource shows want and returns how long that
// took; the test fails after waitTimeout. Capacity shows before the
// daemon's Register call has returned: call plugin.waitRegistered before
// restarting the kubelet or reading registration counts.
func (k *kubelet) waitCapacity(resource string, want counts) time.Duration {
	k.tb.Helper()
	return k.waitUntil(resource, want.String(), func(c counts) bool { return c == want })
}

// waitUntil polls GetCapacity until ok holds for resource; what describes
// the condition in the failure message.
func (k *kubelet) waitUntil(resource, what string, ok func(counts) bool) time.Duration {
	k.tb.Helper()
	start := time.Now()
	var last counts
	err := poll(waitTimeout, func() bool {
		last = k.capacity(resource)
		return ok(last)
	})
	if err != nil {
		k.tb.Fatalf("kubelet device manager: %s never showed %s within %v (last seen: %s)", resource, what, waitTimeout, last)
	}
	return time.Since(start)
}

// devices returns the healthy devices the manager knows for resource, by ID.
func (k *kubelet) devices(resource string) map[string]*pluginapi.Device {
	return k.manager().GetAllocatableDevices(k.logger)[resource]
}

// admit allocates a pod's first container through the manager as the
// kubelet's admission does (Allocate), then asks for the container's run
// options as the kubelet does before creating it. An admitted pod counts as
// active until deletePod.
func (k *kubelet) admit(pod *v1.Pod) (*devicemanager.DeviceRunContainerOptions, error) {
	k.tb.Helper()
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), k.logger), waitTimeout)
	defer cancel()
	m, c := k.manager(), &pod.Spec.Containers[0]
	if err := m.Allocate(ctx, pod, c, lifecycle.AddOperation); err != nil {
		return nil, err
	}
	k.mu.Lock()
	k.pods = append(k.pods, pod)
	k.mu.Unlock()
	return m.GetDeviceRunContainerOptions(ctx, pod, c)
}

// deletePod makes a pod inactive; the manager frees its devices at the next
// allocation.
func (k *kubelet) deletePod(pod *v1.Pod) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pods = slices.DeleteFunc(k.pods, func(p *v1.Pod) bool { return p.UID == pod.UID })
}

// allocated returns the device IDs the manager gave the pod's container,
// sorted.
func (k *kubelet) allocated(pod *v1.Pod, resource string) []string {
	ids := make([]string, 0)
	for id := range k.manager().GetDevices(string(pod.UID), containerName)[resource] {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// gpuPod is a pod whose one container asks for n of resource.
func gpuPod(name, resourceName string, n int64) *v1.Pod {
	q := *resource.NewQuantity(n, resource.DecimalSI)
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name:  containerName,
			Image: "cuda",
			Resources: v1.ResourceRequirements{
				Limits:   v1.ResourceList{v1.ResourceName(resourceName): q},
				Requests: v1.ResourceList{v1.ResourceName(resourceName): q},
			},
		}}},
	}
}

// plugin is our daemon running in process, as `gpu-plugin [flags]` would.
type plugin struct {
	tb     testing.TB
	d      *daemon.Daemon
	cdiDir string // where the daemon writes CDI specs
	cancel context.CancelFunc
	done   chan error

	stopOnce sync.Once
	runErr   error
}

// defaultFlags put the daemon on a simulated dgx-h100, in the directory the
// real device manager uses, without a metrics listener, and point every
// option whose default writes to the host into tmp: only /var/lib/kubelet
// is private to the test.
func defaultFlags(tmp string) []string {
	flags := []string{
		"--simulate=dgx-h100",
		"--kubelet-socket-dir=" + pluginapi.DevicePluginPath,
		"--metrics-address=",
	}
	hostWriters := map[string]string{ // option → value inside tmp
		"cdi-spec-dir": filepath.Join(tmp, "cdi"),
		"labels-file":  filepath.Join(tmp, "features.d", "gpu-plugin"),
	}
	for _, o := range config.Options() {
		if v, ok := hostWriters[o.Name]; ok {
			flags = append(flags, "--"+o.Name+"="+v)
		}
	}
	return flags
}

// startPlugin runs the daemon with flags added to defaultFlags (later flags
// win, so any default can be overridden, e.g. --simulate=pcie-l4x4 or
// --config=FILE from configFile). The environment is not read. The daemon
// stops at cleanup.
func startPlugin(tb testing.TB, flags ...string) *plugin {
	tb.Helper()
	return startPluginLogged(tb, daemonLogger(tb), flags...)
}

// startPluginLogged is startPlugin with the daemon logging to log.
func startPluginLogged(tb testing.TB, log *slog.Logger, flags ...string) *plugin {
	tb.Helper()
	args := append(defaultFlags(tb.TempDir()), flags...)
	cfg, rest, err := config.Load("gpu-plugin", args, func(string) string { return "" }, io.Discard)
	if err != nil {
		tb.Fatalf("daemon flags %q: %v", args, err)
	}
	if len(rest) > 0 {
		tb.Fatalf("daemon flags %q: unexpected arguments %q", args, rest)
	}
	cfg.Daemon.NodeName = "conformance-node"
	p := &plugin{tb: tb, done: make(chan error, 1), cdiDir: cfg.Daemon.CDISpecDir}
	p.d, err = daemon.New(cfg, log)
	if err != nil {
		tb.Fatalf("daemon.New with %q: %v", args, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	go func() { p.done <- p.d.Run(ctx) }()
	tb.Cleanup(func() {
		if err := p.stop(); err != nil {
			tb.Errorf("daemon stopped with an error: %v", err)
		}
	})
	return p
}

// stop cancels the daemon's context, as SIGTERM does, waits (bounded) for
// Run to return and closes NVML. It returns Run's error; safe to call twice.
func (p *plugin) stop() error {
	p.stopOnce.Do(func() {
		p.cancel()
		select {
		case p.runErr = <-p.done:
		case <-time.After(waitTimeout):
			p.runErr = fmt.Errorf("Run did not return within %v of its context being cancelled", waitTimeout)
			return
		}
		p.runErr = errors.Join(p.runErr, p.d.Close())
	})
	return p.runErr
}

// socket is where the daemon serves resource.
func (p *plugin) socket(resource string) string {
	return filepath.Join(pluginapi.DevicePluginPath, sharing.SocketName(resource))
}

// gpuUUIDs are the simulated node's GPU UUIDs, by index.
func (p *plugin) gpuUUIDs() []string {
	var out []string
	for _, g := range p.d.Inventory().GPUs {
		out = append(out, g.UUID)
	}
	return out
}

// registrations is how often resource has registered with a kubelet.
func (p *plugin) registrations(resource string) uint64 {
	for _, st := range p.d.Plugins().Status() {
		if st.Resource == resource {
			return st.Registrations
		}
	}
	return 0
}

// injectCDI resolves CDI device names against the specs the daemon wrote,
// as a container runtime does with the kubelet's CDI devices, and returns
// the container spec they produce.
func (p *plugin) injectCDI(names ...string) (*oci.Spec, error) {
	cache, err := cdi.NewCache(cdi.WithSpecDirs(p.cdiDir), cdi.WithAutoRefresh(false))
	if err != nil {
		return nil, fmt.Errorf("loading CDI specs from %s: %w", p.cdiDir, err)
	}
	spec := &oci.Spec{Process: &oci.Process{}}
	if unresolved, err := cache.InjectDevices(spec, names...); err != nil {
		return nil, fmt.Errorf("CDI devices %v unresolved in %s: %w", unresolved, p.cdiDir, err)
	}
	return spec, nil
}

// waitRegistered waits until every resource of the daemon reports itself
// registered, with no registration error pending; when names the moment
// in the failure message.
func (p *plugin) waitRegistered(when string) {
	p.tb.Helper()
	var last []gpuplugin.ResourceStatus
	err := poll(waitTimeout, func() bool {
		last = p.d.Plugins().Status()
		for _, st := range last {
			if !st.Registered || st.LastRegisterError != "" {
				return false
			}
		}
		return len(last) > 0
	})
	if err != nil {
		p.tb.Fatalf("%s: the daemon never reported itself registered without error within %v: %+v", when, waitTimeout, last)
	}
}

// fakeDevRoot creates the NVIDIA device nodes of a node with up to 16 GPUs
// (character devices with the driver's major numbers) under a temporary
// directory and returns it, for --dev-root: CDI injection stats the host
// device nodes, as a container runtime does. Needs root, as the suite does.
func fakeDevRoot(tb testing.TB) string {
	tb.Helper()
	root := tb.TempDir()
	if err := os.Mkdir(filepath.Join(root, "dev"), 0o755); err != nil {
		tb.Fatal(err)
	}
	const nvidiaMajor, uvmMajor = 195, 510
	nodes := map[string][2]uint32{"nvidiactl": {nvidiaMajor, 255}, "nvidia-uvm": {uvmMajor, 0}, "nvidia-uvm-tools": {uvmMajor, 1}}
	for minor := range uint32(16) {
		nodes[fmt.Sprintf("nvidia%d", minor)] = [2]uint32{nvidiaMajor, minor}
	}
	for name, dev := range nodes {
		path := filepath.Join(root, "dev", name)
		if err := unix.Mknod(path, unix.S_IFCHR|0o666, int(unix.Mkdev(dev[0], dev[1]))); err != nil {
			tb.Fatalf("creating device node %s: %v", path, err)
		}
	}
	return root
}

// configFile writes a config file (NVIDIA's `version: v1` format) and
// returns the flag that names it.
func configFile(tb testing.TB, yaml string) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		tb.Fatal(err)
	}
	return "--config=" + path
}

// poll calls cond at once and then every pollInterval until it holds or
// timeout passes.
func poll(timeout time.Duration, cond func() bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// usage is what a long-running process must not accumulate.
type usage struct{ Goroutines, FDs int }

func (u usage) String() string { return fmt.Sprintf("%d goroutines, %d open fds", u.Goroutines, u.FDs) }

func currentUsage(tb testing.TB) usage {
	tb.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatalf("counting open file descriptors: %v", err)
	}
	return usage{Goroutines: runtime.NumGoroutine(), FDs: len(fds)}
}

// checkNoLeak waits (bounded) until goroutines and open fds are back within
// slack of before, since stopped servers' goroutines end asynchronously, and
// fails with a goroutine dump if they are not. It returns the final usage.
func checkNoLeak(tb testing.TB, before usage, slack int) usage {
	tb.Helper()
	var now usage
	err := poll(10*time.Second, func() bool {
		now = currentUsage(tb)
		return now.Goroutines <= before.Goroutines+slack && now.FDs <= before.FDs+slack
	})
	if err != nil {
		var dump bytes.Buffer
		_ = pprof.Lookup("goroutine").WriteTo(&dump, 1)
		tb.Fatalf("leak: before %s, after %s (slack %d)\n%s", before, now, slack, dump.String())
	}
	return now
}

// kubeletLogger logs the manager through the test (verbosity 2: plugin
// connections and device updates); benchmarks discard it.
func kubeletLogger(tb testing.TB) klog.Logger {
	if b, bench := tb.(*testing.B); bench {
		// The registration server logs through klog's global logger (its
		// request contexts carry none); keep benchmark output parseable.
		klog.SetLogger(logr.Discard())
		b.Cleanup(klog.ClearLogger)
		return logr.Discard()
	}
	return ktesting.NewLogger(tb, ktesting.NewConfig(ktesting.Verbosity(2)))
}

// daemonLogger logs the daemon through the test; benchmarks discard it.
func daemonLogger(tb testing.TB) *slog.Logger {
	if _, bench := tb.(*testing.B); bench {
		return slog.New(slog.DiscardHandler)
	}
	w := &testWriter{tb: tb}
	tb.Cleanup(w.close) // registered first, so it runs after the daemon has stopped
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testWriter sends log lines to t.Log until the test ends; a line written
// later (a gRPC handler finishing late) is dropped instead of panicking.
type testWriter struct {
	mu   sync.Mutex
	tb   testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.tb.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
}
