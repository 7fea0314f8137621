package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// The node's fixed addresses. They exist only inside the suite's private
// network namespace (nsexec.sh creates nodeIP on a veth pair), so they can
// collide with nothing on the machine.
const (
	nodeName    = "e2e-node"
	nodeIP      = "10.200.0.1"
	podSubnet   = "10.88.0.0/16"
	serviceCIDR = "10.96.0.0/16"
	apiPort     = "6443"
	etcdClient  = "http://127.0.0.1:2379"
	etcdPeer    = "http://127.0.0.1:2380"
	adminToken  = "e2e-admin-token"
	gpuResource = corev1.ResourceName("nvidia.com/gpu")
	pauseImage  = "registry.k8s.io/pause:3.10"
	podImage    = "e2e.local/busybox:1"
	// cdiSpecDir is where containerd reads CDI specs, and where the chart's
	// daemon writes them (its --cdi-spec-dir and hostPath default).
	cdiSpecDir = "/var/run/cdi"
)

// env is what scripts/test-e2e.sh hands the suite.
type env struct {
	root         string // temporary root: every component's state lives under it
	nodeBin      string // the e2e-node multi-call binary (cmd/e2e-node)
	cgroupRoot   string // the kubelet's cgroupRoot, created by the script in every v1 hierarchy
	busybox      string // a static busybox, for the pause and test pod images
	containerd   string // the directory of containerd, containerd-shim-runc-v2 and ctr (containerd/go.mod's version)
	imageArchive string // the project image, a docker-archive tarball
	image        string // its name:tag
	imageOrigin  string // how it was built, for the test output
	// Scenario 4c's image: the project image plus the fake
	// nvidia-cuda-mps-control (image.sh's build_mps_image), and that fake
	// on this machine.
	mpsImageArchive string
	mpsImage        string
	mpsControl      string
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// loadEnv skips the test unless it runs inside nsexec.sh's namespaces with
// everything the script prepares.
func loadEnv(t *testing.T) env {
	t.Helper()
	if os.Getenv("IN_E2E_NS") != "1" {
		t.Skip("tests/e2e runs only through scripts/test-e2e.sh (make e2e): root, private mount, network and PID namespaces")
	}
	e := env{
		root:         os.Getenv("E2E_ROOT"),
		nodeBin:      os.Getenv("E2E_NODE_BIN"),
		cgroupRoot:   os.Getenv("E2E_CGROUP_ROOT"),
		busybox:      os.Getenv("E2E_BUSYBOX"),
		containerd:   os.Getenv("E2E_CONTAINERD"),
		imageArchive: os.Getenv("E2E_IMAGE_ARCHIVE"),
		image:        os.Getenv("E2E_IMAGE"),
		imageOrigin:  os.Getenv("E2E_IMAGE_ORIGIN"),

		mpsImageArchive: os.Getenv("E2E_MPS_IMAGE_ARCHIVE"),
		mpsImage:        os.Getenv("E2E_MPS_IMAGE"),
		mpsControl:      os.Getenv("E2E_MPS_CONTROL"),
	}
	for name, v := range map[string]string{"E2E_ROOT": e.root, "E2E_NODE_BIN": e.nodeBin, "E2E_CGROUP_ROOT": e.cgroupRoot,
		"E2E_BUSYBOX": e.busybox, "E2E_CONTAINERD": e.containerd, "E2E_IMAGE_ARCHIVE": e.imageArchive, "E2E_IMAGE": e.image,
		"E2E_MPS_IMAGE_ARCHIVE": e.mpsImageArchive, "E2E_MPS_IMAGE": e.mpsImage, "E2E_MPS_CONTROL": e.mpsControl} {
		if v == "" {
			t.Fatalf("%s is not set: run the suite through scripts/test-e2e.sh", name)
		}
	}
	return e
}

// component is one process of the node, logging to its own file.
type component struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// node is the running node: its processes, its API client, its paths.
type node struct {
	env        env
	kubeconfig string
	client     kubernetes.Interface
	ctrdSock   string
	logDir     string

	mu    sync.Mutex
	comps map[string]*component
	order []string
}

func (n *node) path(p ...string) string { return filepath.Join(append([]string{n.env.root}, p...)...) }

// start runs a component; its output goes to logs/NAME.log (appended, so a
// restarted component keeps its earlier log).
func (n *node) start(t *testing.T, name string, argv ...string) *component {
	t.Helper()
	return n.startEnv(t, name, nil, argv...)
}

// startEnv is start with extra environment variables.
func (n *node) startEnv(t *testing.T, name string, env []string, argv ...string) *component {
	t.Helper()
	logPath := filepath.Join(n.logDir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "==== %s starting: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(argv, " "))
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	// Whatever happens to the test, its processes go with it (the PID
	// namespace ends them too).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("starting %s: %v", name, err)
	}
	c := &component{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		f.Close()
		close(c.done)
	}()
	n.mu.Lock()
	if _, ok := n.comps[name]; !ok {
		n.order = append(n.order, name)
	}
	n.comps[name] = c
	n.mu.Unlock()
	return c
}

// stop ends a component with SIGTERM, then SIGKILL after grace.
func (n *node) stop(name string, grace time.Duration) error {
	n.mu.Lock()
	c := n.comps[name]
	n.mu.Unlock()
	if c == nil {
		return nil
	}
	select {
	case <-c.done:
		return nil
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	<-c.done
	return fmt.Errorf("%s did not stop within %s of SIGTERM; killed", name, grace)
}

// alive fails the test if a component has exited.
func (n *node) alive(t *testing.T, name string) {
	t.Helper()
	n.mu.Lock()
	c := n.comps[name]
	n.mu.Unlock()
	select {
	case <-c.done:
		t.Fatalf("%s exited: %v (log: %s)", name, c.err, c.log)
	default:
	}
}

// dumpLogs prints the tail of every component's log and of the plugin
// pod's, so that a red run is readable from its output alone.
func (n *node) dumpLogs(t *testing.T) {
	n.mu.Lock()
	order := append([]string(nil), n.order...)
	n.mu.Unlock()
	for _, name := range order {
		t.Logf("---- %s log (last 60 lines) ----\n%s", name, tail(filepath.Join(n.logDir, name+".log"), 60))
	}
	if n.client == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pods, err := n.client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Logf("listing pods for their logs: %v", err)
		return
	}
	for _, p := range pods.Items {
		t.Logf("---- pod %s/%s: phase %s, conditions %s", p.Namespace, p.Name, p.Status.Phase, conditions(&p))
		for _, c := range p.Spec.Containers {
			lines := int64(60)
			b, err := n.client.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: c.Name, TailLines: &lines}).DoRaw(ctx)
			if err != nil {
				t.Logf("  container %s log: %v", c.Name, err)
				continue
			}
			t.Logf("  container %s log (last 60 lines):\n%s", c.Name, b)
		}
	}
}

