// Package labels computes node labels compatible with NVIDIA's GPU feature
// discovery (nvidia.com/gpu.product, gpu.count, mig.strategy, …) from the
// inventory and the advertised resources, and writes them atomically to a
// file in node-feature-discovery's features.d directory, where NFD's local
// source turns every key=value line into a node label.
package labels

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// Prefix is the label domain GPU feature discovery uses.
const Prefix = "nvidia.com/"

// Sharing strategies, as the sharing-strategy labels name them.
const (
	StrategyNone        = "none"
	StrategyTimeSlicing = "time-slicing"
	StrategyMPS         = "mps"
)

// Labels are node labels by key.
type Labels map[string]string

// TimestampKey is GFD's label for when the labels were generated.
const TimestampKey = Prefix + "gfd.timestamp"

// DefaultMachineTypeFile is where GFD reads the machine type (DMI product
// name) from.
const DefaultMachineTypeFile = "/sys/class/dmi/id/product_name"

// machineUnknown is nvidia.com/gpu.machine when the machine type cannot be
// read, and gpu.mode when the GPUs' PCI classes are unknown or differ.
const machineUnknown = "unknown"

// Options are the settings the labels depend on besides the inventory and
// the advertised resources.
type Options struct {
	MigStrategy string // none ("" too), single or mixed
	// MachineTypeFile holds the machine type for nvidia.com/gpu.machine
	// (flags.gfd.machineTypeFile); "" or unreadable gives "unknown".
	MachineTypeFile string
	// NoTimestamp leaves nvidia.com/gfd.timestamp out (flags.gfd.noTimestamp).
	NoTimestamp bool
	Now         func() time.Time // for the timestamp; nil means time.Now
}

// OptionsFrom reads the options from the config: the MIG strategy,
// flags.gfd.machineTypeFile (default: <sys-root>/class/dmi/id/product_name)
// and flags.gfd.noTimestamp.
func OptionsFrom(c *config.Config) Options {
	o := Options{MigStrategy: c.MigStrategy(), MachineTypeFile: DefaultMachineTypeFile}
	if c.Daemon.SysRoot != "" {
		o.MachineTypeFile = filepath.Join(c.Daemon.SysRoot, "class", "dmi", "id", "product_name")
	}
	if g := c.Flags.GFD; g != nil {
		if g.MachineTypeFile != nil {
			o.MachineTypeFile = *g.MachineTypeFile
		}
		o.NoTimestamp = g.NoTimestamp != nil && *g.NoTimestamp
	}
	return o
}

// Compute derives the labels as NVIDIA's GPU feature discovery (v0.20)
// names and computes them: the machine type, node-wide versions and
// capabilities, the whole-GPU product (nvidia.com/gpu.*), the GPUs' mode and
// NVLink clique, and with MIG the MIG device types (nvidia.com/gpu.* for
// mig-strategy single, nvidia.com/mig-<profile>.* for mixed) with their
// SMs, slices and engines. Shared resources add their replica count and
// "-SHARED" to the product unless they were renamed, as GFD does. The
// timestamp is the time of the call; Write and Equal ignore its value.
func Compute(inv *nvml.Inventory, resources []*sharing.Resource, o Options) Labels {
	l := Labels{}
	if inv == nil {
		return l
	}
	var gpus []*nvml.GPU
	for i := range inv.GPUs {
		if inv.GPUs[i].Usable() {
			gpus = append(gpus, &inv.GPUs[i])
		}
	}
	if len(gpus) == 0 {
		return l
	}
	migStrategy := o.MigStrategy
	if migStrategy == "" {
		migStrategy = config.MigNone
	}
	l[Prefix+"gpu.machine"] = machineType(o.MachineTypeFile)
	l.versions(inv)
	capable := false
	for _, g := range gpus {
		capable = capable || g.MIGCapable
	}
	l[Prefix+"mig.capable"] = strconv.FormatBool(capable)
	if migStrategy != config.MigNone {
		l[Prefix+"mig.strategy"] = migStrategy // GFD labels the strategy only when MIG is advertised
	}
	// As GFD: true only while the GPUs are shared through MPS (which
	// refuses MIG devices, so a node labelled true has none).
	mps := slices.ContainsFunc(resources, func(r *sharing.Resource) bool { return r.MPS })
	l[Prefix+"mps.capable"] = strconv.FormatBool(mps)

	// Whole GPUs: the most common product (GFD labels one product per key).
	// A product whose every GPU has MIG on is labelled without sharing and
	// with 0 replicas, as GFD does.
	product := mostCommon(gpus)
	count, whole := 0, 0
	for _, g := range gpus {
		if g.Name == product.Name {
			count++
			if !g.MIGEnabled {
				whole++
			}
		}
	}
	rep, renamed := sharingOf(resources, func(d *sharing.Device) bool { return d.MIG == nil && d.GPUUUID != "" })
	if whole == 0 {
		rep, renamed = 0, false
	}
	l.resource("gpu", productName(rep, renamed, product.Name), count, rep, mps)
	if mib := product.MemoryBytes >> 20; mib > 0 {
		l[Prefix+"gpu.memory"] = strconv.FormatUint(mib, 10)
	}
	if cc := product.ComputeCapability; cc.Major != 0 {
		l[Prefix+"gpu.family"] = archFamily(cc)
		l[Prefix+"gpu.compute.major"] = strconv.Itoa(cc.Major)
		l[Prefix+"gpu.compute.minor"] = strconv.Itoa(cc.Minor)
	}
	l[Prefix+"gpu.mode"] = gpuMode(gpus)
	if c := clique(gpus); c != "" {
		l[Prefix+"gpu.clique"] = c
	}

	switch migStrategy {
	case config.MigSingle:
		if reason := singleInvalid(gpus); reason != "" {
			l.invalidSingle(gpus)
		} else {
			l.migTypes(inv, resources, true)
		}
	case config.MigMixed:
		l.migTypes(inv, resources, false)
	}
	if !o.NoTimestamp {
		now := time.Now
		if o.Now != nil {
			now = o.Now
		}
		l[TimestampKey] = strconv.FormatInt(now().Unix(), 10)
	}
	return l
}

