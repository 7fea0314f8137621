// Package config holds the daemon's configuration: NVIDIA k8s-device-plugin's
// `version: v1` file format, accepted unchanged, plus the daemon's own
// settings, and the rules that merge flags, environment and file
// (flag > environment > file > default).
package config

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// Version is the only config file version.
const Version = "v1"

// Config is the effective configuration. File-backed fields are pointers so
// "unset" differs from "false" while the sources are merged; after Resolve
// every flag-backed pointer is set.
type Config struct {
	Version   string     `json:"version"`
	Flags     Flags      `json:"flags"`
	Resources *Resources `json:"resources,omitempty"`
	Sharing   Sharing    `json:"sharing,omitempty"`
	IMEX      IMEX       `json:"imex,omitempty"`
	// Health is this daemon's extension (health_options.go).
	Health Health `json:"health,omitempty"`
	// DRA is this daemon's extension (dra_options.go).
	DRA DRA `json:"dra,omitempty"`
	// Extensions holds this daemon's other file-only extensions (compat.go).
	Extensions Extensions `json:"extensions,omitempty"`

	// Daemon holds settings that exist only on the command line and in the
	// environment (not in NVIDIA's file format).
	Daemon Daemon `json:"-"`
	// Telemetry holds the exporter's settings, also flags and environment
	// only (telemetry_options.go).
	Telemetry Telemetry `json:"-"`

	// parseWarnings are file problems that did not stop parsing (Warnings).
	parseWarnings []string
	// compatWarnings name the settings cleared to do what NVIDIA's plugin
	// does (compat.go).
	compatWarnings []string
	// origin is how Load built this config, so Reload can do it again.
	origin *origin
	// fileSum is the SHA-256 of the config file content it was read from.
	fileSum [32]byte
}

// Flags is the file's `flags` section.
type Flags struct {
	MigStrategy             *string      `json:"migStrategy,omitempty"`
	FailOnInitError         *bool        `json:"failOnInitError,omitempty"`
	NvidiaDriverRoot        *string      `json:"nvidiaDriverRoot,omitempty"`
	NvidiaDevRoot           *string      `json:"nvidiaDevRoot,omitempty"`
	MpsRoot                 *string      `json:"mpsRoot,omitempty"`
	GDRCopyEnabled          *bool        `json:"gdrcopyEnabled,omitempty"`
	GDSEnabled              *bool        `json:"gdsEnabled,omitempty"`
	MOFEDEnabled            *bool        `json:"mofedEnabled,omitempty"`
	UseNodeFeatureAPI       *bool        `json:"useNodeFeatureAPI,omitempty"`
	DeviceDiscoveryStrategy *string      `json:"deviceDiscoveryStrategy,omitempty"`
	Plugin                  *PluginFlags `json:"plugin,omitempty"`
	GFD                     *GFDFlags    `json:"gfd,omitempty"`
}

// PluginFlags is `flags.plugin`.
type PluginFlags struct {
	PassDeviceSpecs               *bool          `json:"passDeviceSpecs,omitempty"`
	DeviceListStrategy            *StringOrSlice `json:"deviceListStrategy,omitempty"`
	DeviceIDStrategy              *string        `json:"deviceIDStrategy,omitempty"`
	CDIAnnotationPrefix           *string        `json:"cdiAnnotationPrefix,omitempty"`
	NvidiaCTKPath                 *string        `json:"nvidiaCTKPath,omitempty"`
	ContainerDriverRoot           *string        `json:"containerDriverRoot,omitempty"`
	SharedDevicesAllocationPolicy *string        `json:"sharedDevicesAllocationPolicy,omitempty"`
}

// GFDFlags is `flags.gfd`, NVIDIA's feature discovery settings. NoTimestamp
// and MachineTypeFile shape gpu-plugin's node labels too; the rest are
// accepted so existing files parse.
type GFDFlags struct {
	Oneshot         *bool     `json:"oneshot,omitempty"`
	NoTimestamp     *bool     `json:"noTimestamp,omitempty"`
	SleepInterval   *Duration `json:"sleepInterval,omitempty"`
	OutputFile      *string   `json:"outputFile,omitempty"`
	MachineTypeFile *string   `json:"machineTypeFile,omitempty"`
}