func conditions(p *corev1.Pod) string {
	var s []string
	for _, c := range p.Status.Conditions {
		s = append(s, fmt.Sprintf("%s=%s %s", c.Type, c.Status, c.Message))
	}
	for _, c := range p.Status.ContainerStatuses {
		if w := c.State.Waiting; w != nil {
			s = append(s, fmt.Sprintf("container %s waiting: %s %s", c.Name, w.Reason, w.Message))
		}
		if x := c.State.Terminated; x != nil {
			s = append(s, fmt.Sprintf("container %s terminated: %s %d %s", c.Name, x.Reason, x.ExitCode, x.Message))
		}
	}
	return strings.Join(s, "; ")
}

func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 4*1024*1024)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// startNode brings the node up: etcd, the API server, the controller
// manager and the scheduler, containerd with the images imported, and the
// kubelet; it returns once the node is Ready.
func startNode(t *testing.T, e env) *node {
	t.Helper()
	n := &node{env: e, comps: map[string]*component{}, logDir: filepath.Join(e.root, "logs")}
	for _, d := range []string{n.logDir, n.path("etcd"), n.path("apiserver"), n.path("containerd"), n.path("cni", "net.d"),
		n.path("kubelet-root"), n.path("kubelet")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			n.dumpLogs(t)
		}
		n.shutdown(t)
	})
	n.privateMounts(t)
	n.writeCredentials(t)

	t0 := time.Now()
	n.start(t, "etcd", e.nodeBin, "etcd", n.path("etcd"), etcdClient, etcdPeer)
	n.waitHTTP(t, "etcd", etcdClient+"/health", 60*time.Second)

	n.start(t, "kube-apiserver", e.nodeBin, "kube-apiserver",
		"--etcd-servers="+etcdClient,
		"--advertise-address="+nodeIP,
		"--secure-port="+apiPort,
		"--cert-dir="+n.path("apiserver"),
		"--token-auth-file="+n.path("tokens.csv"),
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+n.path("sa.pub"),
		"--service-account-signing-key-file="+n.path("sa.key"),
		"--service-cluster-ip-range="+serviceCIDR,
		// The node's name resolves nowhere: reach the kubelet (logs, exec) by its address.
		"--kubelet-preferred-address-types=InternalIP",
		"--profiling=false",
	)
	n.waitHTTP(t, "kube-apiserver", "https://127.0.0.1:"+apiPort+"/readyz", 180*time.Second)
	cfg, err := clientcmd.BuildConfigFromFlags("", n.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	n.client = kubernetes.NewForConfigOrDie(cfg)
	t.Logf("etcd and kube-apiserver ready in %s", time.Since(t0).Round(time.Millisecond))

	n.start(t, "kube-controller-manager", e.nodeBin, "kube-controller-manager",
		"--kubeconfig="+n.kubeconfig,
		"--leader-elect=false",
		"--controllers=*",
		"--bind-address=127.0.0.1",
		"--service-account-private-key-file="+n.path("sa.key"),
		"--root-ca-file="+n.path("apiserver", "apiserver.crt"),
		"--profiling=false",
	)
	n.start(t, "kube-scheduler", e.nodeBin, "kube-scheduler",
		"--kubeconfig="+n.kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--profiling=false",
	)

	t1 := time.Now()
	n.startContainerd(t)
	n.importImages(t)
	t.Logf("containerd ready and images imported in %s (project image: %s, %s); runtime: %s, %s", time.Since(t1).Round(time.Millisecond),
		e.image, e.imageOrigin, firstLine(filepath.Join(e.containerd, "containerd"), "--version"), firstLine("runc", "--version"))

	n.startKubelet(t)
	t2 := time.Now()
	n.waitNode(t, "Ready", 180*time.Second, func(nd *corev1.Node) bool {
		for _, c := range nd.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status == corev1.ConditionTrue
			}
		}
		return false
	})
	t.Logf("node %s Ready %s after the kubelet started (%s after etcd)", nodeName, time.Since(t2).Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	n.waitDefaultServiceAccount(t, "default")
	return n
}

