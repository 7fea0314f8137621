// Package nvml owns the process's one NVML session and builds the node's GPU
// inventory from it.
//
// Every call into NVML goes through a Library: calling go-nvml after a failed
// Init kills the process with a dynamic-linker error that cannot be
// recovered, so the Library refuses calls unless Init succeeded and Close has
// not run. It also turns the panics of go-nvml's moq mocks (an unset method)
// into errors, so a simulated or partially mocked node degrades instead of
// crashing.
package nvml

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// ErrNotInitialized is returned for any call made before a successful Open or
// after Close.
var ErrNotInitialized = errors.New("nvml: library not initialised")

// Error is a failed NVML call.
type Error struct {
	Op     string        // the NVML function, e.g. "nvmlDeviceGetUUID"
	Return gonvml.Return // the code NVML returned
	Panic  any           // set when a mock panicked instead of returning
}

func (e *Error) Error() string {
	if e.Panic != nil {
		return fmt.Sprintf("%s: not implemented by this NVML (%v)", e.Op, e.Panic)
	}
	return fmt.Sprintf("%s: %s", e.Op, returnName(e.Return))
}

// Is lets errors.Is(err, gonvml.ERROR_GPU_IS_LOST) and friends work.
func (e *Error) Is(target error) bool {
	r, ok := target.(gonvml.Return)
	return ok && r == e.Return
}

// returnName names a Return without calling into the library.
func returnName(r gonvml.Return) string {
	switch r {
	case gonvml.ERROR_UNINITIALIZED:
		return "ERROR_UNINITIALIZED (1)"
	case gonvml.ERROR_INVALID_ARGUMENT:
		return "ERROR_INVALID_ARGUMENT (2)"
	case gonvml.ERROR_NOT_SUPPORTED:
		return "ERROR_NOT_SUPPORTED (3)"
	case gonvml.ERROR_NO_PERMISSION:
		return "ERROR_NO_PERMISSION (4)"
	case gonvml.ERROR_NOT_FOUND:
		return "ERROR_NOT_FOUND (6)"
	case gonvml.ERROR_DRIVER_NOT_LOADED:
		return "ERROR_DRIVER_NOT_LOADED (9)"
	case gonvml.ERROR_TIMEOUT:
		return "ERROR_TIMEOUT (10)"
	case gonvml.ERROR_LIBRARY_NOT_FOUND:
		return "ERROR_LIBRARY_NOT_FOUND (12)"
	case gonvml.ERROR_GPU_IS_LOST:
		return "ERROR_GPU_IS_LOST (15)"
	case gonvml.ERROR_LIB_RM_VERSION_MISMATCH:
		return "ERROR_LIB_RM_VERSION_MISMATCH (18)"
	case gonvml.ERROR_UNKNOWN:
		return "ERROR_UNKNOWN (999)"
	}
	return fmt.Sprintf("NVML error %d", int32(r))
}

// IsLost reports whether err says the GPU fell off the bus.
func IsLost(err error) bool { return errors.Is(err, gonvml.ERROR_GPU_IS_LOST) }

// IsNotSupported reports whether err says the call is not available on this
// GPU or this NVML (including unimplemented mock methods).
func IsNotSupported(err error) bool {
	var e *Error
	if errors.As(err, &e) && e.Panic != nil {
		return true
	}
	return errors.Is(err, gonvml.ERROR_NOT_SUPPORTED) || errors.Is(err, gonvml.ERROR_FUNCTION_NOT_FOUND)
}

// InitError explains a failed NVML initialisation and how to fix it.
type InitError struct {
	Return gonvml.Return
}

func (e *InitError) Error() string {
	var fix string
	switch e.Return {
	case gonvml.ERROR_LIBRARY_NOT_FOUND:
		fix = "libnvidia-ml.so.1 was not found: install the NVIDIA driver on the node, mount the driver root " +
			"(--driver-root, e.g. /run/nvidia/driver with the driver container) and run with the NVIDIA container " +
			"runtime, or use --simulate=<profile> on a machine without a GPU"
	case gonvml.ERROR_DRIVER_NOT_LOADED:
		fix = "the NVIDIA kernel driver is not loaded: check `lsmod | grep nvidia` and `dmesg` on the node"
	case gonvml.ERROR_NO_PERMISSION:
		fix = "no permission to open /dev/nvidia*: run the daemon with access to the device nodes"
	case gonvml.ERROR_LIB_RM_VERSION_MISMATCH:
		fix = "libnvidia-ml.so.1 does not match the loaded kernel driver: reboot the node or reload the driver"
	default:
		fix = "check the NVIDIA driver installation (`nvidia-smi` should work on the node)"
	}
	return fmt.Sprintf("NVML initialisation failed with %s: %s", returnName(e.Return), fix)
}

func (e *InitError) Is(target error) bool {
	r, ok := target.(gonvml.Return)
	return ok && r == e.Return
}

