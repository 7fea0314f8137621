// Package sim runs a simulated GPU node: an implementation of go-nvml's
// nvml.Interface, built on go-nvml's moq mocks, that serves a profile's GPUs,
// MIG devices, topology, telemetry and events, plus the HTTP control API that
// injects faults into it. The daemon's production code runs unchanged on top.
package sim

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// EventQueueSize bounds each event set's queue, as the real driver does;
// further events are dropped and counted.
const EventQueueSize = 1024

// noInstance is NVML's "all GPU / compute instances" ID in event data.
const noInstance = 0xFFFFFFFF

// Telemetry is what a simulated GPU reports.
type Telemetry struct {
	GPUUtil      uint32  `json:"gpu_util"`      // %
	MemCopyUtil  uint32  `json:"mem_copy_util"` // %
	FBUsedMiB    uint64  `json:"fb_used_mib"`
	TemperatureC uint32  `json:"temperature_c"`
	PowerW       float64 `json:"power_w"`
	SMClockMHz   uint32  `json:"sm_clock_mhz"`

	// Memory temperature, encoder/decoder, PCIe replays, GPM (telemetry.go).
	ExtraTelemetry
}

// TelemetryPatch changes some telemetry fields; nil fields stay as they are.
type TelemetryPatch struct {
	GPUUtil      *uint32  `json:"gpu_util"`
	MemCopyUtil  *uint32  `json:"mem_copy_util"`
	FBUsedMiB    *uint64  `json:"fb_used_mib"`
	TemperatureC *uint32  `json:"temperature_c"`
	PowerW       *float64 `json:"power_w"`
	SMClockMHz   *uint32  `json:"sm_clock_mhz"`
	ExtraTelemetryPatch
}

// GPUState is a simulated GPU as the control API reports it.
type GPUState struct {
	Index     int       `json:"index"`
	UUID      string    `json:"uuid"`
	Lost      bool      `json:"lost"`
	Telemetry Telemetry `json:"telemetry"`
	EnergyMJ  uint64    `json:"energy_mj"`
	XIDs      int       `json:"xids"` // XIDs injected so far
	// MIGEnabled and MIGDevices are the current MIG layout (SetMIGLayout).
	MIGEnabled bool     `json:"mig_enabled"`
	MIGDevices []string `json:"mig_devices,omitempty"`
	// RecoveryAction (go-nvml's GPU_RECOVERY_ACTION_*) and RowRemap are
	// what the driver says the GPU needs (SetRecoveryAction, SetRowRemap).
	RecoveryAction uint32   `json:"recovery_action"`
	RowRemap       RowRemap `json:"row_remap"`
	// ECC is the ECC mode and error totals (SetECC).
	ECC ECCCounts `json:"ecc"`
	// Processes are the GPU's compute processes (SetProcesses).
	Processes []Process `json:"processes,omitempty"`
}

// Node is a running simulated node. Its mock functions are fixed at
// construction and read the mutable state under mu, so the control API can
// change behaviour while the daemon calls in.
type Node struct {
	spec *node
	now  func() time.Time

	lib     *mock.Interface
	devices []gonvml.Device // simDevice handles

	mu     sync.Mutex
	state  []gpuState
	sets   map[*mock.EventSet]*eventSet
	faults map[faultKey]gonvml.Return
	inits  int
	// libFaults fail library-level calls (EventSetCreate, EventSetWait);
	// waitLost makes a wait fail with GPU_IS_LOST while a GPU registered on
	// the set is lost, as some drivers do.
	libFaults map[string]gonvml.Return
	waitLost  bool
	gpm       map[*mock.GpmSample]*gpmRecord // allocated GPM samples and what they saw (telemetry.go)
	mpsServer uint32                         // the MPS server's PID (processes.go)
}

type gpuState struct {
	mig      migLayout // changed at run time by SetMIGLayout (mig.go)
	lost     bool
	tel      Telemetry
	memClock uint32
	energyMJ float64
	energyAt time.Time
	xids     int
	rec      recoveryState // recovery action and row remapper (recovery.go)
	ecc      ECCCounts     // ECC mode and error totals (ecc.go)
	// procs are the compute processes, replaced whole by SetProcesses;
	// procStamp is the newest utilization sample timestamp handed out (µs)
	// (processes.go).
	procs     []simProc
	procStamp uint64

	fabric gonvml.GpuFabricInfo // NVLink fabric registration (gfd.go)
}

type faultKey struct {
	gpu int
	op  string // a device method name, e.g. "GetTemperature"; "*" for all
}

type eventSet struct {
	ch      chan gonvml.EventData
	regs    map[int]uint64 // GPU index → registered event types
	dropped int
}