// migTypes labels the MIG device types, named after the resources that
// advertise them; under mig-strategy single the one type is nvidia.com/gpu.
func (l Labels) migTypes(inv *nvml.Inventory, resources []*sharing.Resource, single bool) {
	type migType struct {
		parent string
		mig    nvml.MIGDevice
		count  int
	}
	types := map[string]*migType{}
	var order []string
	for _, r := range resources {
		seen := map[string]bool{}
		for i := range r.Devices {
			d := &r.Devices[i]
			if d.MIG == nil || seen[d.Physical] {
				continue
			}
			seen[d.Physical] = true
			t, ok := types[r.Base]
			if !ok {
				t = &migType{parent: parentName(inv, d.GPUUUID), mig: *d.MIG}
				types[r.Base] = t
				order = append(order, r.Base)
			}
			t.count++
		}
	}
	sort.Strings(order)
	for _, base := range order {
		t := types[base]
		rep, renamed := sharingOf(resources, func(d *sharing.Device) bool {
			return d.MIG != nil && d.MIG.Profile == t.mig.Profile
		})
		key := strings.TrimPrefix(base, Prefix)
		if single {
			key = "gpu" // MIG devices stand in for GPUs
		} else if !strings.HasPrefix(base, Prefix) {
			continue // a custom domain is not GFD's to label
		}
		// GFD names a MIG device by its profile with "+" made ".", as
		// its resource name does: 1g.5gb+me → 1g.5gb.me.
		profile := strings.ReplaceAll(t.mig.Profile, "+", ".")
		l.resource(key, productName(rep, renamed, t.parent, "MIG", profile), t.count, rep, false)
		p := Prefix + key + "."
		a := t.mig.Attributes
		if a == nil {
			l[p+"memory"] = strconv.FormatUint(t.mig.MemoryBytes>>20, 10)
			continue
		}
		for suffix, v := range map[string]uint64{
			"memory": a.MemoryMiB, "multiprocessors": uint64(a.Multiprocessors),
			"slices.gi": uint64(a.GISlices), "slices.ci": uint64(a.CISlices),
			"engines.copy": uint64(a.CopyEngines), "engines.decoder": uint64(a.Decoders),
			"engines.encoder": uint64(a.Encoders), "engines.jpeg": uint64(a.JPEGs), "engines.ofa": uint64(a.OFAs),
		} {
			l[p+suffix] = strconv.FormatUint(v, 10)
		}
	}
}

// singleInvalid says why mig-strategy single cannot label the node, as GFD
// decides: a GPU with MIG on but no MIG devices, GPUs with MIG on and off,
// or more than one MIG profile. "" when it can (or no GPU has MIG on).
func singleInvalid(gpus []*nvml.GPU) string {
	profiles := map[string]bool{}
	on, off := 0, 0
	for _, g := range gpus {
		if !g.MIGEnabled {
			off++
			continue
		}
		on++
		if len(g.MIGDevices) == 0 {
			return "a GPU has MIG enabled but no MIG devices"
		}
		for _, m := range g.MIGDevices {
			profiles[m.Profile] = true
		}
	}
	switch {
	case on == 0:
		return ""
	case off > 0:
		return "GPUs with MIG enabled and disabled"
	case len(profiles) > 1:
		return "more than one MIG profile"
	}
	return ""
}

