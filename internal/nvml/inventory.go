package nvml

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Inventory is an immutable snapshot of the node's GPUs. Build it with Scan;
// never modify one that has been handed out.
type Inventory struct {
	DriverVersion     string    `json:"driverVersion"`
	CUDADriverVersion string    `json:"cudaDriverVersion"` // e.g. "12.4"
	GPUs              []GPU     `json:"gpus"`
	Topology          Topology  `json:"topology"`
	ScannedAt         time.Time `json:"scannedAt"`

	handles map[string]gonvml.Device // by GPU or MIG UUID
}

// GPU is one physical GPU.
type GPU struct {
	Index       int    `json:"index"` // NVML index
	UUID        string `json:"uuid"`  // "GPU-…"; empty when the GPU could not be identified
	Name        string `json:"name"`  // product name, e.g. "NVIDIA H100 80GB HBM3"
	MemoryBytes uint64 `json:"memoryBytes"`
	PCIBusID    string `json:"pciBusId"` // as NVML prints it, "00000000:07:00.0"
	Minor       int    `json:"minor"`    // /dev/nvidia<minor>
	NUMANode    int    `json:"numaNode"` // -1 when unknown
	// PCIeRoot is the PCI Express root complex above the GPU ("pci0000:00"),
	// from sysfs; "" when unknown.
	PCIeRoot string `json:"pcieRoot,omitempty"`
	// ComputeCapability is the CUDA compute capability, e.g. 9.0.
	ComputeCapability ComputeCapability `json:"computeCapability"`
	Architecture      string            `json:"architecture"` // lower case, e.g. "hopper"; "" if unknown
	MIGCapable        bool              `json:"migCapable"`
	MIGEnabled        bool              `json:"migEnabled"`
	MIGDevices        []MIGDevice       `json:"migDevices,omitempty"`
	// PCIClass is the PCI class code, 0x030200 for a 3D controller (compute
	// mode), 0x030000 for a VGA controller (display mode); 0 if unknown.
	PCIClass uint32 `json:"pciClass,omitempty"`
	// Fabric is the NVLink fabric the GPU is attached to; nil if none.
	Fabric *Fabric `json:"fabric,omitempty"`

	// Lost is set when NVML reported the GPU as fallen off the bus during the
	// scan; Problem says what went wrong with a GPU that could not be fully
	// discovered. A GPU without a UUID is listed for reporting only.
	Lost    bool   `json:"lost,omitempty"`
	Problem string `json:"problem,omitempty"`
}

// ComputeCapability is a CUDA compute capability.
type ComputeCapability struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
}

func (c ComputeCapability) String() string { return fmt.Sprintf("%d.%d", c.Major, c.Minor) }

// Usable reports whether the GPU was identified and can be advertised.
func (g *GPU) Usable() bool { return g.UUID != "" }

// MIGDevice is one MIG device (a GPU instance with a compute instance).
type MIGDevice struct {
	Index             int    `json:"index"` // position among the parent's MIG devices
	UUID              string `json:"uuid"`  // "MIG-…"
	Profile           string `json:"profile"`
	GPUInstanceID     int    `json:"gpuInstanceId"`
	ComputeInstanceID int    `json:"computeInstanceId"`
	MemoryBytes       uint64 `json:"memoryBytes"`
	// GPUInstanceProfileID is the driver's ID of the GPU instance's
	// profile, as `nvidia-smi mig -lgip` lists it (19 for an A100's
	// 1g.5gb), not its NVML_GPU_INSTANCE_PROFILE_* index.
	GPUInstanceProfileID int `json:"gpuInstanceProfileId"`
	// Placement is where the GPU instance sits, in the GPU's memory
	// slices; Size is 0 when NVML did not say.
	Placement MIGPlacement `json:"placement"`
	// CapDevicePaths are the GPU instance's and the compute instance's
	// /dev/nvidia-caps/nvidia-cap<N> nodes (container paths), which a
	// container needs besides the parent's /dev/nvidia<minor>; empty when
	// the driver's mig-minors file could not be read (see the GPU's Problem).
	CapDevicePaths []string `json:"capDevicePaths,omitempty"`
	// Attributes are the device's SMs, slices and engines; nil when NVML
	// could not report them.
	Attributes *MIGAttributes `json:"attributes,omitempty"`
}

