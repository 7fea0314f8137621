package plugin_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// waitStatus waits (bounded) until the one resource's status satisfies ok.
func (e *env) waitStatus(t testing.TB, what string, ok func(plugin.ResourceStatus) bool) plugin.ResourceStatus {
	t.Helper()
	ctx := waitCtx(t)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		st := e.mgr.Status()
		if len(st) == 1 && ok(st[0]) {
			return st[0]
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("status never showed %s: %+v", what, st)
		}
	}
}

func registrations(k *fakekubelet.Kubelet) int {
	n := 0
	for _, ev := range k.Events() {
		if ev.Kind == "registered" {
			n++
		}
	}
	return n
}

// TestStreamDroppedReregisters: the kubelet closes the plugin connection
// without restarting (as after a failed receive). The resource counts as
// unregistered, with the cause, logged once; it registers again by itself
// and the kubelet's capacity comes back.
func TestStreamDroppedReregisters(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), true)
	e.waitAllocatable(t, 4, 4)
	e.waitStatus(t, "registered", func(s plugin.ResourceStatus) bool { return s.Registered })
	for round := 1; round <= 3; round++ {
		before := registrations(e.kubelet)
		if err := e.kubelet.DropStream(gpuResource); err != nil {
			t.Fatal(err)
		}
		if err := e.kubelet.WaitFor(waitCtx(t), func(k *fakekubelet.Kubelet) bool { return registrations(k) > before }); err != nil {
			t.Fatalf("round %d: no registration after the kubelet dropped the stream: %v", round, err)
		}
		e.waitAllocatable(t, 4, 4)
		e.waitStatus(t, "registered again", func(s plugin.ResourceStatus) bool { return s.Registered && s.LastRegisterError == "" })
		if n := e.logs.Count("resource unregistered"); n != round {
			t.Errorf("round %d: %d 'resource unregistered' log lines, want %d:\n%s", round, n, round, e.logs)
		}
		if n := e.logs.Count("registered with the kubelet again"); n != round {
			t.Errorf("round %d: %d 'registered with the kubelet again' lines, want %d:\n%s", round, n, round, e.logs)
		}
	}
}

// oversized is res with every device repeated until its device list is far
// over the kubelet's 4 MiB message limit (no config passes validation with
// that many).
func oversized(res *sharing.Resource) *sharing.Resource {
	const copies = 13000 // × 4 GPUs: about 4.7 MB encoded
	devs := make([]sharing.Device, 0, copies*len(res.Devices))
	for i := range copies {
		for _, d := range res.Devices {
			d.ID = fmt.Sprintf("%s::replica-with-a-long-name-%06d", d.ID, i)
			devs = append(devs, d)
		}
	}
	return sharing.NewResource(res.Name, devs)
}

// TestOversizedListRecoversAfterUpdate: an update makes the device list
// too big for the kubelet, which drops the stream; the daemon says why
// (once, however often the re-registration fails) and recovers by itself
// when a later update fixes the list: the kubelet then holds the current
// list.
func TestOversizedListRecoversAfterUpdate(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), true)
	e.waitAllocatable(t, 4, 4)
	good := e.mgr.Resources()[0]
	e.mgr.Update([]*sharing.Resource{oversized(good)}, defaultRespond())

	st := e.waitStatus(t, "unregistered for an oversized list", func(s plugin.ResourceStatus) bool {
		return !s.Registered && strings.Contains(s.LastRegisterError, "message limit")
	})
	t.Logf("cause: %s", st.LastRegisterError)
	// Several re-registrations fail the same way; the log says it once.
	before := registrations(e.kubelet)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second) // each try sends megabytes, slow under -race
	defer cancel()
	if err := e.kubelet.WaitFor(ctx, func(k *fakekubelet.Kubelet) bool { return registrations(k) >= before+2 }); err != nil {
		t.Fatalf("the daemon stopped re-registering: %v", err)
	}
	if st := e.mgr.Status()[0]; st.Registered {
		t.Errorf("counts as registered while the kubelet drops every stream: %+v", st)
	}
	if n := e.logs.Count("resource unregistered"); n != 1 {
		t.Errorf("%d 'resource unregistered' lines over %d failed re-registrations, want 1:\n%s", n, registrations(e.kubelet)-before, e.logs)
	}

	e.mgr.Update([]*sharing.Resource{good}, defaultRespond())
	e.waitAllocatable(t, 4, 4)
	e.waitStatus(t, "registered after the fix", func(s plugin.ResourceStatus) bool { return s.Registered && s.LastRegisterError == "" })
	if n := e.logs.Count("registered with the kubelet again"); n != 1 {
		t.Errorf("%d 'registered with the kubelet again' lines, want 1:\n%s", n, e.logs)
	}
}