// privateMounts puts the node's fixed host paths out of the machine's
// reach. The suite runs in a private mount namespace (nsexec.sh), so these
// mounts vanish with it.
func (n *node) privateMounts(t *testing.T) {
	t.Helper()
	mounts := []struct{ src, dst, fstype string }{
		// The kubelet's root: device-plugins and pod-resources are fixed paths.
		{n.path("kubelet-root"), "/var/lib/kubelet", "bind"},
		// containerd's shim sockets, CDI specs, netns mounts.
		{"tmpfs", "/run", "tmpfs"},
		// /var/log/pods and /var/log/containers.
		{"tmpfs", "/var/log", "tmpfs"},
		// The chart's node-feature-discovery hostPath (the script creates the directory if absent).
		{"tmpfs", "/etc/kubernetes", "tmpfs"},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			t.Fatal(err)
		}
		var err error
		if m.fstype == "bind" {
			err = syscall.Mount(m.src, m.dst, "", syscall.MS_BIND, "")
		} else {
			err = syscall.Mount(m.src, m.dst, m.fstype, 0, "mode=0755")
		}
		if err != nil {
			t.Fatalf("mounting %s on %s: %v", m.src, m.dst, err)
		}
	}
}

// writeCredentials writes the service-account key pair, the static token
// file and the kubeconfig every component and the test use.
func (n *node) writeCredentials(t *testing.T) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	write(t, n.path("sa.key"), string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})))
	write(t, n.path("sa.pub"), string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})))
	write(t, n.path("tokens.csv"), adminToken+",admin,admin,\"system:masters\"\n")
	n.kubeconfig = n.path("kubeconfig")
	write(t, n.kubeconfig, `apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:`+apiPort+`
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: `+adminToken+`
contexts:
- name: e2e
  context: {cluster: e2e, user: admin}
current-context: e2e
`)
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// waitHTTP waits for url to answer 200 (with the admin token, any
// certificate), failing early if the component exits.
func (n *node) waitHTTP(t *testing.T, name, url string, timeout time.Duration) {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	var last string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		n.mu.Lock()
		c := n.comps[name]
		n.mu.Unlock()
		select {
		case <-c.done:
			return false, fmt.Errorf("%s exited: %v", name, c.err)
		default:
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
		resp, err := hc.Do(req)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		resp.Body.Close()
		last = resp.Status
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		t.Fatalf("%s: %s not ready after %s: %v (last answer: %s)", name, url, timeout, err, last)
	}
}