// invalidSingle sets GFD's labels for an invalid mig-strategy single node:
// the first MIG-enabled GPU's product with "-MIG-INVALID", and zeros.
func (l Labels) invalidSingle(gpus []*nvml.GPU) {
	for _, g := range gpus {
		if g.MIGEnabled {
			l[Prefix+"gpu.product"] = productName(0, false, g.Name, "MIG", "INVALID")
			break
		}
	}
	l[Prefix+"gpu.count"] = "0"
	l[Prefix+"gpu.replicas"] = "0"
	l[Prefix+"gpu.sharing-strategy"] = ""
	l[Prefix+"gpu.memory"] = "0"
}

// resource sets <key>.product, .count, .replicas and .sharing-strategy.
func (l Labels) resource(key, product string, count, replicas int, mps bool) {
	p := Prefix + key + "."
	l[p+"product"] = product
	l[p+"count"] = strconv.Itoa(count)
	l[p+"replicas"] = strconv.Itoa(replicas)
	strategy := StrategyNone
	switch {
	case replicas > 1 && mps:
		strategy = StrategyMPS
	case replicas > 1:
		strategy = StrategyTimeSlicing
	}
	l[p+"sharing-strategy"] = strategy
}

// machineType reads the machine type file: its trimmed content, sanitised,
// or "unknown" when there is no file to read, as GFD does.
func machineType(path string) string {
	if path == "" {
		return machineUnknown
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return machineUnknown
	}
	return sanitise(strings.TrimSpace(string(raw)))
}

// archFamily names the architecture from the compute capability, with
// GFD's table ("undefined" for a major it does not know).
func archFamily(cc nvml.ComputeCapability) string {
	switch cc.Major {
	case 1:
		return "tesla"
	case 2:
		return "fermi"
	case 3:
		return "kepler"
	case 5:
		return "maxwell"
	case 6:
		return "pascal"
	case 7:
		if cc.Minor < 5 {
			return "volta"
		}
		return "turing"
	case 8:
		if cc.Minor < 9 {
			return "ampere"
		}
		return "ada-lovelace"
	case 9:
		return "hopper"
	case 10, 12:
		return "blackwell"
	case 13:
		return "rubin"
	}
	return "undefined"
}

// gpuMode is "compute" when every GPU is a 3D controller, "graphics" when
// every GPU is a VGA controller, else "unknown", as GFD decides from the
// PCI class.
func gpuMode(gpus []*nvml.GPU) string {
	class := gpus[0].PCIClass
	for _, g := range gpus {
		if g.PCIClass != class {
			return machineUnknown
		}
	}
	switch class {
	case nvml.PCIClassVGA:
		return "graphics"
	case nvml.PCIClass3D:
		return "compute"
	}
	return machineUnknown
}

// clique is "<cluster UUID>.<clique ID>" when every GPU attached to an
// NVLink fabric is in the same cluster and clique; "" when none is attached
// or they differ, as GFD decides.
func clique(gpus []*nvml.GPU) string {
	var f *nvml.Fabric
	for _, g := range gpus {
		switch {
		case g.Fabric == nil:
		case f == nil:
			f = g.Fabric
		case *g.Fabric != *f:
			return ""
		}
	}
	if f == nil {
		return ""
	}
	return f.ClusterUUID + "." + strconv.FormatUint(uint64(f.CliqueID), 10)
}

// versions sets the driver and CUDA version labels: cuda.driver-version is
// the kernel driver's (550.54.15), cuda.runtime-version the CUDA version the
// driver supports (12.4), as GFD names them, and GFD's deprecated
// cuda.driver.* and cuda.runtime.* with the same values. A driver version
// GFD cannot parse (not X.Y or X.Y.Z) gets no driver labels.
func (l Labels) versions(inv *nvml.Inventory) {
	if parts := strings.Split(inv.DriverVersion, "."); len(parts) == 2 || len(parts) == 3 {
		rev := ""
		if len(parts) == 3 {
			rev = sanitise(parts[2])
		}
		l[Prefix+"cuda.driver-version.full"] = sanitise(inv.DriverVersion)
		l[Prefix+"cuda.driver-version.major"] = sanitise(parts[0])
		l[Prefix+"cuda.driver-version.minor"] = sanitise(parts[1])
		l[Prefix+"cuda.driver-version.revision"] = rev
		l[Prefix+"cuda.driver.major"] = sanitise(parts[0])
		l[Prefix+"cuda.driver.minor"] = sanitise(parts[1])
		l[Prefix+"cuda.driver.rev"] = rev
	}
	if v := inv.CUDADriverVersion; v != "" {
		major, minor, _ := strings.Cut(v, ".")
		l[Prefix+"cuda.runtime-version.full"] = sanitise(v)
		l[Prefix+"cuda.runtime-version.major"] = sanitise(major)
		l[Prefix+"cuda.runtime-version.minor"] = sanitise(minor)
		l[Prefix+"cuda.runtime.major"] = sanitise(major)
		l[Prefix+"cuda.runtime.minor"] = sanitise(minor)
	}
}

