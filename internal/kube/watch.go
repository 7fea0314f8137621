package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// informer follows the objects at path that a field selector picks, with
// the semantics of client-go's informer (reflector): a list, then a watch
// from the list's resourceVersion, watched again from the last
// resourceVersion seen when the server ends it (every 5 to 10 minutes);
// listed again, after a backoff, when the watch breaks with an error or
// its resourceVersion expired (410 Gone). Each listed object is handed to
// set; objects gone between two lists to del, as are deleted ones.
type informer[T any] struct {
	c        *Client
	path     string // e.g. /api/v1/pods
	selector string // fieldSelector
	what     string // for the log: "node n1"
	log      *slog.Logger
	meta     func(*T) *ObjectMeta
	set      func(*T)
	del      func(*T) // nil: deletions are not reported
	synced   func()   // nil or called once, after the first list

	// minWatch is the shortest watch the client asks for; each asks for
	// minWatch plus up to as much again at random.
	minWatch time.Duration
	backoff  backoff

	store       map[string]*T // namespace/name → the object last seen
	rv          string        // the resourceVersion last seen
	rvNotServed bool          // the server no longer serves rv: list from etcd
}

// Client-go's reflector's backoff: 800 ms doubling to 30 s (plus up to as
// much again of jitter), back to 800 ms after 2 minutes without one.
const (
	backoffInit  = 800 * time.Millisecond
	backoffMax   = 30 * time.Second
	backoffReset = 2 * time.Minute
)

func (in *informer[T]) run(ctx context.Context) {
	if in.minWatch == 0 {
		in.minWatch = 5 * time.Minute
	}
	if in.backoff.init == 0 {
		in.backoff = backoff{init: backoffInit, max: backoffMax, reset: backoffReset}
	}
	in.store = map[string]*T{}
	synced := false
	for {
		if err := in.list(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			in.log.Warn("cannot list "+in.what+"; retrying", "err", err)
		} else {
			if !synced && in.synced != nil {
				in.synced()
			}
			synced = true
			in.watch(ctx)
		}
		if !sleep(ctx, in.backoff.next()) {
			return
		}
	}
}

// list replaces the store with a fresh list: from the API server's cache
// at first ("0") or at the last resourceVersion seen; from etcd ("") when
// the server no longer has that one.
func (in *informer[T]) list(ctx context.Context) error {
	rv := in.rv
	switch {
	case in.rvNotServed:
		rv = ""
	case rv == "":
		rv = "0"
	}
	items, listRV, err := in.listAt(ctx, rv)
	if isExpired(err) || tooLargeResourceVersion(err) {
		in.rvNotServed = true
		items, listRV, err = in.listAt(ctx, "")
	}
	if err != nil {
		return err
	}
	in.rvNotServed = false
	in.rv = listRV
	seen := make(map[string]bool, len(items))
	for i := range items {
		obj := &items[i]
		k := objectKey(in.meta(obj))
		seen[k] = true
		in.store[k] = obj
		in.set(obj)
	}
	for k, obj := range in.store {
		if !seen[k] {
			delete(in.store, k)
			if in.del != nil {
				in.del(obj)
			}
		}
	}
	return nil
}

func (in *informer[T]) listAt(ctx context.Context, rv string) ([]T, string, error) {
	q := url.Values{}
	if in.selector != "" {
		q.Set("fieldSelector", in.selector)
	}
	if rv != "" {
		q.Set("resourceVersion", rv)
	}
	var list struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
		Items []T `json:"items"`
	}
	err := in.c.do(ctx, request{method: http.MethodGet, path: in.path, query: q}, &list)
	return list.Items, list.Metadata.ResourceVersion, err
}

// watch watches from the last resourceVersion until the watch breaks; a
// watch the server ended is started again at once.
func (in *informer[T]) watch(ctx context.Context) {
	for ctx.Err() == nil {
		start := time.Now()
		events, err := in.watchOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if err == nil && events == 0 && time.Since(start) < time.Second {
			err = errors.New("very short watch: the watch lasted less than a second and received no event")
		}
		switch {
		case err == nil:
			continue
		case connectionRefused(err) || statusCode(err) == http.StatusTooManyRequests:
			// The server is starting or overloaded: watch again after
			// the backoff, no need for a new list.
			if !sleep(ctx, in.backoff.next()) {
				return
			}
			continue
		case isExpired(err):
			in.log.Debug("watch of "+in.what+" expired; listing again", "err", err)
		default:
			in.log.Warn("watch of "+in.what+" ended with an error; listing again", "err", err)
		}
		return
	}
}

