package kubelet

// Stream liveness (issue 15): the real device manager drops our
// ListAndWatch stream without restarting, either because its receive of a
// device list over its 4 MiB gRPC limit fails or because the connection
// closes. The daemon must notice, report the resource unregistered with
// the cause, register again by itself, and get the capacity back.

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	gpuplugin "github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// waitStatus waits until the daemon's status for resource satisfies ok.
func (p *plugin) waitStatus(resource, what string, ok func(gpuplugin.ResourceStatus) bool) gpuplugin.ResourceStatus {
	p.tb.Helper()
	var last gpuplugin.ResourceStatus
	err := poll(waitTimeout, func() bool {
		for _, st := range p.d.Plugins().Status() {
			if st.Resource == resource {
				last = st
				return ok(st)
			}
		}
		return false
	})
	if err != nil {
		p.tb.Fatalf("the daemon never reported %s for %s within %v: %+v", what, resource, waitTimeout, last)
	}
	return last
}

// closePluginConnections shuts down every accepted connection on socket in
// this process: the kubelet's connection to our plugin server. The
// kubelet's receive fails as when the peer goes away, and it drops the
// stream without restarting. It returns how many it closed.
func closePluginConnections(tb testing.TB, socket string) int {
	tb.Helper()
	f, err := os.Open("/proc/net/unix")
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	inodes := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Num RefCount Protocol Flags Type St Inode Path
		fields := strings.Fields(sc.Text())
		if len(fields) == 8 && fields[7] == socket && fields[5] == "03" { // connected, not the listener
			inodes[fields[6]] = true
		}
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	closed := 0
	for _, e := range fds {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue
		}
		inode, ok := strings.CutPrefix(target, "socket:[")
		if !ok || !inodes[strings.TrimSuffix(inode, "]")] {
			continue
		}
		fd, _ := strconv.Atoi(e.Name())
		if err := unix.Shutdown(fd, unix.SHUT_RDWR); err == nil {
			closed++
		}
	}
	return closed
}

// TestStreamClosedReregisters: the kubelet's connection to our plugin is
// closed under a running kubelet (no restart, no new kubelet.sock). The
// kubelet makes the devices unallocatable; the daemon says it is
// unregistered, registers again and the capacity comes back. Prints the
// time from the dropped stream to capacity back (-v).
func TestStreamClosedReregisters(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t, "--rescan-interval=0")
	k.waitCapacity(gpuResource, dgxH100)
	p.waitRegistered("before the drop")
	var took []time.Duration
	for round := 1; round <= 3; round++ {
		before := p.registrations(gpuResource)
		dropped := time.Now()
		if n := closePluginConnections(t, p.socket(gpuResource)); n == 0 {
			t.Fatalf("round %d: found no kubelet connection on %s to close", round, p.socket(gpuResource))
		}
		k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 0})
		st := p.waitStatus(gpuResource, "unregistered", func(s gpuplugin.ResourceStatus) bool { return !s.Registered })
		if !strings.Contains(st.LastRegisterError, "dropped the ListAndWatch stream") {
			t.Errorf("round %d: cause %q does not say the kubelet dropped the stream", round, st.LastRegisterError)
		}
		k.waitCapacity(gpuResource, dgxH100)
		took = append(took, time.Since(dropped))
		p.waitRegistered(fmt.Sprintf("round %d", round))
		if got := p.registrations(gpuResource); got != before+1 {
			t.Errorf("round %d: %d registrations for one dropped stream, want 1", round, got-before)
		}
	}
	t.Logf("dropped stream (closed connection) → capacity back: %v", took)
}

// oversized repeats res's devices until the list is far over the
// kubelet's 4 MiB message limit: no config passes validation with that
// many, so the test hands it to the plugin manager as a reload would.
func oversized(res *sharing.Resource) *sharing.Resource {
	const copies = 12000 // × 8 GPUs: 96,000 devices, as replicas: 12000
	devs := make([]sharing.Device, 0, copies*len(res.Devices))
	for i := range copies {
		for _, d := range res.Devices {
			d.ID = fmt.Sprintf("%s::%d", d.ID, i)
			d.Replica = i
			devs = append(devs, d)
		}
	}
	return sharing.NewResource(res.Name, devs)
}

