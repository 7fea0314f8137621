package health_test

import (
	"slices"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
)

// TestQuarantine walks a unit through the operator's quarantine and the
// monitor's faults in every order: quarantine wins while it lasts, and
// releasing it returns the unit only if no fault holds it.
func TestQuarantine(t *testing.T) {
	type step struct {
		do          func(s *health.State)
		wantHealthy bool
		wantReason  string
	}
	quarantine := func(units ...string) func(s *health.State) {
		return func(s *health.State) { s.Quarantine(units) }
	}
	fault := func(s *health.State) { s.SetUnhealthy("GPU-a", "XID 79") }
	heal := func(s *health.State) { s.SetHealthy("GPU-a", "recovered") }
	cases := []struct {
		name  string
		steps []step
	}{
		{"quarantine then release", []step{
			{quarantine("GPU-a"), false, health.ReasonQuarantined},
			{quarantine(), true, ""},
		}},
		{"monitor recovery does not end quarantine", []step{
			{quarantine("GPU-a"), false, health.ReasonQuarantined},
			{fault, false, health.ReasonQuarantined},
			{heal, false, health.ReasonQuarantined},
			{quarantine(), true, ""},
		}},
		{"release leaves a fault in place", []step{
			{fault, false, "XID 79"},
			{quarantine("GPU-a"), false, health.ReasonQuarantined},
			{quarantine(), false, "XID 79"},
			{heal, true, ""},
		}},
		{"quarantining another unit leaves this one alone", []step{
			{quarantine("GPU-b"), true, ""},
			{quarantine("GPU-b", "GPU-a"), false, health.ReasonQuarantined},
			{quarantine("GPU-b"), true, ""},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := health.NewState(nil, nil)
			for i, st := range tc.steps {
				st.do(s)
				got := s.Status("GPU-a")
				if got.Healthy != st.wantHealthy || (!got.Healthy && got.Reason != st.wantReason) {
					t.Fatalf("step %d: status %+v; want healthy=%v reason %q", i, got, st.wantHealthy, st.wantReason)
				}
				ok, reason := s.Check("GPU-x", "GPU-a")
				if ok != st.wantHealthy || reason != st.wantReason {
					t.Fatalf("step %d: Check = %v, %q; want %v, %q", i, ok, reason, st.wantHealthy, st.wantReason)
				}
				snap, listed := s.Snapshot()["GPU-a"]
				if listed && (snap.Healthy != st.wantHealthy || (!snap.Healthy && snap.Reason != st.wantReason)) {
					t.Fatalf("step %d: snapshot %+v disagrees with status %+v", i, snap, got)
				}
				if !st.wantHealthy && !listed {
					t.Fatalf("step %d: unhealthy unit missing from the snapshot", i)
				}
			}
		})
	}
}

// TestQuarantineReportsAndWakes: Quarantine reports what went in and came
// out, wakes watchers only on a change, and the time a unit went in stays
// put while it stays quarantined.
func TestQuarantineReportsAndWakes(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := health.NewState(nil, func() time.Time { return now })
	ch := s.Changed()
	added, released := s.Quarantine([]string{"GPU-b", "GPU-a", "GPU-a", ""})
	if !slices.Equal(added, []string{"GPU-a", "GPU-b"}) || len(released) != 0 {
		t.Fatalf("first call: added %v released %v", added, released)
	}
	select {
	case <-ch:
	default:
		t.Fatal("a quarantine did not wake the watchers")
	}
	now = now.Add(time.Minute)
	ch = s.Changed()
	if added, released := s.Quarantine([]string{"GPU-a", "GPU-b"}); len(added)+len(released) != 0 {
		t.Fatalf("same set again: added %v released %v", added, released)
	}
	select {
	case <-ch:
		t.Fatal("an unchanged quarantine woke the watchers")
	default:
	}
	if since := s.Status("GPU-a").Since; !since.Equal(now.Add(-time.Minute)) {
		t.Errorf("since = %v; want the time it went in", since)
	}
	added, released = s.Quarantine([]string{"GPU-a"})
	if len(added) != 0 || !slices.Equal(released, []string{"GPU-b"}) {
		t.Fatalf("release: added %v released %v", added, released)
	}
	select {
	case <-ch:
	default:
		t.Fatal("a release did not wake the watchers")
	}
	if got := s.Quarantined(); !slices.Equal(got, []string{"GPU-a"}) {
		t.Errorf("Quarantined() = %v", got)
	}
}