// MIGPlacement is a GPU instance's first memory slice and how many it
// spans (nvmlGpuInstancePlacement_t).
type MIGPlacement struct {
	Start int `json:"start"`
	Size  int `json:"size"`
}

// Handle returns the NVML handle of a GPU or MIG device by UUID. Use it only
// inside Call/Do.
func (inv *Inventory) Handle(uuid string) (gonvml.Device, bool) {
	h, ok := inv.handles[uuid]
	return h, ok
}

// GPUByUUID finds a GPU.
func (inv *Inventory) GPUByUUID(uuid string) (*GPU, bool) {
	for i := range inv.GPUs {
		if inv.GPUs[i].UUID == uuid {
			return &inv.GPUs[i], true
		}
	}
	return nil, false
}

// ResolveDevice finds the GPU or MIG device an operator named: a GPU
// index, a GPU UUID or a MIG device UUID (case-insensitive). It returns
// the UUID, or "" and why nothing matched.
func (inv *Inventory) ResolveDevice(entry string) (uuid, why string) {
	if n, err := strconv.Atoi(entry); err == nil {
		why = fmt.Sprintf("matches no GPU index on this node (%d GPUs)", len(inv.GPUs))
		for _, g := range inv.GPUs {
			if g.Index == n {
				if g.UUID == "" {
					return "", "names a GPU that could not be identified (no UUID)"
				}
				return g.UUID, ""
			}
		}
		return "", why
	}
	for _, g := range inv.GPUs {
		if g.UUID != "" && strings.EqualFold(g.UUID, entry) {
			return g.UUID, ""
		}
		for _, m := range g.MIGDevices {
			if m.UUID != "" && strings.EqualFold(m.UUID, entry) {
				return m.UUID, ""
			}
		}
	}
	return "", "matches no GPU or MIG device on this node"
}

// ScanOptions tune Scan.
type ScanOptions struct {
	// SysRoot is where sysfs is mounted ("/sys"); it supplies NUMA nodes when
	// NVML cannot. Empty disables the fallback.
	SysRoot string
	// ProcRoot is where procfs is mounted; the MIG capability minors are
	// read from ProcRoot/driver/nvidia-caps/mig-minors, only when a GPU has
	// MIG on. Empty means /proc, unless the NVML interface is a
	// MIGMinorsSource (a simulated node), which then supplies them.
	ProcRoot string
	Logger   *slog.Logger
	Now      func() time.Time
}

// Scan builds the inventory. It fails only when the GPUs cannot be counted; a
// GPU that fails is listed with its Problem and the others are still
// discovered.
func Scan(l *Library, opts ScanOptions) (*Inventory, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	lib := l.Interface()
	inv := &Inventory{handles: map[string]gonvml.Device{}, ScannedAt: now()}

	if v, err := Call(l, "nvmlSystemGetDriverVersion", lib.SystemGetDriverVersion); err == nil {
		inv.DriverVersion = v
	} else {
		log.Warn("cannot read the driver version", "err", err)
	}
	if v, err := Call(l, "nvmlSystemGetCudaDriverVersion", lib.SystemGetCudaDriverVersion); err == nil {
		inv.CUDADriverVersion = fmt.Sprintf("%d.%d", v/1000, v%1000/10)
	} else {
		log.Warn("cannot read the CUDA driver version", "err", err)
	}

	count, err := Call(l, "nvmlDeviceGetCount", lib.DeviceGetCount)
	if err != nil {
		return nil, fmt.Errorf("counting GPUs: %w", err)
	}
	devices := make([]gonvml.Device, count)
	capsLoader := &migCapsLoader{load: func() (MIGCaps, error) {
		if src, ok := lib.(MIGMinorsSource); ok && opts.ProcRoot == "" {
			return l.cachedMIGCaps("simulated", func() (MIGCaps, error) {
				return ParseMIGMinors(bytes.NewReader(src.MIGMinors()))
			})
		}
		return l.cachedMIGCaps("proc:"+opts.ProcRoot, func() (MIGCaps, error) { return ReadMIGCaps(opts.ProcRoot) })
	}}
	for i := 0; i < count; i++ {
		gpu := GPU{Index: i, NUMANode: -1, Minor: -1}
		dev, err := Call(l, "nvmlDeviceGetHandleByIndex", func() (gonvml.Device, gonvml.Return) {
			return lib.DeviceGetHandleByIndex(i)
		})
		if err == nil {
			devices[i] = dev
			err = describeGPU(l, dev, &gpu, opts.SysRoot, inv.handles, capsLoader)
		}
		if err != nil {
			gpu.Lost = IsLost(err)
			gpu.Problem = err.Error()
			if !gpu.Lost || gpu.UUID == "" {
				// Keep a GPU we could not identify for reporting, but never
				// advertise one without an identity.
				devices[i] = nil
				gpu.UUID = ""
			}
			log.Warn("GPU discovery failed", "index", i, "lost", gpu.Lost, "err", err)
		} else if gpu.Problem != "" {
			log.Warn("GPU discovered incompletely", "index", i, "uuid", gpu.UUID, "problem", gpu.Problem)
		}
		if gpu.UUID != "" && devices[i] != nil {
			inv.handles[gpu.UUID] = devices[i]
		}
		inv.GPUs = append(inv.GPUs, gpu)
	}
	inv.Topology = scanTopology(l, devices, inv.GPUs)
	return inv, nil
}