// TestOversizedListRecoversAfterReload: an update makes the device list
// too big for the kubelet's receive limit. The kubelet drops the stream and
// keeps the last list it received, unallocatable; the daemon reports the
// resource unregistered with the size as the cause; once an update brings
// the list back under the limit, the daemon registers again by itself and
// the kubelet holds the current list.
func TestOversizedListRecoversAfterReload(t *testing.T) {
	k := startKubelet(t)
	p := startPlugin(t, "--rescan-interval=0")
	k.waitCapacity(gpuResource, dgxH100)
	p.waitRegistered("before the oversized list")
	cfg, _, err := config.Load("gpu-plugin", defaultFlags(t.TempDir()), func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	respond := advert.Respond(cfg, advert.Env{})
	good := p.d.Plugins().Resources()

	p.d.Plugins().Update([]*sharing.Resource{oversized(good[0])}, respond)
	k.waitCapacity(gpuResource, counts{Capacity: 8, Allocatable: 0})
	st := p.waitStatus(gpuResource, "unregistered for the list size", func(s gpuplugin.ResourceStatus) bool {
		return !s.Registered && strings.Contains(s.LastRegisterError, "message limit")
	})
	t.Logf("cause: %s", st.LastRegisterError)
	// It keeps trying (with backoff) while the list stays too big.
	tries := p.registrations(gpuResource)
	if err := poll(waitTimeout, func() bool { return p.registrations(gpuResource) >= tries+2 }); err != nil {
		t.Fatalf("the daemon stopped registering again while the list was too big (%d registrations)", p.registrations(gpuResource))
	}
	if c := k.capacity(gpuResource); c != (counts{Capacity: 8, Allocatable: 0}) {
		t.Errorf("the kubelet shows %s while every list is over its limit, want the last good list unallocatable", c)
	}

	// A reload fixes the list: a smaller, different one (6 of 8 GPUs), so
	// that the capacity proves the list sent after re-registering is the
	// current one.
	fixed := sharing.NewResource(good[0].Name, good[0].Devices[:6])
	reloaded := time.Now()
	p.d.Plugins().Update([]*sharing.Resource{fixed}, respond)
	k.waitCapacity(gpuResource, counts{Capacity: 6, Allocatable: 6})
	t.Logf("oversized list fixed by an update → capacity back: %v", time.Since(reloaded))
	p.waitRegistered("after the fix")
}

// TestReadOnlySocketDir: the device-plugin directory is read-only (a
// bind mount remounted read-only, in the test's private mount namespace)
// when the daemon starts. It cannot create its socket: the status names
// the read-only directory, logged once however many polls fail; once the
// directory is writable again the daemon serves, registers, and the
// kubelet gets the capacity.
func TestReadOnlySocketDir(t *testing.T) {
	k := startKubelet(t)
	dir := pluginapi.DevicePluginPath
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind-mounting %s: %v", dir, err)
	}
	mounted := true
	unmount := func() {
		if mounted {
			if err := unix.Unmount(dir, 0); err != nil {
				t.Errorf("unmounting %s: %v", dir, err)
			}
			mounted = false
		}
	}
	t.Cleanup(unmount)
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("remounting %s read-only: %v", dir, err)
	}
	var logs testkit.Buffer
	p := startPluginLogged(t, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})), "--rescan-interval=0")
	st := p.waitStatus(gpuResource, "the read-only directory", func(s gpuplugin.ResourceStatus) bool {
		return !s.Registered && strings.Contains(s.LastRegisterError, "is read-only")
	})
	t.Logf("cause: %s", st.LastRegisterError)
	// Two more polls (one a second) fail the same way before the fix.
	if err := poll(waitTimeout, func() bool { return logs.Count("plugin server still cannot start") >= 2 }); err != nil {
		t.Fatalf("the daemon stopped retrying:\n%s", logs.String())
	}
	unmount()
	k.waitCapacity(gpuResource, dgxH100)
	p.waitRegistered("after the directory became writable")
	if n := logs.Count("is read-only"); n != 1 {
		t.Errorf("the read-only directory was logged %d times, want once:\n%s", n, logs.String())
	}
}