// sharingOf finds the shared resource whose devices match, and reports its
// replica count and whether it was renamed away from its base name.
func sharingOf(resources []*sharing.Resource, match func(d *sharing.Device) bool) (replicas int, renamed bool) {
	for _, r := range resources {
		if !r.Shared() || len(r.Devices) == 0 || !match(&r.Devices[0]) {
			continue
		}
		return r.Replicas, r.Name != r.Base
	}
	return 1, false
}

func productName(replicas int, renamed bool, parts ...string) string {
	var out []string
	for _, p := range parts {
		if s := sanitise(p); s != "" {
			out = append(out, s)
		}
	}
	if replicas > 1 && !renamed {
		out = append(out, "SHARED")
	}
	return truncate(strings.Join(out, "-"))
}

func parentName(inv *nvml.Inventory, uuid string) string {
	if g, ok := inv.GPUByUUID(uuid); ok {
		return g.Name
	}
	return ""
}

func mostCommon(gpus []*nvml.GPU) *nvml.GPU {
	counts := map[string]int{}
	best := gpus[0]
	for _, g := range gpus {
		counts[g.Name]++
		if counts[g.Name] > counts[best.Name] {
			best = g
		}
	}
	return best
}

var notAllowed = regexp.MustCompile(`[^A-Za-z0-9\-_. ]`)

// sanitise makes a label value: characters other than letters, digits, '-',
// '_', '.' and spaces are dropped, and runs of spaces become one '-'
// ("NVIDIA A100-SXM4-40GB" → "NVIDIA-A100-SXM4-40GB"), as GFD does.
func sanitise(s string) string {
	return truncate(strings.Join(strings.Fields(notAllowed.ReplaceAllString(s, "")), "-"))
}

// truncate keeps a value within Kubernetes' 63 characters, starting and
// ending with a letter or digit.
func truncate(s string) string {
	if len(s) > 63 {
		s = s[:63]
	}
	return strings.Trim(s, "-_.")
}

// Format renders labels as NFD's local source reads them: sorted key=value
// lines.
func (l Labels) Format() []byte {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s\n", k, l[k])
	}
	return b.Bytes()
}

// ErrNoDirectory is returned by Write when the file's directory does not
// exist, which usually means NFD is not installed on the node.
var ErrNoDirectory = errors.New("the labels directory does not exist")

// Equal reports whether a and b hold the same labels, the timestamp's
// value aside (whether each has one still counts).
func Equal(a, b Labels) bool {
	return len(a) == len(b) && bytes.Equal(unstamped(a.Format()), unstamped(b.Format()))
}

// unstamped blanks the timestamp's value in formatted labels.
func unstamped(data []byte) []byte {
	key := []byte(TimestampKey + "=")
	lines := bytes.SplitAfter(data, []byte("\n"))
	for i, line := range lines {
		if bytes.HasPrefix(line, key) {
			lines[i] = append(key[:len(key):len(key)], '\n')
		}
	}
	return bytes.Join(lines, nil)
}

// Write replaces the file at path with the labels, atomically: a hidden
// temporary file in the same directory (NFD skips dot files) renamed over
// it, so NFD never reads half a file. It does nothing if the file already
// holds these labels, and reports whether it wrote. A changed
// nvidia.com/gfd.timestamp alone does not count as a change: GFD stamps
// every labelling pass, but rewriting the file each re-scan would only make
// NFD update the node object for nothing, so the file's timestamp is when
// its labels last changed. It creates no directories: the directory is
// NFD's to provide.
func Write(path string, l Labels) (bool, error) {
	data := l.Format()
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(unstamped(old), unstamped(data)) {
		return false, nil
	}
	dir := filepath.Dir(path)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return false, fmt.Errorf("writing node labels to %s: %w (is node-feature-discovery installed? set --labels-file, or --node-labels=false)", path, ErrNoDirectory)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return false, fmt.Errorf("writing node labels: %w", err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename there is nothing to remove
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return false, fmt.Errorf("writing node labels to %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return false, fmt.Errorf("writing node labels: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return false, fmt.Errorf("writing node labels to %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return false, fmt.Errorf("replacing %s: %w", path, err)
	}
	return true, nil
}