func (n *node) startContainerd(t *testing.T) {
	t.Helper()
	dir := n.path("containerd")
	n.ctrdSock = filepath.Join(dir, "containerd.sock")
	cni := `{
  "cniVersion": "0.4.0",
  "name": "e2e",
  "plugins": [{
    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "` + podSubnet + `"}]], "routes": [{"dst": "0.0.0.0/0"}],
             "dataDir": "` + n.path("cni", "ipam") + `"}
  }]
}
`
	write(t, n.path("cni", "net.d", "10-e2e.conflist"), cni)
	// CDI specs: the node's own /var/run/cdi (under the private /run), made
	// now so that containerd watches it from the start; the machine's
	// /etc/cdi is not the node's, so it is left out of the spec directories.
	if err := os.MkdirAll(cdiSpecDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Config version 3 (containerd v2's CRI layout; v2.4 migrates it to its
	// version 4 in memory). restrict_oom_score_adj: runc cannot lower a
	// sandbox's oom_score_adj without CAP_SYS_RESOURCE, which CI machines
	// lack. The runc runtime's SystemdCgroup stays false: cgroupfs, as the
	// kubelet's cgroupDriver.
	config := `version = 3
root = "` + filepath.Join(dir, "root") + `"
state = "` + filepath.Join(dir, "state") + `"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "` + n.ctrdSock + `"
[ttrpc]
  address = "` + n.ctrdSock + `.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "` + filepath.Join(dir, "opt") + `"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "` + pauseImage + `"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = ["` + cdiSpecDir + `"]
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "` + n.path("cni", "net.d") + `"
`
	write(t, filepath.Join(dir, "config.toml"), config)
	// containerd finds its shim (containerd-shim-runc-v2) on PATH; the shim
	// runs Debian's runc, also from PATH.
	n.startEnv(t, "containerd", []string{"PATH=" + n.env.containerd + string(os.PathListSeparator) + os.Getenv("PATH")},
		filepath.Join(n.env.containerd, "containerd"), "--config", filepath.Join(dir, "config.toml"))
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		n.alive(t, "containerd")
		c, err := net.Dial("unix", n.ctrdSock)
		if err != nil {
			return false, nil
		}
		c.Close()
		return true, nil
	})
	if err != nil {
		t.Fatalf("containerd's socket %s did not appear: %v", n.ctrdSock, err)
	}
}

