package plugin

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Causes: why the kubelet is out of reach, in words an operator can act on.
// /readyz and the one log line per change show them.

// dirCause explains why a plugin socket cannot be served in dir.
func dirCause(dir string, err error) string {
	dir = filepath.Clean(dir)
	if c := dirProblem(dir); c != "" {
		return c
	}
	switch {
	case errors.Is(err, syscall.EROFS):
		return fmt.Sprintf("the kubelet device-plugin directory %s is read-only: mount it read-write", dir)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Sprintf("permission denied in the kubelet device-plugin directory %s: the daemon must run as root (%v)", dir, err)
	}
	return err.Error()
}

// dirProblem names what is wrong with the directory itself, or "".
func dirProblem(dir string) string {
	dir = filepath.Clean(dir)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Sprintf("the kubelet device-plugin directory %s does not exist: is the kubelet running, and is --kubelet-socket-dir right?", dir)
	case err != nil:
		return fmt.Sprintf("the kubelet device-plugin directory %s: %v", dir, err)
	case !fi.IsDir():
		return fmt.Sprintf("the kubelet device-plugin directory %s is not a directory", dir)
	}
	if err := syscall.Access(dir, 2 /* W_OK */); errors.Is(err, syscall.EROFS) {
		return fmt.Sprintf("the kubelet device-plugin directory %s is read-only: mount it read-write", dir)
	}
	return ""
}

// kubeletCause explains a failed registration: the directory, then
// kubelet.sock, then a dial of it. err is the registration's own error,
// returned when nothing more precise is found.
func kubeletCause(dir, sock string, err error) string {
	if c := dirProblem(dir); c != "" {
		return c
	}
	if d := filepath.Dir(sock); d != filepath.Clean(dir) { // --kubelet-socket elsewhere
		if c := dirProblem(d); c != "" {
			return c
		}
	}
	fi, serr := os.Lstat(sock)
	switch {
	case errors.Is(serr, os.ErrNotExist):
		return fmt.Sprintf("%s does not exist: the kubelet is not running (or not yet)", sock)
	case serr != nil:
		return fmt.Sprintf("%s: %v", sock, serr)
	case fi.IsDir():
		return fmt.Sprintf("%s is blocked by a directory where the kubelet's socket should be: remove it", sock)
	case fi.Mode()&os.ModeSocket == 0:
		return fmt.Sprintf("%s is not a socket (%v): remove it; the kubelet creates its socket when it starts", sock, fi.Mode().Type())
	}
	conn, derr := net.DialTimeout("unix", sock, time.Second)
	if derr == nil {
		conn.Close()
		return err.Error() // the kubelet answers: its refusal says why
	}
	switch {
	case errors.Is(derr, syscall.ECONNREFUSED):
		return fmt.Sprintf("connection refused at %s: nothing listens there (the kubelet stopped or is restarting)", sock)
	case errors.Is(derr, syscall.EACCES), errors.Is(derr, syscall.EPERM):
		return fmt.Sprintf("permission denied connecting to %s: the daemon must run as root", sock)
	}
	return fmt.Sprintf("connecting to %s: %v", sock, derr)
}
