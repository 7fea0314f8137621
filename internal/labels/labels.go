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
	"sort"
	"strconv"
	"strings"

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
)

// Labels are node labels by key.
type Labels map[string]string

// Compute derives the labels: node-wide versions and capabilities, the
// whole-GPU product (nvidia.com/gpu.*), and with MIG the MIG device types
// (nvidia.com/gpu.* for mig-strategy single, nvidia.com/mig-<profile>.* for
// mixed). Shared resources add their replica count and "-SHARED" to the
// product unless they were renamed, as GFD does.
func Compute(inv *nvml.Inventory, resources []*sharing.Resource, migStrategy string) Labels {
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
	l.versions(inv)
	capable := false
	for _, g := range gpus {
		capable = capable || g.MIGCapable
	}
	if migStrategy == "" {
		migStrategy = config.MigNone
	}
	l[Prefix+"mig.capable"] = strconv.FormatBool(capable)
	l[Prefix+"mig.strategy"] = migStrategy
	l[Prefix+"mps.capable"] = "false" // MPS is not supported

	// Whole GPUs: the most common product (GFD labels one product per key).
	product := mostCommon(gpus)
	count := 0
	for _, g := range gpus {
		if g.Name == product.Name {
			count++
		}
	}
	rep, renamed := sharingOf(resources, func(d *sharing.Device) bool { return d.MIG == nil && d.GPUUUID != "" })
	l.resource("gpu", productName(rep, renamed, product.Name), count, product.MemoryBytes>>20, rep)
	if product.Architecture != "" {
		l[Prefix+"gpu.family"] = sanitise(product.Architecture)
	}
	l[Prefix+"gpu.compute.major"] = strconv.Itoa(product.ComputeCapability.Major)
	l[Prefix+"gpu.compute.minor"] = strconv.Itoa(product.ComputeCapability.Minor)

	// MIG device types, named after the resources that advertise them.
	type migType struct {
		parent string
		mig    nvml.MIGDevice
		count  int
		base   string
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
				t = &migType{parent: parentName(inv, d.GPUUUID), mig: *d.MIG, base: r.Base}
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
		if migStrategy == config.MigSingle {
			key = "gpu" // MIG devices stand in for GPUs
		}
		if !strings.HasPrefix(base, Prefix) && migStrategy != config.MigSingle {
			continue // a custom domain is not GFD's to label
		}
		l.resource(key, productName(rep, renamed, t.parent, "MIG", t.mig.Profile), t.count, t.mig.MemoryBytes>>20, rep)
	}
	return l
}

// resource sets <key>.product, .count, .memory, .replicas and
// .sharing-strategy.
func (l Labels) resource(key, product string, count int, memoryMiB uint64, replicas int) {
	p := Prefix + key + "."
	l[p+"product"] = product
	l[p+"count"] = strconv.Itoa(count)
	l[p+"memory"] = strconv.FormatUint(memoryMiB, 10)
	if replicas < 1 {
		replicas = 1
	}
	l[p+"replicas"] = strconv.Itoa(replicas)
	strategy := StrategyNone
	if replicas > 1 {
		strategy = StrategyTimeSlicing
	}
	l[p+"sharing-strategy"] = strategy
}

// versions sets the driver and CUDA version labels: cuda.driver-version is
// the kernel driver's (550.54.15), cuda.runtime-version the CUDA version the
// driver supports (12.4), as GFD names them.
func (l Labels) versions(inv *nvml.Inventory) {
	if v := inv.DriverVersion; v != "" {
		parts := strings.SplitN(v, ".", 3)
		l[Prefix+"cuda.driver-version.full"] = sanitise(v)
		l[Prefix+"cuda.driver-version.major"] = parts[0]
		if len(parts) > 1 {
			l[Prefix+"cuda.driver-version.minor"] = parts[1]
		}
		if len(parts) > 2 {
			l[Prefix+"cuda.driver-version.revision"] = sanitise(parts[2])
		}
	}
	if v := inv.CUDADriverVersion; v != "" {
		major, minor, _ := strings.Cut(v, ".")
		l[Prefix+"cuda.runtime-version.full"] = sanitise(v)
		l[Prefix+"cuda.runtime-version.major"] = major
		if minor != "" {
			l[Prefix+"cuda.runtime-version.minor"] = minor
		}
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

// Write replaces the file at path with the labels, atomically: a hidden
// temporary file in the same directory (NFD skips dot files) renamed over
// it, so NFD never reads half a file. It does nothing if the file already
// holds exactly these labels, and reports whether it wrote. It creates no
// directories: the directory is NFD's to provide.
func Write(path string, l Labels) (bool, error) {
	data := l.Format()
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
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