// describeGPU fills gpu from NVML. Identity calls are mandatory; the rest
// fall back to "unknown" unless the GPU is lost.
func describeGPU(l *Library, dev gonvml.Device, gpu *GPU, sysRoot string, handles map[string]gonvml.Device, capsLoader *migCapsLoader) error {
	uuid, err := Call(l, "nvmlDeviceGetUUID", dev.GetUUID)
	if err != nil {
		return err
	}
	gpu.UUID = uuid
	// optional collects failures of non-essential calls; only a lost GPU
	// aborts the description.
	optional := func(err error) error {
		if err != nil && IsLost(err) {
			return err
		}
		return nil
	}
	if gpu.Name, err = Call(l, "nvmlDeviceGetName", dev.GetName); optional(err) != nil {
		return err
	}
	mem, err := Call(l, "nvmlDeviceGetMemoryInfo", dev.GetMemoryInfo)
	if optional(err) != nil {
		return err
	}
	gpu.MemoryBytes = mem.Total
	pci, err := Call(l, "nvmlDeviceGetPciInfo", dev.GetPciInfo)
	if optional(err) != nil {
		return err
	}
	gpu.PCIBusID = busID(pci)
	if gpu.Minor, err = Call(l, "nvmlDeviceGetMinorNumber", dev.GetMinorNumber); optional(err) != nil {
		return err
	} else if err != nil {
		gpu.Minor = -1
	}
	major, minor, err := Call2(l, "nvmlDeviceGetCudaComputeCapability", dev.GetCudaComputeCapability)
	if optional(err) != nil {
		return err
	}
	gpu.ComputeCapability = ComputeCapability{Major: major, Minor: minor}
	arch, err := Call(l, "nvmlDeviceGetArchitecture", dev.GetArchitecture)
	if optional(err) != nil {
		return err
	} else if err == nil {
		gpu.Architecture = architectureName(arch)
	}
	if gpu.Architecture == "" {
		gpu.Architecture = architectureFromCC(gpu.ComputeCapability)
	}
	if numa, err := Call(l, "nvmlDeviceGetNumaNodeId", dev.GetNumaNodeId); err == nil {
		gpu.NUMANode = numa
	} else if IsLost(err) {
		return err
	} else {
		gpu.NUMANode = sysfsNUMANode(sysRoot, gpu.PCIBusID)
	}
	gpu.PCIeRoot = sysfsPCIeRoot(sysRoot, gpu.PCIBusID)
	if err := describeFeatures(l, dev, gpu, sysRoot); err != nil {
		return err
	}
	return describeMIG(l, dev, gpu, handles, capsLoader)
}

