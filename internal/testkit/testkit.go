// Package testkit holds helpers shared by the packages' tests: an
// inventory scanned from a simulated profile through the production
// scanner, a driver root laid out for it, a manual clock, a log buffer
// safe for concurrent writers, and real kubelet-style pod cgroups holding
// real processes (cgroups.go).
package testkit

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/driverroot"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

// Inventory scans a simulated node through the guarded NVML library and
// the production scanner. profile is a built-in profile's name, a profile
// file, or (when it holds a newline) a profile's YAML text.
func Inventory(t testing.TB, profile string) *nvml.Inventory {
	t.Helper()
	_, _, inv := SimNode(t, profile)
	return inv
}

// SimNode starts a simulated node (profile as for Inventory), opens the
// guarded NVML library on it (closed at cleanup) and scans it: for tests
// that also drive the node or use the library.
func SimNode(t testing.TB, profile string) (*sim.Node, *nvml.Library, *nvml.Inventory) {
	t.Helper()
	var p *sim.Profile
	var err error
	if strings.Contains(profile, "\n") {
		p, err = sim.ParseProfile("test", []byte(profile))
	} else {
		p, err = sim.LoadProfile(profile)
	}
	if err != nil {
		t.Fatal(err)
	}
	node := sim.NewNode(p, nil)
	lib, err := nvml.Open(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return node, lib, inv
}

// DriverRoot lays out a stand-in driver root for inv (internal/driverroot)
// with the driver's mig-minors for its GPUs, as a simulated node's, and
// returns it. Its device nodes need CAP_MKNOD: without it the test skips.
func DriverRoot(t testing.TB, inv *nvml.Inventory) string {
	t.Helper()
	dir := t.TempDir()
	if err := driverroot.Create(dir, inv, nvml.DriverMIGMinors(len(inv.GPUs))); err != nil {
		if errors.Is(err, driverroot.ErrNoMknod) {
			t.Skipf("a driver root with device nodes: %v", err)
		}
		t.Fatal(err)
	}
	return dir
}

// Clock is a manual clock, safe for concurrent use: it moves only when
// Advance is called.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock returns a clock reading start.
func NewClock(start time.Time) *Clock { return &Clock{t: start} }

// Now is the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// Buffer collects output (a logger's) written from many goroutines.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String is everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Count is how many times s occurs in what was written.
func (b *Buffer) Count(s string) int { return strings.Count(b.String(), s) }
