package config

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// Allowed values of the enumerated file fields.
var (
	MigStrategies        = []string{MigNone, MigSingle, MigMixed}
	ListStrategies       = []string{ListEnvvar, ListVolumeMounts, ListCDIAnnotations, ListCDICRI}
	IDStrategies         = []string{IDUUID, IDIndex}
	AllocationPolicies   = []string{PolicyDistributed, PolicyPacked}
	DiscoveryStrategies  = []string{"auto", "nvml", "tegra"}
	defaultResourceRealm = "nvidia.com"
)

// Shared device allocation policies (flags.plugin.sharedDevicesAllocationPolicy).
const (
	// PolicyDistributed prefers replicas of the least used GPUs.
	PolicyDistributed = "distributed"
	// PolicyPacked prefers replicas of the most used GPUs.
	PolicyPacked = "packed"
)

// defaultCTKPath is --nvidia-cdi-hook-path's default; another value was set
// on purpose.
const defaultCTKPath = "/usr/bin/nvidia-ctk"

// SharedSuffix is what renameByDefault appends to a shared resource's name.
const SharedSuffix = ".shared"

// MaxResourceNameLength bounds a qualified resource name, as Kubernetes does.
const MaxResourceNameLength = 253

var (
	dnsSubdomainRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	qualifiedRE    = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
)

// NormalizeResourceName qualifies a bare name with nvidia.com/ (as NVIDIA's
// plugin does: "gpu" is "nvidia.com/gpu") and checks it is a valid
// Kubernetes extended resource name.
func NormalizeResourceName(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("required: a resource name such as nvidia.com/gpu")
	}
	if !strings.Contains(name, "/") {
		name = defaultResourceRealm + "/" + name
	}
	domain, local, _ := strings.Cut(name, "/")
	switch {
	case len(name) > MaxResourceNameLength:
		return "", fmt.Errorf("%s is longer than %d characters", quote(name), MaxResourceNameLength)
	case !dnsSubdomainRE.MatchString(domain):
		return "", fmt.Errorf("%s: the domain %s must be lower-case letters, digits, '-' and '.'", quote(name), quote(domain))
	case domain == "kubernetes.io" || strings.HasSuffix(domain, ".kubernetes.io"):
		return "", fmt.Errorf("%s: extended resources may not use the kubernetes.io domain", quote(name))
	case len(local) > 63 || !qualifiedRE.MatchString(local):
		return "", fmt.Errorf("%s: the part after the '/' must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", quote(name))
	}
	return name, nil
}

