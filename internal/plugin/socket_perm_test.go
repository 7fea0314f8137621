package plugin_test

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestSocketPermissions: every plugin socket is 0600 (only its owner, the
// kubelet's user root, may connect: the narrowest mode the kubelet
// accepts), also when the process umask would allow everyone, and again
// after a kubelet restart has deleted and the manager re-created it.
func TestSocketPermissions(t *testing.T) {
	old := syscall.Umask(0)
	t.Cleanup(func() { syscall.Umask(old) })
	e := startEnv(t, "dgx-h100", defaultRespond(), true)
	e.waitAllocatable(t, 8, 8)
	check := func(when string) {
		t.Helper()
		sock := filepath.Join(e.dir, "nvidia-gpu.sock")
		fi, err := os.Stat(sock)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %s is %v, want a socket with mode 0600", when, sock, fi.Mode())
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
			t.Errorf("%s: %s is owned by uid %d, want ours (%d)", when, sock, st.Uid, os.Getuid())
		}
	}
	check("at start")
	if err := e.kubelet.Restart(); err != nil {
		t.Fatal(err)
	}
	e.waitAllocatable(t, 8, 8)
	check("after a kubelet restart")
}