// Resources is the `resources` section: resource names by device pattern.
type Resources struct {
	GPUs []Resource `json:"gpus,omitempty"`
	MIGs []Resource `json:"mig,omitempty"`
}

// Resource maps devices whose product name matches Pattern to Name.
type Resource struct {
	Pattern string `json:"pattern"`
	Name    string `json:"name"`
}

// Sharing is the `sharing` section.
type Sharing struct {
	TimeSlicing *ReplicatedResources `json:"timeSlicing,omitempty"`
	MPS         *ReplicatedResources `json:"mps,omitempty"`
}

// ReplicatedResources configures time-slicing or MPS.
type ReplicatedResources struct {
	RenameByDefault            bool                 `json:"renameByDefault,omitempty"`
	FailRequestsGreaterThanOne *bool                `json:"failRequestsGreaterThanOne,omitempty"`
	Resources                  []ReplicatedResource `json:"resources,omitempty"`
}

// ReplicatedResource is one shared resource.
type ReplicatedResource struct {
	Name     string   `json:"name"`
	Rename   string   `json:"rename,omitempty"`
	Devices  *Devices `json:"devices,omitempty"` // nil: all
	Replicas int      `json:"replicas"`
}

// IMEX is the `imex` section.
type IMEX struct {
	ChannelIDs []int `json:"channelIDs,omitempty"`
	Required   *bool `json:"required,omitempty"`
}

// StringOrSlice accepts a YAML string or a list of strings.
type StringOrSlice []string

// UnmarshalJSON accepts "a" or ["a", "b"].
func (s *StringOrSlice) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*s = splitList(one)
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return fmt.Errorf("want a string or a list of strings")
	}
	*s = many
	return nil
}

// Daemon holds the daemon's own settings.
type Daemon struct {
	ConfigFile       string `json:"configFile"`
	Simulate         string `json:"simulate"`
	NVMLLibrary      string `json:"nvmlLibrary"`
	KubeletSocketDir string `json:"kubeletSocketDir"`
	// KubeletSocket is the kubelet's registration socket (NVIDIA's
	// --kubelet-socket); "" when --kubelet-socket was not given: then it is
	// kubelet.sock in KubeletSocketDir. SkipRegistration is set when
	// --kubelet-socket was given empty: the plugin servers run but nothing
	// registers with a kubelet, as NVIDIA's plugin does.
	KubeletSocket    string `json:"kubeletSocket,omitempty"`
	SkipRegistration bool   `json:"skipRegistration,omitempty"`
	// CDIFeatureFlags and CDIDisableHooks are NVIDIA's --cdi-feature-flags
	// and --cdi-disable-hooks: accepted, for the CDI spec generator.
	CDIFeatureFlags []string `json:"cdiFeatureFlags,omitempty"`
	CDIDisableHooks []string `json:"cdiDisableHooks,omitempty"`
	NodeName        string   `json:"nodeName"`
	Kubeconfig      string   `json:"kubeconfig,omitempty"`
	PodNamespace    string   `json:"podNamespace,omitempty"`
	PodName         string   `json:"podName,omitempty"`
	// ConfigDir holds named config files; the node's ConfigLabel label
	// picks one (DefaultConfig without it). See Select.
	ConfigDir      string        `json:"configDir,omitempty"`
	ConfigLabel    string        `json:"configLabel,omitempty"`
	DefaultConfig  string        `json:"defaultConfig,omitempty"`
	MetricsAddress string        `json:"metricsAddress"`
	LogFormat      string        `json:"logFormat"`
	Verbosity      int           `json:"verbosity"`
	SysRoot        string        `json:"sysRoot"`
	CDISpecDir     string        `json:"cdiSpecDir"`
	WebConfigFile  string        `json:"webConfigFile"`
	RescanInterval time.Duration `json:"rescanInterval"`
	// NodeLabels turns the GFD-compatible node labels file on; LabelsFile is
	// where it is written (sharing_options.go).
	NodeLabels bool   `json:"nodeLabels"`
	LabelsFile string `json:"labelsFile"`
	// MPSControlBinary is the nvidia-cuda-mps-control run for sharing.mps
	// ("": the driver root's).
	MPSControlBinary string `json:"mpsControlBinary,omitempty"`
	// WatchConfig reloads the config file when it changes.
	WatchConfig bool `json:"watchConfig"`
	// KubeletRegistrarDir and KubeletPluginsDir are where the DRA plugin
	// registers and serves (dra_options.go).
	KubeletRegistrarDir string `json:"kubeletRegistrarDir,omitempty"`
	KubeletPluginsDir   string `json:"kubeletPluginsDir,omitempty"`
}

