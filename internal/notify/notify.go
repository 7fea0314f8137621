// Package notify provides a broadcast signal: any number of goroutines wait
// for "something changed" without a channel per subscriber and without a
// send that could block.
package notify

import "sync"

// Signal wakes every waiter each time Notify is called. The zero value is
// ready to use.
type Signal struct {
	mu sync.Mutex
	ch chan struct{}
}

// C returns a channel that is closed by the next Notify. Take it before
// reading the state it guards, so a change in between is not missed.
func (s *Signal) C() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

// Notify wakes everyone waiting on a channel from C.
func (s *Signal) Notify() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
}