// NewNode starts a simulated node for a parsed profile. now may be nil.
func NewNode(p *Profile, now func() time.Time) *Node {
	if now == nil {
		now = time.Now
	}
	n := &Node{
		spec:   p.spec,
		now:    now,
		sets:   map[*mock.EventSet]*eventSet{},
		faults: map[faultKey]gonvml.Return{},

		libFaults: map[string]gonvml.Return{},
		mpsServer: uint32(os.Getpid()),
	}
	t0 := now()
	for _, g := range n.spec.gpus {
		n.state = append(n.state, gpuState{
			lost: g.lost,
			tel: Telemetry{
				TemperatureC: 31, PowerW: g.model.idlePowerW, SMClockMHz: g.model.smClockMHz,
				FBUsedMiB: 0, ExtraTelemetry: defaultExtraTelemetry(),
			},
			memClock: g.model.memClockMHz,
			energyAt: t0,
		})
	}
	for _, g := range n.spec.gpus {
		n.devices = append(n.devices, simDevice{n.newDevice(g)})
	}
	for i, g := range n.spec.gpus {
		n.state[i].mig = n.newMIGLayout(g, g.migEnabled, g.migs, 0)
	}
	n.lib = n.newLibrary()
	return n
}

// NVML returns the simulated library.
func (n *Node) NVML() gonvml.Interface { return simLibrary{Interface: n.lib, gpus: len(n.spec.gpus)} }

// Name is the profile's name.
func (n *Node) Name() string { return n.spec.name }

// GPUCount is the number of simulated GPUs.
func (n *Node) GPUCount() int { return len(n.spec.gpus) }

// read answers a device call: it fails as injected, or as lost, or returns
// f's value computed under the lock.
func read[T any](n *Node, gpu int, op string, f func(s *gpuState) T) (T, gonvml.Return) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var zero T
	if r := n.failureLocked(gpu, op); r != gonvml.SUCCESS {
		return zero, r
	}
	return f(&n.state[gpu]), gonvml.SUCCESS
}

// value answers a device call with a fixed value.
func value[T any](n *Node, gpu int, op string, v T) (T, gonvml.Return) {
	return read(n, gpu, op, func(*gpuState) T { return v })
}

func (n *Node) failureLocked(gpu int, op string) gonvml.Return {
	if n.state[gpu].lost {
		return gonvml.ERROR_GPU_IS_LOST
	}
	if r, ok := n.faults[faultKey{gpu, op}]; ok {
		return r
	}
	if r, ok := n.faults[faultKey{gpu, "*"}]; ok {
		return r
	}
	return gonvml.SUCCESS
}

func (n *Node) newLibrary() *mock.Interface {
	spec := n.spec
	l := &mock.Interface{}
	// go-nvlib asks whether the driver has a symbol before some calls; a
	// simulated driver has them all.
	l.ExtensionsFunc = func() gonvml.ExtendedInterface {
		return &mock.ExtendedInterface{LookupSymbolFunc: func(string) error { return nil }}
	}
	l.InitFunc = func() gonvml.Return {
		n.mu.Lock()
		defer n.mu.Unlock()
		n.inits++
		return gonvml.SUCCESS
	}
	l.ShutdownFunc = func() gonvml.Return {
		n.mu.Lock()
		defer n.mu.Unlock()
		if n.inits == 0 {
			return gonvml.ERROR_UNINITIALIZED
		}
		n.inits--
		return gonvml.SUCCESS
	}
	l.SystemGetDriverVersionFunc = func() (string, gonvml.Return) { return spec.driverVersion, gonvml.SUCCESS }
	l.SystemGetNVMLVersionFunc = func() (string, gonvml.Return) {
		return "12." + spec.driverVersion, gonvml.SUCCESS
	}
	l.SystemGetCudaDriverVersionFunc = func() (int, gonvml.Return) { return spec.cudaDriverVersion, gonvml.SUCCESS }
	l.SystemGetCudaDriverVersion_v2Func = l.SystemGetCudaDriverVersionFunc
	l.DeviceGetCountFunc = func() (int, gonvml.Return) { return len(n.devices), gonvml.SUCCESS }
	l.DeviceGetHandleByIndexFunc = func(i int) (gonvml.Device, gonvml.Return) {
		if i < 0 || i >= len(n.devices) {
			return nil, gonvml.ERROR_INVALID_ARGUMENT
		}
		return value[gonvml.Device](n, i, "DeviceGetHandleByIndex", n.devices[i])
	}
	l.DeviceGetHandleByUUIDFunc = func(uuid string) (gonvml.Device, gonvml.Return) {
		for i, g := range spec.gpus {
			if g.uuid == uuid {
				return value[gonvml.Device](n, i, "DeviceGetHandleByUUID", n.devices[i])
			}
			if d := n.migByUUID(i, uuid); d != nil {
				return value[gonvml.Device](n, i, "DeviceGetHandleByUUID", d)
			}
		}
		return nil, gonvml.ERROR_NOT_FOUND
	}
	l.DeviceGetHandleByPciBusIdFunc = func(bus string) (gonvml.Device, gonvml.Return) {
		for i, g := range spec.gpus {
			if strings.EqualFold(g.busID, bus) {
				return value[gonvml.Device](n, i, "DeviceGetHandleByPciBusId", n.devices[i])
			}
		}
		return nil, gonvml.ERROR_NOT_FOUND
	}
	l.EventSetCreateFunc = func() (gonvml.EventSet, gonvml.Return) {
		n.mu.Lock()
		r, failing := n.libFaults["EventSetCreate"]
		n.mu.Unlock()
		if failing {
			return nil, r
		}
		return n.newEventSet(), gonvml.SUCCESS
	}
	n.addGPMLibrary(l)
	return l
}

