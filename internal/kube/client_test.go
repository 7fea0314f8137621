package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// newTestClient is a Client of srv with a static token.
func newTestClient(t *testing.T, srv *httptest.Server) *Client {
	t.Helper()
	c, err := NewClient(&Config{Host: srv.URL, BearerToken: "tok"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func writeStatus(w http.ResponseWriter, code int, reason, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	fmt.Fprintf(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","message":%q,"reason":%q,"code":%d}`, msg, reason, code)
}

// A Node read and written back keeps every field this package does not
// know, numbers included, and only the taints change; the status patch
// is a strategic merge patch on nodes/status.
func TestNodeReadUpdatePatch(t *testing.T) {
	const stored = `{"kind":"Node","apiVersion":"v1","metadata":{"name":"n1","resourceVersion":"41","labels":{"a":"b"},"annotations":{"x":"y"}},` +
		`"spec":{"podCIDR":"10.0.0.0/24","taints":[{"key":"other","effect":"NoExecute","timeAdded":"2026-01-02T03:04:05Z"}]},` +
		`"status":{"images":[{"names":["big"],"sizeBytes":9007199254740993}],"conditions":[{"type":"Ready","status":"True","lastHeartbeatTime":"2026-01-02T03:04:05Z","lastTransitionTime":null}]}}`
	var put, patch []byte
	var patchType, agent, auth string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		agent, auth = r.UserAgent(), r.Header.Get("Authorization")
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/api/v1/nodes/n1":
			io.WriteString(w, stored)
		case r.Method == http.MethodPut && r.URL.Path == "/api/v1/nodes/n1":
			put, _ = io.ReadAll(r.Body)
			io.WriteString(w, stored)
		case r.Method == http.MethodPatch && r.URL.Path == "/api/v1/nodes/n1/status":
			patch, _ = io.ReadAll(r.Body)
			patchType = r.Header.Get("Content-Type")
			io.WriteString(w, stored)
		default:
			writeStatus(w, 404, "NotFound", fmt.Sprintf("nodes %q not found", strings.TrimPrefix(r.URL.Path, "/api/v1/nodes/")))
		}
	}))
	defer srv.Close()
	c := newTestClient(t, srv)
	ctx := context.Background()

	n, err := c.GetNode(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if n.Name != "n1" || n.ResourceVersion != "41" || n.Labels["a"] != "b" || len(n.Spec.Taints) != 1 ||
		len(n.Status.Conditions) != 1 || n.Status.Conditions[0].Type != "Ready" || n.Status.Conditions[0].LastHeartbeatTime.IsZero() {
		t.Fatalf("node read as %+v", n)
	}
	if agent != "gpu-plugin" || auth != "Bearer tok" {
		t.Errorf("user agent %q, authorization %q", agent, auth)
	}
	n.Spec.Taints = append(n.Spec.Taints, Taint{Key: "mine", Effect: TaintEffectNoSchedule})
	if err := c.UpdateNode(ctx, n); err != nil {
		t.Fatal(err)
	}
	decode := func(b []byte) map[string]any {
		var m map[string]any
		dec := json.NewDecoder(strings.NewReader(string(b)))
		dec.UseNumber()
		if err := dec.Decode(&m); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		return m
	}
	want, got := decode([]byte(stored)), decode(put)
	if !strings.Contains(string(put), `"sizeBytes":9007199254740993`) {
		t.Errorf("a large number changed on the way back: %s", put)
	}
	var written Node
	_ = json.Unmarshal(put, &written)
	if taints, _ := json.Marshal(written.Spec.Taints); string(taints) !=
		`[{"key":"other","effect":"NoExecute","timeAdded":"2026-01-02T03:04:05Z"},{"key":"mine","effect":"NoSchedule"}]` {
		t.Errorf("taints written %s", taints)
	}
	delete(got["spec"].(map[string]any), "taints")
	delete(want["spec"].(map[string]any), "taints")
	g, _ := json.Marshal(got)
	w, _ := json.Marshal(want)
	if string(g) != string(w) {
		t.Errorf("the update changed more than the taints:\n got %s\nwant %s", g, w)
	}

	if err := c.PatchNodeStatus(ctx, "n1", []byte(`{"status":{}}`)); err != nil {
		t.Fatal(err)
	}
	if patchType != "application/strategic-merge-patch+json" || string(patch) != `{"status":{}}` {
		t.Errorf("patch %s as %s", patch, patchType)
	}

	_, err = c.GetNode(ctx, "n2")
	if !IsNotFound(err) || err.Error() != `nodes "n2" not found` {
		t.Errorf("reading a missing node: %v (IsNotFound %v)", err, IsNotFound(err))
	}
	if err := c.UpdateNode(ctx, &Node{}); err == nil {
		t.Error("a Node not read from the server was written")
	}
}

// RetryOnConflict tries again on a conflict only, 5 times at most.
func TestRetryOnConflict(t *testing.T) {
	conflict := &StatusError{Code: 409, Reason: "Conflict", Message: "the object has been modified"}
	n := 0
	err := RetryOnConflict(context.Background(), func() error {
		n++
		if n < 3 {
			return conflict
		}
		return nil
	})
	if err != nil || n != 3 {
		t.Errorf("err %v after %d calls, want success after 3", err, n)
	}
	n = 0
	err = RetryOnConflict(context.Background(), func() error { n++; return conflict })
	if !IsConflict(err) || n != 5 {
		t.Errorf("err %v after %d calls, want the conflict after 5", err, n)
	}
	n = 0
	other := errors.New("boom")
	if err := RetryOnConflict(context.Background(), func() error { n++; return other }); err != other || n != 1 {
		t.Errorf("err %v after %d calls, want boom at once", err, n)
	}
}

// A 429 or 5xx with Retry-After is repeated, as client-go does; one
// without it is an error at once.
func TestRetryAfter(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch n := calls.Add(1); {
		case r.URL.Path == "/api/v1/nodes/busy" && n == 1:
			w.Header().Set("Retry-After", "0")
			writeStatus(w, 429, "TooManyRequests", "slow down")
		case r.URL.Path == "/api/v1/nodes/busy":
			io.WriteString(w, `{"metadata":{"name":"busy"}}`)
		default:
			writeStatus(w, 500, "InternalError", "broken")
		}
	}))
	defer srv.Close()
	c := newTestClient(t, srv)
	if n, err := c.GetNode(context.Background(), "busy"); err != nil || n.Name != "busy" || calls.Load() != 2 {
		t.Errorf("node %v, err %v after %d calls; want it after 2", n, err, calls.Load())
	}
	calls.Store(0)
	if _, err := c.GetNode(context.Background(), "x"); statusCode(err) != 500 || calls.Load() != 1 {
		t.Errorf("err %v after %d calls, want the 500 after 1", err, calls.Load())
	}
}

