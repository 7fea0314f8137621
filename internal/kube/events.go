package kube

import (
	"container/list"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Event recording as client-go's record.EventBroadcaster with its
// EventCorrelator does it, for the daemon's few Events:
//
//   - Eventf queues (at most 1,000, then drops) and one goroutine writes;
//   - more than 10 Events within 10 minutes that differ only in message
//     (same source, object, type and reason) are aggregated into one
//     "(combined from similar events): ..." Event;
//   - an Event that repeats one already written raises that one's count
//     (a patch) instead of making another;
//   - a spam filter (a token bucket per source, object and type) drops
//     what exceeds Burst at once, then QPS;
//   - a failed write is tried again every 10 s, 12 times in all, unless
//     the server refused it.
const (
	maxQueuedEvents  = 1000
	maxTriesPerEvent = 12
	eventRetryPause  = 10 * time.Second
	eventCacheSize   = 4096
	aggregateMax     = 10
	aggregateWindow  = 10 * time.Minute
	combinedPrefix   = "(combined from similar events): "
	// client-go's spam filter defaults: 25 at once, then one per 5 minutes.
	defaultEventBurst = 25
	defaultEventQPS   = 1.0 / 300
)

// RecorderOptions configure a Recorder.
type RecorderOptions struct {
	// Source names the reporting component and host.
	Source EventSource
	// Burst and QPS are the spam filter's token bucket (defaults 25 and
	// 1/300, client-go's).
	Burst int
	QPS   float64
	// Logger hears of Events that could not be written.
	Logger *slog.Logger
}

// Recorder writes Events from its own goroutine until Shutdown or the end
// of the context it was made with; Eventf never blocks.
type Recorder struct {
	c      *Client
	source EventSource
	log    *slog.Logger
	queue  chan *Event
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	corr   *correlator
	pause  time.Duration // between tries
	now    func() time.Time
}

// NewRecorder starts a Recorder.
func (c *Client) NewRecorder(ctx context.Context, opts RecorderOptions) *Recorder {
	if opts.Burst <= 0 {
		opts.Burst = defaultEventBurst
	}
	if opts.QPS <= 0 {
		opts.QPS = defaultEventQPS
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Recorder{
		c: c, source: opts.Source, log: opts.Logger,
		queue: make(chan *Event, maxQueuedEvents),
		done:  make(chan struct{}),
		corr:  newCorrelator(opts.Burst, opts.QPS),
		pause: eventRetryPause,
		now:   time.Now,
	}
	r.ctx, r.cancel = context.WithCancel(ctx)
	go r.run()
	return r
}

// Shutdown stops the Recorder; Events not yet written are dropped.
func (r *Recorder) Shutdown() {
	r.cancel()
	<-r.done
}

// Eventf records an Event of eventtype (EventTypeNormal or
// EventTypeWarning) about ref.
func (r *Recorder) Eventf(ref *ObjectReference, eventtype, reason, format string, args ...any) {
	if eventtype != EventTypeNormal && eventtype != EventTypeWarning {
		r.log.Error("unsupported Event type", "type", eventtype)
		return
	}
	if r.ctx.Err() != nil {
		r.log.Debug("Event after the recorder stopped: dropped", "reason", reason)
		return
	}
	now := r.now()
	ns := ref.Namespace
	if ns == "" {
		ns = "default"
	}
	e := &Event{
		ObjectMeta:     ObjectMeta{Name: eventName(ref.Name, now), Namespace: ns},
		InvolvedObject: *ref,
		Reason:         reason,
		Message:        fmt.Sprintf(format, args...),
		Source:         r.source,
		FirstTimestamp: NewTime(now),
		LastTimestamp:  NewTime(now),
		Count:          1,
		Type:           eventtype,
		// As client-go fills them in from the source.
		ReportingController: r.source.Component,
		ReportingInstance:   r.source.Host,
	}
	select {
	case r.queue <- e:
	default:
		r.log.Error("too many queued Events: Event dropped", "reason", reason, "message", e.Message)
	}
}

// eventName is the object's name and the time in hex, as client-go's; a
// random name where that is no valid name (too long).
func eventName(object string, t time.Time) string {
	name := fmt.Sprintf("%s.%x", object, t.UnixNano())
	if len(name) <= 253 {
		return name
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func (r *Recorder) run() {
	defer close(r.done)
	for {
		select {
		case <-r.ctx.Done():
			return
		case e := <-r.queue:
			r.write(e)
		}
	}
}

// write correlates e and writes the result, trying again after a failure.
func (r *Recorder) write(e *Event) {
	e, patch, skip := r.corr.correlate(e, r.now())
	if skip {
		return
	}
	for tries := 1; ; tries++ {
		if r.writeOnce(e, patch) {
			return
		}
		if tries >= maxTriesPerEvent {
			r.log.Error("cannot write Event: retry limit exceeded", "reason", e.Reason, "message", e.Message)
			return
		}
		pause := r.pause
		if tries == 1 {
			pause = time.Duration(mrand.Float64() * float64(pause))
		}
		if !sleep(r.ctx, pause) {
			return
		}
	}
}

// writeOnce patches the Event e repeats (its count above 1) or creates
// it; it reports whether it is done, written or refused for good.
func (r *Recorder) writeOnce(e *Event, patch []byte) bool {
	events := "/api/v1/namespaces/" + url.PathEscape(e.Namespace) + "/events"
	var out Event
	var err error
	update := e.Count > 1
	if update {
		err = r.c.do(r.ctx, request{method: http.MethodPatch, path: events + "/" + url.PathEscape(e.Name),
			contentType: strategicMergePatch, body: patch}, &out)
	}
	if !update || IsNotFound(err) {
		// A repeat of an Event that is gone (expired) makes a new one.
		e.ResourceVersion = ""
		body, merr := json.Marshal(e)
		if merr != nil {
			r.log.Error("cannot encode Event (will not retry)", "err", merr)
			return true
		}
		err = r.c.do(r.ctx, request{method: http.MethodPost, path: events, contentType: jsonBody, body: body}, &out)
	}
	if err == nil {
		r.corr.written(&out)
		return true
	}
	var se *StatusError
	if errors.As(err, &se) {
		if se.Reason == "AlreadyExists" || slices.Contains(se.Causes, "NamespaceTerminating") {
			r.log.Debug("the server refused an Event (will not retry)", "reason", e.Reason, "err", err)
		} else {
			r.log.Error("the server refused an Event (will not retry)", "reason", e.Reason, "message", e.Message, "err", err)
		}
		return true
	}
	if r.ctx.Err() == nil {
		r.log.Error("cannot write Event (may retry after a pause)", "reason", e.Reason, "err", err)
	}
	return false
}

// correlator is client-go's EventCorrelator: aggregation, de-duplication
// and the spam filter, each with a 4,096-entry LRU cache.
type correlator struct {
	mu        sync.Mutex
	aggregate *lru[*aggregateRecord] // by source, object, type, reason
	seen      *lru[eventLog]         // by the Event's key (message included)
	spam      *lru[*rate.Limiter]    // by source, object, type
	burst     int
	qps       float64
}

type aggregateRecord struct {
	messages map[string]struct{}
	last     time.Time
}

// eventLog is the last write of an Event, which a repeat patches.
type eventLog struct {
	count           int32
	firstTimestamp  Time
	name            string
	resourceVersion string
}

func newCorrelator(burst int, qps float64) *correlator {
	return &correlator{
		aggregate: newLRU[*aggregateRecord](eventCacheSize),
		seen:      newLRU[eventLog](eventCacheSize),
		spam:      newLRU[*rate.Limiter](eventCacheSize),
		burst:     burst, qps: qps,
	}
}

// correlate returns what to write for e: e itself, the aggregate it joins,
// or a repeat (count above 1, with the patch of count, lastTimestamp and
// message); skip when the spam filter drops it.
func (c *correlator) correlate(e *Event, now time.Time) (out *Event, patch []byte, skip bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	// Aggregation.
	key := eventKey(e)
	aggKey := strings.Join([]string{e.Source.Component, e.Source.Host, e.InvolvedObject.Kind, e.InvolvedObject.Namespace,
		e.InvolvedObject.Name, e.InvolvedObject.UID, e.InvolvedObject.APIVersion, e.Type, e.Reason,
		e.ReportingController, e.ReportingInstance}, "")
	rec, ok := c.aggregate.get(aggKey)
	if !ok || now.Sub(rec.last) > aggregateWindow {
		rec = &aggregateRecord{messages: map[string]struct{}{}}
	}
	rec.messages[e.Message] = struct{}{}
	rec.last = now
	c.aggregate.add(aggKey, rec)
	if len(rec.messages) >= aggregateMax {
		for m := range rec.messages { // client-go pops any one
			delete(rec.messages, m)
			break
		}
		e = &Event{
			ObjectMeta:     ObjectMeta{Name: fmt.Sprintf("%v.%x", e.InvolvedObject.Name, now.UnixNano()), Namespace: e.Namespace},
			Count:          1,
			FirstTimestamp: NewTime(now),
			InvolvedObject: e.InvolvedObject,
			LastTimestamp:  NewTime(now),
			Message:        combinedPrefix + e.Message,
			Type:           e.Type,
			Reason:         e.Reason,
			Source:         e.Source,
		}
		key = aggKey
	}
	// De-duplication.
	ev := *e
	if last, ok := c.seen.get(key); ok && last.count > 0 {
		ev.Name, ev.ResourceVersion, ev.FirstTimestamp, ev.Count = last.name, last.resourceVersion, last.firstTimestamp, last.count+1
		patch, _ = json.Marshal(struct {
			Count         int32  `json:"count"`
			LastTimestamp Time   `json:"lastTimestamp"`
			Message       string `json:"message,omitempty"`
		}{ev.Count, ev.LastTimestamp, ev.Message})
	}
	c.seen.add(key, eventLog{count: ev.Count, firstTimestamp: ev.FirstTimestamp, name: ev.Name, resourceVersion: ev.ResourceVersion})
	// Spam filter.
	spamKey := strings.Join([]string{ev.Source.Component, ev.Source.Host, ev.InvolvedObject.Kind, ev.InvolvedObject.Namespace,
		ev.InvolvedObject.Name, ev.InvolvedObject.UID, ev.InvolvedObject.APIVersion, ev.Type}, "")
	lim, ok := c.spam.get(spamKey)
	if !ok {
		lim = rate.NewLimiter(rate.Limit(c.qps), c.burst)
	}
	c.spam.add(spamKey, lim)
	if !lim.AllowN(now, 1) {
		return nil, nil, true
	}
	return &ev, patch, false
}

// written records what the server stored, for the next repeat.
func (c *correlator) written(e *Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seen.add(eventKey(e), eventLog{count: e.Count, firstTimestamp: e.FirstTimestamp, name: e.Name, resourceVersion: e.ResourceVersion})
}

// eventKey is what makes two Events the same.
func eventKey(e *Event) string {
	o := e.InvolvedObject
	return strings.Join([]string{e.Source.Component, e.Source.Host, o.Kind, o.Namespace, o.Name, o.FieldPath, o.UID, o.APIVersion,
		e.Type, e.Reason, e.Message}, "")
}

// lru is a string-keyed cache of at most max entries that forgets the
// least recently used.
type lru[V any] struct {
	max   int
	order *list.List // of *lruEntry[V], most recent first
	items map[string]*list.Element
}

type lruEntry[V any] struct {
	key string
	val V
}

func newLRU[V any](max int) *lru[V] {
	return &lru[V]{max: max, order: list.New(), items: map[string]*list.Element{}}
}

func (l *lru[V]) get(key string) (V, bool) {
	if el, ok := l.items[key]; ok {
		l.order.MoveToFront(el)
		return el.Value.(*lruEntry[V]).val, true
	}
	var zero V
	return zero, false
}

func (l *lru[V]) add(key string, val V) {
	if el, ok := l.items[key]; ok {
		el.Value.(*lruEntry[V]).val = val
		l.order.MoveToFront(el)
		return
	}
	l.items[key] = l.order.PushFront(&lruEntry[V]{key, val})
	if l.order.Len() > l.max {
		old := l.order.Remove(l.order.Back()).(*lruEntry[V])
		delete(l.items, old.key)
	}
}
