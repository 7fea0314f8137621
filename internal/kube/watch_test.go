package kube

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func podJSON(name, rv, phase string, containers ...string) string {
	var cs []string
	for _, c := range containers {
		cs = append(cs, fmt.Sprintf(`{"name":%q,"containerID":"containerd://%s-id","ready":true}`, c, c))
	}
	return fmt.Sprintf(`{"metadata":{"name":%q,"namespace":"ns","uid":"uid-%s","resourceVersion":%q,"labels":{"app":"x"}},`+
		`"spec":{"nodeName":"n1"},"status":{"phase":%q,"containerStatuses":[%s]}}`, name, name, rv, phase, strings.Join(cs, ","))
}

// The pod watch follows client-go's informer: a list from the cache, a
// watch from its resourceVersion, a watch the server ends (or whose
// connection breaks after events) started again from the last
// resourceVersion seen, bookmarks included; after 410 Gone a new list,
// from etcd when the cache no longer has that resourceVersion, and pods
// gone meanwhile deleted.
func TestPodWatch(t *testing.T) {
	type watchScript func(w http.ResponseWriter, r *http.Request)
	event := func(typ, obj string) string { return fmt.Sprintf(`{"type":%q,"object":%s}`+"\n", typ, obj) }
	scripts := make(chan watchScript, 10)
	var mu sync.Mutex
	var requests []string // "list RV" or "watch RV"
	lists := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if r.URL.Path != "/api/v1/pods" || q.Get("fieldSelector") != "spec.nodeName=n1" {
			writeStatus(w, 400, "BadRequest", "unexpected request "+r.URL.String())
			return
		}
		mu.Lock()
		if q.Get("watch") == "true" {
			requests = append(requests, "watch "+q.Get("resourceVersion"))
			if q.Get("allowWatchBookmarks") != "true" || q.Get("timeoutSeconds") == "" {
				t.Errorf("watch request %s", r.URL)
			}
		} else {
			requests = append(requests, "list "+q.Get("resourceVersion"))
			lists++
		}
		n := lists
		mu.Unlock()
		if q.Get("watch") != "true" {
			switch {
			case n == 1:
				fmt.Fprintf(w, `{"kind":"PodList","metadata":{"resourceVersion":"10"},"items":[%s,%s]}`,
					podJSON("a", "5", "Running", "main"), podJSON("b", "6", "Pending"))
			case q.Get("resourceVersion") != "":
				writeStatus(w, 410, "Expired", "too old resource version: 14 (19)")
			default:
				fmt.Fprintf(w, `{"kind":"PodList","metadata":{"resourceVersion":"20"},"items":[%s,%s]}`,
					podJSON("a", "15", "Succeeded", "main"), podJSON("d", "18", "Running", "side"))
			}
			return
		}
		select {
		case s := <-scripts:
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			s(w, r)
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()

	scripts <- func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, event("MODIFIED", podJSON("a", "11", "Running", "main", "side")))
		io.WriteString(w, event("ADDED", podJSON("c", "12", "Pending")))
		io.WriteString(w, event("DELETED", podJSON("b", "13", "Succeeded")))
		io.WriteString(w, event("BOOKMARK", `{"metadata":{"resourceVersion":"14"}}`))
	}
	scripts <- func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, event("ERROR", `{"kind":"Status","status":"Failure","message":"too old resource version: 14 (19)","reason":"Expired","code":410}`))
	}
	scripts <- func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, event("MODIFIED", podJSON("d", "21", "Running", "side")))
		w.(http.Flusher).Flush()
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close() // the connection breaks mid-stream
		}
	}
	done := make(chan struct{})
	scripts <- func(w http.ResponseWriter, r *http.Request) {
		close(done)
		<-r.Context().Done()
	}

	var log []string
	synced := 0
	h := PodHandler{
		Set: func(p *Pod) {
			var cs []string
			for _, c := range p.Status.ContainerStatuses {
				cs = append(cs, c.Name+"="+c.ContainerID)
			}
			if p.Labels != nil {
				t.Errorf("pod %s handed over with its labels", p.Name)
			}
			log = append(log, fmt.Sprintf("set %s/%s %s %s %s", p.Namespace, p.Name, p.UID, p.Status.Phase, strings.Join(cs, ",")))
		},
		Delete: func(uid string) { log = append(log, "delete "+uid) },
		Synced: func() { synced++; log = append(log, "synced") },
	}
	in := newTestClient(t, srv).podInformer("n1", slog.New(slog.DiscardHandler), h)
	in.backoff = backoff{init: time.Millisecond, max: time.Millisecond, reset: time.Minute}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		in.run(ctx)
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the watch never got to its fourth request")
	}
	cancel()
	<-stopped

	want := []string{
		"set ns/a uid-a Running main=containerd://main-id",
		"set ns/b uid-b Pending ",
		"synced",
		"set ns/a uid-a Running main=containerd://main-id,side=containerd://side-id",
		"set ns/c uid-c Pending ",
		"delete uid-b",
		// After 410: the new list; c is gone.
		"set ns/a uid-a Succeeded main=containerd://main-id",
		"set ns/d uid-d Running side=containerd://side-id",
		"delete uid-c",
		"set ns/d uid-d Running side=containerd://side-id",
	}
	if !slices.Equal(log, want) {
		t.Errorf("handlers heard\n%s\nwant\n%s", strings.Join(log, "\n"), strings.Join(want, "\n"))
	}
	mu.Lock()
	defer mu.Unlock()
	wantReq := []string{"list 0", "watch 10", "watch 14", "list 14", "list ", "watch 20", "watch 21"}
	if !slices.Equal(requests, wantReq) {
		t.Errorf("requests %q, want %q", requests, wantReq)
	}
}

// WatchNode hands over the one node, asked for by name.
func TestWatchNode(t *testing.T) {
	got := make(chan *Node, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if r.URL.Path != "/api/v1/nodes" || q.Get("fieldSelector") != "metadata.name=n1" {
			writeStatus(w, 400, "BadRequest", "unexpected request "+r.URL.String())
			return
		}
		if q.Get("watch") == "true" {
			<-r.Context().Done()
			return
		}
		io.WriteString(w, `{"metadata":{"resourceVersion":"3"},"items":[{"metadata":{"name":"n1","resourceVersion":"3","labels":{"cfg":"a"}}}]}`)
	}))
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		newTestClient(t, srv).WatchNode(ctx, "n1", slog.New(slog.DiscardHandler), func(n *Node) { got <- n })
	}()
	select {
	case n := <-got:
		if n.Name != "n1" || n.Labels["cfg"] != "a" {
			t.Errorf("node %+v", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no node")
	}
	cancel()
	<-stopped
}

func TestFieldSelectorEscapes(t *testing.T) {
	if got := fieldSelector("metadata.name", `a,b=c\d`); got != `metadata.name=a\,b\=c\\d` {
		t.Errorf("selector %s", got)
	}
}
