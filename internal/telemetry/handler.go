package telemetry

import (
	"bytes"
	"compress/gzip"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

// textContentType is the text exposition format, version 0.0.4: the one
// dcgm-exporter serves. OpenMetrics is never offered, because it would
// type DCGM_* counters without a _total suffix as unknown.
var textContentType = string(expfmt.NewFormat(expfmt.TypeTextPlain))

// Handler serves /metrics: the registry's families (the daemon's own),
// then the collector's DCGM_* families written by WriteText, which keeps a
// scrape of dense MIG nodes within a few milliseconds. It compresses with
// gzip when the client accepts it, as promhttp does. collector may be nil.
func Handler(g prometheus.Gatherer, c *Collector, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &handler{g: g, c: c, log: log}
}

type handler struct {
	g    prometheus.Gatherer
	c    *Collector
	log  *slog.Logger
	bufs sync.Pool // *bytes.Buffer
	gzs  sync.Pool // *gzip.Writer

	mu      sync.Mutex
	lastErr string
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	buf, _ := h.bufs.Get().(*bytes.Buffer)
	if buf == nil {
		buf = new(bytes.Buffer)
	}
	buf.Reset()
	defer h.bufs.Put(buf)

	mfs, err := h.g.Gather()
	h.noteError(err)
	enc := expfmt.NewEncoder(buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			h.noteError(err)
		}
	}
	if h.c != nil {
		h.c.WriteText(buf)
	}

	w.Header().Set("Content-Type", textContentType)
	if !acceptsGzip(r) {
		w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
		_, _ = w.Write(buf.Bytes())
		return
	}
	w.Header().Set("Content-Encoding", "gzip")
	w.Header().Add("Vary", "Accept-Encoding")
	gz, _ := h.gzs.Get().(*gzip.Writer)
	if gz == nil {
		gz, _ = gzip.NewWriterLevel(w, gzip.BestSpeed)
	} else {
		gz.Reset(w)
	}
	_, _ = gz.Write(buf.Bytes())
	_ = gz.Close()
	h.gzs.Put(gz)
}

// noteError logs a gather problem once per distinct message; the metrics
// that could be gathered are still served (promhttp's ContinueOnError).
func (h *handler) noteError(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg != "" && msg != h.lastErr {
		h.log.Warn("gathering metrics", "err", err)
	}
	h.lastErr = msg
}

func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		enc, q, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(strings.TrimSpace(enc), "gzip") && strings.TrimSpace(q) != "q=0" {
			return true
		}
	}
	return false
}
