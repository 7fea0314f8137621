package daemon_test

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// fakeAPI serves the node test-node: get, list and watch (the test
// sends label changes down the watch), and takes Events.
type fakeAPI struct {
	mu     sync.Mutex
	label  string
	rv     int
	events []string // "type reason: message"
	watch  chan string
}

func (f *fakeAPI) nodeJSON() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return fmt.Sprintf(`{"metadata":{"name":"test-node","resourceVersion":"%d","labels":{"nvidia.com/device-plugin.config":%q}}}`, f.rv, f.label)
}

// setLabel changes the label and tells the watch.
func (f *fakeAPI) setLabel(v string) {
	f.mu.Lock()
	f.label = v
	f.rv++
	f.mu.Unlock()
	f.watch <- `{"type":"MODIFIED","object":` + f.nodeJSON() + "}\n"
}

func (f *fakeAPI) Events() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.events...)
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/nodes/test-node":
		io.WriteString(w, f.nodeJSON())
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/nodes" && r.URL.Query().Get("watch") != "true":
		f.mu.Lock()
		rv := f.rv
		f.mu.Unlock()
		fmt.Fprintf(w, `{"metadata":{"resourceVersion":"%d"},"items":[%s]}`, rv, f.nodeJSON())
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/nodes":
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		for {
			select {
			case <-r.Context().Done():
				return
			case ev := <-f.watch:
				io.WriteString(w, ev)
				w.(http.Flusher).Flush()
			}
		}
	case r.Method == http.MethodPost && r.URL.Path == "/api/v1/namespaces/default/events":
		body, _ := io.ReadAll(r.Body)
		var e struct {
			Type, Reason, Message string
			InvolvedObject        struct{ Kind, Name string }
		}
		_ = json.Unmarshal(body, &e)
		f.mu.Lock()
		f.events = append(f.events, fmt.Sprintf("%s %s %s/%s: %s", e.Type, e.Reason, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Message))
		f.mu.Unlock()
		w.Write(body)
	default:
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"kind":"Status","code":404,"reason":"NotFound","message":"not found"}`)
	}
}

// --config-dir through a kubeconfig: the node's label picks the file at
// start, a label change down the watch is applied live with an Event, and
// a label naming no file keeps the configuration with a Warning Event.
func TestConfigDirFollowsNodeLabel(t *testing.T) {
	api := &fakeAPI{label: "a", rv: 1, watch: make(chan string, 4)}
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close) // after the daemon's cleanup, which ends its watch
	dir := t.TempDir()
	configs := filepath.Join(dir, "configs")
	if err := os.Mkdir(configs, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(configs, name), []byte("version: v1\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "`+srv.URL+`"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	r := &running{dir: socketDir(t), done: make(chan error, 1)}
	r.run(t, slog.New(slog.DiscardHandler), "--simulate=pcie-l4x4", "--node-labels=false", "--pod-resources-socket=",
		"--config-dir="+configs, "--kubeconfig="+kubeconfig)
	metrics := "http://" + r.d.Addr() + "/metrics"
	served := func(want string) func() (bool, string) {
		return func() (bool, string) {
			_, body := get(t, metrics)
			for _, l := range strings.Split(body, "\n") {
				if strings.HasPrefix(l, "gpu_plugin_node_config") && strings.Contains(l, want) {
					return true, l
				}
			}
			return false, fmt.Sprintf("events %q", api.Events())
		}
	}
	eventually(t, "config a by label", served(`gpu_plugin_node_config_info{by="label",config="a"} 1`))

	api.setLabel("b")
	eventually(t, "config b by label", served(`gpu_plugin_node_config_info{by="label",config="b"} 1`))
	eventually(t, "a GPUConfigApplied Event", func() (bool, string) {
		ev := api.Events()
		return len(ev) == 1 && strings.HasPrefix(ev[0], `Normal GPUConfigApplied Node/test-node: nvidia.com/device-plugin.config="b": config b applied (was a)`), fmt.Sprint(ev)
	})

	api.setLabel("zzz")
	eventually(t, "the unknown label reported", served(`gpu_plugin_node_config_unknown_label 1`))
	eventually(t, "an UnknownGPUConfig Event", func() (bool, string) {
		ev := api.Events()
		return len(ev) == 2 && strings.HasPrefix(ev[1], `Warning UnknownGPUConfig Node/test-node: nvidia.com/device-plugin.config: node label value "zzz" names no config file`), fmt.Sprint(ev)
	})
	if ok, l := served(`gpu_plugin_node_config_info{by="label",config="b"} 1`)(); !ok {
		t.Errorf("the configuration in force changed after an unknown label: %s", l)
	}
}
