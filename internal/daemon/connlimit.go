package daemon

import (
	"net"
	"net/http"
	"sync"
	"time"
)

// maxHTTPConns bounds the metrics listener's open connections. Each costs
// the process a goroutine and buffers whether it scrapes or idles; past the
// limit a client waits in the kernel's accept queue, which costs the
// process nothing, so memory stays flat however many clients connect.
const maxHTTPConns = 128

// connLimiter is a listener that holds at most max connections open. When
// it is full and a client waits, the connection idle the longest (a
// keep-alive between scrapes) is closed to make room, so idle clients
// cannot lock out new ones such as the kubelet's probes. Install track as
// the server's ConnState hook.
type connLimiter struct {
	net.Listener
	slots chan struct{}
	done  chan struct{}
	once  sync.Once

	mu      sync.Mutex
	idle    map[net.Conn]time.Time // connections between requests, since when
	waiting bool                   // Accept waits for a slot
}

func newConnLimiter(l net.Listener, max int) *connLimiter {
	return &connLimiter{Listener: l, slots: make(chan struct{}, max), done: make(chan struct{}), idle: map[net.Conn]time.Time{}}
}

func (l *connLimiter) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	default:
		// Full: close the longest idle connection, and any that turns
		// idle while we wait (track), until a slot frees.
		l.mu.Lock()
		l.waiting = true
		l.mu.Unlock()
		l.closeOldestIdle()
		select {
		case l.slots <- struct{}{}:
		case <-l.done:
		}
		l.mu.Lock()
		l.waiting = false
		l.mu.Unlock()
		select {
		case <-l.done:
			return nil, net.ErrClosed
		default:
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitedConn{Conn: c, release: func() { <-l.slots }}, nil
}

func (l *connLimiter) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// track is the http.Server's ConnState hook.
func (l *connLimiter) track(c net.Conn, state http.ConnState) {
	l.mu.Lock()
	if state != http.StateIdle {
		delete(l.idle, c)
		l.mu.Unlock()
		return
	}
	if l.waiting {
		l.mu.Unlock()
		c.Close() // a client waits for its slot
		return
	}
	l.idle[c] = time.Now()
	l.mu.Unlock()
}

func (l *connLimiter) closeOldestIdle() {
	l.mu.Lock()
	var oldest net.Conn
	var since time.Time
	for c, t := range l.idle {
		if oldest == nil || t.Before(since) {
			oldest, since = c, t
		}
	}
	delete(l.idle, oldest)
	l.mu.Unlock()
	if oldest != nil {
		oldest.Close()
	}
}

// limitedConn gives its slot back once, when closed.
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