func (n *Node) newDevice(g *simGPU) *mock.Device {
	i := g.index
	cfg := g.model.config
	d := &mock.Device{}
	d.GetUUIDFunc = func() (string, gonvml.Return) { return value(n, i, "GetUUID", g.uuid) }
	d.GetNameFunc = func() (string, gonvml.Return) { return value(n, i, "GetName", g.name) }
	d.GetIndexFunc = func() (int, gonvml.Return) { return value(n, i, "GetIndex", i) }
	d.GetMinorNumberFunc = func() (int, gonvml.Return) { return value(n, i, "GetMinorNumber", i) }
	d.GetBrandFunc = func() (gonvml.BrandType, gonvml.Return) { return value(n, i, "GetBrand", cfg.Brand) }
	d.GetArchitectureFunc = func() (gonvml.DeviceArchitecture, gonvml.Return) {
		return value(n, i, "GetArchitecture", cfg.Architecture)
	}
	d.GetCudaComputeCapabilityFunc = func() (int, int, gonvml.Return) {
		r := n.check(i, "GetCudaComputeCapability")
		return cfg.CudaMajor, cfg.CudaMinor, r
	}
	d.GetPciInfoFunc = func() (gonvml.PciInfo, gonvml.Return) {
		return value(n, i, "GetPciInfo", pciInfo(g.busID, cfg.PciDeviceId))
	}
	d.GetNumaNodeIdFunc = func() (int, gonvml.Return) {
		if g.numa < 0 {
			return 0, gonvml.ERROR_NOT_SUPPORTED
		}
		return value(n, i, "GetNumaNodeId", g.numa)
	}
	totalBytes := g.memoryMiB << 20
	reservedBytes := (g.memoryMiB / 100) << 20 // the driver keeps about 1%
	// Used memory is fb_used_mib plus what the processes use.
	d.GetMemoryInfoFunc = func() (gonvml.Memory, gonvml.Return) {
		return read(n, i, "GetMemoryInfo", func(s *gpuState) gonvml.Memory {
			used := min((s.tel.FBUsedMiB+s.procsMiBLocked(nil))<<20, totalBytes-reservedBytes)
			return gonvml.Memory{Total: totalBytes, Used: used + reservedBytes, Free: totalBytes - reservedBytes - used}
		})
	}
	d.GetMemoryInfo_v2Func = func() (gonvml.Memory_v2, gonvml.Return) {
		return read(n, i, "GetMemoryInfo_v2", func(s *gpuState) gonvml.Memory_v2 {
			used := min((s.tel.FBUsedMiB+s.procsMiBLocked(nil))<<20, totalBytes-reservedBytes)
			return gonvml.Memory_v2{Version: gonvml.STRUCT_VERSION(gonvml.Memory_v2{}, 2), Total: totalBytes,
				Reserved: reservedBytes, Used: used, Free: totalBytes - reservedBytes - used}
		})
	}

	// Telemetry.
	d.GetUtilizationRatesFunc = func() (gonvml.Utilization, gonvml.Return) {
		return read(n, i, "GetUtilizationRates", func(s *gpuState) gonvml.Utilization {
			return gonvml.Utilization{Gpu: s.tel.GPUUtil, Memory: s.tel.MemCopyUtil}
		})
	}
	d.GetTemperatureFunc = func(gonvml.TemperatureSensors) (uint32, gonvml.Return) {
		return read(n, i, "GetTemperature", func(s *gpuState) uint32 { return s.tel.TemperatureC })
	}
	d.GetPowerUsageFunc = func() (uint32, gonvml.Return) {
		return read(n, i, "GetPowerUsage", func(s *gpuState) uint32 { return uint32(s.tel.PowerW * 1000) })
	}
	d.GetTotalEnergyConsumptionFunc = func() (uint64, gonvml.Return) {
		return read(n, i, "GetTotalEnergyConsumption", func(s *gpuState) uint64 {
			n.advanceEnergyLocked(s)
			return uint64(s.energyMJ)
		})
	}
	d.GetClockInfoFunc = func(t gonvml.ClockType) (uint32, gonvml.Return) {
		return read(n, i, "GetClockInfo", func(s *gpuState) uint32 {
			if t == gonvml.CLOCK_MEM {
				return s.memClock
			}
			return s.tel.SMClockMHz
		})
	}
	n.addTelemetryFuncs(d, g) // field values, encoder/decoder, PCIe replays, GPM (telemetry.go)
	n.addRecoveryFuncs(d, g)  // remapped rows (recovery.go)
	n.addECCFuncs(d, g)       // ECC mode and totals (ecc.go)
	n.addFeatureFuncs(d, g)   // PCI class, fabric (gfd.go)
	n.addProcessFuncs(d, g)   // compute processes, their utilization (processes.go)

	// Topology: NVLinks as the profile's matrix describes them.
	links := n.nvlinkEnds(i)
	d.GetNvLinkStateFunc = func(link int) (gonvml.EnableState, gonvml.Return) {
		if len(links) == 0 {
			return 0, gonvml.ERROR_NOT_SUPPORTED
		}
		if link < 0 || link >= len(links) {
			return 0, gonvml.ERROR_INVALID_ARGUMENT
		}
		return value(n, i, "GetNvLinkState", gonvml.EnableState(gonvml.FEATURE_ENABLED))
	}
	d.GetNvLinkRemoteDeviceTypeFunc = func(link int) (gonvml.IntNvLinkDeviceType, gonvml.Return) {
		if link < 0 || link >= len(links) {
			return 0, gonvml.ERROR_INVALID_ARGUMENT
		}
		kind := gonvml.NVLINK_DEVICE_TYPE_GPU
		if links[link] < 0 {
			kind = gonvml.NVLINK_DEVICE_TYPE_SWITCH
		}
		return value(n, i, "GetNvLinkRemoteDeviceType", kind)
	}
	d.GetNvLinkRemotePciInfoFunc = func(link int) (gonvml.PciInfo, gonvml.Return) {
		if link < 0 || link >= len(links) {
			return gonvml.PciInfo{}, gonvml.ERROR_INVALID_ARGUMENT
		}
		bus := "00000000:FF:00.0" // an NVSwitch
		if links[link] >= 0 {
			bus = n.spec.gpus[links[link]].busID
		}
		return value(n, i, "GetNvLinkRemotePciInfo", pciInfo(bus, 0))
	}
	d.GetTopologyCommonAncestorFunc = func(peer gonvml.Device) (gonvml.GpuTopologyLevel, gonvml.Return) {
		j := n.indexOf(peer)
		if j < 0 {
			return 0, gonvml.ERROR_INVALID_ARGUMENT
		}
		if r := n.check(j, "GetTopologyCommonAncestor"); r != gonvml.SUCCESS {
			return 0, r
		}
		return value(n, i, "GetTopologyCommonAncestor", topologyLevel(n.spec.links[i][j].PCIe))
	}

	// The health monitor's probe.
	d.GetPerformanceStateFunc = func() (gonvml.Pstates, gonvml.Return) {
		return value(n, i, "GetPerformanceState", gonvml.PSTATE_0)
	}

	// Events.
	d.GetSupportedEventTypesFunc = func() (uint64, gonvml.Return) {
		return value[uint64](n, i, "GetSupportedEventTypes",
			gonvml.EventTypeXidCriticalError|gonvml.EventTypeDoubleBitEccError|gonvml.EventTypeSingleBitEccError)
	}
	d.RegisterEventsFunc = func(types uint64, set gonvml.EventSet) gonvml.Return {
		ws, ok := set.(simEventSet)
		ms := ws.EventSet
		n.mu.Lock()
		defer n.mu.Unlock()
		if r := n.failureLocked(i, "RegisterEvents"); r != gonvml.SUCCESS {
			return r
		}
		es, known := n.sets[ms]
		if !ok || !known {
			return gonvml.ERROR_INVALID_ARGUMENT
		}
		es.regs[i] |= types
		return gonvml.SUCCESS
	}

	// MIG.
	migCapable := len(cfg.MIGProfiles.GpuInstanceProfiles) > 0
	d.GetMigModeFunc = func() (int, int, gonvml.Return) {
		if !migCapable {
			return 0, 0, gonvml.ERROR_NOT_SUPPORTED
		}
		mode := gonvml.DEVICE_MIG_DISABLE
		if n.migLayoutOf(i).enabled {
			mode = gonvml.DEVICE_MIG_ENABLE
		}
		return mode, mode, n.check(i, "GetMigMode")
	}
	d.IsMigDeviceHandleFunc = func() (bool, gonvml.Return) { return value(n, i, "IsMigDeviceHandle", false) }
	d.GetMaxMigDeviceCountFunc = func() (int, gonvml.Return) {
		if !migCapable {
			return 0, gonvml.ERROR_NOT_SUPPORTED
		}
		// 0 while MIG is off, as NVML documents (and the fake library does).
		most := 0
		if n.migLayoutOf(i).enabled {
			most = int(g.model.migSlices())
		}
		return value(n, i, "GetMaxMigDeviceCount", most)
	}
	d.GetMigDeviceHandleByIndexFunc = func(k int) (gonvml.Device, gonvml.Return) {
		layout := n.migLayoutOf(i)
		switch {
		case !layout.enabled:
			return nil, gonvml.ERROR_NOT_SUPPORTED
		case k < 0 || k >= int(g.model.migSlices()):
			return nil, gonvml.ERROR_INVALID_ARGUMENT
		case k >= len(layout.devs):
			return nil, gonvml.ERROR_NOT_FOUND
		}
		return value[gonvml.Device](n, i, "GetMigDeviceHandleByIndex", layout.devs[k])
	}
	// Takes a profile index (NVML_GPU_INSTANCE_PROFILE_*) and answers the
	// driver's profile ID in the info, as NVML does.
	d.GetGpuInstanceProfileInfoFunc = func(index int) (gonvml.GpuInstanceProfileInfo, gonvml.Return) {
		if index < 0 || index >= gonvml.GPU_INSTANCE_PROFILE_COUNT {
			return gonvml.GpuInstanceProfileInfo{}, gonvml.ERROR_INVALID_ARGUMENT
		}
		info, ok := cfg.MIGProfiles.GpuInstanceProfiles[index]
		if !ok {
			return info, gonvml.ERROR_NOT_SUPPORTED
		}
		return value(n, i, "GetGpuInstanceProfileInfo", info)
	}
	d.GetGpuInstanceByIdFunc = func(id int) (gonvml.GpuInstance, gonvml.Return) {
		for _, m := range n.migLayoutOf(i).migs {
			if m.giID == id {
				return value[gonvml.GpuInstance](n, i, "GetGpuInstanceById", n.newGpuInstance(g, m, simDevice{d}))
			}
		}
		return nil, gonvml.ERROR_NOT_FOUND
	}
	return d
}