// Device list strategies.
const (
	ListEnvvar         = "envvar"
	ListVolumeMounts   = "volume-mounts"
	ListCDIAnnotations = "cdi-annotations"
	ListCDICRI         = "cdi-cri"
)

// MIG strategies.
const (
	MigNone   = "none"
	MigSingle = "single"
	MigMixed  = "mixed"
)

// Device ID strategies.
const (
	IDUUID  = "uuid"
	IDIndex = "index"
)

// ReadFile reads a config file through ReadConfigFile's bounds and parses
// it (YAML or JSON). Unknown fields are warnings that name their path.
func ReadFile(path string) (*Config, error) {
	raw, err := ReadConfigFile(path)
	if err != nil {
		return nil, err
	}
	c, err := Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	c.fileSum = sha256.Sum256(raw)
	return c, nil
}

// Parse decodes and validates a config document. Every error names the
// field at fault by its path (e.g. sharing.timeSlicing.resources[1].replicas)
// and what the field accepts; settings accepted without effect are listed by
// Warnings.
func Parse(raw []byte) (*Config, error) {
	if len(raw) > MaxFileSize {
		return nil, fmt.Errorf("the config is larger than %d bytes (%d); a config is a few KiB, and a ConfigMap holds at most 1 MiB", MaxFileSize, len(raw))
	}
	if len(bytes.TrimSpace(raw)) == 0 {
		return &Config{Version: Version}, nil
	}
	node := yamlNode(raw)
	if err := checkAliases(node); err != nil {
		return nil, err
	}
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("not valid YAML or JSON: %w", err)
	}
	doc, err := decodeGeneric(js)
	if err != nil {
		return nil, fmt.Errorf("not valid YAML or JSON: %w", err)
	}
	if _, ok := doc.(map[string]any); !ok && doc != nil {
		return nil, fmt.Errorf("want a mapping with version, flags, sharing, ... at the top; got %s", describe(doc))
	}
	var shape shapeChecker
	if err := shape.check(reflect.TypeFor[Config](), doc, ""); err != nil {
		return nil, err
	}
	// Unknown fields were reported as warnings by the shape check; like
	// NVIDIA's parser, the decode ignores them.
	var c Config
	if err := json.NewDecoder(bytes.NewReader(js)).Decode(&c); err != nil {
		return nil, explainDecodeError(err)
	}
	switch c.Version {
	case "":
		c.Version = Version
	case Version:
	default:
		return nil, fmt.Errorf("version: %s is not supported (want %q)", quote(c.Version), Version)
	}
	if err := c.validateFile(); err != nil {
		return nil, err
	}
	c.parseWarnings = append(duplicateKeys(node), shape.warnings...)
	return &c, nil
}