// busID returns the PCI bus ID NVML reports, in NVML's 8-digit-domain form.
func busID(p gonvml.PciInfo) string {
	var b strings.Builder
	for _, c := range p.BusId {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	if b.Len() == 0 && (p.Bus != 0 || p.Device != 0 || p.Domain != 0) {
		return fmt.Sprintf("%08x:%02x:%02x.0", p.Domain, p.Bus, p.Device)
	}
	return NormalizeBusID(b.String())
}

// NormalizeBusID returns a PCI address in NVML's form: an 8-hex-digit domain
// and upper-case hex, "00000000:07:00.0". Unparseable input is returned as is.
func NormalizeBusID(s string) string {
	domain, rest, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok || strings.Count(rest, ":") != 1 {
		return s
	}
	if _, err := strconv.ParseUint(domain, 16, 32); err != nil {
		return s
	}
	return strings.ToUpper(fmt.Sprintf("%08s:%s", strings.ToLower(domain), rest))
}

// sysfsBDF is a bus ID as sysfs names it: a 4-digit domain, lower case
// (0000:07:00.0).
func sysfsBDF(bus string) string {
	bdf := strings.ToLower(bus)
	if len(bdf) == len("00000000:07:00.0") {
		bdf = bdf[4:]
	}
	return bdf
}

// sysfsPCIeRoot is the PCI Express root complex above a device, as the
// standard DRA attribute resource.kubernetes.io/pcieRoot names it
// ("pci0000:00"): the first element of its sysfs device path. "" when
// unknown.
func sysfsPCIeRoot(sysRoot, bus string) string {
	if sysRoot == "" || bus == "" {
		return ""
	}
	target, err := filepath.EvalSymlinks(filepath.Join(sysRoot, "bus", "pci", "devices", sysfsBDF(bus)))
	if err != nil {
		return ""
	}
	if base, err := filepath.EvalSymlinks(sysRoot); err == nil {
		if rel, err := filepath.Rel(base, target); err == nil {
			target = rel // devices/pci0000:00/…: only the part below sysfs counts
		}
	}
	for _, part := range strings.Split(filepath.ToSlash(target), "/") {
		if strings.HasPrefix(part, "pci") && strings.Contains(part, ":") {
			return part
		}
	}
	return ""
}

// sysfsNUMANode reads /sys/bus/pci/devices/<bdf>/numa_node; -1 when unknown.
func sysfsNUMANode(sysRoot, bus string) int {
	if sysRoot == "" || bus == "" {
		return -1
	}
	raw, err := os.ReadFile(filepath.Join(sysRoot, "bus", "pci", "devices", sysfsBDF(bus), "numa_node"))
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || n < 0 {
		return -1
	}
	return n
}

func architectureName(a gonvml.DeviceArchitecture) string {
	switch a {
	case gonvml.DEVICE_ARCH_KEPLER:
		return "kepler"
	case gonvml.DEVICE_ARCH_MAXWELL:
		return "maxwell"
	case gonvml.DEVICE_ARCH_PASCAL:
		return "pascal"
	case gonvml.DEVICE_ARCH_VOLTA:
		return "volta"
	case gonvml.DEVICE_ARCH_TURING:
		return "turing"
	case gonvml.DEVICE_ARCH_AMPERE:
		return "ampere"
	case gonvml.DEVICE_ARCH_ADA:
		return "ada-lovelace"
	case gonvml.DEVICE_ARCH_HOPPER:
		return "hopper"
	case gonvml.DEVICE_ARCH_BLACKWELL:
		return "blackwell"
	}
	return ""
}

// architectureFromCC derives the family when NVML cannot name it.
func architectureFromCC(cc ComputeCapability) string {
	switch {
	case cc.Major >= 10:
		return "blackwell"
	case cc.Major == 9:
		return "hopper"
	case cc.Major == 8 && cc.Minor >= 9:
		return "ada-lovelace"
	case cc.Major == 8:
		return "ampere"
	case cc.Major == 7 && cc.Minor >= 5:
		return "turing"
	case cc.Major == 7:
		return "volta"
	case cc.Major == 6:
		return "pascal"
	}
	return ""
}
