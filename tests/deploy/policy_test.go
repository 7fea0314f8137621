package deploy

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"
)

// mountDoc is one row of docs/install.md's table of host paths.
type mountDoc struct {
	Host      string // absolute host path; "" for the driver root
	Container string
	ReadOnly  bool
}

// driverRootMount is the container path of the driver root, the one mount
// whose host path is a value (and absent when the driver root is "/").
const driverRootMount = "/driver-root"

// mpsShmMount is where the MPS root's shm directory is mounted: the MPS
// servers' and their clients' shared memory.
const mpsShmMount = "/dev/shm"

// isMPSRow reports whether a row of the host path table is one of the MPS
// mounts (naming mps.root, or /dev/shm): they are there only with MPS, at
// the policy's root, so expectedMounts adds them itself.
func isMPSRow(cells []string) bool {
	return strings.Contains(strings.ToLower(cells[0]+cells[1]), "mps") || strings.Contains(cells[1], "`"+mpsShmMount+"`")
}

// isDRARow reports whether a row of the host path table is one of the DRA
// mounts (naming a dra.* value): they are there only with DRA, at the
// policy's directories, so expectedMounts adds them itself.
func isDRARow(cells []string) bool {
	return strings.Contains(cells[0], "`dra.")
}

// documentedMounts parses docs/install.md's host path table (between the
// hostpaths:begin/end markers).
func documentedMounts(t *testing.T) []mountDoc {
	t.Helper()
	section := docSection(t, InstallDoc, "hostpaths")
	code := regexp.MustCompile("`([^`]+)`")
	var out []mountDoc
	for _, line := range strings.Split(section, "\n") {
		cells := strings.Split(strings.Trim(strings.TrimSpace(line), "|"), "|")
		if len(cells) < 4 || strings.HasPrefix(strings.TrimSpace(cells[0]), "---") || strings.Contains(cells[0], "Host path") {
			continue
		}
		if isMPSRow(cells) || isDRARow(cells) {
			continue
		}
		var m mountDoc
		if c := code.FindStringSubmatch(cells[1]); c != nil {
			m.Container = c[1]
		}
		if c := code.FindStringSubmatch(cells[0]); c != nil && strings.HasPrefix(c[1], "/") && m.Container != driverRootMount {
			m.Host = c[1]
		}
		switch access := strings.TrimSpace(cells[2]); access {
		case "read-only":
			m.ReadOnly = true
		case "read-write":
		default:
			t.Fatalf("docs/install.md host path table: access %q in %q: want read-only or read-write", access, line)
		}
		if m.Container == "" || (m.Host == "" && m.Container != driverRootMount) {
			t.Fatalf("docs/install.md host path table: row %q lacks a `host path` or `container path`", line)
		}
		out = append(out, m)
	}
	if len(out) == 0 {
		t.Fatal("docs/install.md host path table is empty")
	}
	return out
}

// expectedMounts is the documented list for a given driver root, and
// whether a cdi-* strategy or DRA is set (either mounts the driver root "/"
// too), plus, with an MPS root, the MPS root at its own path and its shm at
// /dev/shm, and with DRA the kubelet's plugin registration and plugins
// directories at their own paths, all read-write.
func expectedMounts(t *testing.T, driverRoot string, cdi bool, mpsRoot string, draDirs []string) []mountDoc {
	var out []mountDoc
	if mpsRoot != "" {
		out = append(out, mountDoc{Host: mpsRoot, Container: mpsRoot}, mountDoc{Host: mpsRoot + "/shm", Container: mpsShmMount})
	}
	for _, d := range draDirs {
		out = append(out, mountDoc{Host: d, Container: d})
	}
	cdi = cdi || len(draDirs) > 0
	for _, m := range documentedMounts(t) {
		if m.Container == driverRootMount {
			if driverRoot == "/" && !cdi {
				continue
			}
			m.Host = driverRoot
		}
		out = append(out, m)
	}
	return out
}

// policy is what a render must satisfy besides its own case's checks.
type policy struct {
	driverRoot   string
	cdi          bool // a cdi-* device list strategy is set
	metricsPort  int32
	basicAuth    bool
	tls          bool
	allowedCaps  []string // capabilities the container may add
	apiAccess    bool     // nodeHealth.condition: the pod mounts its token
	hostPID      bool     // perPodUsage, MPS with mps.enableHostPID: the pod shares the host's PID namespace
	mpsRoot      string   // MPS on: the MPS root mounted at its own path, and its shm at /dev/shm
	draDirs      []string // DRA on: the kubelet's plugins_registry and plugins directories, each at its own path
	rawDaemonSet string   // the rendered YAML, for the comment checks
}

