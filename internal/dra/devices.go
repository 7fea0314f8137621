package dra

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// device is one GPU or MIG device offered through DRA.
type device struct {
	name string // the device's name in the ResourceSlice
	uuid string // the GPU's or MIG device's UUID
	// units are the health units whose health is the device's: the GPU,
	// and for a MIG device its parent too.
	units []string
	slice kube.SliceDevice // without taints
	// gpuIndex and memory are a whole GPU's (for an MPS daemon); mig is
	// set for a MIG device.
	gpuIndex int
	memory   uint64
	mig      bool
}

// Standard attribute names (k8s.io/dynamic-resource-allocation/deviceattribute).
const (
	attrPCIBusID = "resource.kubernetes.io/pciBusID"
	attrNUMANode = "resource.kubernetes.io/numaNode"
	attrPCIeRoot = "resource.kubernetes.io/pcieRoot"
)

// describe builds the devices for the units offered through DRA, in
// inventory order, named and described as NVIDIA's DRA driver does: whole
// GPUs "gpu-<minor>" with type "gpu", MIG devices as migDeviceName says
// with type "mig", so DeviceClass selectors, claim CEL and device names
// written for it select the same devices here.
func describe(inv *nvml.Inventory, units []string) []device {
	offered := make(map[string]bool, len(units))
	for _, u := range units {
		offered[u] = true
	}
	var out []device
	seen := map[string]bool{}
	for i := range inv.GPUs {
		g := &inv.GPUs[i]
		if !g.Usable() {
			continue
		}
		if offered[g.UUID] && !g.MIGEnabled {
			out = append(out, device{name: fmt.Sprintf("gpu-%d", g.Minor), uuid: g.UUID, units: []string{g.UUID}, slice: gpuDevice(inv, g),
				gpuIndex: g.Index, memory: g.MemoryBytes})
		}
		for j := range g.MIGDevices {
			m := &g.MIGDevices[j]
			if !g.MIGEnabled || !offered[m.UUID] {
				continue
			}
			name := migDeviceName(g, m)
			if seen[name] {
				// Two GPU instances in one place: NVML is wrong, and a
				// duplicate name would make the API refuse the whole slice.
				name = migIDName(g, m)
			}
			seen[name] = true
			out = append(out, device{name: name, uuid: m.UUID, units: []string{g.UUID, m.UUID}, slice: migDevice(inv, g, m, name), mig: true})
		}
	}
	return out
}

// migDeviceName names a MIG device as NVIDIA's DRA driver does, by its
// GPU instance's profile ID and placement:
// "gpu-<parent minor>-mig-<profile ID>-<placement start>-<placement size>"
// (an A100's 3g.20gb in the upper half: "gpu-0-mig-9-4-4"). NVIDIA's
// driver offers one compute instance per GPU instance; a compute instance
// smaller than its GPU instance (a 1c.3g.20gb), or one of several in it,
// adds "-ci<compute instance ID>" so that each is a device of its own.
// Without a placement from NVML (a mock; a real driver always has one) the
// profile and the instance IDs name it.
func migDeviceName(g *nvml.GPU, m *nvml.MIGDevice) string {
	if m.Placement.Size == 0 {
		return migIDName(g, m)
	}
	name := fmt.Sprintf("gpu-%d-mig-%d-%d-%d", g.Minor, m.GPUInstanceProfileID, m.Placement.Start, m.Placement.Size)
	shared := m.Attributes != nil && m.Attributes.CISlices < m.Attributes.GISlices
	for i := range g.MIGDevices {
		other := &g.MIGDevices[i]
		shared = shared || (other.UUID != m.UUID && other.GPUInstanceID == m.GPUInstanceID)
	}
	if shared {
		name += fmt.Sprintf("-ci%d", m.ComputeInstanceID)
	}
	return name
}

// migIDName names a MIG device by its profile and GPU- and
// compute-instance IDs, unique on a GPU whatever NVML says of placements.
func migIDName(g *nvml.GPU, m *nvml.MIGDevice) string {
	return fmt.Sprintf("gpu-%d-mig-%s-%d-%d", g.Minor, profileName(m.Profile), m.GPUInstanceID, m.ComputeInstanceID)
}

// profileName makes a MIG profile ("1g.10gb+me") part of a device name
// (lower case letters, digits and dashes: "1g10gb-me").
func profileName(p string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(p) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case r == '+' || r == '-' || r == '_':
			b.WriteByte('-')
		}
	}
	return strings.Trim(b.String(), "-")
}

