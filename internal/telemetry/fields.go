package telemetry

import (
	_ "embed"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Field is one DCGM field this package knows how to serve: an index into
// the catalog, so a device's values fit in a fixed array and a bit mask.
type Field uint8

// The catalog. Order is irrelevant to the output; ids are DCGM's.
const (
	DriverVersion Field = iota // a label, not a metric
	SMClock
	MemClock
	MemoryTemp
	GPUTemp
	PowerUsage
	TotalEnergyConsumption
	PCIeReplayCounter
	GPUUtil
	MemCopyUtil
	EncUtil
	DecUtil
	XIDErrors
	FBTotal
	FBFree
	FBUsed
	FBReserved
	ECCSBEVolatileTotal
	ECCDBEVolatileTotal
	ECCSBEAggregateTotal
	ECCDBEAggregateTotal
	UncorrectableRemappedRows
	CorrectableRemappedRows
	RowRemapFailure
	NVLinkBandwidthTotal
	VGPULicenseStatus
	ProfGREngineActive
	ProfSMActive
	ProfSMOccupancy
	ProfPipeTensorActive
	ProfDRAMActive
	ProfPipeFP64Active
	ProfPipeFP32Active
	ProfPipeFP16Active
	ProfPCIeTxBytes
	ProfPCIeRxBytes

	// NumFields is the catalog's size.
	NumFields
)

// Scope says where a MIG device's value of a field comes from.
type Scope uint8

const (
	// ScopeDevice fields belong to the physical GPU (clocks, temperatures,
	// power, errors); a MIG device's series carry its GPU's value, as
	// dcgm-exporter's do.
	ScopeDevice Scope = iota
	// ScopeInstance fields are measured per MIG device (framebuffer,
	// profiling).
	ScopeInstance
	// ScopeWholeGPU fields do not exist for MIG devices (NVML and DCGM do
	// not support utilization on MIG), so MIG series omit them.
	ScopeWholeGPU
)

// FieldInfo describes a catalog field.
type FieldInfo struct {
	Name  string // DCGM's name, e.g. DCGM_FI_DEV_GPU_UTIL
	ID    uint16 // DCGM's field id
	Scope Scope
}

var catalog = [NumFields]FieldInfo{
	DriverVersion:             {"DCGM_FI_DRIVER_VERSION", 1, ScopeDevice},
	SMClock:                   {"DCGM_FI_DEV_SM_CLOCK", 100, ScopeDevice},
	MemClock:                  {"DCGM_FI_DEV_MEM_CLOCK", 101, ScopeDevice},
	MemoryTemp:                {"DCGM_FI_DEV_MEMORY_TEMP", 140, ScopeDevice},
	GPUTemp:                   {"DCGM_FI_DEV_GPU_TEMP", 150, ScopeDevice},
	PowerUsage:                {"DCGM_FI_DEV_POWER_USAGE", 155, ScopeDevice},
	TotalEnergyConsumption:    {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 156, ScopeDevice},
	PCIeReplayCounter:         {"DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 202, ScopeDevice},
	GPUUtil:                   {"DCGM_FI_DEV_GPU_UTIL", 203, ScopeWholeGPU},
	MemCopyUtil:               {"DCGM_FI_DEV_MEM_COPY_UTIL", 204, ScopeWholeGPU},
	EncUtil:                   {"DCGM_FI_DEV_ENC_UTIL", 206, ScopeDevice},
	DecUtil:                   {"DCGM_FI_DEV_DEC_UTIL", 207, ScopeDevice},
	XIDErrors:                 {"DCGM_FI_DEV_XID_ERRORS", 230, ScopeDevice},
	FBTotal:                   {"DCGM_FI_DEV_FB_TOTAL", 250, ScopeInstance},
	FBFree:                    {"DCGM_FI_DEV_FB_FREE", 251, ScopeInstance},
	FBUsed:                    {"DCGM_FI_DEV_FB_USED", 252, ScopeInstance},
	FBReserved:                {"DCGM_FI_DEV_FB_RESERVED", 253, ScopeInstance},
	ECCSBEVolatileTotal:       {"DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 310, ScopeDevice},
	ECCDBEVolatileTotal:       {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 311, ScopeDevice},
	ECCSBEAggregateTotal:      {"DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", 312, ScopeDevice},
	ECCDBEAggregateTotal:      {"DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", 313, ScopeDevice},
	UncorrectableRemappedRows: {"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 393, ScopeDevice},
	CorrectableRemappedRows:   {"DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", 394, ScopeDevice},
	RowRemapFailure:           {"DCGM_FI_DEV_ROW_REMAP_FAILURE", 395, ScopeDevice},
	NVLinkBandwidthTotal:      {"DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", 449, ScopeDevice},
	VGPULicenseStatus:         {"DCGM_FI_DEV_VGPU_LICENSE_STATUS", 526, ScopeDevice},
	ProfGREngineActive:        {"DCGM_FI_PROF_GR_ENGINE_ACTIVE", 1001, ScopeInstance},
	ProfSMActive:              {"DCGM_FI_PROF_SM_ACTIVE", 1002, ScopeInstance},
	ProfSMOccupancy:           {"DCGM_FI_PROF_SM_OCCUPANCY", 1003, ScopeInstance},
	ProfPipeTensorActive:      {"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1004, ScopeInstance},
	ProfDRAMActive:            {"DCGM_FI_PROF_DRAM_ACTIVE", 1005, ScopeInstance},
	ProfPipeFP64Active:        {"DCGM_FI_PROF_PIPE_FP64_ACTIVE", 1006, ScopeInstance},
	ProfPipeFP32Active:        {"DCGM_FI_PROF_PIPE_FP32_ACTIVE", 1007, ScopeInstance},
	ProfPipeFP16Active:        {"DCGM_FI_PROF_PIPE_FP16_ACTIVE", 1008, ScopeInstance},
	ProfPCIeTxBytes:           {"DCGM_FI_PROF_PCIE_TX_BYTES", 1009, ScopeInstance},
	ProfPCIeRxBytes:           {"DCGM_FI_PROF_PCIE_RX_BYTES", 1010, ScopeInstance},
}

// Info describes f.
func (f Field) Info() FieldInfo { return catalog[f] }

func (f Field) String() string { return catalog[f].Name }

// LookupField finds a catalog field by its DCGM name.
func LookupField(name string) (Field, bool) {
	for f := range NumFields {
		if catalog[f].Name == name {
			return f, true
		}
	}
	return 0, false
}

// Mask is a set of fields.
type Mask uint64

// Has reports whether f is in the set.
func (m Mask) Has(f Field) bool { return m&(1<<f) != 0 }

// With returns the set plus f.
func (m Mask) With(f Field) Mask { return m | 1<<f }

// MaskOf builds a set.
func MaskOf(fs ...Field) Mask {
	var m Mask
	for _, f := range fs {
		m = m.With(f)
	}
	return m
}

// Metric kinds a counters file may give a field.
const (
	KindGauge   = "gauge"
	KindCounter = "counter"
	KindLabel   = "label"
)

// Metric is one line of a counters file: a field, how it is exported, and
// its help text. Name is the name as written in the file, which is the
// exported name (dcgm-exporter exports the file's names).
type Metric struct {
	Field Field
	Name  string
	Kind  string // gauge, counter or label
	Help  string
}

// MetricSet is a parsed counters file.
type MetricSet struct {
	Metrics []Metric // metrics and labels, in file order, each field once
	// Skipped lists the file's lines this daemon cannot serve at all (a
	// field outside the catalog), to be logged once at start.
	Skipped []string
}

// Fields is the set of every field the metric set needs read.
func (s *MetricSet) Fields() Mask {
	var m Mask
	for _, x := range s.Metrics {
		m = m.With(x.Field)
	}
	return m
}

//go:embed default-counters.csv
var defaultCounters string

// DefaultMetricSet is dcgm-exporter's default counters file.
func DefaultMetricSet() *MetricSet {
	s, err := ParseCounters(strings.NewReader(defaultCounters))
	if err != nil {
		panic("telemetry: the built-in counters file is broken: " + err.Error())
	}
	return s
}

// LoadCounters reads a dcgm-exporter counters file (--collectors); an
// empty path gives the default set.
func LoadCounters(path string) (*MetricSet, error) {
	if path == "" {
		return DefaultMetricSet(), nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("counters file (--collectors): %w", err)
	}
	defer f.Close()
	s, err := ParseCounters(f)
	if err != nil {
		return nil, fmt.Errorf("counters file %s (--collectors): %w", path, err)
	}
	return s, nil
}

// ParseCounters reads dcgm-exporter's counters CSV: one field per line,
// "FIELD_NAME, type, help text", # comments, blanks around columns trimmed.
// Types are gauge, counter and label. A syntax error fails the whole file
// with its line number; a well-formed line naming a field this daemon does
// not know is skipped and listed in Skipped.
func ParseCounters(r io.Reader) (*MetricSet, error) {
	cr := csv.NewReader(r)
	cr.Comment = '#'
	cr.FieldsPerRecord = -1
	cr.TrimLeadingSpace = true
	cr.LazyQuotes = true
	s := &MetricSet{}
	seen := map[Field]int{}
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		line, _ := cr.FieldPos(0)
		if err != nil {
			return nil, fmt.Errorf("line %d: %v", line, err)
		}
		if len(rec) == 1 && strings.TrimSpace(rec[0]) == "" {
			continue
		}
		if len(rec) != 3 {
			return nil, fmt.Errorf("line %d: %d columns, want 3: FIELD_NAME, type, help text", line, len(rec))
		}
		name, kind, help := strings.TrimSpace(rec[0]), strings.ToLower(strings.TrimSpace(rec[1])), strings.TrimSpace(rec[2])
		switch kind {
		case KindGauge, KindCounter, KindLabel:
		case "histogram", "summary":
			s.Skipped = append(s.Skipped, fmt.Sprintf("line %d: %s: type %s is not supported (gauge, counter, label)", line, name, kind))
			continue
		default:
			return nil, fmt.Errorf("line %d: %s: unknown type %q: want gauge, counter or label", line, name, kind)
		}
		if !strings.HasPrefix(name, "DCGM_") && !strings.HasPrefix(name, "dcgm_") {
			return nil, fmt.Errorf("line %d: %q is not a DCGM field name (DCGM_FI_…)", line, name)
		}
		f, ok := LookupField(name)
		if legacy, id, known, served := lookupLegacyField(name); known {
			// A 1.x name: served under that name, from its DCGM field.
			f, ok = legacy, served
			if !served {
				s.Skipped = append(s.Skipped, fmt.Sprintf("line %d: %s (DCGM field %d) is not served by gpu-plugin", line, name, id))
				continue
			}
		}
		if !ok {
			s.Skipped = append(s.Skipped, fmt.Sprintf("line %d: %s is not served by gpu-plugin", line, name))
			continue
		}
		if (kind == KindLabel) != (f == DriverVersion) {
			s.Skipped = append(s.Skipped, fmt.Sprintf("line %d: %s cannot be a %s here", line, name, kind))
			continue
		}
		if prev, dup := seen[f]; dup {
			return nil, fmt.Errorf("line %d: %s is listed twice (first on line %d)", line, name, prev)
		}
		seen[f] = line
		s.Metrics = append(s.Metrics, Metric{Field: f, Name: name, Kind: kind, Help: help})
	}
	if !s.servesAMetric() && len(s.Skipped) > 0 {
		// Serving nothing while looking configured would hide the mistake.
		return nil, fmt.Errorf("%s; no line of the file names a field gpu-plugin serves, so no DCGM metric would be exported (%d lines skipped: %s)",
			s.Skipped[0], len(s.Skipped), strings.Join(s.Skipped, "; "))
	}
	return s, nil
}

// servesAMetric reports whether the set holds a metric, not only labels.
func (s *MetricSet) servesAMetric() bool {
	for _, m := range s.Metrics {
		if m.Kind != KindLabel {
			return true
		}
	}
	return false
}
