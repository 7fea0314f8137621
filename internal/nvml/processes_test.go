package nvml

// The process wrappers over go-nvml's mocks: the answers the simulator and
// the fake library do not produce (NOT_AVAILABLE memory, go-nvml's
// count-call quirks, a count that grows between go-nvml's two calls).

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

func openMock(t *testing.T) *Library {
	t.Helper()
	lib, err := Open(&mock.Interface{
		InitFunc:     func() gonvml.Return { return gonvml.SUCCESS },
		ShutdownFunc: func() gonvml.Return { return gonvml.SUCCESS },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Close() })
	return lib
}

func TestComputeProcesses(t *testing.T) {
	const noMIG = 0xFFFFFFFF
	for _, tc := range []struct {
		name    string
		procs   []gonvml.ProcessInfo
		ret     gonvml.Return
		want    []ProcessInfo
		wantErr string // substring; "" for success
	}{
		{name: "none", ret: gonvml.SUCCESS},
		{
			name: "memory and MIG ids",
			procs: []gonvml.ProcessInfo{
				{Pid: 10, UsedGpuMemory: 2 << 30, GpuInstanceId: noMIG, ComputeInstanceId: noMIG},
				{Pid: 11, UsedGpuMemory: 1 << 20, GpuInstanceId: 7, ComputeInstanceId: 0},
			},
			ret: gonvml.SUCCESS,
			want: []ProcessInfo{
				{PID: 10, UsedMemory: 2 << 30, GPUInstanceID: noMIG, ComputeInstanceID: noMIG},
				{PID: 11, UsedMemory: 1 << 20, GPUInstanceID: 7, ComputeInstanceID: 0},
			},
		},
		{
			name:  "memory not available reads 0",
			procs: []gonvml.ProcessInfo{{Pid: 12, UsedGpuMemory: 0xFFFFFFFFFFFFFFFF, GpuInstanceId: noMIG, ComputeInstanceId: noMIG}},
			ret:   gonvml.SUCCESS,
			want:  []ProcessInfo{{PID: 12, UsedMemory: 0, GPUInstanceID: noMIG, ComputeInstanceID: noMIG}},
		},
		{name: "lost", ret: gonvml.ERROR_GPU_IS_LOST, wantErr: "nvmlDeviceGetComputeRunningProcesses: ERROR_GPU_IS_LOST"},
		{name: "no permission", ret: gonvml.ERROR_NO_PERMISSION, wantErr: "nvmlDeviceGetComputeRunningProcesses: ERROR_NO_PERMISSION"},
	} {
		// The MPS client list answers in the same form, under its own
		// name.
		for _, list := range processLists {
			t.Run(list.name+"/"+tc.name, func(t *testing.T) {
				lib := openMock(t)
				d := &mock.Device{}
				list.set(d, func() ([]gonvml.ProcessInfo, gonvml.Return) { return tc.procs, tc.ret })
				got, err := list.call(lib, d)
				want := tc.wantErr
				if want != "" {
					want = strings.Replace(want, "nvmlDeviceGetComputeRunningProcesses", list.op, 1)
				}
				checkErr(t, err, want)
				if !reflect.DeepEqual(got, tc.want) {
					t.Errorf("got %+v, want %+v", got, tc.want)
				}
			})
		}
	}
}

// processLists are the two process-list wrappers, each with the mock
// method it calls.
var processLists = []struct {
	name, op string
	call     func(*Library, gonvml.Device) ([]ProcessInfo, error)
	set      func(*mock.Device, func() ([]gonvml.ProcessInfo, gonvml.Return))
}{
	{"compute", "nvmlDeviceGetComputeRunningProcesses", ComputeProcesses,
		func(d *mock.Device, f func() ([]gonvml.ProcessInfo, gonvml.Return)) {
			d.GetComputeRunningProcessesFunc = f
		}},
	{"MPS", "nvmlDeviceGetMPSComputeRunningProcesses", MPSComputeProcesses,
		func(d *mock.Device, f func() ([]gonvml.ProcessInfo, gonvml.Return)) {
			d.GetMPSComputeRunningProcessesFunc = f
		}},
}

// TestMPSComputeProcessesNotSupported: NOT_SUPPORTED, and an NVML without
// the call (a mock without the method panics), read as not supported, so
// the caller stops asking; other failures do not.
func TestMPSComputeProcessesNotSupported(t *testing.T) {
	for _, tc := range []struct {
		name    string
		set     bool
		ret     gonvml.Return
		notSupp bool
	}{
		{"NOT_SUPPORTED", true, gonvml.ERROR_NOT_SUPPORTED, true},
		{"function not found", true, gonvml.ERROR_FUNCTION_NOT_FOUND, true},
		{"not implemented", false, 0, true},
		{"no permission", true, gonvml.ERROR_NO_PERMISSION, false},
		{"lost", true, gonvml.ERROR_GPU_IS_LOST, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lib := openMock(t)
			d := &mock.Device{}
			if tc.set {
				d.GetMPSComputeRunningProcessesFunc = func() ([]gonvml.ProcessInfo, gonvml.Return) { return nil, tc.ret }
			}
			_, err := MPSComputeProcesses(lib, d)
			if err == nil || IsNotSupported(err) != tc.notSupp {
				t.Errorf("err %v: not supported %v, want %v", err, IsNotSupported(err), tc.notSupp)
			}
		})
	}
}

