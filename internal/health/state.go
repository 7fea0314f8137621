// Package health tracks whether each GPU and MIG device is fit to be
// allocated, and why not.
package health

import (
	"log/slog"
	"slices"
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

	mu    sync.RWMutex
	units map[string]Status
	// quarantined are the units an operator took out of service
	// (Quarantine), with the time each went in. They read unhealthy
	// whatever units says; units keeps what the monitor reports, so a
	// unit returns from quarantine only if nothing else holds it.
	quarantined map[string]time.Time
	changed     notify.Signal
}

// ReasonQuarantined is the reason of a quarantined unit.
const ReasonQuarantined = "quarantined by operator"

// NewState returns an empty table. log and now may be nil.
func NewState(log *slog.Logger, now func() time.Time) *State {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if now == nil {
		now = time.Now
	}
	return &State{log: log, now: now, units: map[string]Status{}, quarantined: map[string]time.Time{}}
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
	if _, q := s.quarantined[unit]; q {
		s.log.Info("quarantined device's own health changed; it stays out until released", "device", unit, "healthy", healthy, "reason", reason)
	} else if healthy {
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
	return s.status(unit)
}

// status is a unit's effective health: quarantine first, then what was
// reported. The caller holds mu.
func (s *State) status(unit string) Status {
	if since, ok := s.quarantined[unit]; ok {
		return Status{Healthy: false, Reason: ReasonQuarantined, Since: since}
	}
	if st, ok := s.units[unit]; ok {
		return st
	}
	return Status{Healthy: true}
}

// Quarantine makes exactly units the quarantined set: each reads unhealthy
// with ReasonQuarantined until a later call leaves it out. A unit released
// from quarantine is healthy only if nothing else (the monitor, discovery)
// holds it. It reports the units that went in and came out; only a change
// is logged and wakes watchers.
func (s *State) Quarantine(units []string) (added, released []string) {
	want := make(map[string]bool, len(units))
	for _, u := range units {
		if u != "" {
			want[u] = true
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for u := range want {
		if _, ok := s.quarantined[u]; !ok {
			s.quarantined[u] = now
			added = append(added, u)
		}
	}
	for u := range s.quarantined {
		if !want[u] {
			delete(s.quarantined, u)
			released = append(released, u)
		}
	}
	slices.Sort(added)
	slices.Sort(released)
	for _, u := range added {
		s.log.Warn("device unhealthy", "device", u, "reason", ReasonQuarantined)
	}
	for _, u := range released {
		if st, ok := s.units[u]; ok && !st.Healthy {
			s.log.Info("device released from quarantine; still unhealthy", "device", u, "reason", st.Reason)
		} else {
			s.log.Info("device healthy again", "device", u, "reason", "released from quarantine by operator")
		}
	}
	if len(added)+len(released) > 0 {
		s.changed.Notify()
	}
	return added, released
}

// Quarantined lists the quarantined units, sorted.
func (s *State) Quarantined() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]string, 0, len(s.quarantined))
	for u := range s.quarantined {
		out = append(out, u)
	}
	slices.Sort(out)
	return out
}

// Check reports whether all the given units are healthy, and if not, the
// first unhealthy one's reason.
func (s *State) Check(units ...string) (bool, string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, u := range units {
		if st := s.status(u); !st.Healthy {
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
	out := make(map[string]Status, len(s.units)+len(s.quarantined))
	for k := range s.units {
		out[k] = s.status(k)
	}
	for k := range s.quarantined {
		out[k] = s.status(k)
	}
	return out
}
