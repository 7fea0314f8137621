// Package kube is the daemon's little API-server client: its own Node
// (read, watch, status patch, taint update), the pods on it (watch), Events
// about the Node and NFD NodeFeature objects. Only opt-in features use it
// (--node-health-condition, --config-dir, --use-node-feature-api,
// --per-pod-usage); the default daemon never calls the API server.
//
// It speaks JSON over net/http with small structs of its own instead of
// client-go, k8s.io/api and apimachinery: linked in, those grew the binary
// by 15 MB and the daemon's resident memory by 10 MB with the features off
// too, since most of the binary's pages end up resident. What the daemon
// relied on in client-go is kept: list-then-watch with re-list and backoff
// (watch.go), the Event recorder's aggregation, de-duplication and spam
// filter (events.go), kubeconfig and in-cluster configuration (config.go),
// and the REST client's rate limit and retries (here).
package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/time/rate"
)

// Client calls one API server.
type Client struct {
	host    string // scheme://host[:port], no trailing slash
	http    *http.Client
	auth    func(*http.Request)
	tokens  *fileToken // nil unless the token comes from a file
	agent   string
	limiter *rate.Limiter
}

// Client-side rate limit, client-go's default for a REST client.
const (
	clientQPS   = 5
	clientBurst = 10
	// maxRetries bounds the retries of one request that the server asks
	// to repeat (Retry-After), as client-go's.
	maxRetries = 10
)

// NewClient makes a Client from a Config (in-cluster or kubeconfig).
func NewClient(cfg *Config) (*Client, error) {
	host := cfg.Host
	if !strings.Contains(host, "://") {
		// As client-go: https when TLS is configured, else http.
		scheme := "http://"
		if len(cfg.CAData) > 0 || len(cfg.CertData) > 0 || cfg.Insecure {
			scheme = "https://"
		}
		host = scheme + host
	}
	if (cfg.BearerToken != "" || cfg.TokenFile != "") && (cfg.Username != "" || cfg.Password != "") {
		return nil, errors.New("API client: username/password or bearer token may be set, but not both")
	}
	u, err := url.Parse(host)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, fmt.Errorf("API client: server %q is not an http(s) URL", cfg.Host)
	}
	tr, err := cfg.transport()
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	auth, tokens := cfg.authorize()
	agent := cfg.UserAgent
	if agent == "" {
		agent = "gpu-plugin"
	}
	return &Client{
		host:    strings.TrimSuffix(u.Scheme+"://"+u.Host+u.Path, "/"),
		http:    &http.Client{Transport: tr},
		auth:    auth,
		tokens:  tokens,
		agent:   agent,
		limiter: rate.NewLimiter(clientQPS, clientBurst),
	}, nil
}

// Content types of the bodies the daemon sends.
const (
	strategicMergePatch = "application/strategic-merge-patch+json"
	jsonBody            = "application/json"
)

// request is one call: method, path, query and an optional body.
type request struct {
	method, path string
	query        url.Values
	contentType  string
	body         []byte
}

// do makes the call and decodes a 2xx answer's body into out (unless nil).
// An answer of another status is a *StatusError.
func (c *Client) do(ctx context.Context, r request, out any) error {
	resp, err := c.send(ctx, r)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: reading the answer: %w", r.method, r.path, err)
	}
	if out == nil {
		return nil
	}
	if raw, ok := out.(*[]byte); ok {
		*raw = body
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("%s %s: decoding the answer: %w", r.method, r.path, err)
	}
	return nil
}