// firstLine is the first line a command prints, or why it printed none.
func firstLine(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("%s: %v", name, err)
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

// ctr runs containerd's own client against the node's containerd, in the
// CRI plugin's k8s.io namespace.
func (n *node) ctr(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(n.env.containerd, "ctr"), append([]string{"--address", n.ctrdSock, "--namespace", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (n *node) importImages(t *testing.T) {
	t.Helper()
	dir := n.path("images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	pause := filepath.Join(dir, "pause.tar")
	if err := busyboxImage(n.env.busybox, pause, pauseImage, []string{"/bin/sleep", "infinity"}); err != nil {
		t.Fatal(err)
	}
	pod := filepath.Join(dir, "busybox.tar")
	if err := busyboxImage(n.env.busybox, pod, podImage, []string{"/bin/sh"}); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{pause, pod, n.env.imageArchive, n.env.mpsImageArchive} {
		if _, err := n.ctr("images", "import", a); err != nil {
			t.Fatal(err)
		}
	}
	out, err := n.ctr("images", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{pauseImage, podImage, n.env.image, n.env.mpsImage} {
		if !strings.Contains(out, want) {
			t.Fatalf("image %s not in containerd after import; it has:\n%s", want, out)
		}
	}
}

func (n *node) startKubelet(t *testing.T) {
	t.Helper()
	config := `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 and no systemd.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: ` + n.env.cgroupRoot + `
containerRuntimeEndpoint: unix://` + n.ctrdSock + `
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
failSwapOn: false
readOnlyPort: 0
# A mounted ConfigMap is refreshed on the pod's next sync: every syncFrequency
# (default 1m) plus jitter; 10s keeps the time-slicing scenario short.
syncFrequency: 10s
# Left at its default (10s): the health scenario measures what a real node does.
nodeStatusUpdateFrequency: 10s
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`
	write(t, n.path("kubelet", "config.yaml"), config)
	n.start(t, "kubelet", n.env.nodeBin, "kubelet",
		"--config="+n.path("kubelet", "config.yaml"),
		"--kubeconfig="+n.kubeconfig,
		"--hostname-override="+nodeName,
		"--node-ip="+nodeIP,
		"--v=1",
	)
}

// waitNode waits until cond holds for the node and returns it.
func (n *node) waitNode(t *testing.T, what string, timeout time.Duration, cond func(*corev1.Node) bool) *corev1.Node {
	t.Helper()
	var got *corev1.Node
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		n.alive(t, "kubelet")
		nd, err := n.client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		got = nd
		return cond(nd), nil
	})
	if err != nil {
		desc := "no node object"
		if got != nil {
			desc = fmt.Sprintf("capacity %v allocatable %v conditions %v", got.Status.Capacity, got.Status.Allocatable, got.Status.Conditions)
		}
		t.Fatalf("node %s: %s not reached in %s: %v; %s", nodeName, what, timeout, err, desc)
	}
	return got
}

// waitDefaultServiceAccount waits for the controller manager to create
// namespace ns's default service account, which the API server's
// ServiceAccount admission needs before it admits a pod there.
func (n *node) waitDefaultServiceAccount(t *testing.T, ns string) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := n.client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("the controller manager created no default service account in %s: %v", ns, err)
	}
}

// gpus returns the node's capacity and allocatable of nvidia.com/gpu.
func gpus(nd *corev1.Node) (capacity, allocatable int64) {
	q := func(l corev1.ResourceList) int64 {
		v, ok := l[gpuResource]
		if !ok {
			return 0
		}
		return v.Value()
	}
	return q(nd.Status.Capacity), q(nd.Status.Allocatable)
}

func gpuLimit(n int64) corev1.ResourceRequirements {
	return corev1.ResourceRequirements{Limits: corev1.ResourceList{gpuResource: *resource.NewQuantity(n, resource.DecimalSI)}}
}

// shutdown stops the kubelet first (so it starts no more containers), then
// containerd, then the control plane. Container processes end with the PID
// namespace when the test binary exits.
func (n *node) shutdown(t *testing.T) {
	var errs []error
	for _, name := range []string{"prometheus", "kubelet", "kube-scheduler", "kube-controller-manager", "containerd", "kube-apiserver", "etcd"} {
		if err := n.stop(name, 20*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Logf("shutdown: %v", err)
	}
}
