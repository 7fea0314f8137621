package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/exporter-toolkit/web"

	"github.com/gpu-plugin/gpu-plugin/internal/dra"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/mps"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/version"
)

// httpServer is the metrics listener: /metrics, /healthz, /readyz,
// /debug/devices, and /sim/ on a simulated node.
type httpServer struct {
	d        *Daemon
	lis      net.Listener
	srv      *http.Server
	registry *prometheus.Registry
}

func (d *Daemon) newHTTPServer() (*httpServer, error) {
	lis, err := net.Listen("tcp", d.cfg.Daemon.MetricsAddress)
	if err != nil {
		return nil, fmt.Errorf("metrics listener on %s (--metrics-address): %w", d.cfg.Daemon.MetricsAddress, err)
	}
	limited := newConnLimiter(lis, maxHTTPConns)
	h := &httpServer{d: d, lis: limited, registry: prometheus.NewRegistry()}
	h.registry.MustRegister(
		collectors.NewGoCollector(),
		newCachedCollector(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), time.Second),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "gpu_plugin_build_info",
			Help:        "Always 1; the version label says which build runs.",
			ConstLabels: prometheus.Labels{"version": version.String()},
		}, func() float64 { return 1 }),
	)
	h.registry.MustRegister(d.healthCollector())
	h.registry.MustRegister(d.rl) // config reloads, re-scans, node labels (reload.go)
	if d.mps != nil {
		h.registry.MustRegister(d.mps) // MPS control daemons (mps.go)
	}
	if d.dra != nil {
		h.registry.MustRegister(d.dra) // the DRA plugin (dra.go)
	}
	// DCGM_*, the sampler, pod attribution, plugin and NVML counters (telemetry.go).
	h.registry.MustRegister(d.telemetryCollectors()...)
	mux := http.NewServeMux()
	// With telemetry on, DCGM_* families are written from pre-rendered
	// label sets after the registry's (telemetry.go).
	// Scrapes are bounded and share renders (scrape.go).
	mux.Handle("GET /metrics", newScrapeGate(
		d.metricsHandler(h.registry, promhttp.HandlerFor(h.registry, promhttp.HandlerOpts{ErrorLog: nil})),
		scrapesInFlight, scrapesQueued))
	mux.HandleFunc("GET /healthz", h.healthz)
	mux.HandleFunc("GET /readyz", h.readyz)
	mux.HandleFunc("GET /debug/devices", h.debugDevices)
	if d.node != nil {
		mux.Handle("/sim/", d.node.Handler())
	}
	h.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ConnState:         limited.track, // idle connections make room when full (connlimit.go)
		// net/http's own complaints (TLS handshakes of clients that do not
		// trust the certificate or speak plain HTTP) go to our logger, not
		// the log package's stderr.
		ErrorLog: slog.NewLogLogger(d.log.With("component", "http").Handler(), slog.LevelDebug),
	}
	return h, nil
}

func (h *httpServer) addr() string { return h.lis.Addr().String() }

// run serves until ctx ends, then shuts down gracefully.
func (h *httpServer) run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() {
		cfgFile := h.d.cfg.Daemon.WebConfigFile
		errc <- web.Serve(h.lis, h.srv, &web.FlagConfig{WebConfigFile: &cfgFile}, h.d.log.With("component", "http"))
	}()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := h.srv.Shutdown(sctx)
		<-errc
		return err
	}
}

// healthz is liveness: the process serves HTTP and the telemetry sampler's
// loop turns.
func (h *httpServer) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if err := h.d.telemetryAlive(); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, err)
		return
	}
	fmt.Fprintln(w, "ok")
}

// readyz is readiness: NVML works, every resource is registered with the
// kubelet, and the telemetry samples are fresh.
func (h *httpServer) readyz(w http.ResponseWriter, _ *http.Request) {
	var problems []string
	if h.d.initErr != nil {
		problems = append(problems, "NVML unavailable: "+h.d.initErr.Error())
	}
	for _, st := range h.d.plugins.Status() {
		if !st.Registered {
			msg := fmt.Sprintf("%s not registered with the kubelet", st.Resource)
			if st.LastRegisterError != "" {
				msg += ": " + st.LastRegisterError
			}
			problems = append(problems, msg)
		}
	}
	if h.d.initErr == nil && len(problems) == 0 && !h.d.plugins.Registered() {
		problems = append(problems, "kubelet plugin servers starting")
	}
	problems = append(problems, h.d.telemetryProblems()...)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if len(problems) > 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, strings.Join(problems, "\n"))
		return
	}
	fmt.Fprintln(w, "ready")
	// Notes do not make the pod unready: the daemon serves with the
	// configuration in force.
	if n := h.d.rl.readinessNote(); n != "" {
		fmt.Fprintln(w, "note: "+n)
	}
}

// DebugDevices is the /debug/devices document.
type DebugDevices struct {
	Node      string                   `json:"node"`
	Simulated bool                     `json:"simulated"`
	Inventory *nvml.Inventory          `json:"inventory,omitempty"`
	Health    map[string]health.Status `json:"health"`
	Resources []plugin.ResourceStatus  `json:"resources"`
	NVMLError string                   `json:"nvmlError,omitempty"`
	// HealthMonitor is the health monitor's own state (health.go).
	HealthMonitor *health.MonitorStatus `json:"healthMonitor,omitempty"`
	// MPS are the MPS control daemons (sharing.mps), by resource.
	MPS []mps.Status `json:"mps,omitempty"`
	// DRA is the DRA kubelet plugin: registration, the slice, the offered
	// devices and the prepared claims (--allocation-mode dra or split).
	DRA *dra.Status `json:"dra,omitempty"`
}

func (h *httpServer) debugDevices(w http.ResponseWriter, _ *http.Request) {
	doc := DebugDevices{
		Node:      h.d.cfg.Daemon.NodeName,
		Simulated: h.d.node != nil,
		Inventory: h.d.Inventory(),
		Health:    h.d.health.Snapshot(),
		Resources: h.d.plugins.Status(),
	}
	if h.d.initErr != nil {
		doc.NVMLError = h.d.initErr.Error()
	}
	doc.HealthMonitor = h.d.healthMonitorStatus()
	if h.d.mps != nil {
		doc.MPS = h.d.mps.Statuses()
	}
	if h.d.dra != nil {
		st := h.d.dra.Status()
		doc.DRA = &st
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(doc)
}
