package plugin

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"tags.cncf.io/container-device-interface/pkg/parser"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// CDI names, as NVIDIA's plugin writes them, so existing CDI specs and
// runtime configurations keep working.
const (
	CDIVendor = "k8s.device-plugin.nvidia.com"
	CDIClass  = "gpu"
)

// Environment and paths the NVIDIA container toolkit reads.
const (
	visibleDevicesEnv  = "NVIDIA_VISIBLE_DEVICES"
	volumeMountsRoot   = "/var/run/nvidia-container-devices"
	cdiAnnotationOwner = "gpu-plugin"
)

// ResponseOptions shape Allocate responses; they come from the config.
type ResponseOptions struct {
	ListStrategies      []string // envvar, volume-mounts, cdi-annotations, cdi-cri
	IDStrategy          string   // uuid or index
	PassDeviceSpecs     bool
	DevRoot             string // host root of /dev
	CDIAnnotationPrefix string
	GDRCopy, GDS, MOFED bool
	IMEXChannels        []int
}

// ResponseOptionsFrom extracts the Allocate options from a resolved config.
func ResponseOptionsFrom(c *config.Config) ResponseOptions {
	b := func(p *bool) bool { return p != nil && *p }
	return ResponseOptions{
		ListStrategies:      c.DeviceListStrategies(),
		IDStrategy:          c.DeviceIDStrategy(),
		PassDeviceSpecs:     c.PassDeviceSpecs(),
		DevRoot:             c.DevRoot(),
		CDIAnnotationPrefix: c.CDIAnnotationPrefix(),
		GDRCopy:             b(c.Flags.GDRCopyEnabled),
		GDS:                 b(c.Flags.GDSEnabled),
		MOFED:               b(c.Flags.MOFEDEnabled),
		IMEXChannels:        PresentIMEXChannels(c),
	}
}

// imexChannelDir holds the IMEX channel device nodes the driver creates.
const imexChannelDir = "/dev/nvidia-caps-imex-channels"

// IMEXChannelPath is channel n's device node, as containers see it.
func IMEXChannelPath(n int) string { return fmt.Sprintf("%s/channel%d", imexChannelDir, n) }

// IMEXChannels checks the configured IMEX channels (imex.channelIDs) as
// NVIDIA's plugin does at start: a channel is used only if its device node
// exists as a character device, looked up under the driver root as mounted
// in this container (--driver-root-ctr-path, when it has a dev directory)
// and at /dev. It returns the channels found and one error per channel
// missing; with imex.required, a missing channel is an error that must stop
// the start.
func IMEXChannels(c *config.Config) (present []int, missing []error, err error) {
	root := config.Deref(c.Plugin().ContainerDriverRoot)
	if fi, statErr := os.Stat(filepath.Join(root, "dev")); root == "" || statErr != nil || !fi.IsDir() {
		root = "/"
	}
	for _, ch := range c.IMEX.ChannelIDs {
		path := IMEXChannelPath(ch)
		if e := charDevice(filepath.Join(root, path), path); e != nil {
			if c.IMEX.Required != nil && *c.IMEX.Required {
				return nil, nil, fmt.Errorf("imex.required: IMEX channel %d is required but %v; create the channel (the driver's nvidia-caps-imex-channels), or set imex.required: false (--imex-required=false) to start without it", ch, e)
			}
			missing = append(missing, fmt.Errorf("IMEX channel %d is not injected: %w", ch, e))
			continue
		}
		present = append(present, ch)
	}
	return present, missing, nil
}

// PresentIMEXChannels is the channels IMEXChannels finds.
func PresentIMEXChannels(c *config.Config) []int {
	present, _, _ := IMEXChannels(c)
	return present
}

// charDevice reports why none of paths is a character device, or nil.
func charDevice(paths ...string) error {
	var why []string
	for _, p := range slices.Compact(paths) {
		fi, err := os.Stat(p)
		switch {
		case err != nil:
			why = append(why, err.Error())
		case fi.Mode()&os.ModeCharDevice == 0:
			why = append(why, p+" is not a character device")
		default:
			return nil
		}
	}
	return errors.New(strings.Join(why, "; "))
}

func (o ResponseOptions) has(strategy string) bool {
	return slices.Contains(o.ListStrategies, strategy)
}

// onlyCDI reports whether every selected strategy is a CDI one; then the
// runtime does all the work and no environment or mounts are returned.
func (o ResponseOptions) onlyCDI() bool {
	for _, s := range o.ListStrategies {
		if s != config.ListCDIAnnotations && s != config.ListCDICRI {
			return false
		}
	}
	return len(o.ListStrategies) > 0
}

// deviceName is how the runtime is told about a device.
func (o ResponseOptions) deviceName(d *sharing.Device) string {
	if o.IDStrategy == config.IDIndex {
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

	if o.has(config.ListCDIAnnotations) || o.has(config.ListCDICRI) {
		cdiNames := make([]string, 0, len(names)+4)
		for _, n := range names {
			cdiNames = append(cdiNames, parser.QualifiedName(CDIVendor, CDIClass, n))
		}
		cdiNames = append(cdiNames, o.cdiExtras()...)
		if o.has(config.ListCDIAnnotations) {
			key, err := o.cdiAnnotationKey()
			if err != nil {
				return nil, err
			}
			resp.Annotations = map[string]string{key: strings.Join(cdiNames, ",")}
		}
		if o.has(config.ListCDICRI) {
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
		if o.has(config.ListEnvvar) {
			env[visibleDevicesEnv] = strings.Join(names, ",")
			if len(o.IMEXChannels) > 0 {
				env["NVIDIA_IMEX_CHANNELS"] = joinInts(o.IMEXChannels)
			}
		}
		if o.has(config.ListVolumeMounts) {
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
		out = append(out, parser.QualifiedName(CDIVendor, "gdrcopy", "all"))
	}
	if o.GDS {
		out = append(out, parser.QualifiedName(CDIVendor, "gds", "all"))
	}
	if o.MOFED {
		out = append(out, parser.QualifiedName(CDIVendor, "mofed", "all"))
	}
	for _, ch := range o.IMEXChannels {
		out = append(out, parser.QualifiedName(CDIVendor, "imex-channel", strconv.Itoa(ch)))
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
	paths := []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}
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
		paths = append(paths, IMEXChannelPath(ch))
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
