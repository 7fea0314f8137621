package plugin

import (
	"crypto/rand"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Environment and paths the NVIDIA container toolkit reads.
const (
	visibleDevicesEnv  = "NVIDIA_VISIBLE_DEVICES"
	volumeMountsRoot   = "/var/run/nvidia-container-devices"
	cdiAnnotationOwner = "gpu-plugin"
)

// ResponseOptions shape Allocate responses. The advertisement stage
// (internal/advert) derives them from the config.
type ResponseOptions struct {
	// The device list strategies: how the allocated devices reach the
	// runtime. Several may be on.
	Envvar, VolumeMounts, CDIAnnotations, CDICRI bool
	// IndexIDs names devices by index ("0", "1:2") instead of UUID
	// (--device-id-strategy=index).
	IndexIDs        bool
	PassDeviceSpecs bool
	DevRoot         string // host root of /dev, for PassDeviceSpecs
	// ControlNodes are the control device nodes passed with
	// PassDeviceSpecs besides the devices' own (/dev/nvidiactl, …).
	ControlNodes        []string
	CDIAnnotationPrefix string
	GDRCopy, GDS, MOFED bool
	IMEXChannels        []int
	// MPSRoot is --mps-root, the host directory of the MPS control
	// daemons, for replicas of resources shared through MPS.
	MPSRoot string
}

// MPSContainerRoot is where an MPS client container finds its resource's
// pipe directory, as NVIDIA's plugin mounts it: /mps/<resource>/pipe.
const MPSContainerRoot = "/mps"

// MPSPipeDir is a resource's MPS pipe directory under root:
// <root>/nvidia.com/gpu/pipe, the resource name kept whole as NVIDIA's
// plugin keeps it.
func MPSPipeDir(root, resource string) string { return filepath.Join(root, resource, "pipe") }

// MPSShmDir is the MPS shared-memory directory under root, one for every
// resource: clients get it as /dev/shm.
func MPSShmDir(root string) string { return filepath.Join(root, "shm") }

// addMPS gives an MPS replica's container what NVIDIA's plugin gives it:
// the pipe directory in CUDA_MPS_PIPE_DIRECTORY, and mounts of the pipe
// directory and the MPS shared memory (at /dev/shm). It applies whatever
// the device list strategy, CDI-only included.
func (o ResponseOptions) addMPS(resp *pluginapi.ContainerAllocateResponse, resource string) {
	pipe := MPSPipeDir(MPSContainerRoot, resource)
	if resp.Envs == nil {
		resp.Envs = map[string]string{}
	}
	resp.Envs["CUDA_MPS_PIPE_DIRECTORY"] = pipe
	resp.Mounts = append(resp.Mounts,
		&pluginapi.Mount{ContainerPath: pipe, HostPath: MPSPipeDir(o.MPSRoot, resource)},
		&pluginapi.Mount{ContainerPath: "/dev/shm", HostPath: MPSShmDir(o.MPSRoot)},
	)
}

// onlyCDI reports whether every selected strategy is a CDI one; then the
// runtime does all the work and no environment or mounts are returned.
func (o ResponseOptions) onlyCDI() bool {
	return (o.CDIAnnotations || o.CDICRI) && !o.Envvar && !o.VolumeMounts
}

// deviceName is how the runtime is told about a device.
func (o ResponseOptions) deviceName(d *sharing.Device) string {
	if o.IndexIDs {
		return d.IndexID()
	}
	return d.Physical
}

// containerResponse builds one container's allocation from its devices,
// already de-duplicated to physical devices.
func (o ResponseOptions) containerResponse(devices []*sharing.Device) (*pluginapi.ContainerAllocateResponse, error) {
	resp := &pluginapi.ContainerAllocateResponse{}
	names := make([]string, len(devices))
	for i, d := range devices {
		names[i] = o.deviceName(d)
	}

	if o.CDIAnnotations || o.CDICRI {
		cdiNames := make([]string, 0, len(names)+4)
		for _, n := range names {
			cdiNames = append(cdiNames, cdi.QualifiedName(cdi.Class, n))
		}
		cdiNames = append(cdiNames, o.cdiExtras()...)
		if o.CDIAnnotations {
			key, err := o.cdiAnnotationKey()
			if err != nil {
				return nil, err
			}
			resp.Annotations = map[string]string{key: strings.Join(cdiNames, ",")}
		}
		if o.CDICRI {
			for _, n := range cdiNames {
				resp.CdiDevices = append(resp.CdiDevices, &pluginapi.CDIDevice{Name: n})
			}
		}
	}
	env := map[string]string{}
	if o.GDRCopy {
		env["NVIDIA_GDRCOPY"] = "enabled"
	}
	if o.GDS {
		env["NVIDIA_GDS"] = "enabled"
	}
	if o.MOFED {
		env["NVIDIA_MOFED"] = "enabled"
	}
	if !o.onlyCDI() {
		if o.Envvar {
			env[visibleDevicesEnv] = strings.Join(names, ",")
			if len(o.IMEXChannels) > 0 {
				env["NVIDIA_IMEX_CHANNELS"] = joinInts(o.IMEXChannels)
			}
		}
		if o.VolumeMounts {
			env[visibleDevicesEnv] = volumeMountsRoot
			for _, n := range names {
				resp.Mounts = append(resp.Mounts, &pluginapi.Mount{
					HostPath: "/dev/null", ContainerPath: filepath.Join(volumeMountsRoot, n), ReadOnly: true,
				})
			}
			for _, ch := range o.IMEXChannels {
				resp.Mounts = append(resp.Mounts, &pluginapi.Mount{
					HostPath: "/dev/null", ContainerPath: filepath.Join(volumeMountsRoot, "imex", strconv.Itoa(ch)), ReadOnly: true,
				})
			}
		}
		if o.PassDeviceSpecs {
			resp.Devices = o.deviceSpecs(devices)
		}
	}
	if len(env) > 0 {
		resp.Envs = env
	}
	return resp, nil
}

// cdiExtras are the optional CDI devices NVIDIA's plugin adds.
func (o ResponseOptions) cdiExtras() []string {
	var out []string
	if o.GDRCopy {
		out = append(out, cdi.QualifiedName(cdi.GDRCopyClass, "all"))
	}
	if o.GDS {
		out = append(out, cdi.QualifiedName(cdi.GDSClass, "all"))
	}
	if o.MOFED {
		out = append(out, cdi.QualifiedName(cdi.MOFEDClass, "all"))
	}
	for _, ch := range o.IMEXChannels {
		out = append(out, cdi.QualifiedName(cdi.IMEXClass, strconv.Itoa(ch)))
	}
	return out
}

// cdiAnnotationKey is unique per response, as the CDI annotation scheme
// requires one key per plugin and request.
func (o ResponseOptions) cdiAnnotationKey() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generating a CDI annotation key: %w", err)
	}
	return fmt.Sprintf("%s%s_%x-%x-%x-%x-%x", o.CDIAnnotationPrefix, cdiAnnotationOwner, b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

// deviceSpecs lists the device nodes a container needs when the runtime is
// not told to add them (passDeviceSpecs, for the CPU manager's static
// policy, which re-creates containers without the runtime's help).
func (o ResponseOptions) deviceSpecs(devices []*sharing.Device) []*pluginapi.DeviceSpec {
	paths := slices.Clone(o.ControlNodes)
	seen := map[int]bool{}
	seenCap := map[string]bool{}
	for _, d := range devices {
		if d.Minor >= 0 && !seen[d.Minor] {
			seen[d.Minor] = true
			paths = append(paths, fmt.Sprintf("/dev/nvidia%d", d.Minor))
		}
		// MIG caps (issue 16): a MIG device also needs its GPU and compute
		// instances' /dev/nvidia-caps/nvidia-cap<N> nodes.
		if d.MIG != nil {
			for _, c := range d.MIG.CapDevicePaths {
				if !seenCap[c] {
					seenCap[c] = true
					paths = append(paths, c)
				}
			}
		}
	}
	for _, ch := range o.IMEXChannels {
		paths = append(paths, cdi.IMEXChannelPath(ch))
	}
	specs := make([]*pluginapi.DeviceSpec, len(paths))
	for i, p := range paths {
		specs[i] = &pluginapi.DeviceSpec{ContainerPath: p, HostPath: filepath.Join(o.DevRoot, p), Permissions: "rw"}
	}
	return specs
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}