func (n *Node) newGpuInstance(g *simGPU, m *simMIG, parent gonvml.Device) *mock.GpuInstance {
	cfg := g.model.config
	ciProfile, _ := g.model.fullComputeProfile(m.giProfile)
	gi := &mock.GpuInstance{}
	gi.GetInfoFunc = func() (gonvml.GpuInstanceInfo, gonvml.Return) {
		return value(n, g.index, "GpuInstanceGetInfo", gonvml.GpuInstanceInfo{
			Device: parent, Id: uint32(m.giID), ProfileId: cfg.MIGProfiles.GpuInstanceProfiles[m.giProfile].Id,
			Placement: m.placement,
		})
	}
	gi.GetComputeInstanceProfileInfoFunc = func(profile, engine int) (gonvml.ComputeInstanceProfileInfo, gonvml.Return) {
		info, ok := cfg.MIGProfiles.ComputeInstanceProfiles[m.giProfile][profile]
		if !ok || engine != gonvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED {
			return info, gonvml.ERROR_NOT_SUPPORTED
		}
		return value(n, g.index, "GpuInstanceGetComputeInstanceProfileInfo", info)
	}
	gi.GetComputeInstanceByIdFunc = func(id int) (gonvml.ComputeInstance, gonvml.Return) {
		if id != m.ciID {
			return nil, gonvml.ERROR_NOT_FOUND
		}
		ci := &mock.ComputeInstance{}
		ci.GetInfoFunc = func() (gonvml.ComputeInstanceInfo, gonvml.Return) {
			return value(n, g.index, "ComputeInstanceGetInfo", gonvml.ComputeInstanceInfo{
				Device: parent, GpuInstance: gi, Id: uint32(m.ciID), ProfileId: ciProfile.Id,
			})
		}
		return value[gonvml.ComputeInstance](n, g.index, "GetComputeInstanceById", ci)
	}
	return gi
}

