package sim

import (
	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// go-nvml's moq mocks append every call's arguments to a slice that is never
// trimmed. A simulated daemon calls in every second for as long as it runs,
// so the handles the simulator hands out wrap the mocks and call the Func
// fields directly for every method that takes arguments (methods without
// arguments record zero-size entries, which cost nothing). The wrappers are
// comparable values holding the mock pointer, so a handle compares equal to
// itself wherever NVML hands it out (events, topology peers).

type simLibrary struct {
	*mock.Interface
	gpus int
}

// MIGMinors is the simulated node's /proc/driver/nvidia-caps/mig-minors,
// numbered as the driver numbers it (GPU minors are NVML indices here), so
// nvml.Scan gives simulated MIG devices their capability nodes through the
// same parser as real ones.
func (l simLibrary) MIGMinors() []byte { return nvml.DriverMIGMinors(l.gpus) }

func (l simLibrary) DeviceGetHandleByIndex(i int) (gonvml.Device, gonvml.Return) {
	return l.DeviceGetHandleByIndexFunc(i)
}

func (l simLibrary) DeviceGetHandleByUUID(uuid string) (gonvml.Device, gonvml.Return) {
	return l.DeviceGetHandleByUUIDFunc(uuid)
}

func (l simLibrary) DeviceGetHandleByPciBusId(bus string) (gonvml.Device, gonvml.Return) {
	return l.DeviceGetHandleByPciBusIdFunc(bus)
}

func (l simLibrary) GpmMetricsGet(m *gonvml.GpmMetricsGetType) gonvml.Return {
	return l.GpmMetricsGetFunc(m)
}

func (l simLibrary) GpmSampleFree(s gonvml.GpmSample) gonvml.Return { return l.GpmSampleFreeFunc(s) }

type simDevice struct{ *mock.Device }

func (d simDevice) GetClockInfo(t gonvml.ClockType) (uint32, gonvml.Return) {
	return d.GetClockInfoFunc(t)
}

func (d simDevice) GetTemperature(s gonvml.TemperatureSensors) (uint32, gonvml.Return) {
	return d.GetTemperatureFunc(s)
}

func (d simDevice) GetFieldValues(v []gonvml.FieldValue) gonvml.Return {
	return d.GetFieldValuesFunc(v)
}

func (d simDevice) GetNvLinkState(link int) (gonvml.EnableState, gonvml.Return) {
	return d.GetNvLinkStateFunc(link)
}

func (d simDevice) GetNvLinkRemoteDeviceType(link int) (gonvml.IntNvLinkDeviceType, gonvml.Return) {
	return d.GetNvLinkRemoteDeviceTypeFunc(link)
}

func (d simDevice) GetNvLinkRemotePciInfo(link int) (gonvml.PciInfo, gonvml.Return) {
	return d.GetNvLinkRemotePciInfoFunc(link)
}

func (d simDevice) GetTopologyCommonAncestor(peer gonvml.Device) (gonvml.GpuTopologyLevel, gonvml.Return) {
	return d.GetTopologyCommonAncestorFunc(peer)
}

func (d simDevice) RegisterEvents(types uint64, set gonvml.EventSet) gonvml.Return {
	return d.RegisterEventsFunc(types, set)
}

func (d simDevice) GetMigDeviceHandleByIndex(k int) (gonvml.Device, gonvml.Return) {
	return d.GetMigDeviceHandleByIndexFunc(k)
}

func (d simDevice) GetGpuInstanceById(id int) (gonvml.GpuInstance, gonvml.Return) {
	return d.GetGpuInstanceByIdFunc(id)
}

func (d simDevice) GetGpuInstanceProfileInfo(id int) (gonvml.GpuInstanceProfileInfo, gonvml.Return) {
	return d.GetGpuInstanceProfileInfoFunc(id)
}

func (d simDevice) GpmSampleGet(s gonvml.GpmSample) gonvml.Return { return d.GpmSampleGetFunc(s) }

func (d simDevice) GpmMigSampleGet(gi int, s gonvml.GpmSample) gonvml.Return {
	return d.GpmMigSampleGetFunc(gi, s)
}

func (d simDevice) GetProcessUtilization(lastSeen uint64) ([]gonvml.ProcessUtilizationSample, gonvml.Return) {
	return d.GetProcessUtilizationFunc(lastSeen)
}

type simEventSet struct{ *mock.EventSet }

func (s simEventSet) Wait(timeoutMs uint32) (gonvml.EventData, gonvml.Return) {
	return s.WaitFunc(timeoutMs)
}

// Mock returns the go-nvml mock behind a simulated GPU or MIG handle, for
// tests that replace one of its Func fields before anything calls it.
func Mock(d gonvml.Device) (*mock.Device, bool) {
	s, ok := d.(simDevice)
	return s.Device, ok
}
