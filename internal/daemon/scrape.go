package daemon

import (
	"bytes"
	"compress/gzip"
	"net/http"
	"strconv"
	"sync"
)

// Scrape limits: at most scrapesInFlight responses are written at once and
// scrapesQueued more wait for a turn; beyond that a scrape gets 503 at
// once. Renders are shared (scrapeGate), so neither number scales memory
// with the body's size.
const (
	scrapesInFlight = 64
	scrapesQueued   = 192
)

// scrapeGate bounds /metrics and shares its renders. A scrape that arrives
// while a render is under way waits for it and is served its bytes; one
// that arrives when none is under way starts a new one. So a scrape never
// gets data older than the render in flight when it arrived, and any
// number of concurrent scrapes cost one render and one body in memory
// (plus one gzipped copy, made once per render when a client asks for it).
type scrapeGate struct {
	render  http.Handler  // the full, uncompressed /metrics response
	admit   chan struct{} // scrapes in flight or waiting
	writing chan struct{} // scrapes writing their response

	mu      sync.Mutex
	cur     *snapshot // the render in progress, nil when none
	joiners int       // scrapes waiting for cur (tests watch it)
}

// snapshot is one render's response, shared by every scrape it serves.
type snapshot struct {
	done   chan struct{} // closed once the fields below are set
	status int
	header http.Header
	body   []byte

	gzOnce sync.Once
	gz     []byte
}

func newScrapeGate(render http.Handler, inFlight, queued int) *scrapeGate {
	return &scrapeGate{
		render:  render,
		admit:   make(chan struct{}, inFlight+queued),
		writing: make(chan struct{}, inFlight),
	}
}

func (g *scrapeGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	select {
	case g.admit <- struct{}{}:
		defer func() { <-g.admit }()
	default:
		w.Header().Set("Retry-After", "1")
		http.Error(w, "too many concurrent scrapes; retry later", http.StatusServiceUnavailable)
		return
	}
	select {
	case g.writing <- struct{}{}:
		defer func() { <-g.writing }()
	case <-r.Context().Done():
		return
	}
	snap := g.snapshot(r)
	h := w.Header()
	for k, v := range snap.header {
		h[k] = v
	}
	body := snap.body
	if snap.status == http.StatusOK && acceptsGzip(r) {
		h.Set("Content-Encoding", "gzip")
		h.Add("Vary", "Accept-Encoding")
		body = snap.gzipped()
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(snap.status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

// snapshot joins the render in progress or starts one.
func (g *scrapeGate) snapshot(r *http.Request) *snapshot {
	g.mu.Lock()
	if s := g.cur; s != nil {
		g.joiners++
		g.mu.Unlock()
		<-s.done
		g.mu.Lock()
		g.joiners--
		g.mu.Unlock()
		return s
	}
	s := &snapshot{done: make(chan struct{})}
	g.cur = s
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.cur = nil
		g.mu.Unlock()
		close(s.done)
	}()
	// The render is plain: compression happens once per snapshot.
	req := r.Clone(r.Context())
	req.Header.Del("Accept-Encoding")
	rec := &recorder{header: http.Header{}, status: http.StatusOK}
	g.render.ServeHTTP(rec, req)
	s.status, s.body = rec.status, rec.body.Bytes()
	rec.header.Del("Content-Length")
	rec.header.Del("Content-Encoding")
	s.header = rec.header
	return s
}

func (s *snapshot) gzipped() []byte {
	s.gzOnce.Do(func() {
		var buf bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
		_, _ = zw.Write(s.body)
		_ = zw.Close()
		s.gz = buf.Bytes()
	})
	return s.gz
}

// recorder captures a render.
type recorder struct {
	header      http.Header
	status      int
	wroteHeader bool
	body        bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(code int) {
	if !r.wroteHeader {
		r.status, r.wroteHeader = code, true
	}
}

func (r *recorder) Write(p []byte) (int, error) {
	r.wroteHeader = true
	return r.body.Write(p)
}

// acceptsGzip reports whether the client takes a gzip body.
func acceptsGzip(r *http.Request) bool {
	for _, part := range bytes.Split([]byte(r.Header.Get("Accept-Encoding")), []byte(",")) {
		enc, q, _ := bytes.Cut(bytes.TrimSpace(part), []byte(";"))
		if bytes.EqualFold(bytes.TrimSpace(enc), []byte("gzip")) && string(bytes.TrimSpace(q)) != "q=0" {
			return true
		}
	}
	return false
}