func (n *Node) newMIGDevice(g *simGPU, m *simMIG) *mock.Device {
	i := g.index
	parent := n.devices[i]
	total := m.memoryMiB << 20
	d := &mock.Device{}
	d.GetUUIDFunc = func() (string, gonvml.Return) { return value(n, i, "GetUUID", m.uuid) }
	d.GetNameFunc = func() (string, gonvml.Return) {
		return value(n, i, "GetName", g.name+" MIG "+m.profile)
	}
	d.IsMigDeviceHandleFunc = func() (bool, gonvml.Return) { return value(n, i, "IsMigDeviceHandle", true) }
	d.GetDeviceHandleFromMigDeviceHandleFunc = func() (gonvml.Device, gonvml.Return) {
		return value[gonvml.Device](n, i, "GetDeviceHandleFromMigDeviceHandle", parent)
	}
	d.GetGpuInstanceIdFunc = func() (int, gonvml.Return) { return value(n, i, "GetGpuInstanceId", m.giID) }
	d.GetComputeInstanceIdFunc = func() (int, gonvml.Return) { return value(n, i, "GetComputeInstanceId", m.ciID) }
	// Used memory is what the device's processes use.
	d.GetMemoryInfoFunc = func() (gonvml.Memory, gonvml.Return) {
		return read(n, i, "GetMemoryInfo", func(s *gpuState) gonvml.Memory {
			used := s.procsMiBLocked(m) << 20
			return gonvml.Memory{Total: total, Used: used, Free: total - used}
		})
	}
	d.GetMemoryInfo_v2Func = func() (gonvml.Memory_v2, gonvml.Return) {
		return read(n, i, "GetMemoryInfo_v2", func(s *gpuState) gonvml.Memory_v2 {
			used := s.procsMiBLocked(m) << 20
			return gonvml.Memory_v2{Total: total, Used: used, Free: total - used}
		})
	}
	n.addMIGProcessFuncs(d, g, m) // processes.go
	// MIG handles answer GetAttributes (whole GPUs do not), as NVML
	// documents; go-nvlib's GetProfile reads the memory size from it.
	giInfo := g.model.config.MIGProfiles.GpuInstanceProfiles[m.giProfile]
	ciInfo, _ := g.model.fullComputeProfile(m.giProfile)
	attrs := gonvml.DeviceAttributes{
		MultiprocessorCount: ciInfo.MultiprocessorCount, SharedCopyEngineCount: giInfo.CopyEngineCount,
		SharedDecoderCount: giInfo.DecoderCount, SharedEncoderCount: giInfo.EncoderCount,
		SharedJpegCount: giInfo.JpegCount, SharedOfaCount: giInfo.OfaCount,
		GpuInstanceSliceCount: giInfo.SliceCount, ComputeInstanceSliceCount: ciInfo.SliceCount,
		MemorySizeMB: giInfo.MemorySizeMB,
	}
	d.GetAttributesFunc = func() (gonvml.DeviceAttributes, gonvml.Return) {
		return value(n, i, "GetAttributes", attrs)
	}
	return d
}

