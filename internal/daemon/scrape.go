package daemon

import (
	"bytes"
	"compress/gzip"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
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
	// bufs are render buffers, reused once every scrape a render served
	// has written it: a render is about 250 KB on a large node, and
	// allocating it per scrape made the garbage collector, not the
	// render, the scrape's tail. lastSize sizes a new buffer.
	bufs     sync.Pool
	lastSize atomic.Int64
	// gzBufs are the gzip output buffers, reused the same way. The gzip
	// writers are not pooled: each holds about 1 MB of compressor state,
	// and keeping one cost the daemon 2.5 MB of RSS (suite J) for less
	// than the render buffers gave.
	gzBufs sync.Pool
}

// snapshot is one render's response, shared by every scrape it serves.
type snapshot struct {
	done   chan struct{} // closed once the fields below are set
	status int
	header http.Header
	body   []byte
	buf    *bytes.Buffer // body's storage, back to the pool at refs 0
	refs   atomic.Int32  // scrapes still writing body

	gzOnce sync.Once
	gz     []byte
	gzBuf  *bytes.Buffer // gz's storage, back to the pool at refs 0
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
	defer g.release(snap)
	h := w.Header()
	for k, v := range snap.header {
		h[k] = v
	}
	body := snap.body
	if snap.status == http.StatusOK && acceptsGzip(r) {
		h.Set("Content-Encoding", "gzip")
		h.Add("Vary", "Accept-Encoding")
		body = g.gzipped(snap)
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
		s.refs.Add(1) // before cur is cleared, so the render's own release cannot free body under us
		g.mu.Unlock()
		<-s.done
		g.mu.Lock()
		g.joiners--
		g.mu.Unlock()
		return s
	}
	s := &snapshot{done: make(chan struct{})}
	s.refs.Store(1)
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
	buf, _ := g.bufs.Get().(*bytes.Buffer)
	if buf == nil {
		buf = &bytes.Buffer{}
		if n := g.lastSize.Load(); n > 0 {
			buf.Grow(int(n + n/16))
		}
	}
	rec := &recorder{header: http.Header{}, status: http.StatusOK, body: buf}
	g.render.ServeHTTP(rec, req)
	g.lastSize.Store(int64(buf.Len()))
	s.status, s.body, s.buf = rec.status, buf.Bytes(), buf
	rec.header.Del("Content-Length")
	rec.header.Del("Content-Encoding")
	s.header = rec.header
	return s
}

// gzipped compresses a snapshot's body once, for every scrape it serves.
func (g *scrapeGate) gzipped(s *snapshot) []byte {
	s.gzOnce.Do(func() {
		buf, _ := g.gzBufs.Get().(*bytes.Buffer)
		if buf == nil {
			buf = &bytes.Buffer{}
		}
		zw, _ := gzip.NewWriterLevel(buf, gzip.BestSpeed)
		_, _ = zw.Write(s.body)
		_ = zw.Close()
		s.gz, s.gzBuf = buf.Bytes(), buf
	})
	return s.gz
}

// release ends one scrape's use of a snapshot; the last one returns its
// buffer to the pool.
func (g *scrapeGate) release(s *snapshot) {
	if s.refs.Add(-1) != 0 {
		return
	}
	if s.buf != nil {
		s.buf.Reset()
		g.bufs.Put(s.buf)
	}
	if s.gzBuf != nil {
		s.gzBuf.Reset()
		g.gzBufs.Put(s.gzBuf)
	}
}

// recorder captures a render.
type recorder struct {
	header      http.Header
	status      int
	wroteHeader bool
	body        *bytes.Buffer
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