// Library is the process's NVML session. It is safe for concurrent use.
type Library struct {
	iface gonvml.Interface

	mu    sync.RWMutex // held shared by every call, exclusively by Close
	ready bool

	calls  atomic.Uint64 // calls made
	errors atomic.Uint64 // calls that failed, expected answers excluded
	// failed counts errors by function (op → *atomic.Uint64). Ops are
	// literals at the call sites, so the map stays small.
	failed sync.Map

	// migCaps caches parsed mig-minors files by where they came from: the
	// driver writes the file once, when it loads, listing every GPU and
	// compute instance that could exist, so a MIG re-layout never changes
	// it and a re-scan need not read it again. Failures are not cached.
	migCapsMu sync.Mutex
	migCaps   map[string]MIGCaps
}

// cachedMIGCaps returns the caps loaded from key, loading them once.
func (l *Library) cachedMIGCaps(key string, load func() (MIGCaps, error)) (MIGCaps, error) {
	l.migCapsMu.Lock()
	defer l.migCapsMu.Unlock()
	if c, ok := l.migCaps[key]; ok {
		return c, nil
	}
	c, err := load()
	if err != nil {
		return nil, err
	}
	if l.migCaps == nil {
		l.migCaps = map[string]MIGCaps{}
	}
	l.migCaps[key] = c
	return c, nil
}

// Open initialises NVML through iface (the real library from gonvml.New, or a
// simulated one) and returns the session. On failure nothing else is ever
// called on iface, and the error is an *InitError.
func Open(iface gonvml.Interface) (*Library, error) {
	l := &Library{iface: iface}
	ret, panicked := safeReturn(iface.Init)
	if panicked != nil {
		return nil, &Error{Op: "nvmlInit", Panic: panicked}
	}
	if ret != gonvml.SUCCESS {
		return nil, &InitError{Return: ret}
	}
	l.ready = true
	return l, nil
}

// Close shuts NVML down. Later calls fail with ErrNotInitialized. It waits for
// calls in flight and is idempotent.
func (l *Library) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.ready {
		return nil
	}
	l.ready = false
	ret, panicked := safeReturn(l.iface.Shutdown)
	if panicked != nil {
		return &Error{Op: "nvmlShutdown", Panic: panicked}
	}
	if ret != gonvml.SUCCESS {
		return &Error{Op: "nvmlShutdown", Return: ret}
	}
	return nil
}

// Stats reports how many NVML calls the process made and how many failed.
func (l *Library) Stats() (calls, failed uint64) { return l.calls.Load(), l.errors.Load() }

// FailedCalls reports the failed calls so far by NVML function (e.g.
// "nvmlDeviceGetTemperature"), expected answers excluded, so an operator
// can tell which call a driver problem breaks.
func (l *Library) FailedCalls() map[string]uint64 {
	out := map[string]uint64{}
	l.failed.Range(func(op, n any) bool {
		out[op.(string)] = n.(*atomic.Uint64).Load()
		return true
	})
	return out
}

func (l *Library) countFailure(op string) {
	n, ok := l.failed.Load(op)
	if !ok {
		n, _ = l.failed.LoadOrStore(op, new(atomic.Uint64))
	}
	n.(*atomic.Uint64).Add(1)
}

// Interface returns the underlying go-nvml interface. Only pass it into the
// functions given to Call, Call2 and Do; never call it directly.
func (l *Library) Interface() gonvml.Interface { return l.iface }

// Do runs f, one NVML call named op, if the session is live.
func Do(l *Library, op string, f func() gonvml.Return) error {
	_, err := Call(l, op, func() (struct{}, gonvml.Return) { return struct{}{}, f() })
	return err
}

// Call runs f, one NVML call named op, if the session is live, and turns its
// Return or a mock's panic into an *Error.
func Call[T any](l *Library, op string, f func() (T, gonvml.Return)) (T, error) {
	v, _, err := Call2(l, op, func() (T, struct{}, gonvml.Return) {
		v, r := f()
		return v, struct{}{}, r
	})
	return v, err
}

// Call2 is Call for NVML functions with two results.
func Call2[A, B any](l *Library, op string, f func() (A, B, gonvml.Return)) (a A, b B, err error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if !l.ready {
		return a, b, fmt.Errorf("%s: %w", op, ErrNotInitialized)
	}
	l.calls.Add(1)
	var ret gonvml.Return
	func() {
		defer func() {
			if p := recover(); p != nil {
				err = &Error{Op: op, Panic: p}
			}
		}()
		a, b, ret = f()
	}()
	if err == nil && ret != gonvml.SUCCESS {
		err = &Error{Op: op, Return: ret}
	}
	if err != nil && !expected(err) {
		l.errors.Add(1)
		l.countFailure(op)
	}
	return a, b, err
}

// expected reports the answers that are part of normal discovery (an absent
// feature, an empty MIG slot, a link index past the last link) rather than
// failures worth counting.
func expected(err error) bool {
	return IsNotSupported(err) || errors.Is(err, gonvml.ERROR_NOT_FOUND) || errors.Is(err, gonvml.ERROR_INVALID_ARGUMENT)
}

func safeReturn(f func() gonvml.Return) (ret gonvml.Return, panicked any) {
	defer func() { panicked = recover() }()
	return f(), nil
}
