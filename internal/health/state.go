// Package health tracks whether each GPU and MIG device is fit to be
// allocated, and why not.
package health

import (
	"log/slog"
	"sync"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/notify"
)

// Status is the health of one unit: a GPU or a MIG device, by UUID.
type Status struct {
	Healthy bool      `json:"healthy"`
	Reason  string    `json:"reason,omitempty"`
	Since   time.Time `json:"since"`
}

// State is the node's health table. Units never reported are healthy. It
// outlives kubelet restarts and config reloads: the plugin servers read it,
// they never own it.
type State struct {
	log *slog.Logger
	now func() time.Time

	mu      sync.RWMutex
	units   map[string]Status
	changed notify.Signal
}

// NewState returns an empty table. log and now may be nil.
func NewState(log *slog.Logger, now func() time.Time) *State {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if now == nil {
		now = time.Now
	}
	return &State{log: log, now: now, units: map[string]Status{}}
}

// SetUnhealthy marks a unit unhealthy with a reason. It reports whether the
// unit's health changed; only a change is logged and wakes watchers, so an
// event storm on a sick GPU costs one log line.
func (s *State) SetUnhealthy(unit, reason string) bool {
	return s.set(unit, false, reason)
}

// SetHealthy marks a unit healthy again and reports whether that changed it.
func (s *State) SetHealthy(unit, reason string) bool {
	return s.set(unit, true, reason)
}

func (s *State) set(unit string, healthy bool, reason string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, known := s.units[unit]
	if !known {
		old = Status{Healthy: true}
	}
	if old.Healthy == healthy {
		if !healthy && known && old.Reason != reason {
			old.Reason = reason // keep the latest reason, quietly
			s.units[unit] = old
		}
		return false
	}
	s.units[unit] = Status{Healthy: healthy, Reason: reason, Since: s.now()}
	if healthy {
		s.log.Info("device healthy again", "device", unit, "reason", reason)
	} else {
		s.log.Warn("device unhealthy", "device", unit, "reason", reason)
	}
	s.changed.Notify()
	return true
}

// Status returns a unit's health.
func (s *State) Status(unit string) Status {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if st, ok := s.units[unit]; ok {
		return st
	}
	return Status{Healthy: true}
}

// Check reports whether all the given units are healthy, and if not, the
// first unhealthy one's reason.
func (s *State) Check(units ...string) (bool, string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, u := range units {
		if st, ok := s.units[u]; ok && !st.Healthy {
			return false, st.Reason
		}
	}
	return true, ""
}

// Changed returns a channel closed at the next health change. Take it before
// reading the table.
func (s *State) Changed() <-chan struct{} { return s.changed.C() }

// Snapshot copies the table of units that have been reported.
func (s *State) Snapshot() map[string]Status {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make(map[string]Status, len(s.units))
	for k, v := range s.units {
		out[k] = v
	}
	return out
}
