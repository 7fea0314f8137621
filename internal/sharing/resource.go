// Package sharing turns the inventory and the configuration into the
// resources the node advertises: whole GPUs, MIG devices by strategy, and
// time-sliced replicas, with the device IDs the kubelet sees.
package sharing

import (
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// DefaultResourceName is what whole GPUs are advertised as.
const DefaultResourceName = "nvidia.com/gpu"

// ReplicaSeparator joins a physical ID and a replica number: "<id>::<n>".
// Third parties (dcgm-exporter) strip it to find the physical device, so the
// format is fixed.
const ReplicaSeparator = "::"

// Device is one schedulable unit advertised to the kubelet.
type Device struct {
	// ID is what the kubelet sees: "GPU-…", "MIG-…", or "<physical>::<n>".
	ID string
	// Physical is the GPU or MIG UUID behind ID.
	Physical string
	GPUIndex int
	GPUUUID  string
	// MIG is set for a MIG device (or a replica of one).
	MIG *nvml.MIGDevice
	// Replica is the replica number, or -1 for an unshared device.
	Replica  int
	NUMANode int // -1 when unknown
	Minor    int // the parent GPU's /dev/nvidia<minor>
	// MIGChildren are the MIG devices of a MIG-enabled GPU advertised whole
	// (migStrategy none): a fault on any of them makes the whole GPU unfit.
	MIGChildren []string
	// MPSUnit is the health unit of the MPS control daemon serving this
	// replica (MPSHealthUnit), "" when not shared through MPS.
	MPSUnit string
}

// IndexID is the device's name under the index ID strategy: the GPU's NVML
// index, or "<gpu>:<mig>" for a MIG device.
func (d *Device) IndexID() string {
	if d.MIG != nil {
		return fmt.Sprintf("%d:%d", d.GPUIndex, d.MIG.Index)
	}
	return strconv.Itoa(d.GPUIndex)
}

// HealthUnits are the health table keys whose health this device shares:
// its GPU, its MIG device if it is one, and the MIG devices inside it if it
// is a whole MIG-enabled GPU.
func (d *Device) HealthUnits() []string {
	var units []string
	if d.MIG != nil {
		units = []string{d.GPUUUID, d.MIG.UUID}
	} else {
		units = append([]string{d.GPUUUID}, d.MIGChildren...)
	}
	if d.MPSUnit != "" {
		units = append(units, d.MPSUnit)
	}
	return units
}

// Resource is one extended resource and its devices.
type Resource struct {
	Name    string // e.g. "nvidia.com/gpu"
	Devices []Device
	// Replicas is the time-slicing replica count per physical device; 0 when
	// the resource is not shared.
	Replicas int
	// FailRequestsGreaterThanOne rejects requests for more than one replica.
	FailRequestsGreaterThanOne bool
	// MPS: the replicas are shared through an MPS control daemon
	// (sharing.mps) rather than by time-slicing.
	MPS bool
	// AllocationPolicy is flags.plugin.sharedDevicesAllocationPolicy:
	// "distributed" or "packed"; GetPreferredAllocation uses it to choose
	// among replicas.
	AllocationPolicy string
	// Base is the resource the devices belong to before a time-slicing
	// rename, e.g. nvidia.com/gpu for nvidia.com/gpu.shared; Name otherwise.
	Base string

	byID map[string]int
}

// NewResource indexes devices for lookup.
func NewResource(name string, devices []Device) *Resource {
	r := &Resource{Name: name, Base: name, Devices: devices, byID: make(map[string]int, len(devices))}
	for i, d := range devices {
		r.byID[d.ID] = i
	}
	return r
}

// Lookup finds a device by the ID the kubelet uses.
func (r *Resource) Lookup(id string) (*Device, bool) {
	i, ok := r.byID[id]
	if !ok {
		return nil, false
	}
	return &r.Devices[i], true
}

// Shared reports whether the resource hands out replicas.
func (r *Resource) Shared() bool { return r.Replicas > 1 }

// SocketName is the resource's plugin socket file name, as NVIDIA's plugin
// names it: "nvidia-gpu.sock", "nvidia-mig-1g.10gb.sock"; names outside
// nvidia.com keep their domain: "example.com-gpu.sock".
func SocketName(resource string) string {
	if rest, ok := strings.CutPrefix(resource, "nvidia.com/"); ok {
		return "nvidia-" + rest + ".sock"
	}
	return strings.ReplaceAll(resource, "/", "-") + ".sock"
}

// SplitReplicaID splits "<physical>::<n>"; replica is -1 for a plain ID.
// n must be written as Build writes it (no sign, no leading zeros), so that
// one replica has one ID.
func SplitReplicaID(id string) (physical string, replica int, err error) {
	base, num, found := strings.Cut(id, ReplicaSeparator)
	if !found {
		return id, -1, nil
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 0 || base == "" || strconv.Itoa(n) != num {
		return "", 0, fmt.Errorf("bad replica device ID %q: want <id>::<n> with n a decimal number ≥ 0 without sign or leading zeros", id)
	}
	return base, n, nil
}

// Equal reports whether two resources advertise the same thing: the same
// devices with everything Allocate, ListAndWatch, placement and health read
// from them, and the same sharing settings. It is the one definition of a
// resource having "changed", for the log and for what is re-sent to the
// kubelet.
func (r *Resource) Equal(o *Resource) bool {
	return r.Name == o.Name && r.Replicas == o.Replicas && r.FailRequestsGreaterThanOne == o.FailRequestsGreaterThanOne && r.MPS == o.MPS &&
		r.AllocationPolicy == o.AllocationPolicy && r.Base == o.Base &&
		slices.EqualFunc(r.Devices, o.Devices, sameDevice)
}

func sameDevice(x, y Device) bool {
	sameMIG := (x.MIG == nil) == (y.MIG == nil) && (x.MIG == nil || reflect.DeepEqual(*x.MIG, *y.MIG))
	return x.ID == y.ID && x.Physical == y.Physical && x.GPUIndex == y.GPUIndex && x.GPUUUID == y.GPUUUID &&
		x.Replica == y.Replica && x.NUMANode == y.NUMANode && x.Minor == y.Minor && sameMIG &&
		slices.Equal(x.MIGChildren, y.MIGChildren) && x.MPSUnit == y.MPSUnit
}
