package daemon

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// blockingRender renders "render N" and blocks each render until released.
type blockingRender struct {
	renders atomic.Int64
	started chan struct{}
	release chan struct{}
}

func (b *blockingRender) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := b.renders.Add(1)
	b.started <- struct{}{}
	<-b.release
	if r.Header.Get("Accept-Encoding") != "" {
		http.Error(w, "the render must be plain", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintf(w, "render %d\n", n)
}

// waitGate polls (bounded) until cond holds on the gate.
func waitGate(t *testing.T, g *scrapeGate, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("gate never showed %s", what)
		}
	}
}

func get(t *testing.T, url string, gz bool) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if gz {
		req.Header.Set("Accept-Encoding", "gzip")
	}
	tr := &http.Transport{DisableCompression: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Error(err)
		return 0, ""
	}
	defer resp.Body.Close()
	var body io.Reader = resp.Body
	if resp.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(resp.Body)
		if err != nil {
			t.Error(err)
			return 0, ""
		}
		body = zr
	} else if gz && resp.StatusCode == http.StatusOK {
		t.Error("asked for gzip, got a plain body")
	}
	b, _ := io.ReadAll(body)
	return resp.StatusCode, string(b)
}

// TestScrapesShareOneRender: scrapes arriving while a render is under way
// are served that render's bytes (plain or gzipped); a scrape arriving
// after it gets a new render, never an older one.
func TestScrapesShareOneRender(t *testing.T) {
	r := &blockingRender{started: make(chan struct{}, 1), release: make(chan struct{})}
	g := newScrapeGate(r, 64, 64)
	srv := httptest.NewServer(g)
	defer srv.Close()

	const clients = 50
	bodies := make([]string, clients)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, bodies[0] = get(t, srv.URL, false)
	}()
	<-r.started
	for i := 1; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, bodies[i] = get(t, srv.URL, i%2 == 0)
		}()
	}
	waitGate(t, g, fmt.Sprintf("%d scrapes joining the render", clients-1), func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.joiners == clients-1
	})
	close(r.release)
	wg.Wait()
	for i, b := range bodies {
		if b != "render 1\n" {
			t.Errorf("scrape %d got %q, want the shared render 1", i, b)
		}
	}
	if n := r.renders.Load(); n != 1 {
		t.Errorf("%d renders for %d concurrent scrapes, want 1", n, clients)
	}
	go func() { <-r.started }()
	if _, b := get(t, srv.URL, false); b != "render 2\n" {
		t.Errorf("a scrape after the shared render got %q, want a fresh render 2", b)
	}
}

// TestScrapesBounded: past the in-flight and queue limits a scrape is
// refused at once with 503 and Retry-After; the admitted ones are served.
func TestScrapesBounded(t *testing.T) {
	r := &blockingRender{started: make(chan struct{}, 1), release: make(chan struct{})}
	g := newScrapeGate(r, 1, 1) // one writing, one waiting
	srv := httptest.NewServer(g)
	defer srv.Close()

	codes := make(chan int, 2)
	for range 2 {
		go func() {
			c, _ := get(t, srv.URL, false)
			codes <- c
		}()
	}
	<-r.started
	waitGate(t, g, "two scrapes admitted", func() bool { return len(g.admit) == 2 })

	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || !bytes.Contains(msg, []byte("too many concurrent scrapes")) {
		t.Errorf("a scrape past the limits: %s, Retry-After %q, %q; want 503 with Retry-After", resp.Status, resp.Header.Get("Retry-After"), msg)
	}
	close(r.release)
	for range 2 {
		if c := <-codes; c != http.StatusOK {
			t.Errorf("an admitted scrape got %d, want 200", c)
		}
	}
	if n := len(g.admit); n != 0 {
		t.Errorf("%d admission slots still taken after every scrape ended", n)
	}
}

// TestConnLimitMakesRoomFromIdle: with every connection slot held by an
// idle keep-alive client, a new client is still served: the idle
// connection is closed to make room (the limit must not let idle clients
// lock out the kubelet's probes).
func TestConnLimitMakesRoomFromIdle(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	limited := newConnLimiter(lis, 1)
	srv := &http.Server{
		Handler:   http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "ok") }),
		ConnState: limited.track,
	}
	go srv.Serve(limited)
	defer srv.Close()
	url := "http://" + lis.Addr().String() + "/"

	idle := &http.Transport{} // keeps its connection open after the request
	defer idle.CloseIdleConnections()
	for i, c := range []*http.Client{{Transport: idle}, {Transport: &http.Transport{}, Timeout: waitLimit}} {
		resp, err := c.Get(url)
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "ok" {
			t.Fatalf("client %d got %q", i, b)
		}
	}
}

// varyingRender writes render n as n%7+1 identical lines of varying length,
// so that a body mixing two renders (a reused buffer written while a scrape
// still sends it) cannot pass for one.
type varyingRender struct{ renders atomic.Int64 }

func (v *varyingRender) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	n := v.renders.Add(1)
	line := fmt.Sprintf("render %d %s\n", n, strings.Repeat("x", int(n%13)*100))
	for range n%7 + 1 {
		fmt.Fprint(w, line)
	}
}

// TestPooledRenderBuffersAreNotShared: render and gzip buffers are reused
// once the scrapes a render served are done; under many concurrent and
// overlapping scrapes, plain and gzipped, every body is exactly one render.
func TestPooledRenderBuffersAreNotShared(t *testing.T) {
	g := newScrapeGate(&varyingRender{}, 64, 64)
	srv := httptest.NewServer(g)
	defer srv.Close()
	var wg sync.WaitGroup
	for c := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 25 {
				code, body := get(t, srv.URL, (c+i)%2 == 0)
				lines := strings.SplitAfter(body, "\n")
				lines = lines[:len(lines)-1] // after the last newline
				var n int
				if code != http.StatusOK || len(lines) == 0 {
					t.Errorf("status %d, body %q", code, body)
					return
				}
				if _, err := fmt.Sscanf(lines[0], "render %d", &n); err != nil || len(lines) != n%7+1 {
					t.Errorf("body of %d lines starting %.40q is not one whole render", len(lines), lines[0])
					return
				}
				for _, l := range lines {
					if l != lines[0] {
						t.Errorf("render %d's body mixes in %.40q", n, l)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
}