// checkDaemonSetPolicy applies the install policy to a DaemonSet.
func checkDaemonSetPolicy(t *testing.T, ds *appsv1.DaemonSet, p policy) {
	t.Helper()
	spec := ds.Spec.Template.Spec

	if got := ds.Spec.UpdateStrategy.Type; got != appsv1.RollingUpdateDaemonSetStrategyType {
		t.Errorf("updateStrategy.type = %q, want RollingUpdate", got)
	}
	if ru := ds.Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 0 {
		t.Errorf("updateStrategy.rollingUpdate.maxSurge must be 0: two plugins on one node fight over the kubelet sockets; got %+v", ru)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName = %q, want system-node-critical", spec.PriorityClassName)
	}
	for _, want := range []corev1.Toleration{
		{Key: "nvidia.com/gpu", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule},
		{Key: "CriticalAddonsOnly", Operator: corev1.TolerationOpExists},
	} {
		if !slices.ContainsFunc(spec.Tolerations, func(tl corev1.Toleration) bool {
			return tl.Key == want.Key && tl.Operator == want.Operator && tl.Effect == want.Effect
		}) {
			t.Errorf("no toleration %s %s %s among %+v", want.Key, want.Operator, want.Effect, spec.Tolerations)
		}
	}
	if spec.HostNetwork || spec.HostPID != p.hostPID || spec.HostIPC {
		t.Errorf("hostNetwork/hostPID/hostIPC = %v/%v/%v, want false/%v/false", spec.HostNetwork, spec.HostPID, spec.HostIPC, p.hostPID)
	}
	if !p.apiAccess && (spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken) {
		t.Error("automountServiceAccountToken must be false: the daemon never calls the API server unless an API feature (nodeHealth.condition, DRA, …) is set")
	}
	sel, err := metav1LabelSelector(ds)
	if err != nil || !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("the selector %v does not match the pod labels %v (%v)", ds.Spec.Selector, ds.Spec.Template.Labels, err)
	}

	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	checkResources(t, c.Resources)
	checkProbes(t, c, p)
	checkSecurityContext(t, c.SecurityContext, p)
	checkMounts(t, spec, c, p.driverRoot, p.cdi, p.mpsRoot, p.draDirs)

	if !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool {
		return cp.Name == "metrics" && cp.ContainerPort == p.metricsPort
	}) {
		t.Errorf("no container port named metrics on %d: %+v", p.metricsPort, c.Ports)
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	if e := env["NODE_NAME"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME must come from spec.nodeName (the Hostname label of DCGM_* series); got %+v", e)
	}
	if got := env["GPU_PLUGIN_METRICS_ADDRESS"].Value; got != ":"+itoa(p.metricsPort) {
		t.Errorf("GPU_PLUGIN_METRICS_ADDRESS = %q, want :%d", got, p.metricsPort)
	}
}

func metav1LabelSelector(ds *appsv1.DaemonSet) (labels.Selector, error) {
	return labels.ValidatedSelectorFromSet(ds.Spec.Selector.MatchLabels)
}

func checkResources(t *testing.T, r corev1.ResourceRequirements) {
	t.Helper()
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, okReq := r.Requests[name]
		lim, okLim := r.Limits[name]
		if !okReq || !okLim {
			t.Errorf("resources: %s request and limit must both be set; got requests %v, limits %v", name, r.Requests, r.Limits)
			continue
		}
		if req.Cmp(lim) > 0 {
			t.Errorf("resources: %s request %s exceeds the limit %s", name, req.String(), lim.String())
		}
	}
	// The daemon's measured peak RSS (templates/daemonset.yaml) must fit the
	// request with room to spare.
	if mem, ok := r.Requests[corev1.ResourceMemory]; ok && mem.Cmp(resource.MustParse("32Mi")) < 0 {
		t.Errorf("resources: memory request %s is below the measured 26 MiB peak plus headroom", mem.String())
	}
}

func checkProbes(t *testing.T, c corev1.Container, p policy) {
	t.Helper()
	for _, pr := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"livenessProbe", c.LivenessProbe, "/healthz"}, {"readinessProbe", c.ReadinessProbe, "/readyz"}} {
		if pr.probe == nil {
			t.Errorf("%s missing", pr.name)
			continue
		}
		h := pr.probe.ProbeHandler
		if p.basicAuth {
			// Every path needs the password the kubelet does not have.
			if h.TCPSocket == nil || h.TCPSocket.Port.String() != "metrics" || h.HTTPGet != nil {
				t.Errorf("%s with basic auth: want tcpSocket on port metrics, got %+v", pr.name, h)
			}
			continue
		}
		scheme := corev1.URISchemeHTTP
		if p.tls {
			scheme = corev1.URISchemeHTTPS
		}
		if h.HTTPGet == nil || h.HTTPGet.Path != pr.path || h.HTTPGet.Port.String() != "metrics" || h.HTTPGet.Scheme != scheme {
			t.Errorf("%s: want GET %s on port metrics over %s, got %+v", pr.name, pr.path, scheme, h.HTTPGet)
		}
	}
}