func TestComputeProcessesGuarded(t *testing.T) {
	lib := openMock(t)
	lib.Close()
	called := false
	d := &mock.Device{GetComputeRunningProcessesFunc: func() ([]gonvml.ProcessInfo, gonvml.Return) {
		called = true
		return nil, gonvml.SUCCESS
	}}
	if _, err := ComputeProcesses(lib, d); !errors.Is(err, ErrNotInitialized) || called {
		t.Errorf("after Close: err %v, NVML called %v; want ErrNotInitialized and no call", err, called)
	}
	d.GetMPSComputeRunningProcessesFunc = d.GetComputeRunningProcessesFunc
	if _, err := MPSComputeProcesses(lib, d); !errors.Is(err, ErrNotInitialized) || called {
		t.Errorf("after Close: MPSComputeProcesses err %v, NVML called %v; want ErrNotInitialized and no call", err, called)
	}
	if _, err := ProcessUtilization(lib, d, 0); !errors.Is(err, ErrNotInitialized) {
		t.Errorf("after Close: ProcessUtilization err %v, want ErrNotInitialized", err)
	}
}

// answer is one go-nvml GetProcessUtilization result, or a panic.
type answer struct {
	samples []gonvml.ProcessUtilizationSample
	ret     gonvml.Return
	panic   bool // go-nvml slicing past its buffer
}

func TestProcessUtilization(t *testing.T) {
	s1 := gonvml.ProcessUtilizationSample{Pid: 10, TimeStamp: 1_000_000, SmUtil: 40, MemUtil: 7, EncUtil: 1, DecUtil: 2}
	s2 := gonvml.ProcessUtilizationSample{Pid: 11, TimeStamp: 1_166_666, SmUtil: 3}
	grow := answer{panic: true}
	for _, tc := range []struct {
		name      string
		answers   []answer // one per call, in order
		want      []ProcessSample
		wantErr   string
		wantCalls int
		notSupp   bool // the error says NOT_SUPPORTED
	}{
		{name: "samples", answers: []answer{{samples: []gonvml.ProcessUtilizationSample{s1, s2}, ret: gonvml.SUCCESS}},
			want:      []ProcessSample{{PID: 10, Timestamp: 1_000_000, SMUtil: 40, MemUtil: 7}, {PID: 11, Timestamp: 1_166_666, SMUtil: 3}},
			wantCalls: 1},
		{name: "none newer (NOT_FOUND)", answers: []answer{{ret: gonvml.ERROR_NOT_FOUND}}, wantCalls: 1},
		{name: "go-nvml's empty count answer", answers: []answer{{samples: []gonvml.ProcessUtilizationSample{}, ret: gonvml.ERROR_INSUFFICIENT_SIZE}}, wantCalls: 1},
		{name: "success without samples", answers: []answer{{ret: gonvml.SUCCESS}}, wantCalls: 1},
		{name: "MIG GPU (NOT_SUPPORTED)", answers: []answer{{ret: gonvml.ERROR_NOT_SUPPORTED}},
			wantErr: "nvmlDeviceGetProcessUtilization: ERROR_NOT_SUPPORTED", notSupp: true, wantCalls: 1},
		{name: "lost", answers: []answer{{ret: gonvml.ERROR_GPU_IS_LOST}},
			wantErr: "nvmlDeviceGetProcessUtilization: ERROR_GPU_IS_LOST", wantCalls: 1},
		{name: "count grew once", answers: []answer{grow, {samples: []gonvml.ProcessUtilizationSample{s1}, ret: gonvml.SUCCESS}},
			want: []ProcessSample{{PID: 10, Timestamp: 1_000_000, SMUtil: 40, MemUtil: 7}}, wantCalls: 2},
		{name: "fill call short", answers: []answer{{samples: []gonvml.ProcessUtilizationSample{s1}, ret: gonvml.ERROR_INSUFFICIENT_SIZE}, {ret: gonvml.ERROR_NOT_FOUND}},
			wantCalls: 2},
		{name: "count keeps growing", answers: []answer{grow, grow, grow},
			wantErr: "kept changing", wantCalls: 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lib := openMock(t)
			calls := 0
			var lastSeen []uint64
			d := &mock.Device{GetProcessUtilizationFunc: func(ts uint64) ([]gonvml.ProcessUtilizationSample, gonvml.Return) {
				a := tc.answers[min(calls, len(tc.answers)-1)]
				calls++
				lastSeen = append(lastSeen, ts)
				if a.panic {
					var buf []gonvml.ProcessUtilizationSample
					n := calls + 1
					return buf[:n], gonvml.ERROR_INSUFFICIENT_SIZE // as go-nvml does: out of range
				}
				return a.samples, a.ret
			}}
			got, err := ProcessUtilization(lib, d, 999)
			checkErr(t, err, tc.wantErr)
			if IsNotSupported(err) != tc.notSupp {
				t.Errorf("IsNotSupported(%v) = %v, want %v", err, !tc.notSupp, tc.notSupp)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
			if calls != tc.wantCalls {
				t.Errorf("%d calls, want %d", calls, tc.wantCalls)
			}
			for _, ts := range lastSeen {
				if ts != 999 {
					t.Errorf("called with lastSeen %d, want 999", ts)
				}
			}
		})
	}
}

// TestProcessUtilizationUnimplemented: a mock without the method panics
// with a string; that is "not supported", not a count that changed (which
// would be retried and then reported as a plain failure).
func TestProcessUtilizationUnimplemented(t *testing.T) {
	lib := openMock(t)
	d := &mock.Device{}
	_, err := ProcessUtilization(lib, d, 0)
	if !IsNotSupported(err) {
		t.Errorf("unset mock method: %v, want a not-supported error", err)
	}
}

func checkErr(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("unexpected error %v", err)
	case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
		t.Errorf("error %v, want one containing %q", err, want)
	}
}
