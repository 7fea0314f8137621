package config

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"
	"unicode/utf8"
)

// Bounds on the config file and the values in it. Every input has one, so
// that a start, a live reload and `gpu-plugin config check` refuse the same
// files, and none can exhaust memory or block the daemon.
const (
	// MaxFileSize is the largest config file read: a ConfigMap holds at
	// most 1 MiB.
	MaxFileSize = 1 << 20
	// ReadTimeout bounds reading the config file. It is checked between
	// chunks of readChunk bytes; special files (FIFOs, devices) are refused
	// before any read, so no read can wait for a writer.
	ReadTimeout = 5 * time.Second
	readChunk   = 64 << 10

	// MaxDevicesPerResource bounds the devices one resource advertises
	// (replicas × shared devices, or the devices themselves). The kubelet
	// receives each ListAndWatch reply with gRPC's default 4 MiB message
	// limit; a longer list is dropped by the kubelet and the node loses the
	// resource. Measured against the real device manager (k8s.io/kubernetes
	// v1.37.2, tests/kubelet TestListAndWatchMessageLimit) with 47-byte
	// replica IDs "GPU-<uuid>::<5 digits>" (as long as the daemon's longest)
	// and a NUMA node each, 66 bytes per device on the wire: 63,437 devices
	// get through, 63,906 do not ("received message larger than max
	// (4217796 vs. 4194304)"). This bound is 63% of that, a margin of over
	// a third.
	MaxDevicesPerResource = 40000
	// MaxReplicas bounds sharing.*.resources[].replicas: more replicas than
	// MaxDevicesPerResource cannot be advertised even for one GPU.
	MaxReplicas = MaxDevicesPerResource

	// maxQuoted is how much of a value an error message quotes.
	maxQuoted = 64
)

// ReadConfigFile reads a config file through the bounds above: it must be
// a regular file (a symlink to one is fine, as in a mounted ConfigMap) of at
// most MaxFileSize bytes, read within ReadTimeout. A FIFO, a device such as
// /dev/zero, a directory or a socket is refused with an error naming it,
// without reading from it.
func ReadConfigFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("reading config file: %w", err)
	}
	if err := checkRegular(path, fi); err != nil {
		return nil, err
	}
	// O_NONBLOCK: should the path be swapped for a FIFO after the Stat,
	// the open does not wait for a writer; the Stat of the open file below
	// then refuses it.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("reading config file: %w", err)
	}
	defer f.Close()
	if fi, err = f.Stat(); err != nil {
		return nil, fmt.Errorf("reading config file: %w", err)
	}
	if err := checkRegular(path, fi); err != nil {
		return nil, err
	}
	if fi.Size() > MaxFileSize {
		return nil, tooLarge(path, fi.Size())
	}
	deadline := time.Now().Add(ReadTimeout)
	buf := make([]byte, 0, min(fi.Size()+1, MaxFileSize+1))
	chunk := make([]byte, readChunk)
	for {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("config file %s: not read within %s; is it on a hung file system?", path, ReadTimeout)
		}
		n, err := f.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if len(buf) > MaxFileSize {
			return nil, tooLarge(path, int64(len(buf)))
		}
		if errors.Is(err, io.EOF) {
			return buf, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading config file %s: %w", path, err)
		}
	}
}

func checkRegular(path string, fi os.FileInfo) error {
	if fi.Mode().IsRegular() {
		return nil
	}
	kind := "not a regular file"
	switch m := fi.Mode(); {
	case m.IsDir():
		kind = "a directory"
	case m&os.ModeNamedPipe != 0:
		kind = "a FIFO (named pipe)"
	case m&os.ModeCharDevice != 0:
		kind = "a character device"
	case m&os.ModeDevice != 0:
		kind = "a block device"
	case m&os.ModeSocket != 0:
		kind = "a socket"
	}
	return fmt.Errorf("config file %s is %s; want a regular file (or a symlink to one), such as a mounted ConfigMap key", path, kind)
}

func tooLarge(path string, size int64) error {
	return fmt.Errorf("config file %s is larger than %d bytes (%d or more); a config is a few KiB, and a ConfigMap holds at most 1 MiB", path, MaxFileSize, size)
}

// quote writes s as a quoted Go string for an error message, cut to its
// first maxQuoted bytes with a marker that says how long it was, so a huge
// value never makes a huge log line.
func quote(s string) string {
	if len(s) <= maxQuoted {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprintf("%q… (%d bytes)", cutAt(s, maxQuoted), len(s))
}

// clip is quote without the quotes, for numbers and names.
func clip(s string) string {
	if len(s) <= maxQuoted {
		return s
	}
	return fmt.Sprintf("%s… (%d bytes)", cutAt(s, maxQuoted), len(s))
}

// cutAt is s's first n bytes (len(s) > n), shortened so that no UTF-8
// sequence is split.
func cutAt(s string, n int) string {
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Quote is how messages quote a value from a config file: cut to its first
// 64 bytes, with a marker giving its length, when it is longer.
func Quote(s string) string { return quote(s) }