// validateFile checks the file's values (types were checked while parsing)
// and normalises resource names in place. Errors name the field and what
// it accepts.
func (c *Config) validateFile() error {
	oneOf := func(path, v string, allowed []string) error {
		if v != "" && !slices.Contains(allowed, v) {
			return fieldErr(path, "%s is not one of %s", quote(v), strings.Join(allowed, ", "))
		}
		return nil
	}
	f := c.Flags
	if err := oneOf("flags.migStrategy", Deref(f.MigStrategy), MigStrategies); err != nil {
		return err
	}
	if err := oneOf("flags.deviceDiscoveryStrategy", Deref(f.DeviceDiscoveryStrategy), DiscoveryStrategies); err != nil {
		return err
	}
	if p := f.Plugin; p != nil {
		if p.DeviceListStrategy != nil {
			if len(*p.DeviceListStrategy) == 0 {
				return fieldErr("flags.plugin.deviceListStrategy", "empty; choose at least one of %s", strings.Join(ListStrategies, ", "))
			}
			for i, s := range *p.DeviceListStrategy {
				if err := oneOf(fmt.Sprintf("flags.plugin.deviceListStrategy[%d]", i), s, ListStrategies); err != nil {
					return err
				}
			}
		}
		if err := oneOf("flags.plugin.deviceIDStrategy", Deref(p.DeviceIDStrategy), IDStrategies); err != nil {
			return err
		}
		if err := oneOf("flags.plugin.sharedDevicesAllocationPolicy", Deref(p.SharedDevicesAllocationPolicy), AllocationPolicies); err != nil {
			return err
		}
	}
	if r := c.Resources; r != nil {
		for _, group := range []struct {
			path string
			list []Resource
		}{{"resources.gpus", r.GPUs}, {"resources.mig", r.MIGs}} {
			for i := range group.list {
				e := &group.list[i]
				path := fmt.Sprintf("%s[%d]", group.path, i)
				if e.Pattern == "" {
					return fieldErr(path+".pattern", "required: a product name (gpus) or MIG profile (mig) pattern; '*' matches any run of characters")
				}
				name, err := NormalizeResourceName(e.Name)
				if err != nil {
					return fieldErr(path+".name", "%v", err)
				}
				e.Name = name
			}
		}
	}
	if ts := c.Sharing.TimeSlicing; ts != nil {
		if len(ts.Resources) == 0 {
			return fieldErr("sharing.timeSlicing.resources", "no resources listed (NVIDIA's plugin refuses this too): list the resources to share, e.g. [{name: nvidia.com/gpu, replicas: 2}], or remove sharing.timeSlicing")
		}
		if err := ts.validate("sharing.timeSlicing"); err != nil {
			return err
		}
	}
	if m := c.Sharing.MPS; m != nil {
		if len(m.Resources) == 0 {
			return fieldErr("sharing.mps.resources", "no resources listed (NVIDIA's plugin refuses this too): list the resources to share, e.g. [{name: nvidia.com/gpu, replicas: 2}], or remove sharing.mps")
		}
		if err := m.validate("sharing.mps"); err != nil {
			return err
		}
	}
	for i, ch := range c.IMEX.ChannelIDs {
		if ch != 0 {
			return fieldErr(fmt.Sprintf("imex.channelIDs[%d]", i), "%d is not supported: only channel 0 (channelIDs: [0]) or none ([])", ch)
		}
	}
	if len(c.IMEX.ChannelIDs) > 1 {
		return fieldErr("imex.channelIDs", "%v: only one channel, 0, is supported (channelIDs: [0]) or none ([])", c.IMEX.ChannelIDs)
	}
	return nil
}

func (rr *ReplicatedResources) validate(path string) error {
	for i := range rr.Resources {
		r := &rr.Resources[i]
		p := fmt.Sprintf("%s.resources[%d]", path, i)
		name, err := NormalizeResourceName(r.Name)
		if err != nil {
			return fieldErr(p+".name", "%v", err)
		}
		r.Name = name
		if r.Rename != "" {
			if r.Rename, err = NormalizeResourceName(r.Rename); err != nil {
				return fieldErr(p+".rename", "%v", err)
			}
		}
		if r.Replicas < 2 {
			return fieldErr(p+".replicas", "%d is not allowed: want a whole number of 2 or more (how many containers share each device); remove the entry to stop sharing %s", r.Replicas, r.Name)
		}
		if r.Replicas > MaxReplicas {
			return fieldErr(p+".replicas", "%d is too many: at most %d (one resource may advertise at most %d devices, replicas × devices, safely under what the kubelet takes in one message)", r.Replicas, MaxReplicas, MaxDevicesPerResource)
		}
		// A resource listed twice: NVIDIA's plugin gives each device the
		// larger replica count (compat.go does the same, with a warning);
		// with resource customization the entries must name different
		// devices, which the sharing package checks on the node.
	}
	return nil
}

// SharedName is the name a shared resource is advertised under: rename if
// set, else name with ".shared" when renameByDefault, else name.
func (rr *ReplicatedResources) SharedName(r ReplicatedResource) string {
	switch {
	case r.Rename != "":
		return r.Rename
	case rr.RenameByDefault:
		return r.Name + SharedSuffix
	}
	return r.Name
}

// Warnings lists every setting that is accepted but has no effect, so that
// nothing is ignored silently. Each names its field.
func (c *Config) Warnings() []string {
	var w []string
	w = append(w, c.parseWarnings...)
	w = append(w, c.compatWarnings...)
	if g := c.Flags.GFD; g != nil {
		for _, f := range []struct {
			name string
			set  bool
		}{
			// noTimestamp and machineTypeFile apply to the node labels.
			{"oneshot", g.Oneshot != nil}, {"sleepInterval", g.SleepInterval != nil}, {"outputFile", g.OutputFile != nil},
		} {
			if f.set {
				w = append(w, fmt.Sprintf("flags.gfd.%s: read by NVIDIA's gpu-feature-discovery only; gpu-plugin writes node labels itself whenever they change (--node-labels, --labels-file); ignored", f.name))
			}
		}
	}
	return w
}