// addedCapability matches an entry of a capability list.
var addedCapability = regexp.MustCompile(`(?m)^(\s*)- ([A-Z_]+)\s*$`)

func checkSecurityContext(t *testing.T, sc *corev1.SecurityContext, p policy) {
	t.Helper()
	if sc == nil {
		t.Fatal("no securityContext")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged: true; the daemon needs no privileged mode")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation must be false")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("readOnlyRootFilesystem must be true: the daemon writes only to its host paths")
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("seccompProfile must be RuntimeDefault, got %+v", sc.SeccompProfile)
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Errorf("runAsUser must be 0, as documented (owner of the kubelet's root-owned directories without capabilities); got %v", sc.RunAsUser)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities.drop must be [ALL], got %+v", sc.Capabilities)
		return
	}
	for _, c := range sc.Capabilities.Add {
		if !slices.Contains(p.allowedCaps, string(c)) {
			t.Errorf("capability %s added; allowed here: %v", c, p.allowedCaps)
		}
	}
	// Every kept capability is justified by a comment right above it.
	lines := strings.Split(p.rawDaemonSet, "\n")
	for i, l := range lines {
		m := addedCapability.FindStringSubmatch(l)
		if m == nil || !slices.Contains(sc.Capabilities.Add, corev1.Capability(m[2])) {
			continue
		}
		// The comment block right above the entry must start with "# CAP:".
		j := i - 1
		for j > 0 && strings.HasPrefix(strings.TrimSpace(lines[j-1]), "#") && strings.HasPrefix(strings.TrimSpace(lines[j]), "#") && !strings.HasPrefix(strings.TrimSpace(lines[j]), "# "+m[2]+":") {
			j--
		}
		if j < 0 || !strings.HasPrefix(strings.TrimSpace(lines[j]), "# "+m[2]+":") {
			t.Errorf("capability %s has no justifying comment (# %s: why) right above it", m[2], m[2])
		}
	}
}

func checkMounts(t *testing.T, spec corev1.PodSpec, c corev1.Container, driverRoot string, cdi bool, mpsRoot string, draDirs []string) {
	t.Helper()
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	var got []mountDoc
	for _, vm := range c.VolumeMounts {
		v, ok := volumes[vm.Name]
		if !ok {
			t.Errorf("volumeMount %s names no volume", vm.Name)
			continue
		}
		if v.HostPath == nil {
			continue
		}
		got = append(got, mountDoc{Host: v.HostPath.Path, Container: vm.MountPath, ReadOnly: vm.ReadOnly})
		if vm.SubPath != "" {
			t.Errorf("hostPath mount %s uses subPath: mount directories, never socket files", vm.Name)
		}
	}
	for _, v := range spec.Volumes {
		if v.HostPath != nil && !slices.ContainsFunc(c.VolumeMounts, func(vm corev1.VolumeMount) bool { return vm.Name == v.Name }) {
			t.Errorf("hostPath volume %s is not mounted", v.Name)
		}
	}
	want := expectedMounts(t, driverRoot, cdi, mpsRoot, draDirs)
	byContainer := func(a, b mountDoc) int { return strings.Compare(a.Container, b.Container) }
	slices.SortFunc(got, byContainer)
	slices.SortFunc(want, byContainer)
	if !slices.Equal(got, want) {
		t.Errorf("hostPath mounts differ from docs/install.md's table (driver root %q, MPS root %q, DRA directories %q):\n got  %+v\n want %+v", driverRoot, mpsRoot, draDirs, got, want)
	}
}

func checkService(t *testing.T, svc *corev1.Service, ds *appsv1.DaemonSet, port int32) {
	t.Helper()
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service clusterIP = %q, want None (headless)", svc.Spec.ClusterIP)
	}
	if !svc.Spec.PublishNotReadyAddresses {
		t.Error("Service publishNotReadyAddresses must be true: an unready daemon's metrics say why")
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != "metrics" || svc.Spec.Ports[0].Port != port || svc.Spec.Ports[0].TargetPort.String() != "metrics" {
		t.Errorf("Service ports = %+v, want one port named metrics on %d", svc.Spec.Ports, port)
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("Service selector %v does not select the pods %v", svc.Spec.Selector, ds.Spec.Template.Labels)
	}
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }

// readFile reads a repository file.
func readFile(t *testing.T, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(RepoRoot(), rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// docSection returns the text of the repository file rel (README.md or a
// docs/ page) between <!-- name:begin --> and <!-- name:end -->.
func docSection(t *testing.T, rel, name string) string {
	t.Helper()
	doc := string(readFile(t, rel))
	begin, end := "<!-- "+name+":begin -->", "<!-- "+name+":end -->"
	i, j := strings.Index(doc, begin), strings.Index(doc, end)
	if i < 0 || j < i {
		t.Fatalf("%s lacks the %s and %s markers", rel, begin, end)
	}
	return doc[i+len(begin) : j]
}