// check answers a call that has no value of its own.
func (n *Node) check(gpu int, op string) gonvml.Return {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.failureLocked(gpu, op)
}

func (n *Node) indexOf(d gonvml.Device) int {
	for i, dev := range n.devices {
		if gonvml.Device(dev) == d {
			return i
		}
	}
	return -1
}

// nvlinkEnds lists GPU i's NVLinks by link number: the peer GPU's index, or
// -1 for a link to an NVSwitch.
func (n *Node) nvlinkEnds(i int) []int {
	var ends []int
	if n.spec.nvswitch {
		if len(n.spec.gpus) > 1 {
			for k := 0; k < n.spec.links[0][1].NVLinks; k++ {
				ends = append(ends, -1)
			}
		}
		return ends
	}
	for j, l := range n.spec.links[i] {
		for k := 0; k < l.NVLinks && j != i; k++ {
			ends = append(ends, j)
		}
	}
	return ends
}

func (n *Node) advanceEnergyLocked(s *gpuState) {
	now := n.now()
	if dt := now.Sub(s.energyAt); dt > 0 {
		s.energyMJ += s.tel.PowerW * float64(dt.Milliseconds()) // W × ms = mJ
		s.energyAt = now
	}
}

func (n *Node) newEventSet() simEventSet {
	es := &eventSet{ch: make(chan gonvml.EventData, EventQueueSize), regs: map[int]uint64{}}
	ms := &mock.EventSet{}
	ms.WaitFunc = func(timeoutMs uint32) (gonvml.EventData, gonvml.Return) {
		if r := n.waitFailure(es); r != gonvml.SUCCESS {
			return gonvml.EventData{}, r
		}
		t := time.NewTimer(time.Duration(timeoutMs) * time.Millisecond)
		defer t.Stop()
		select {
		case e := <-es.ch:
			return e, gonvml.SUCCESS
		case <-t.C:
			return gonvml.EventData{}, gonvml.ERROR_TIMEOUT
		}
	}
	ms.FreeFunc = func() gonvml.Return {
		n.mu.Lock()
		defer n.mu.Unlock()
		delete(n.sets, ms)
		return gonvml.SUCCESS
	}
	n.mu.Lock()
	n.sets[ms] = es
	n.mu.Unlock()
	return simEventSet{ms}
}

