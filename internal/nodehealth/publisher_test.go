package nodehealth

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// fakeNode is an API server holding one Node: status patches merge
// conditions by type, updates are compare-and-swap on resourceVersion.
type fakeNode struct {
	mu     sync.Mutex
	node   map[string]any
	rv     int
	events []kube.Event
	puts   int
}

func (f *fakeNode) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	body, _ := io.ReadAll(r.Body)
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/nodes/n1":
	case r.Method == http.MethodPatch && r.URL.Path == "/api/v1/nodes/n1/status":
		var p struct {
			Status struct {
				Conditions []map[string]any `json:"conditions"`
			} `json:"status"`
		}
		_ = json.Unmarshal(body, &p)
		st := f.node["status"].(map[string]any)
		conds, _ := st["conditions"].([]any)
		for _, c := range p.Status.Conditions {
			replaced := false
			for i, old := range conds {
				if old.(map[string]any)["type"] == c["type"] {
					conds[i], replaced = c, true
				}
			}
			if !replaced {
				conds = append(conds, c)
			}
		}
		st["conditions"] = conds
		f.rv++
	case r.Method == http.MethodPut && r.URL.Path == "/api/v1/nodes/n1":
		var n map[string]any
		_ = json.Unmarshal(body, &n)
		if n["metadata"].(map[string]any)["resourceVersion"] != f.node["metadata"].(map[string]any)["resourceVersion"] {
			w.WriteHeader(http.StatusConflict)
			io.WriteString(w, `{"kind":"Status","reason":"Conflict","code":409,"message":"the object has been modified"}`)
			return
		}
		n["status"] = f.node["status"]
		f.node = n
		f.rv++
		f.puts++
	case r.Method == http.MethodPost && r.URL.Path == "/api/v1/namespaces/default/events":
		var e kube.Event
		_ = json.Unmarshal(body, &e)
		f.events = append(f.events, e)
		w.Write(body)
		return
	default:
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"kind":"Status","reason":"NotFound","code":404,"message":"not found"}`)
		return
	}
	f.node["metadata"].(map[string]any)["resourceVersion"] = strconv.Itoa(f.rv)
	json.NewEncoder(w).Encode(f.node)
}

func (f *fakeNode) state() (cond map[string]any, taints []any, events []kube.Event) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.node["status"].(map[string]any)["conditions"].([]any) {
		if c.(map[string]any)["type"] == ConditionType {
			cond = c.(map[string]any)
		}
	}
	taints, _ = f.node["spec"].(map[string]any)["taints"].([]any)
	return cond, taints, append([]kube.Event(nil), f.events...)
}

// The publisher against an API server: the condition set at start, a GPU
// turning unhealthy makes an Event and, once none is usable, the taint;
// recovery lifts both, and the Node's other fields stay.
func TestPublisherAgainstAPIServer(t *testing.T) {
	f := &fakeNode{node: map[string]any{
		"metadata": map[string]any{"name": "n1", "resourceVersion": "0", "labels": map[string]any{"keep": "me"}},
		"spec":     map[string]any{"podCIDR": "10.0.0.0/24", "taints": []any{map[string]any{"key": "other", "effect": "NoExecute"}}},
		"status":   map[string]any{"conditions": []any{map[string]any{"type": "Ready", "status": "True"}}},
	}}
	srv := httptest.NewServer(f)
	defer srv.Close()
	client, err := kube.NewClient(&kube.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	st := health.NewState(slog.New(slog.DiscardHandler), time.Now)
	inv := &nvml.Inventory{GPUs: []nvml.GPU{{Index: 0, UUID: "GPU-0"}}}
	p, err := New(Options{NodeName: "n1", Client: client, Health: st, Inventory: func() *nvml.Inventory { return inv },
		Taint: true, Debounce: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	wait := func(what string, ok func(cond map[string]any, taints []any, events []kube.Event) bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			cond, taints, events := f.state()
			if ok(cond, taints, events) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: condition %v taints %v events %+v; publisher %+v", what, cond, taints, events, p.Status())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	hasTaint := func(taints []any) bool {
		for _, tt := range taints {
			if tt.(map[string]any)["key"] == TaintKey && tt.(map[string]any)["effect"] == "NoSchedule" {
				return true
			}
		}
		return false
	}
	wait("condition True at start", func(c map[string]any, taints []any, _ []kube.Event) bool {
		return c != nil && c["status"] == "True" && !hasTaint(taints)
	})

	st.SetUnhealthy("GPU-0", "XID 79")
	wait("condition False, tainted, one Warning", func(c map[string]any, taints []any, events []kube.Event) bool {
		return c["status"] == "False" && hasTaint(taints) && len(taints) == 2 && len(events) == 1
	})
	_, _, events := f.state()
	e := events[0]
	if e.Type != kube.EventTypeWarning || e.Reason != ReasonUnhealthy || e.InvolvedObject != *kube.NodeReference("n1") ||
		e.Source.Component != "gpu-plugin" || e.Source.Host != "n1" || !strings.Contains(e.Message, "GPU 0 (GPU-0) is unhealthy: XID 79") {
		t.Errorf("Event %+v", e)
	}

	st.SetHealthy("GPU-0", "recovered")
	wait("condition True, untainted, a Normal Event", func(c map[string]any, taints []any, events []kube.Event) bool {
		return c["status"] == "True" && !hasTaint(taints) && len(taints) == 1 && len(events) == 2 && events[1].Type == kube.EventTypeNormal
	})
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.node["metadata"].(map[string]any)["labels"].(map[string]any)["keep"] != "me" || f.node["spec"].(map[string]any)["podCIDR"] != "10.0.0.0/24" {
		t.Errorf("the node lost fields: %v", f.node)
	}
	if f.puts != 2 {
		t.Errorf("%d updates, want 2 (taint on, taint off)", f.puts)
	}
}