// common are the attributes a MIG device shares with its parent GPU.
func common(inv *nvml.Inventory, g *nvml.GPU) map[string]kube.DeviceAttribute {
	a := map[string]kube.DeviceAttribute{
		"productName":           kube.StringAttribute(g.Name),
		"cudaComputeCapability": kube.VersionAttribute(semver(g.ComputeCapability.String())),
		"driverVersion":         kube.VersionAttribute(semver(inv.DriverVersion)),
		"cudaDriverVersion":     kube.VersionAttribute(semver(inv.CUDADriverVersion)),
	}
	if g.Architecture != "" {
		// NVIDIA's driver writes the architecture capitalized ("Hopper").
		a["architecture"] = kube.StringAttribute(strings.ToUpper(g.Architecture[:1]) + g.Architecture[1:])
	}
	if g.PCIBusID != "" {
		a[attrPCIBusID] = kube.StringAttribute(pciBusID(g.PCIBusID))
	}
	if g.NUMANode >= 0 {
		a[attrNUMANode] = kube.IntAttribute(int64(g.NUMANode))
	}
	if g.PCIeRoot != "" {
		a[attrPCIeRoot] = kube.StringAttribute(g.PCIeRoot)
	}
	return a
}

func gpuDevice(inv *nvml.Inventory, g *nvml.GPU) kube.SliceDevice {
	a := common(inv, g)
	a["type"] = kube.StringAttribute("gpu")
	a["uuid"] = kube.StringAttribute(g.UUID)
	a["index"] = kube.IntAttribute(int64(g.Index))
	a["minor"] = kube.IntAttribute(int64(g.Minor))
	return kube.SliceDevice{
		Name:       fmt.Sprintf("gpu-%d", g.Minor),
		Attributes: a,
		Capacity:   map[string]kube.DeviceCapacity{"memory": {Value: strconv.FormatUint(g.MemoryBytes, 10)}},
	}
}

func migDevice(inv *nvml.Inventory, g *nvml.GPU, m *nvml.MIGDevice, name string) kube.SliceDevice {
	a := common(inv, g)
	a["type"] = kube.StringAttribute("mig")
	a["uuid"] = kube.StringAttribute(m.UUID)
	a["parentUUID"] = kube.StringAttribute(g.UUID)
	a["parentIndex"] = kube.IntAttribute(int64(g.Index))
	a["profile"] = kube.StringAttribute(m.Profile)
	capacity := map[string]kube.DeviceCapacity{"memory": {Value: strconv.FormatUint(m.MemoryBytes, 10)}}
	if at := m.Attributes; at != nil {
		for k, v := range map[string]uint32{
			"multiprocessors": at.Multiprocessors, "copyEngines": at.CopyEngines, "decoders": at.Decoders,
			"encoders": at.Encoders, "jpegEngines": at.JPEGs, "ofaEngines": at.OFAs,
		} {
			capacity[k] = kube.DeviceCapacity{Value: strconv.FormatUint(uint64(v), 10)}
		}
	}
	// The memory slices the GPU instance holds, one capacity each, as
	// NVIDIA's driver publishes them. Every MIG GPU so far has at most 8;
	// a placement beyond that is left out rather than push the device past
	// the API's 32 attributes and capacities.
	if p := m.Placement; p.Start >= 0 && p.Size > 0 && p.Start+p.Size <= maxMemorySlices {
		for i := p.Start; i < p.Start+p.Size; i++ {
			capacity["memorySlice"+strconv.Itoa(i)] = kube.DeviceCapacity{Value: "1"}
		}
	}
	return kube.SliceDevice{Name: name, Attributes: a, Capacity: capacity}
}

// maxMemorySlices bounds the memorySlice capacities of a MIG device.
const maxMemorySlices = 8

// semver pads a version to the three parts a version attribute needs
// ("12.4" → "12.4.0", "550.54.15" as is); "" stays "".
func semver(v string) string {
	if v == "" {
		return v
	}
	parts := strings.Split(v, ".")
	for len(parts) < 3 {
		parts = append(parts, "0")
	}
	for i, p := range parts[:3] {
		if n, err := strconv.Atoi(p); err == nil {
			parts[i] = strconv.Itoa(n) // no leading zeros: "535.04" → "535.4.0"
		}
	}
	return strings.Join(parts[:3], ".")
}

// pciBusID writes NVML's bus ID ("00000000:07:00.0") as the standard
// attribute does ("0000:07:00.0", lower case).
func pciBusID(id string) string {
	id = strings.ToLower(nvml.NormalizeBusID(id))
	if dom, rest, ok := strings.Cut(id, ":"); ok && len(dom) > 4 {
		id = dom[len(dom)-4:] + ":" + rest
	}
	return id
}
