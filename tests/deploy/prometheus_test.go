package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

// promServer is a real Prometheus (Debian package prometheus, as the
// daemon's telemetry tests use) scraping one target every second.
type promServer struct {
	addr   string
	exited chan error
	log    *lockedBuffer
}

// prometheusBinary returns prometheus' path, or skips.
func prometheusBinary(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("prometheus not installed (apt-get install prometheus; scripts/test.sh does it): real-Prometheus checks skipped")
	}
	return p
}

// startPrometheus runs Prometheus against target (host:port) until the test
// ends, and waits until it is ready.
func startPrometheus(t *testing.T, bin, target string) *promServer {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	body := fmt.Sprintf("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: gpu-plugin\n    honor_labels: true\n    static_configs:\n      - targets: [%q]\n", target)
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	p := &promServer{addr: addr, exited: make(chan error, 1), log: &lockedBuffer{}}
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.exited
	})
	p.eventually(t, 30*time.Second, "Prometheus ready", func() string {
		resp, err := http.Get("http://" + addr + "/-/ready")
		if err != nil {
			return err.Error()
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return resp.Status
		}
		return ""
	})
	return p
}

// eventually calls check every 250 ms until it returns "" (done); otherwise
// it fails after limit with the last answer, or when Prometheus exits.
func (p *promServer) eventually(t *testing.T, limit time.Duration, what string, check func() string) {
	t.Helper()
	deadline := time.After(limit)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		last := check()
		if last == "" {
			return
		}
		select {
		case err := <-p.exited:
			p.exited <- err
			t.Fatalf("%s: prometheus exited: %v\n%s", what, err, p.log)
		case <-deadline:
			t.Fatalf("%s: not within %s; last: %s\nprometheus log:\n%s", what, limit, last, p.log)
		case <-tick.C:
		}
	}
}

// promSample is one element of an instant vector.
type promSample struct {
	Labels map[string]string
	Value  float64
}

// query evaluates an instant query now, as KEDA's Prometheus scaler and
// prometheus-adapter do (GET /api/v1/query).
func (p *promServer) query(q string) ([]promSample, error) {
	var doc struct {
		Status    string `json:"status"`
		Error     string `json:"error"`
		ErrorType string `json:"errorType"`
		Data      struct {
			ResultType string `json:"resultType"`
			Result     []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := p.get("/api/v1/query?query="+url.QueryEscape(q), &doc); err != nil {
		return nil, err
	}
	if doc.Status != "success" {
		return nil, fmt.Errorf("%s: %s", doc.ErrorType, doc.Error)
	}
	if doc.Data.ResultType != "vector" {
		return nil, fmt.Errorf("result type %s, want vector", doc.Data.ResultType)
	}
	out := make([]promSample, 0, len(doc.Data.Result))
	for _, r := range doc.Data.Result {
		s, _ := r.Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return nil, fmt.Errorf("value %v: %w", r.Value[1], err)
		}
		out = append(out, promSample{Labels: r.Metric, Value: v})
	}
	return out, nil
}

// series lists the series a selector matches, as prometheus-adapter's
// discovery does (GET /api/v1/series).
func (p *promServer) series(match string) ([]map[string]string, error) {
	var doc struct {
		Status string              `json:"status"`
		Error  string              `json:"error"`
		Data   []map[string]string `json:"data"`
	}
	if err := p.get("/api/v1/series?match[]="+url.QueryEscape(match), &doc); err != nil {
		return nil, err
	}
	if doc.Status != "success" {
		return nil, fmt.Errorf("series %s: %s", match, doc.Error)
	}
	return doc.Data, nil
}

func (p *promServer) get(path string, into any) error {
	resp, err := http.Get("http://" + p.addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(into)
}

// lockedBuffer collects a child process' output.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