// watchOnce is one watch request; it returns how many events it handled,
// and nil when the server (or the client's deadline) ended it.
func (in *informer[T]) watchOnce(ctx context.Context) (int, error) {
	timeout := in.minWatch + rand.N(in.minWatch)
	q := url.Values{
		"watch":               {"true"},
		"resourceVersion":     {in.rv},
		"allowWatchBookmarks": {"true"},
		"timeoutSeconds":      {strconv.Itoa(int(timeout.Seconds()))},
	}
	if in.selector != "" {
		q.Set("fieldSelector", in.selector)
	}
	// The server ends the watch after timeout; this deadline ends one on
	// a connection that died without a word.
	ctx, cancel := context.WithTimeout(ctx, timeout+30*time.Second)
	defer cancel()
	resp, err := in.c.send(ctx, request{method: http.MethodGet, path: in.path, query: q})
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for n := 0; ; n++ {
		var ev struct {
			Type   string          `json:"type"`
			Object json.RawMessage `json:"object"`
		}
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil || streamEnded(err) {
				return n, nil
			}
			return n, fmt.Errorf("decoding the watch stream: %w", err)
		}
		if ev.Type == "ERROR" {
			return n, statusErrorFromObject(ev.Object)
		}
		var obj T
		if err := json.Unmarshal(ev.Object, &obj); err != nil {
			in.log.Warn("cannot decode a watch event of "+in.what, "type", ev.Type, "err", err)
			continue
		}
		m := in.meta(&obj)
		switch ev.Type {
		case "ADDED", "MODIFIED":
			in.store[objectKey(m)] = &obj
			in.set(&obj)
		case "DELETED":
			delete(in.store, objectKey(m))
			if in.del != nil {
				in.del(&obj)
			}
		case "BOOKMARK":
		default:
			in.log.Warn("unknown watch event of "+in.what, "type", ev.Type)
			continue
		}
		if m.ResourceVersion != "" {
			in.rv = m.ResourceVersion
		}
	}
}

func objectKey(m *ObjectMeta) string {
	if m.Namespace == "" {
		return m.Name
	}
	return m.Namespace + "/" + m.Name
}

// streamEnded is a watch stream that ended, cleanly or with its
// connection: client-go's watcher ends quietly on these and watches again.
func streamEnded(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || brokenConnection(err) ||
		errors.As(err, &ne) && ne.Timeout()
}

func connectionRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

// statusErrorFromObject is the Status of a watch's ERROR event.
func statusErrorFromObject(raw json.RawMessage) *StatusError {
	var st struct {
		Message string `json:"message"`
		Reason  string `json:"reason"`
		Code    int    `json:"code"`
		Details struct {
			Causes []struct {
				Type string `json:"reason"`
			} `json:"causes"`
		} `json:"details"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return &StatusError{Code: http.StatusInternalServerError, Message: "the watch stream ended with an unreadable error: " + string(raw)}
	}
	e := &StatusError{Code: st.Code, Reason: st.Reason, Message: st.Message}
	for _, c := range st.Details.Causes {
		e.Causes = append(e.Causes, c.Type)
	}
	return e
}

// tooLargeResourceVersion is the server's answer to a list at a
// resourceVersion its cache has not reached yet.
func tooLargeResourceVersion(err error) bool {
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusGatewayTimeout {
		return false
	}
	for _, c := range se.Causes {
		if c == "ResourceVersionTooLarge" {
			return true
		}
	}
	return false
}

// fieldSelector is field=value, escaped as apimachinery's fields package
// does.
func fieldSelector(field, value string) string {
	return field + "=" + strings.NewReplacer(`\`, `\\`, `,`, `\,`, `=`, `\=`).Replace(value)
}

// backoff is a doubling delay with jitter that starts over after a quiet
// period.
type backoff struct {
	init, max, reset time.Duration
	cur              time.Duration
	last             time.Time
}

func (b *backoff) next() time.Duration {
	if b.cur == 0 || time.Since(b.last) > b.reset {
		b.cur = b.init
	}
	d := b.cur
	b.cur = min(2*b.cur, b.max)
	b.last = time.Now()
	return d + time.Duration(rand.Float64()*float64(d))
}

// sleep waits d; false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