// explainDecodeError turns encoding/json's messages into ones that name the
// field's path.
func explainDecodeError(err error) error {
	msg := err.Error()
	if f, ok := strings.CutPrefix(msg, "json: unknown field "); ok {
		return fmt.Errorf("unknown field %s: remove it or check its spelling (see the configuration reference in docs/configuration.md)", f)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Errorf("%s: wrong type: got a %s, want %s", te.Field, te.Value, te.Type)
	}
	return err
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// Accessors for resolved values; Resolve guarantees the pointers are set.

// MigStrategy is the resolved MIG strategy.
func (c *Config) MigStrategy() string { return Deref(c.Flags.MigStrategy) }

// FailOnInitError is the resolved failOnInitError.
func (c *Config) FailOnInitError() bool {
	return c.Flags.FailOnInitError != nil && *c.Flags.FailOnInitError
}

// DriverRoot is the host driver root.
func (c *Config) DriverRoot() string { return Deref(c.Flags.NvidiaDriverRoot) }

// DevRoot is the host root of /dev (defaults to the driver root).
func (c *Config) DevRoot() string {
	if r := Deref(c.Flags.NvidiaDevRoot); r != "" {
		return r
	}
	return c.DriverRoot()
}

// Sharing strategies: what the sharing section in force does, as the
// nvidia.com/gpu.sharing-strategy label names them.
const (
	SharingNone        = "none"
	SharingTimeSlicing = "time-slicing"
	SharingMPS         = "mps"
)

// ReplicatedSharing is the sharing section in force and its field path:
// sharing.mps when present (sharing.timeSlicing is then ignored, as
// NVIDIA's plugin ignores it), else sharing.timeSlicing; nil when neither.
func (c *Config) ReplicatedSharing() (*ReplicatedResources, string) {
	if c.Sharing.MPS != nil {
		return c.Sharing.MPS, "sharing.mps"
	}
	return c.Sharing.TimeSlicing, "sharing.timeSlicing"
}

// UsesMPS reports whether GPUs are shared through MPS.
func (c *Config) UsesMPS() bool { return c.Sharing.MPS != nil }

// MPSRoot is --mps-root: the host directory of the MPS control daemons'
// pipes, logs and shared memory.
func (c *Config) MPSRoot() string { return Deref(c.Flags.MpsRoot) }

// checkMPS refuses what NVIDIA's plugin refuses at start when it shares
// through MPS: the mixed MIG strategy and a missing MPS root.
func (c *Config) checkMPS() error {
	if !c.UsesMPS() {
		return nil
	}
	if c.MigStrategy() == MigMixed {
		return fieldErr("sharing.mps", "MPS cannot be used with mig-strategy mixed (NVIDIA's plugin refuses it too): MPS shares whole GPUs only; use mig-strategy none, or share MIG devices with sharing.timeSlicing")
	}
	root := c.MPSRoot()
	if root == "" {
		return fieldErr("sharing.mps", "MPS needs an MPS root: set --mps-root (flags.mpsRoot, environment MPS_ROOT) to the host directory for the MPS control daemons' pipes, logs and shared memory, e.g. /run/nvidia/mps as the chart does")
	}
	if !filepath.IsAbs(root) {
		return fieldErr("flags.mpsRoot", "%s is not an absolute path; want a host directory such as /run/nvidia/mps (flag --mps-root, environment MPS_ROOT)", quote(root))
	}
	return nil
}

// Plugin returns the plugin flags, never nil.
func (c *Config) Plugin() *PluginFlags {
	if c.Flags.Plugin == nil {
		c.Flags.Plugin = &PluginFlags{}
	}
	return c.Flags.Plugin
}

// DeviceListStrategies is the resolved device list strategy set.
func (c *Config) DeviceListStrategies() []string {
	if p := c.Plugin().DeviceListStrategy; p != nil {
		return *p
	}
	return nil
}

// UsesCDI reports whether a device list strategy names devices by CDI,
// so that a CDI spec must describe them.
func (c *Config) UsesCDI() bool {
	return slices.ContainsFunc(c.DeviceListStrategies(), func(s string) bool {
		return s == ListCDIAnnotations || s == ListCDICRI
	})
}

// DeviceIDStrategy is uuid or index.
func (c *Config) DeviceIDStrategy() string { return Deref(c.Plugin().DeviceIDStrategy) }

// PassDeviceSpecs is the resolved passDeviceSpecs.
func (c *Config) PassDeviceSpecs() bool { return derefBool(c.Plugin().PassDeviceSpecs) }

// CDIAnnotationPrefix is the resolved CDI annotation prefix.
func (c *Config) CDIAnnotationPrefix() string { return Deref(c.Plugin().CDIAnnotationPrefix) }

// Deref reads an optional string; nil is "".
func Deref(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

func derefBool(p *bool) bool { return p != nil && *p }
