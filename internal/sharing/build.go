package sharing

import (
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Options are the parts of the configuration that shape resources.
type Options struct {
	MigStrategy string // none, single or mixed; "" is none
	// GPUNames and MIGNames are the file's resources.gpus and resources.mig:
	// the first rule whose pattern matches a GPU's product name (or a MIG
	// device's profile) names its resource. The defaults apply after them:
	// nvidia.com/gpu for GPUs, nvidia.com/mig-<profile> (mixed) or
	// nvidia.com/gpu (single) for MIG devices.
	GPUNames, MIGNames []NameRule
	// Replicated is the sharing section in force (sharing.mps when
	// present, else sharing.timeSlicing), validated by config, and
	// ReplicatedPath its field path for messages ("" reads as
	// sharing.timeSlicing).
	Replicated     *config.ReplicatedResources
	ReplicatedPath string
	// MPS shares the replicated resources through MPS rather than by
	// time-slicing: whole GPUs only, at most MaxMPSClients replicas each.
	MPS bool
	// AllocationPolicy is copied to every resource (see
	// Resource.AllocationPolicy).
	AllocationPolicy string
}

// NameRule maps devices whose product name or MIG profile matches Pattern
// ('*' matches any run of characters; the whole name must match) to the
// resource Name.
type NameRule struct {
	Pattern string
	Name    string
}

// OptionsFrom takes the sharing options from a resolved configuration.
func OptionsFrom(c *config.Config) Options {
	rr, path := c.ReplicatedSharing()
	o := Options{
		MigStrategy:      c.MigStrategy(),
		Replicated:       rr,
		ReplicatedPath:   path,
		MPS:              c.UsesMPS(),
		AllocationPolicy: config.Deref(c.Plugin().SharedDevicesAllocationPolicy),
	}
	if r := c.Resources; r != nil {
		for _, g := range r.GPUs {
			o.GPUNames = append(o.GPUNames, NameRule{Pattern: g.Pattern, Name: g.Name})
		}
		for _, m := range r.MIGs {
			o.MIGNames = append(o.MIGNames, NameRule{Pattern: m.Pattern, Name: m.Name})
		}
	}
	return o
}

// Plan is what Build derives: the resources, and warnings about devices or
// settings that could not be applied on this node (each names its device
// or field).
type Plan struct {
	Resources []*Resource
	Warnings  []string
}

// Build derives the node's resources from the inventory. GPUs that could
// not be identified are left out (the health table reports them).
func Build(inv *nvml.Inventory, opts Options) ([]*Resource, error) {
	p, err := NewPlan(inv, opts)
	if err != nil {
		return nil, err
	}
	return p.Resources, nil
}

// NewPlan derives the resources and says what it could not apply. Errors
// name the GPU or the config field at fault and how to fix it.
func NewPlan(inv *nvml.Inventory, opts Options) (*Plan, error) {
	b := &builder{opts: opts, plan: &Plan{}, base: map[string][]Device{}, gpus: map[string]*nvml.GPU{}}
	var gpus []*nvml.GPU
	if inv != nil {
		for i := range inv.GPUs {
			if inv.GPUs[i].Usable() {
				gpus = append(gpus, &inv.GPUs[i])
				b.gpus[inv.GPUs[i].UUID] = &inv.GPUs[i]
			}
		}
	}
	switch opts.MigStrategy {
	case "", config.MigNone:
		for _, g := range gpus {
			b.addGPU(g)
		}
	case config.MigSingle:
		if err := b.single(gpus); err != nil {
			return nil, err
		}
	case config.MigMixed:
		b.mixed(gpus)
	default:
		return nil, fmt.Errorf("mig-strategy %q is not one of %s", opts.MigStrategy, strings.Join(config.MigStrategies, ", "))
	}
	if err := b.share(); err != nil {
		return nil, err
	}
	for _, r := range b.plan.Resources {
		if len(r.Devices) > config.MaxDevicesPerResource {
			return nil, fmt.Errorf("%s would have %d devices, more than the %d one resource may advertise (the kubelet drops a longer list: its gRPC message limit is 4 MiB)", r.Name, len(r.Devices), config.MaxDevicesPerResource)
		}
	}
	return b.plan, nil
}

type builder struct {
	opts  Options
	plan  *Plan
	base  map[string][]Device // resource name → devices, before sharing
	order []string            // base names in first-seen order
	gpus  map[string]*nvml.GPU
}

func (b *builder) warn(format string, args ...any) {
	b.plan.Warnings = append(b.plan.Warnings, fmt.Sprintf(format, args...))
}

func (b *builder) add(name string, d Device) {
	if _, ok := b.base[name]; !ok {
		b.order = append(b.order, name)
	}
	b.base[name] = append(b.base[name], d)
}

func gpuLabel(g *nvml.GPU) string { return fmt.Sprintf("GPU %d (%s)", g.Index, g.UUID) }

func (b *builder) addGPU(g *nvml.GPU) {
	var children []string
	for _, m := range g.MIGDevices {
		children = append(children, m.UUID)
	}
	b.add(b.gpuName(g.Name), Device{
		ID: g.UUID, Physical: g.UUID, GPUIndex: g.Index, GPUUUID: g.UUID,
		Replica: -1, NUMANode: g.NUMANode, Minor: g.Minor, MIGChildren: children,
	})
}

func migDevice(g *nvml.GPU, m nvml.MIGDevice) Device {
	return Device{
		ID: m.UUID, Physical: m.UUID, GPUIndex: g.Index, GPUUUID: g.UUID, MIG: &m,
		Replica: -1, NUMANode: g.NUMANode, Minor: g.Minor,
	}
}

// gpuName names a whole GPU's resource from its product name. The name is
// matched as NVML reports it ("NVIDIA A100-SXM4-40GB") and without the
// "NVIDIA " prefix, so both spellings of a pattern work.
func (b *builder) gpuName(product string) string {
	short := strings.TrimPrefix(product, "NVIDIA ")
	for _, r := range b.opts.GPUNames {
		if Match(r.Pattern, product) || Match(r.Pattern, short) {
			return r.Name
		}
	}
	return DefaultResourceName
}

// subdivided matches compute-instance-subdivided profiles ("1c.3g.20gb"),
// which NVIDIA's plugin advertises under no default name.
var subdivided = regexp.MustCompile(`^[0-9]+c\.`)

// migName names a MIG device's resource from its profile, "" for none.
func (b *builder) migName(profile string, single bool) string {
	for _, r := range b.opts.MIGNames {
		if Match(r.Pattern, profile) {
			return r.Name
		}
	}
	switch {
	case single:
		return DefaultResourceName
	case subdivided.MatchString(profile):
		return ""
	}
	return MIGResourceName(profile)
}

// MIGResourceName is NVIDIA's resource name for a MIG profile under the
// mixed strategy: "1g.10gb" → nvidia.com/mig-1g.10gb, "1g.10gb+me" →
// nvidia.com/mig-1g.10gb.me.
func MIGResourceName(profile string) string {
	return "nvidia.com/mig-" + strings.ReplaceAll(profile, "+", ".")
}

// single advertises MIG devices as nvidia.com/gpu, which is only meaningful
// when every GPU is partitioned into devices of one profile.
func (b *builder) single(gpus []*nvml.GPU) error {
	var on, off []*nvml.GPU
	for _, g := range gpus {
		if g.MIGEnabled {
			on = append(on, g)
		} else {
			off = append(off, g)
		}
	}
	if len(on) == 0 {
		for _, g := range gpus {
			b.addGPU(g)
		}
		return nil
	}
	const fix = "re-partition the GPUs (e.g. with mig-parted), or use --mig-strategy=mixed"
	if len(off) > 0 {
		return fmt.Errorf("mig-strategy single needs every GPU in the same MIG mode, but %s has MIG disabled while %s has it enabled: %s",
			gpuLabel(off[0]), gpuLabel(on[0]), fix)
	}
	var want string
	var first *nvml.GPU
	for _, g := range on {
		if len(g.MIGDevices) == 0 {
			return fmt.Errorf("mig-strategy single: %s has MIG enabled but no MIG devices: %s", gpuLabel(g), fix)
		}
		for _, m := range g.MIGDevices {
			if want == "" {
				want, first = m.Profile, g
			}
			if m.Profile != want {
				return fmt.Errorf("mig-strategy single needs one MIG profile on every GPU, but %s has %s while %s has %s: %s",
					gpuLabel(g), profileList(g), gpuLabel(first), want, fix)
			}
		}
	}
	for _, g := range on {
		for _, m := range g.MIGDevices {
			b.add(b.migName(m.Profile, true), migDevice(g, m))
		}
	}
	return nil
}

func profileList(g *nvml.GPU) string {
	p := make([]string, len(g.MIGDevices))
	for i, m := range g.MIGDevices {
		p[i] = m.Profile
	}
	return strings.Join(p, ", ")
}

// mixed advertises whole GPUs and one resource per MIG profile.
func (b *builder) mixed(gpus []*nvml.GPU) {
	for _, g := range gpus {
		if !g.MIGEnabled {
			b.addGPU(g)
			continue
		}
		if len(g.MIGDevices) == 0 {
			b.warn("%s has MIG enabled but no MIG devices: it offers nothing until it is partitioned", gpuLabel(g))
		}
		for _, m := range g.MIGDevices {
			name := b.migName(m.Profile, false)
			if name == "" {
				b.warn("%s MIG device %d (%s) has profile %s, which no resource name matches (compute-instance subdivisions have no default name; with --resource-customization a resources.mig rule can name them): not advertised, as by NVIDIA's plugin",
					gpuLabel(g), m.Index, m.UUID, m.Profile)
				continue
			}
			b.add(name, migDevice(g, m))
		}
	}
}

// share applies sharing.timeSlicing: the selected devices of each listed
// resource become replicas under the shared name; the others stay as they
// are under the resource's own name.
func (b *builder) share() error {
	ts := b.opts.Replicated
	section := b.opts.ReplicatedPath
	if section == "" {
		section = "sharing.timeSlicing"
	}
	if b.opts.MPS {
		if err := b.checkMPS(section); err != nil {
			return err
		}
	}
	remaining := make(map[string][]Device, len(b.base))
	for name, devs := range b.base {
		remaining[name] = devs
	}
	type sharedOut struct {
		res   *Resource
		field string
		taken int
	}
	var shared []*sharedOut
	byName := map[string]*sharedOut{}
	takenBy := map[string]string{} // physical ID → field
	if ts != nil {
		for k, e := range ts.Resources {
			field := fmt.Sprintf("%s.resources[%d]", section, k)
			devs := b.base[e.Name]
			if len(devs) == 0 {
				b.warn("%s: this node has no %s devices (mig-strategy %s); nothing shared for it", field, e.Name, strategyName(b.opts.MigStrategy))
				continue
			}
			sel, err := selectDevices(devs, e.Devices, field+".devices", e.Name)
			if err != nil {
				return err
			}
			for _, d := range sel {
				if prev, ok := takenBy[d.ID]; ok {
					return &config.FieldError{Path: field + ".devices", Msg: fmt.Sprintf("%s (%s) is already shared by %s; each device may be shared by one entry", d.IndexID(), d.ID, prev)}
				}
				takenBy[d.ID] = field
			}
			out := ts.SharedName(e)
			if prev, ok := byName[out]; ok {
				return &config.FieldError{Path: field, Msg: fmt.Sprintf("shares under the name %s, as %s does; give each entry its own rename", out, prev.field)}
			}
			// Bound the list before building it: replicas comes from a
			// file, and the kubelet takes at most so many devices anyway.
			if e.Replicas < 2 || e.Replicas > config.MaxReplicas {
				return &config.FieldError{Path: field + ".replicas", Msg: fmt.Sprintf("%d is not allowed: want 2 to %d", e.Replicas, config.MaxReplicas)}
			}
			if total := int64(len(sel)) * int64(e.Replicas); total > config.MaxDevicesPerResource {
				return &config.FieldError{Path: field + ".replicas", Msg: fmt.Sprintf(
					"%d replicas × %d %s devices = %d devices, more than the %d one resource may advertise (the kubelet drops a longer list: its gRPC message limit is 4 MiB); lower replicas to at most %d",
					e.Replicas, len(sel), e.Name, total, config.MaxDevicesPerResource, config.MaxDevicesPerResource/len(sel))}
			}
			if b.opts.MPS {
				if err := b.checkMPSReplicas(sel, e.Replicas, field+".replicas"); err != nil {
					return err
				}
			}
			replicas := make([]Device, 0, len(sel)*e.Replicas)
			for _, d := range sel {
				for n := 0; n < e.Replicas; n++ {
					r := d
					r.ID = d.ID + ReplicaSeparator + strconv.Itoa(n)
					r.Replica = n
					if b.opts.MPS {
						r.MPSUnit = MPSHealthUnit(out)
					}
					replicas = append(replicas, r)
				}
			}
			res := NewResource(out, replicas)
			res.Base = e.Name
			res.Replicas = e.Replicas
			res.MPS = b.opts.MPS
			res.FailRequestsGreaterThanOne = ts.FailRequestsGreaterThanOne != nil && *ts.FailRequestsGreaterThanOne
			s := &sharedOut{res: res, field: field, taken: len(sel)}
			shared = append(shared, s)
			byName[out] = s
			remaining[e.Name] = slices.DeleteFunc(slices.Clone(remaining[e.Name]), func(d Device) bool { return takenBy[d.ID] == field })
		}
	}
	for _, s := range shared {
		left := remaining[s.res.Name]
		if len(left) == 0 {
			continue
		}
		if s.res.Name == s.res.Base {
			return &config.FieldError{Path: s.field + ".devices", Msg: fmt.Sprintf(
				"shares %d of the %d %s devices without renaming them, so %s would mix %d unshared devices with replicas and a pod could not tell which it gets: set rename (e.g. rename: %s%s), renameByDefault: true, or devices: all",
				s.taken, s.taken+len(left), s.res.Base, s.res.Name, len(left), s.res.Base, config.SharedSuffix)}
		}
		return &config.FieldError{Path: s.field + ".rename", Msg: fmt.Sprintf(
			"%s is already the name of %d unshared devices on this node; choose another name", s.res.Name, len(left))}
	}
	for _, name := range b.order {
		if devs := remaining[name]; len(devs) > 0 {
			b.plan.Resources = append(b.plan.Resources, NewResource(name, devs))
		}
	}
	for _, s := range shared {
		b.plan.Resources = append(b.plan.Resources, s.res)
	}
	for _, r := range b.plan.Resources {
		r.AllocationPolicy = b.opts.AllocationPolicy
	}
	sort.Slice(b.plan.Resources, func(i, j int) bool { return b.plan.Resources[i].Name < b.plan.Resources[j].Name })
	return nil
}

// checkMPS refuses MIG devices on a node that shares through MPS, as
// NVIDIA's plugin does: MPS shares whole GPUs only.
func (b *builder) checkMPS(section string) error {
	for _, name := range b.order {
		for _, d := range b.base[name] {
			if d.MIG != nil {
				return &config.FieldError{Path: section, Msg: fmt.Sprintf(
					"MPS shares whole GPUs only, but %s is MIG device %s of GPU %d (%s, mig-strategy %s; NVIDIA's plugin refuses this too): use mig-strategy none on GPUs without MIG, or share MIG devices with sharing.timeSlicing",
					name, d.IndexID(), d.GPUIndex, d.ID, strategyName(b.opts.MigStrategy))}
			}
		}
	}
	return nil
}

// checkMPSReplicas refuses more replicas than an MPS server takes clients
// on a GPU, as NVIDIA's MPS control daemon does.
func (b *builder) checkMPSReplicas(devs []Device, replicas int, field string) error {
	for _, d := range devs {
		g := b.gpus[d.GPUUUID]
		if g == nil {
			continue
		}
		if most := MaxMPSClients(g.ComputeCapability); replicas > most {
			return &config.FieldError{Path: field, Msg: fmt.Sprintf(
				"%d is more than the %d clients an MPS server takes on GPU %d (%s, compute capability %s; NVIDIA's plugin refuses this too): lower replicas to at most %d",
				replicas, most, g.Index, g.UUID, g.ComputeCapability, most)}
		}
	}
	return nil
}

// MaxMPSClients is how many client contexts one MPS server takes on a GPU
// of this compute capability: 48 from 7.5 on, 16 before, the limits
// NVIDIA's MPS control daemon enforces.
func MaxMPSClients(cc nvml.ComputeCapability) int {
	if cc.Major > 7 || (cc.Major == 7 && cc.Minor >= 5) {
		return 48
	}
	return 16
}

// MPSHealthUnit is the health table key of a resource's MPS control
// daemon: every replica of the resource is unfit while it is not ready.
func MPSHealthUnit(resource string) string { return "mps:" + resource }

func strategyName(s string) string {
	if s == "" {
		return config.MigNone
	}
	return s
}

// selectDevices picks the devices a shared resource's `devices` field names,
// in the resource's device order.
func selectDevices(devs []Device, sel *config.Devices, path, resource string) ([]Device, error) {
	switch {
	case sel == nil || sel.All:
		return devs, nil
	case sel.Count > 0:
		if sel.Count > len(devs) {
			return nil, &config.FieldError{Path: path, Msg: fmt.Sprintf("%d, but this node has %d %s devices: want 1..%d or \"all\"", sel.Count, len(devs), resource, len(devs))}
		}
		return devs[:sel.Count], nil
	}
	picked := make([]bool, len(devs))
	for i, ref := range sel.List {
		k := findDevice(devs, ref)
		if k < 0 {
			return nil, &config.FieldError{Path: fmt.Sprintf("%s[%d]", path, i), Msg: noMatch(devs, ref, resource)}
		}
		if picked[k] {
			return nil, &config.FieldError{Path: fmt.Sprintf("%s[%d]", path, i), Msg: fmt.Sprintf("%s names %s, which an earlier entry already names", config.Quote(ref), devs[k].IndexID())}
		}
		picked[k] = true
	}
	var out []Device
	for k, d := range devs {
		if picked[k] {
			out = append(out, d)
		}
	}
	return out, nil
}

// findDevice returns the index in devs of the device ref names, or -1.
func findDevice(devs []Device, ref string) int {
	kind := config.ClassifyDeviceRef(ref)
	var gpuUUID string
	var gi, ci int
	if kind == config.RefMIGUUID && strings.HasPrefix(ref, "MIG-GPU-") {
		// The older MIG-GPU-<uuid>/<gi>/<ci> form.
		parts := strings.Split(strings.TrimPrefix(ref, "MIG-"), "/")
		gpuUUID = parts[0]
		gi, _ = strconv.Atoi(parts[1])
		ci, _ = strconv.Atoi(parts[2])
	}
	for k := range devs {
		d := &devs[k]
		var ok bool
		switch kind {
		case config.RefGPUIndex:
			n, err := strconv.Atoi(ref)
			ok = err == nil && d.MIG == nil && d.GPUIndex == n
		case config.RefMIGIndex:
			ok = d.MIG != nil && d.IndexID() == canonicalMIGIndex(ref)
		case config.RefGPUUUID:
			ok = d.MIG == nil && strings.EqualFold(d.GPUUUID, ref)
		case config.RefMIGUUID:
			if gpuUUID != "" {
				ok = d.MIG != nil && strings.EqualFold(d.GPUUUID, gpuUUID) && d.MIG.GPUInstanceID == gi && d.MIG.ComputeInstanceID == ci
			} else {
				ok = d.MIG != nil && strings.EqualFold(d.MIG.UUID, ref)
			}
		}
		if ok {
			return k
		}
	}
	return -1
}

func canonicalMIGIndex(ref string) string {
	g, m, _ := strings.Cut(ref, ":")
	gi, _ := strconv.Atoi(g)
	mi, _ := strconv.Atoi(m)
	return fmt.Sprintf("%d:%d", gi, mi)
}

// noMatch explains a device reference that names nothing, with the
// references that would work.
func noMatch(devs []Device, ref, resource string) string {
	kind := config.ClassifyDeviceRef(ref)
	isMIG := devs[0].MIG != nil
	var hint string
	switch {
	case isMIG && (kind == config.RefGPUIndex || kind == config.RefGPUUUID):
		hint = fmt.Sprintf("; %s holds MIG devices, named by MIG index (<gpu>:<mig>) or MIG UUID", resource)
	case !isMIG && (kind == config.RefMIGIndex || kind == config.RefMIGUUID):
		hint = fmt.Sprintf("; %s holds whole GPUs, named by GPU index or GPU UUID", resource)
	}
	ids := make([]string, 0, len(devs))
	for _, d := range devs {
		ids = append(ids, d.IndexID())
	}
	const most = 16
	list := strings.Join(ids[:min(len(ids), most)], ", ")
	if len(ids) > most {
		list += fmt.Sprintf(", … (%d in all)", len(ids))
	}
	return fmt.Sprintf("%s matches no %s device on this node%s; allowed: %s, or their UUIDs", config.Quote(ref), resource, hint, list)
}

// Match reports whether name matches pattern as a whole, '*' standing for
// any run of characters (NVIDIA's resource pattern syntax, anchored as
// since its v0.20.0).
func Match(pattern, name string) bool {
	parts := strings.Split(pattern, "*")
	if len(parts) == 1 {
		return pattern == name
	}
	if !strings.HasPrefix(name, parts[0]) {
		return false
	}
	name = name[len(parts[0]):]
	last := parts[len(parts)-1]
	for _, p := range parts[1 : len(parts)-1] {
		i := strings.Index(name, p)
		if i < 0 {
			return false
		}
		name = name[i+len(p):]
	}
	return len(name) >= len(last) && strings.HasSuffix(name, last)
}