// send makes the call after the client's rate limit and returns a 2xx
// answer for the caller to read and close. As client-go's REST client, it
// repeats a call the server answers 429 or 5xx with Retry-After (after
// that many seconds), and a GET whose connection broke (after 1 s), up
// to maxRetries times.
func (c *Client) send(ctx context.Context, r request) (*http.Response, error) {
	u := c.host + r.path
	if len(r.query) > 0 {
		u += "?" + r.query.Encode()
	}
	for attempt := 1; ; attempt++ {
		if err := c.limiter.Wait(ctx); err != nil {
			return nil, err
		}
		var body io.Reader
		if r.body != nil {
			body = bytes.NewReader(r.body)
		}
		req, err := http.NewRequestWithContext(ctx, r.method, u, body)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Accept", jsonBody)
		req.Header.Set("User-Agent", c.agent)
		if r.contentType != "" {
			req.Header.Set("Content-Type", r.contentType)
		}
		c.auth(req)
		resp, err := c.http.Do(req)
		if err == nil && resp.StatusCode == http.StatusUnauthorized && c.tokens != nil {
			c.tokens.expire()
		}
		wait := time.Duration(-1)
		switch {
		case err != nil:
			if r.method == http.MethodGet && brokenConnection(err) {
				wait = time.Second
			}
		case resp.StatusCode/100 == 2:
			return resp, nil
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			if s, perr := strconv.Atoi(resp.Header.Get("Retry-After")); perr == nil && s >= 0 {
				wait = time.Duration(s) * time.Second
			}
		}
		if wait < 0 || attempt > maxRetries || ctx.Err() != nil {
			if err != nil {
				return nil, err
			}
			defer resp.Body.Close()
			return nil, statusErrorFrom(resp)
		}
		if resp != nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
	}
}

// brokenConnection is an error of a connection that broke (reset, closed
// early): worth repeating an idempotent call for.
func brokenConnection(err error) bool {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
		return true
	}
	s := err.Error()
	return strings.Contains(s, "connection reset by peer") || strings.Contains(s, "http2: client connection lost") ||
		strings.Contains(s, "use of closed network connection")
}

// StatusError is an API server's answer other than 2xx: its Status object
// (or one made from the HTTP status when the body is none).
type StatusError struct {
	Code    int
	Reason  string
	Message string
	Causes  []string // details.causes[].reason
}

func (e *StatusError) Error() string { return e.Message }

// statusErrorFrom reads a failed answer's Status.
func statusErrorFrom(resp *http.Response) *StatusError {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var st struct {
		Kind string `json:"kind"`
	}
	if json.Unmarshal(body, &st) == nil && st.Kind == "Status" {
		e := statusErrorFromObject(body)
		if e.Code == 0 {
			e.Code = resp.StatusCode
		}
		if e.Message == "" {
			e.Message = fmt.Sprintf("the server answered %s", resp.Status)
		}
		return e
	}
	msg := strings.TrimSpace(string(body))
	if msg == "" || len(msg) > 1024 {
		msg = http.StatusText(resp.StatusCode)
	}
	return &StatusError{Code: resp.StatusCode, Message: fmt.Sprintf("the server answered %s: %s", resp.Status, msg)}
}

// statusCode is err's API status code, 0 when it is no *StatusError.
func statusCode(err error) int {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

// IsNotFound reports whether err says the object does not exist.
func IsNotFound(err error) bool { return statusCode(err) == http.StatusNotFound }

// IsConflict reports whether err is a write refused because the object
// changed since it was read.
func IsConflict(err error) bool { return statusCode(err) == http.StatusConflict }

// isExpired reports whether err says a resourceVersion is too old (410
// Gone): a watch must start again from a new list.
func isExpired(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && (se.Code == http.StatusGone || se.Reason == "Expired" || se.Reason == "Gone")
}

// RetryOnConflict runs fn until it returns anything but a conflict, at
// most 5 times 10 ms apart (client-go's retry.DefaultRetry).
func RetryOnConflict(ctx context.Context, fn func() error) error {
	var err error
	for i := range 5 {
		if i > 0 {
			select {
			case <-ctx.Done():
				return err
			case <-time.After(time.Duration(float64(10*time.Millisecond) * (1 + 0.1*rand.Float64()))):
			}
		}
		if err = fn(); !IsConflict(err) {
			return err
		}
	}
	return err
}

// fileToken is a bearer token read from a file, read again each minute and
// after a 401, as client-go does: the kubelet rotates pod-bound tokens.
type fileToken struct {
	path string
	mu   sync.Mutex
	tok  string
	read time.Time
}

func (f *fileToken) token() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if time.Since(f.read) >= time.Minute {
		// A failed read keeps the token read before.
		if b, err := readToken(f.path); err == nil {
			f.tok = b
		}
		f.read = time.Now()
	}
	return f.tok
}

// expire makes the next token() read the file.
func (f *fileToken) expire() {
	f.mu.Lock()
	f.read = time.Time{}
	f.mu.Unlock()
}

// dialer is client-go's: 30 s to connect, TCP keep-alives every 30 s.
var dialer = &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