// waitFailure is how a wait on es fails right now: a library-level fault,
// a fault on EventSetWait for a GPU registered on es, or GPU_IS_LOST in
// wait-lost mode while a registered GPU is lost.
func (n *Node) waitFailure(es *eventSet) gonvml.Return {
	n.mu.Lock()
	defer n.mu.Unlock()
	if r, ok := n.libFaults["EventSetWait"]; ok {
		return r
	}
	for gpu := range es.regs {
		if r, ok := n.faults[faultKey{gpu, "EventSetWait"}]; ok {
			return r
		}
		if n.waitLost && n.state[gpu].lost {
			return gonvml.ERROR_GPU_IS_LOST
		}
	}
	return gonvml.SUCCESS
}

// LibraryFaultCalls are the library-level calls SetLibraryFault can fail.
var LibraryFaultCalls = []string{"EventSetCreate", "EventSetWait"}

// SetLibraryFault makes a library-level call (EventSetCreate, or
// EventSetWait on every event set) return code; SUCCESS clears it.
func (n *Node) SetLibraryFault(op string, code gonvml.Return) error {
	if !slices.Contains(LibraryFaultCalls, op) {
		return fmt.Errorf("no library call %q to fail: want one of %s", op, strings.Join(LibraryFaultCalls, ", "))
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if code == gonvml.SUCCESS {
		delete(n.libFaults, op)
	} else {
		n.libFaults[op] = code
	}
	return nil
}

// SetWaitLost turns wait-lost mode on or off: while on, an event wait fails
// with GPU_IS_LOST as long as a GPU registered on its set is lost.
func (n *Node) SetWaitLost(on bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.waitLost = on
}

func (n *Node) validGPU(gpu int) error {
	if gpu < 0 || gpu >= len(n.spec.gpus) {
		return fmt.Errorf("no GPU %d: this node has GPUs 0..%d", gpu, len(n.spec.gpus)-1)
	}
	return nil
}

// InjectEvent delivers an NVML event of the given type and data on a GPU to
// every event set registered for it, as the driver would. gi and ci name a
// MIG GPU/compute instance, or are -1 for the whole GPU. It returns how many
// event sets received it.
func (n *Node) InjectEvent(gpu int, eventType uint64, data uint64, gi, ci int) (int, error) {
	if err := n.validGPU(gpu); err != nil {
		return 0, err
	}
	e := gonvml.EventData{
		Device: n.devices[gpu], EventType: eventType, EventData: data,
		GpuInstanceId: noInstance, ComputeInstanceId: noInstance,
	}
	if gi >= 0 {
		e.GpuInstanceId = uint32(gi)
	}
	if ci >= 0 {
		e.ComputeInstanceId = uint32(ci)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if eventType == gonvml.EventTypeXidCriticalError {
		n.state[gpu].xids++
	}
	delivered := 0
	for _, es := range n.sets {
		if es.regs[gpu]&eventType == 0 {
			continue
		}
		select {
		case es.ch <- e:
			delivered++
		default:
			es.dropped++
		}
	}
	return delivered, nil
}

// InjectXID delivers an XID critical error.
func (n *Node) InjectXID(gpu int, code uint64, gi, ci int) (int, error) {
	return n.InjectEvent(gpu, gonvml.EventTypeXidCriticalError, code, gi, ci)
}

// SetLost makes a GPU fall off the bus (every call on it returns
// GPU_IS_LOST) or come back.
func (n *Node) SetLost(gpu int, lost bool) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.state[gpu].lost = lost
	return nil
}

// SetFault makes one device method (or "*" for all) on a GPU return code;
// SUCCESS clears it.
func (n *Node) SetFault(gpu int, op string, code gonvml.Return) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if code == gonvml.SUCCESS {
		delete(n.faults, faultKey{gpu, op})
	} else {
		n.faults[faultKey{gpu, op}] = code
	}
	return nil
}