// TestKubeletAwayCauses: while the kubelet is out of reach the status
// names why, each cause is logged once however many retries pass, and
// registration follows once the cause is gone.
func TestKubeletAwayCauses(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), false)
	sock := filepath.Join(e.dir, "kubelet.sock")
	steps := []struct {
		name  string
		setup func(t *testing.T)
		want  string
	}{
		{"no kubelet.sock", func(*testing.T) {}, "does not exist: the kubelet is not running"},
		{"a directory in its place", func(t *testing.T) {
			if err := os.Mkdir(sock, 0o755); err != nil {
				t.Fatal(err)
			}
		}, "blocked by a directory"},
		{"a dead socket", func(t *testing.T) {
			if err := os.Remove(sock); err != nil {
				t.Fatal(err)
			}
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close()
		}, "connection refused at"},
	}
	for _, step := range steps {
		step.setup(t)
		e.waitStatus(t, step.name, func(s plugin.ResourceStatus) bool {
			return !s.Registered && strings.Contains(s.LastRegisterError, step.want)
		})
		// Five more retries fail the same way: the cause is still logged
		// only once.
		e.waitLogCount(t, retryLine, e.logs.Count(retryLine)+5)
		if n := e.logs.Count(step.want); n != 1 {
			t.Errorf("%s: cause logged %d times over 5 retries, want once:\n%s", step.name, n, e.logs)
		}
	}
	os.Remove(sock)
	k, err := fakekubelet.Start(e.dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	e.kubelet = k
	e.waitAllocatable(t, 4, 4)
	e.waitStatus(t, "registered", func(s plugin.ResourceStatus) bool { return s.Registered && s.LastRegisterError == "" })
}

// TestSocketDirComesBack: the device-plugin directory is deleted under the
// running manager, then re-created. The cause is named and logged once,
// the directory is watched again (a kubelet starting in it is seen at once,
// not by the poll), and the resource registers.
func TestSocketDirComesBack(t *testing.T) {
	e := startEnv(t, "pcie-l4x4", defaultRespond(), true)
	e.waitAllocatable(t, 4, 4)
	e.kubelet.Stop()
	// The manager may re-create its socket (it restarts servers whose
	// socket is gone) between RemoveAll's listing and its rmdir: retry.
	deadline := time.Now().Add(5 * time.Second)
	for err := os.RemoveAll(e.dir); err != nil; err = os.RemoveAll(e.dir) {
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	e.waitStatus(t, "the missing directory", func(s plugin.ResourceStatus) bool {
		return !s.Registered && strings.Contains(s.LastRegisterError, "does not exist: is the kubelet running")
	})
	// Five more poll ticks try to serve the socket and fail the same way:
	// still one line (per resource) for the cause.
	e.waitLogCount(t, "plugin server still cannot start", e.logs.Count("plugin server still cannot start")+5)
	if n := e.logs.Count("level=ERROR"); n != 1 {
		t.Errorf("%d error lines while the directory stayed missing, want 1:\n%s", n, e.logs)
	}
	if err := os.Mkdir(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	k, err := fakekubelet.Start(e.dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	e.kubelet = k
	e.waitAllocatable(t, 4, 4)
	e.waitStatus(t, "registered", func(s plugin.ResourceStatus) bool { return s.Registered && s.LastRegisterError == "" })
	if n := e.logs.Count("watching it"); n != 1 {
		t.Errorf("the directory watch was re-added %d times, want once:\n%s", n, e.logs)
	}
}

// TestSocketDirWatchQuiet: a directory named with a trailing slash (as
// the kubelet's own constant is) is watched once; the poll (every 50 ms
// here) does not take it for a lost watch and re-add it on every tick.
func TestSocketDirWatchQuiet(t *testing.T) {
	e := startEnvAt(t, shortTempDir(t)+"/", inventory(t, "pcie-l4x4"), defaultRespond(), false, nil)
	// No kubelet: registrations fail and back off to 200 ms. Six of them
	// span many poll ticks.
	e.waitLogCount(t, retryLine, 6)
	if n := e.logs.Count("watching it"); n != 0 {
		t.Errorf("the watch of an unchanged directory was re-added %d times:\n%s", n, e.logs)
	}
}

// retryLine is the manager's debug line for each failed registration.
const retryLine = "registration failed, retrying"

// waitLogCount waits (bounded) until the log holds line at least n times.
func (e *env) waitLogCount(t testing.TB, line string, n int) {
	t.Helper()
	ctx := waitCtx(t)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for e.logs.Count(line) < n {
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("%q logged %d times, want %d:\n%s", line, e.logs.Count(line), n, e.logs)
		}
	}
}

// TestStreamDroppedAsRegistrationEnds drops the kubelet's stream the
// moment the resource counts as registered, with the stream opened before
// Register answers (an order the real kubelet shows): while the manager's
// loop still handles the end of the attempt. The resource must count as
// unregistered and register again. The real-kubelet suite once saw such a
// drop go unnoticed for good (a wake-up lost between a check and the next
// wait); this test exercises the path but did not reproduce that race.
func TestStreamDroppedAsRegistrationEnds(t *testing.T) {
	rounds := 20
	if testing.Short() {
		rounds = 5
	}
	for round := range rounds {
		e := startEnv(t, "pcie-l4x4", defaultRespond(), false)
		k, err := fakekubelet.Start(e.dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		k.ReplyAfterFirstList(true) // before the manager sees kubelet.sock
		e.kubelet = k
		ctx := waitCtx(t)
		for st := e.mgr.Status(); len(st) != 1 || !st[0].Registered || st[0].Streams == 0; st = e.mgr.Status() {
			if ctx.Err() != nil {
				t.Fatalf("round %d: never registered:\n%s", round, e.logs)
			}
			time.Sleep(20 * time.Microsecond)
		}
		if err := e.kubelet.DropStream(gpuResource); err != nil {
			t.Fatal(err)
		}
		e.waitStatus(t, fmt.Sprintf("round %d: unregistered after the drop", round),
			func(s plugin.ResourceStatus) bool { return !s.Registered || s.Registrations > 1 })
		e.waitAllocatable(t, 4, 4)
		e.waitStatus(t, fmt.Sprintf("round %d: registered again", round),
			func(s plugin.ResourceStatus) bool { return s.Registered && s.Registrations > 1 })
		e.stop()
		k.Stop()
	}
}