// A kubeconfig's current context: the server, its CA and the user's
// token file, relative paths from the file's directory; a credential
// plugin is refused.
func TestLoadKubeconfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("token", "file-token\n")
	write("ca.crt", "not a certificate")
	kc := write("kubeconfig", `apiVersion: v1
kind: Config
clusters:
- {name: other, cluster: {server: "https://other:6443"}}
- {name: c, cluster: {server: "https://api:6443", certificate-authority: ca.crt, tls-server-name: kubernetes}}
users:
- {name: u, user: {tokenFile: token, as: admin, as-groups: [g1, g2]}}
contexts:
- {name: ctx, context: {cluster: c, user: u}}
current-context: ctx
`)
	cfg, err := LoadKubeconfig(kc)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Host != "https://api:6443" || string(cfg.CAData) != "not a certificate" || cfg.ServerName != "kubernetes" ||
		cfg.BearerToken != "file-token" || cfg.TokenFile != filepath.Join(dir, "token") ||
		cfg.ImpersonateUser != "admin" || len(cfg.ImpersonateGroups) != 2 {
		t.Errorf("config %+v", cfg)
	}
	if _, err := NewClient(cfg); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("a CA file without a certificate: %v", err)
	}

	execUser := write("exec", `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/true}}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`)
	if _, err := LoadKubeconfig(execUser); !errors.Is(err, ErrCredentialPlugin) {
		t.Errorf("exec user: %v, want ErrCredentialPlugin", err)
	}
	noCtx := write("nocontext", "apiVersion: v1\nkind: Config\n")
	if _, err := LoadKubeconfig(noCtx); err == nil || !strings.Contains(err.Error(), "no current-context") {
		t.Errorf("no context: %v", err)
	}
	if _, err := LoadKubeconfig(filepath.Join(dir, "absent")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	insecure := &Config{Host: "https://x", Insecure: true, CAData: []byte("x")}
	if _, err := NewClient(insecure); err == nil || !strings.Contains(err.Error(), "insecure") {
		t.Errorf("CA with insecure: %v", err)
	}
}