// SetTelemetry changes a GPU's reported values.
func (n *Node) SetTelemetry(gpu int, p TelemetryPatch) error {
	if err := n.validGPU(gpu); err != nil {
		return err
	}
	var problems []string
	pct := func(name string, v *uint32) {
		if v != nil && *v > 100 {
			problems = append(problems, fmt.Sprintf("%s %d is over 100", name, *v))
		}
	}
	pct("gpu_util", p.GPUUtil)
	pct("mem_copy_util", p.MemCopyUtil)
	problems = append(problems, p.ExtraTelemetryPatch.problems()...)
	if p.FBUsedMiB != nil && *p.FBUsedMiB > n.spec.gpus[gpu].memoryMiB {
		problems = append(problems, fmt.Sprintf("fb_used_mib %d is more than the GPU's %d MiB", *p.FBUsedMiB, n.spec.gpus[gpu].memoryMiB))
	}
	if p.PowerW != nil && (*p.PowerW < 0 || *p.PowerW > 5000) {
		problems = append(problems, fmt.Sprintf("power_w %g is out of range 0..5000", *p.PowerW))
	}
	if p.TemperatureC != nil && *p.TemperatureC > 200 {
		problems = append(problems, fmt.Sprintf("temperature_c %d is out of range 0..200", *p.TemperatureC))
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s", strings.Join(problems, "; "))
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	s := &n.state[gpu]
	n.advanceEnergyLocked(s) // energy so far was drawn at the old power
	set := func(dst *uint32, v *uint32) {
		if v != nil {
			*dst = *v
		}
	}
	set(&s.tel.GPUUtil, p.GPUUtil)
	set(&s.tel.MemCopyUtil, p.MemCopyUtil)
	set(&s.tel.TemperatureC, p.TemperatureC)
	set(&s.tel.SMClockMHz, p.SMClockMHz)
	p.ExtraTelemetryPatch.apply(&s.tel.ExtraTelemetry)
	if p.FBUsedMiB != nil {
		s.tel.FBUsedMiB = *p.FBUsedMiB
	}
	if p.PowerW != nil {
		s.tel.PowerW = *p.PowerW
	}
	return nil
}

// State reports every GPU's simulated state.
func (n *Node) State() []GPUState {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]GPUState, len(n.state))
	for i := range n.state {
		s := &n.state[i]
		n.advanceEnergyLocked(s)
		tel := s.tel
		tel.ExtraTelemetry = tel.ExtraTelemetry.clone()
		out[i] = GPUState{Index: i, UUID: n.spec.gpus[i].uuid, Lost: s.lost, Telemetry: tel,
			EnergyMJ: uint64(s.energyMJ), XIDs: s.xids, MIGEnabled: s.mig.enabled, MIGDevices: s.mig.profiles(),
			RecoveryAction: uint32(s.rec.action), RowRemap: s.rec.remap, ECC: s.ecc, Processes: n.processesLocked(i)}
	}
	return out
}

// EventStats reports live event sets and events dropped on full queues.
func (n *Node) EventStats() (sets, dropped int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, es := range n.sets {
		dropped += es.dropped
	}
	return len(n.sets), dropped
}

func pciInfo(bus string, deviceID uint32) gonvml.PciInfo {
	var p gonvml.PciInfo
	for k := 0; k < len(bus) && k < len(p.BusId)-1; k++ {
		p.BusId[k] = int8(bus[k])
	}
	legacy := bus
	if len(bus) == len("00000000:07:00.0") {
		legacy = bus[4:]
	}
	for k := 0; k < len(legacy) && k < len(p.BusIdLegacy)-1; k++ {
		p.BusIdLegacy[k] = int8(legacy[k])
	}
	parts := strings.FieldsFunc(bus, func(r rune) bool { return r == ':' || r == '.' })
	if len(parts) == 4 {
		dom, _ := strconv.ParseUint(parts[0], 16, 32)
		b, _ := strconv.ParseUint(parts[1], 16, 32)
		dev, _ := strconv.ParseUint(parts[2], 16, 32)
		p.Domain, p.Bus, p.Device = uint32(dom), uint32(b), uint32(dev)
	}
	p.PciDeviceId = deviceID
	return p
}

func topologyLevel(r nvml.PCIeRelation) gonvml.GpuTopologyLevel {
	switch r {
	case nvml.PCIeInternal:
		return gonvml.TOPOLOGY_INTERNAL
	case nvml.PCIePIX:
		return gonvml.TOPOLOGY_SINGLE
	case nvml.PCIePXB:
		return gonvml.TOPOLOGY_MULTIPLE
	case nvml.PCIePHB:
		return gonvml.TOPOLOGY_HOSTBRIDGE
	case nvml.PCIeNODE:
		return gonvml.TOPOLOGY_NODE
	}
	return gonvml.TOPOLOGY_SYSTEM
}
