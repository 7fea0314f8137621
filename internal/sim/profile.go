package sim

import (
	"bytes"
	"crypto/sha1"
	"embed"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.yaml.in/yaml/v3"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Profile is a simulated node as written in a profile file. The schema is
// documented in docs/simulated-nodes.md and shown by the built-in
// profiles in profiles/*.yaml.
type Profile struct {
	// Name identifies the node; it seeds the stable UUIDs.
	Name        string `yaml:"name"`
	Description string `yaml:"description"`
	// DriverVersion is what nvmlSystemGetDriverVersion returns.
	DriverVersion string `yaml:"driverVersion"`
	// CUDADriverVersion is "major.minor", e.g. "12.4".
	CUDADriverVersion string `yaml:"cudaDriverVersion"`
	// NVSwitch says the NVLinks end on NVSwitches (HGX/DGX boards) rather
	// than on peer GPUs. The topology matrix must then give every pair the
	// same NV<n>.
	NVSwitch bool         `yaml:"nvswitch"`
	GPUs     []ProfileGPU `yaml:"gpus"`
	// Topology is the GPU part of `nvidia-smi topo -m`, pasted as is:
	// X, NV<n>, PIX, PXB, PHB, NODE, SYS. Header, NIC columns, affinity
	// columns and the legend are ignored. Empty: PCIe only, NODE within a
	// NUMA node and SYS across.
	Topology string `yaml:"topology"`
	// PCIe optionally gives the PCIe relation hidden under NV<n> cells, in
	// the same form. Empty: NODE within a NUMA node, SYS across.
	PCIe string `yaml:"pcie"`

	spec *node // the validated expansion, set by ParseProfile
}

// ProfileGPU is one entry of a profile's gpus list.
type ProfileGPU struct {
	Model     string `yaml:"model"`     // e.g. "H100-SXM5-80GB", or a product name
	Count     int    `yaml:"count"`     // identical GPUs this entry stands for; default 1
	Name      string `yaml:"name"`      // overrides the product name
	MemoryMiB uint64 `yaml:"memoryMiB"` // overrides the memory size
	NUMANode  *int   `yaml:"numaNode"`  // default: unknown (-1)
	UUID      string `yaml:"uuid"`      // default: derived from the profile name and index
	PCIBusID  string `yaml:"pciBusId"`  // default: derived from the index
	// MIGEnabled turns MIG mode on; MIGDevices lists the MIG devices by
	// profile name, e.g. [3g.40gb, 1g.10gb, 1g.10gb].
	MIGEnabled bool     `yaml:"migEnabled"`
	MIGDevices []string `yaml:"migDevices"`
	// Lost starts the GPU fallen off the bus (as after XID 79), to test
	// discovery with a dead GPU; POST /sim/gpus/{index}/recover revives it.
	Lost bool `yaml:"lost"`
}

// node is a profile expanded into what the simulated NVML serves.
type node struct {
	name              string
	driverVersion     string
	cudaDriverVersion int
	nvswitch          bool
	gpus              []*simGPU
	links             [][]nvml.Link
}

type simGPU struct {
	index      int
	model      *model
	name       string
	memoryMiB  uint64
	numa       int
	uuid       string
	busID      string
	migEnabled bool
	migs       []*simMIG
	lost       bool // at start
}

type simMIG struct {
	profile   string
	giProfile int
	giID      int
	ciID      int
	placement gonvml.GpuInstancePlacement
	uuid      string
	memoryMiB uint64
}

//go:embed profiles/*.yaml
var builtinFS embed.FS

// BuiltinNames lists the built-in profiles.
func BuiltinNames() []string {
	entries, _ := builtinFS.ReadDir("profiles")
	var names []string
	for _, e := range entries {
		names = append(names, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	sort.Strings(names)
	return names
}

// LoadProfile reads a built-in profile by name, or a profile file by path.
func LoadProfile(nameOrPath string) (*Profile, error) {
	if raw, err := builtinFS.ReadFile("profiles/" + nameOrPath + ".yaml"); err == nil {
		return ParseProfile("builtin:"+nameOrPath, raw)
	}
	if !strings.ContainsAny(nameOrPath, "/.") {
		return nil, fmt.Errorf("unknown simulated profile %q: use one of %s, or a path to a profile file",
			nameOrPath, strings.Join(BuiltinNames(), ", "))
	}
	raw, err := os.ReadFile(nameOrPath)
	if err != nil {
		return nil, fmt.Errorf("reading simulated profile: %w", err)
	}
	return ParseProfile(nameOrPath, raw)
}

// ParseProfile decodes and validates a profile. Errors name the file and the
// field or line at fault.
func ParseProfile(file string, raw []byte) (*Profile, error) {
	var p Profile
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&p); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: the profile is empty", file)
		}
		return nil, fmt.Errorf("%s: %s", file, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	spec, err := p.expand(file, scalarLines(raw))
	if err != nil {
		return nil, err
	}
	p.spec = spec
	return &p, nil
}

// scalarLines finds the first content line of the topology and pcie blocks,
// so matrix errors can point at a line.
func scalarLines(raw []byte) map[string]int {
	var doc yaml.Node
	lines := map[string]int{}
	if yaml.Unmarshal(raw, &doc) != nil || len(doc.Content) == 0 {
		return lines
	}
	m := doc.Content[0]
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		line := v.Line
		if v.Style&(yaml.LiteralStyle|yaml.FoldedStyle) != 0 {
			line++ // block scalars start below their indicator
		}
		lines[k.Value] = line
	}
	return lines
}

func (p *Profile) expand(file string, lines map[string]int) (*node, error) {
	fail := func(field, format string, args ...any) error {
		return fmt.Errorf("%s: %s: %s", file, field, fmt.Sprintf(format, args...))
	}
	if p.Name == "" {
		return nil, fail("name", "required: name the simulated node")
	}
	n := &node{name: p.Name, driverVersion: p.DriverVersion, nvswitch: p.NVSwitch}
	if n.driverVersion == "" {
		n.driverVersion = "550.54.15"
	}
	cuda := p.CUDADriverVersion
	if cuda == "" {
		cuda = "12.4"
	}
	major, minor, ok := strings.Cut(cuda, ".")
	ma, err1 := strconv.Atoi(major)
	mi, err2 := strconv.Atoi(minor)
	if !ok || err1 != nil || err2 != nil || ma < 1 || mi < 0 || mi > 99 {
		return nil, fail("cudaDriverVersion", "%q is not a version like \"12.4\"", cuda)
	}
	n.cudaDriverVersion = ma*1000 + mi*10

	if len(p.GPUs) == 0 {
		return nil, fail("gpus", "required: list at least one GPU")
	}
	seen := map[string]string{}
	for e, g := range p.GPUs {
		field := fmt.Sprintf("gpus[%d]", e)
		m, err := findModel(g.Model)
		if err != nil {
			return nil, fail(field+".model", "%v", err)
		}
		count := g.Count
		if count == 0 {
			count = 1
		}
		if count < 0 || count > 64 {
			return nil, fail(field+".count", "%d is out of range 1..64", g.Count)
		}
		if len(n.gpus)+count > maxProfileGPUs {
			return nil, fail(field+".count", "the profile would have more than %d GPUs (the topology matrix grows with their square)", maxProfileGPUs)
		}
		if count > 1 && (g.UUID != "" || g.PCIBusID != "") {
			return nil, fail(field, "uuid and pciBusId name one GPU: use count 1 with them")
		}
		if len(g.MIGDevices) > 0 && !g.MIGEnabled {
			return nil, fail(field+".migDevices", "MIG devices need migEnabled: true")
		}
		if g.MIGEnabled && len(m.config.MIGProfiles.GpuInstanceProfiles) == 0 {
			return nil, fail(field+".migEnabled", "%s does not support MIG", m.key)
		}
		profiles := m.migProfiles()
		var slices uint32
		for k, name := range g.MIGDevices {
			id, ok := profiles[name]
			if !ok {
				return nil, fail(fmt.Sprintf("%s.migDevices[%d]", field, k), "unknown MIG profile %q for %s (known: %s)",
					name, m.key, strings.Join(m.migProfileNames(), ", "))
			}
			slices += m.config.MIGProfiles.GpuInstanceProfiles[id].SliceCount
		}
		if most := m.migSlices(); slices > most {
			return nil, fail(field+".migDevices", "the MIG devices need %d compute slices; %s has %d", slices, m.key, most)
		}
		placements, err := m.placeMIG(g.MIGDevices)
		if err != nil {
			return nil, fail(field+".migDevices", "%v", err)
		}
		for c := 0; c < count; c++ {
			idx := len(n.gpus)
			gpu := &simGPU{
				index: idx, model: m, name: m.config.Name, memoryMiB: m.config.MemoryMB,
				numa: -1, uuid: g.UUID, busID: g.PCIBusID, migEnabled: g.MIGEnabled, lost: g.Lost,
			}
			if g.Name != "" {
				gpu.name = g.Name
			}
			if g.MemoryMiB != 0 {
				gpu.memoryMiB = g.MemoryMiB
			}
			if g.NUMANode != nil {
				gpu.numa = *g.NUMANode
			}
			if gpu.uuid == "" {
				gpu.uuid = "GPU-" + stableUUID(p.Name, "gpu", strconv.Itoa(idx))
			} else if !uuidPattern.MatchString(gpu.uuid) {
				return nil, fail(field+".uuid", "%q is not a GPU UUID like GPU-5c8e8f7a-1b2c-4d3e-8f90-0123456789ab", gpu.uuid)
			}
			if gpu.busID == "" {
				gpu.busID = fmt.Sprintf("%08X:%02X:00.0", idx/16, 0x07+0x0F*(idx%16))
			}
			gpu.busID = nvml.NormalizeBusID(gpu.busID)
			for key, what := range map[string]string{gpu.uuid: "uuid", gpu.busID: "pciBusId"} {
				if prev, dup := seen[key]; dup {
					return nil, fail(field+"."+what, "%s %s is also used by %s", what, key, prev)
				}
				seen[key] = fmt.Sprintf("GPU %d", idx)
			}
			for k, name := range g.MIGDevices {
				id := profiles[name]
				info := m.config.MIGProfiles.GpuInstanceProfiles[id]
				gpu.migs = append(gpu.migs, &simMIG{
					profile: name, giProfile: id, giID: k + 1, ciID: 0, placement: placements[k],
					uuid:      "MIG-" + stableUUID(p.Name, "mig", strconv.Itoa(idx), strconv.Itoa(k)),
					memoryMiB: info.MemorySizeMB,
				})
			}
			n.gpus = append(n.gpus, gpu)
		}
	}
	if len(n.gpus) > 64 {
		return nil, fail("gpus", "%d GPUs; at most 64 are supported", len(n.gpus))
	}

	var err error
	if n.links, err = parseMatrices(n, p.Topology, p.PCIe, lines); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if n.nvswitch {
		for i := range n.links {
			for j := range n.links {
				if i != j && n.links[i][j].NVLinks != n.links[0][1].NVLinks {
					return nil, fmt.Errorf("%s: topology: nvswitch: true needs the same NV<n> between every pair of GPUs; GPU%d-GPU%d differs", file, i, j)
				}
			}
		}
	}
	return n, nil
}

// maxProfileGPUs bounds a profile's GPUs: far above any node, low enough
// that a profile (a few bytes per 64 GPUs, fewer with YAML aliases) cannot
// make the n×n topology exhaust memory.
const maxProfileGPUs = 512

var uuidPattern = regexp.MustCompile(`^GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// stableUUID derives a UUID from the profile name and a path, so a profile
// gets the same UUIDs on every start.
func stableUUID(parts ...string) string {
	sum := sha1.Sum([]byte(strings.Join(parts, "/")))
	sum[6] = sum[6]&0x0f | 0x50 // version 5 layout
	sum[8] = sum[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", sum[0:4], sum[4:6], sum[6:8], sum[8:10], sum[10:16])
}

var gpuLabel = regexp.MustCompile(`^GPU(\d+)$`)

// matrixRow is one row of an nvidia-smi matrix with the line it came from.
type matrixRow struct {
	line  int
	cells []string
}

// readMatrix picks the GPU rows out of pasted `nvidia-smi topo -m` text: a
// row is a line whose first word (after an optional GPU<k> label) is a cell
// word. Header and NIC rows never start that way; the legend ends the matrix.
func readMatrix(field, text string, firstLine, n int, isCell func(string) bool) ([]matrixRow, error) {
	var rows []matrixRow
	for k, line := range strings.Split(text, "\n") {
		words := strings.Fields(line)
		lineNo := firstLine + k
		if len(words) == 0 || (len(words) > 1 && words[1] == "=") {
			continue // blank, or a legend entry such as "X = Self"
		}
		if strings.HasPrefix(words[0], "Legend") {
			break
		}
		label := -1
		if m := gpuLabel.FindStringSubmatch(words[0]); m != nil && len(words) > 1 && isCell(words[1]) {
			label, _ = strconv.Atoi(m[1])
			words = words[1:]
		}
		if !isCell(words[0]) {
			continue
		}
		if label >= 0 && label != len(rows) {
			return nil, fmt.Errorf("%s: line %d: row labelled GPU%d is row %d", field, lineNo, label, len(rows))
		}
		cells := 0
		for cells < len(words) && isCell(words[cells]) {
			cells++
		}
		if cells < n && cells < len(words) {
			return nil, fmt.Errorf("%s: line %d: GPU%d's cell %d is %q, which is not X, NV<n>, PIX, PXB, PHB, NODE or SYS",
				field, lineNo, len(rows), cells, words[cells])
		}
		if cells < n {
			return nil, fmt.Errorf("%s: line %d: GPU%d's row has %d cells, want %d (the matrix must be square: one row and one column per GPU)",
				field, lineNo, len(rows), cells, n)
		}
		rows = append(rows, matrixRow{line: lineNo, cells: words[:n]})
	}
	if len(rows) != n {
		return nil, fmt.Errorf("%s: %d rows for %d GPUs (the matrix must be square: one row and one column per GPU)", field, len(rows), n)
	}
	return rows, nil
}

func isTopoCell(w string) bool {
	if _, ok, err := nvml.ParseNVLinkCell(w); ok {
		return err == nil
	}
	_, err := nvml.ParsePCIeRelation(w)
	return err == nil
}

func isPCIeCell(w string) bool {
	_, err := nvml.ParsePCIeRelation(w)
	return err == nil
}

func parseMatrices(n *node, topo, pcie string, lines map[string]int) ([][]nvml.Link, error) {
	count := len(n.gpus)
	links := make([][]nvml.Link, count)
	for i := range links {
		links[i] = make([]nvml.Link, count)
		for j := range links[i] {
			switch {
			case i == j:
				links[i][j].PCIe = nvml.PCIeSelf
			case n.gpus[i].numa >= 0 && n.gpus[i].numa == n.gpus[j].numa:
				links[i][j].PCIe = nvml.PCIeNODE
			default:
				links[i][j].PCIe = nvml.PCIeSYS
			}
		}
	}
	if strings.TrimSpace(topo) != "" {
		rows, err := readMatrix("topology", topo, lines["topology"], count, isTopoCell)
		if err != nil {
			return nil, err
		}
		if err := checkMatrix("topology", rows); err != nil {
			return nil, err
		}
		for i, r := range rows {
			for j, c := range r.cells {
				if nv, ok, _ := nvml.ParseNVLinkCell(c); ok {
					links[i][j].NVLinks = nv
				} else if i != j {
					links[i][j].PCIe, _ = nvml.ParsePCIeRelation(c)
				}
			}
		}
	}
	if strings.TrimSpace(pcie) != "" {
		rows, err := readMatrix("pcie", pcie, lines["pcie"], count, isPCIeCell)
		if err != nil {
			return nil, err
		}
		if err := checkMatrix("pcie", rows); err != nil {
			return nil, err
		}
		for i, r := range rows {
			for j, c := range r.cells {
				if i != j {
					links[i][j].PCIe, _ = nvml.ParsePCIeRelation(c)
				}
			}
		}
	}
	return links, nil
}

// checkMatrix requires X exactly on the diagonal and symmetry.
func checkMatrix(field string, rows []matrixRow) error {
	for i, r := range rows {
		for j, c := range r.cells {
			if (i == j) != strings.EqualFold(c, "X") {
				if i == j {
					return fmt.Errorf("%s: line %d: GPU%d's own cell is %q, want X", field, r.line, i, c)
				}
				return fmt.Errorf("%s: line %d: GPU%d-GPU%d is X, which only the diagonal may be", field, r.line, i, j)
			}
			if other := rows[j].cells[i]; !strings.EqualFold(c, other) {
				return fmt.Errorf("%s: not symmetric: GPU%d-GPU%d is %s (line %d) but GPU%d-GPU%d is %s (line %d)",
					field, i, j, c, r.line, j, i, other, rows[j].line)
			}
		}
	}
	return nil
}