// The in-cluster token is read from its file, again after a minute or a
// 401 (the kubelet rotates it).
func TestInClusterToken(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	if _, err := inClusterConfig(dir); err == nil {
		t.Fatal("in-cluster config without KUBERNETES_SERVICE_HOST")
	}
	var mu sync.Mutex
	var seen []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer two" {
			writeStatus(w, 401, "Unauthorized", "Unauthorized")
			return
		}
		io.WriteString(w, `{"metadata":{"name":"n"}}`)
	}))
	defer srv.Close()
	host, port, _ := strings.Cut(strings.TrimPrefix(srv.URL, "http://"), ":")
	t.Setenv("KUBERNETES_SERVICE_HOST", host)
	t.Setenv("KUBERNETES_SERVICE_PORT", port)
	cfg, err := inClusterConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Host != "https://"+host+":"+port || cfg.BearerToken != "one" {
		t.Fatalf("config %+v", cfg)
	}
	cfg.Host = srv.URL // plain HTTP for the test
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetNode(context.Background(), "n"); statusCode(err) != 401 {
		t.Fatalf("first call: %v, want 401", err)
	}
	if err := os.WriteFile(tokenFile, []byte("two\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetNode(context.Background(), "n"); err != nil {
		t.Fatalf("after the 401 and a new token: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(seen, ",") != "Bearer one,Bearer two" {
		t.Errorf("tokens sent %q", seen)
	}
}

// Events about the node: created; a repeat patches the count of the one
// written; the 10th distinct message within 10 minutes is combined; the
// spam filter drops what exceeds its burst; a failed connection is tried
// again.
func TestRecorder(t *testing.T) {
	type call struct{ method, path, body string }
	var mu sync.Mutex
	var calls []call
	var failNext atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failNext.CompareAndSwap(true, false) {
			// A connection that breaks: not the server's answer.
			hj, _ := w.(http.Hijacker)
			conn, _, _ := hj.Hijack()
			conn.Close()
			return
		}
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		calls = append(calls, call{r.Method, r.URL.Path, string(body)})
		mu.Unlock()
		var e Event
		_ = json.Unmarshal(body, &e)
		if r.Method == http.MethodPatch {
			var p struct {
				Count   int32  `json:"count"`
				Message string `json:"message"`
			}
			_ = json.Unmarshal(body, &p)
			e = Event{ObjectMeta: ObjectMeta{Name: filepath.Base(r.URL.Path), Namespace: "default", ResourceVersion: "2"},
				InvolvedObject: *NodeReference("n1"), Source: EventSource{Component: "gpu-plugin", Host: "n1"},
				Type: EventTypeWarning, Reason: "GPUUnhealthy", Message: p.Message, Count: p.Count,
				ReportingController: "gpu-plugin", ReportingInstance: "n1"}
		}
		e.ResourceVersion = "1"
		json.NewEncoder(w).Encode(e)
	}))
	defer srv.Close()
	c := newTestClient(t, srv)
	rec := c.NewRecorder(context.Background(), RecorderOptions{Source: EventSource{Component: "gpu-plugin", Host: "n1"}, Burst: 12, QPS: 1e-9})
	rec.pause = time.Millisecond
	defer rec.Shutdown()
	waitCalls := func(n int) []call {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			mu.Lock()
			got := append([]call(nil), calls...)
			mu.Unlock()
			if len(got) >= n || time.Now().After(deadline) {
				if len(got) != n {
					t.Fatalf("%d calls, want %d: %+v", len(got), n, got)
				}
				return got
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	ref := NodeReference("n1")

	rec.Eventf(ref, EventTypeWarning, "GPUUnhealthy", "GPU %d is unhealthy", 0)
	got := waitCalls(1)
	var first Event
	if err := json.Unmarshal([]byte(got[0].body), &first); err != nil || got[0].method != http.MethodPost || got[0].path != "/api/v1/namespaces/default/events" {
		t.Fatalf("first call %+v: %v", got[0], err)
	}
	if first.InvolvedObject != *ref || first.Count != 1 || first.Type != EventTypeWarning || first.Message != "GPU 0 is unhealthy" ||
		first.Source.Host != "n1" || first.ReportingController != "gpu-plugin" || !strings.HasPrefix(first.Name, "n1.") || first.FirstTimestamp.IsZero() {
		t.Errorf("Event written %s", got[0].body)
	}

	// The same again: a patch of the first.
	rec.Eventf(ref, EventTypeWarning, "GPUUnhealthy", "GPU %d is unhealthy", 0)
	got = waitCalls(2)
	if got[1].method != http.MethodPatch || got[1].path != "/api/v1/namespaces/default/events/"+first.Name ||
		!strings.HasPrefix(got[1].body, `{"count":2,"lastTimestamp":"`) || !strings.HasSuffix(got[1].body, `","message":"GPU 0 is unhealthy"}`) {
		t.Errorf("repeat written as %+v", got[1])
	}

	// A broken connection: tried again.
	failNext.Store(true)
	rec.Eventf(ref, EventTypeWarning, "GPUUnhealthy", "GPU %d is unhealthy", 1)
	got = waitCalls(3)
	if !strings.Contains(got[2].body, `"message":"GPU 1 is unhealthy"`) {
		t.Errorf("after a failed try: %+v", got[2])
	}

	// Messages 3 to 9 are written as they are, the 10th distinct one
	// within the window is combined.
	for i := 2; i < 10; i++ {
		rec.Eventf(ref, EventTypeWarning, "GPUUnhealthy", "GPU %d is unhealthy", i)
	}
	got = waitCalls(11)
	if !strings.Contains(got[9].body, `"message":"GPU 8 is unhealthy"`) ||
		!strings.Contains(got[10].body, `"message":"(combined from similar events): GPU 9 is unhealthy"`) {
		t.Errorf("10th distinct message written as %s", got[10].body)
	}
	// The 12th Warning fits the burst (combined again: a repeat of the
	// combined Event), the 13th is dropped.
	rec.Eventf(ref, EventTypeWarning, "GPUUnhealthy", "GPU %d is unhealthy", 10)
	rec.Eventf(ref, EventTypeWarning, "GPUUnhealthy", "GPU %d is unhealthy", 11)
	time.Sleep(100 * time.Millisecond)
	got = waitCalls(12)
	var combined Event
	_ = json.Unmarshal([]byte(got[10].body), &combined)
	if got[11].method != http.MethodPatch || got[11].path != "/api/v1/namespaces/default/events/"+combined.Name ||
		!strings.Contains(got[11].body, `"message":"(combined from similar events): GPU 10 is unhealthy"`) {
		t.Errorf("12th Warning written as %+v", got[11])
	}
	// Another type has its own bucket.
	rec.Eventf(ref, EventTypeNormal, "GPUHealthy", "GPU 0 is healthy again")
	got = waitCalls(13)
	if !strings.Contains(got[12].body, `"type":"Normal"`) {
		t.Errorf("Normal Event written as %s", got[12].body)
	}
	rec.Eventf(ref, "Odd", "X", "not a type")
	time.Sleep(50 * time.Millisecond)
	waitCalls(13)
}
