package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Health recovery policies.
const (
	// RecoveryNever keeps an unhealthy device unhealthy until the daemon
	// restarts (NVIDIA's plugin's only behaviour).
	RecoveryNever = "never"
	// RecoveryAfterQuietPeriod returns a device to service once its GPU
	// answers NVML again and has had no fatal event for the quiet period.
	RecoveryAfterQuietPeriod = "after-quiet-period"
)

// Health defaults.
const (
	DefaultHealthRecovery      = RecoveryAfterQuietPeriod
	DefaultHealthQuietPeriod   = time.Minute
	DefaultHealthProbeInterval = 5 * time.Second
)

// Health is the `health` section, this daemon's extension to NVIDIA's file
// format, plus NVIDIA's environment-only health knobs.
//
//	health:
//	  skipXIDs: [94]          # also ignore these XIDs (added to 13,31,43,45,68,109)
//	  fatalXIDs: [13]         # always fatal, whatever the skip lists say
//	  doubleBitECC: true      # a double-bit ECC event makes the device unhealthy
//	  recovery: after-quiet-period   # or never
//	  quietPeriod: 1m         # how long a GPU must answer and stay clean to come back
//	  probeInterval: 5s       # how often every GPU is probed with a cheap NVML call
//	  quarantine: ["GPU-…", 3] # GPUs (UUID or index) or MIG devices (UUID) taken out by hand; applied live
type Health struct {
	SkipXIDs      []uint64 `json:"skipXIDs,omitempty"`
	FatalXIDs     []uint64 `json:"fatalXIDs,omitempty"`
	DoubleBitECC  *bool    `json:"doubleBitECC,omitempty"`
	Recovery      *string  `json:"recovery,omitempty"`
	QuietPeriod   *string  `json:"quietPeriod,omitempty"`
	ProbeInterval *string  `json:"probeInterval,omitempty"`
	// Quarantine lists the GPUs (by UUID or index) and MIG devices (by
	// UUID) an operator took out of service. It applies live on a reload,
	// joined with QuarantineFlag.
	Quarantine QuarantineList `json:"quarantine,omitempty"`
	// QuarantineFlag is --health-quarantine (GPU_PLUGIN_HEALTH_QUARANTINE).
	QuarantineFlag QuarantineList `json:"-"`

	// NodeCondition publishes the node's GPU health to the API server (a
	// node condition and Events); NodeTaint adds a NoSchedule taint while
	// no GPU is healthy. Flag and environment only: they need RBAC that
	// the install grants with them.
	NodeCondition bool `json:"-"`
	NodeTaint     bool `json:"-"`

	// Disable and Enable are DP_DISABLE_HEALTHCHECKS and
	// DP_ENABLE_HEALTHCHECKS (environment or flag only, as NVIDIA's).
	Disable HealthCheckList `json:"-"`
	Enable  HealthCheckList `json:"-"`
}

// HealthCheckList is a parsed DP_DISABLE_HEALTHCHECKS or
// DP_ENABLE_HEALTHCHECKS value: "all", "xids" (disable only) and XID numbers,
// comma-separated.
type HealthCheckList struct {
	All  bool     `json:"all,omitempty"`
	XIDs bool     `json:"xids,omitempty"` // "xids": every XID (DP_DISABLE_HEALTHCHECKS only)
	List []uint64 `json:"list,omitempty"`
}

// ParseHealthCheckList parses a DP_*_HEALTHCHECKS value; allowXIDsWord
// accepts the word "xids".
func ParseHealthCheckList(s string, allowXIDsWord bool) (HealthCheckList, error) {
	var l HealthCheckList
	for _, tok := range splitList(s) {
		switch strings.ToLower(tok) {
		case "all":
			l.All = true
			continue
		case "xids":
			if allowXIDsWord {
				l.XIDs = true
				continue
			}
		}
		n, err := strconv.ParseUint(tok, 10, 64)
		if err != nil {
			words := `"all"`
			if allowXIDsWord {
				words = `"all", "xids"`
			}
			return l, fmt.Errorf("%s is not an XID number; want a comma-separated list of XID numbers or %s", quote(tok), words)
		}
		l.List = append(l.List, n)
	}
	return l, nil
}

// UnmarshalJSON reads the file's `health` section, rejecting unknown fields
// and bad values with the field's path.
func (h *Health) UnmarshalJSON(b []byte) error {
	var raw struct {
		SkipXIDs      []uint64       `json:"skipXIDs"`
		FatalXIDs     []uint64       `json:"fatalXIDs"`
		DoubleBitECC  *bool          `json:"doubleBitECC"`
		Recovery      *string        `json:"recovery"`
		QuietPeriod   *string        `json:"quietPeriod"`
		ProbeInterval *string        `json:"probeInterval"`
		Quarantine    QuarantineList `json:"quarantine"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&raw); err != nil {
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return fmt.Errorf("health: unknown field %s: the section takes skipXIDs, fatalXIDs, doubleBitECC, recovery, quietPeriod, probeInterval, quarantine", clip(f))
		}
		var qe quarantineError
		if errors.As(err, &qe) {
			return fmt.Errorf("health.quarantine: %w", err)
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			if te.Field == "" {
				return fmt.Errorf("health: wrong type: got a %s, want a mapping of fields", te.Value)
			}
			return fmt.Errorf("health.%s: wrong type: got a %s, want %s", te.Field, te.Value, healthFieldType(te.Field))
		}
		return fmt.Errorf("health: %w", err)
	}
	if raw.Recovery != nil {
		if err := checkRecovery(*raw.Recovery); err != nil {
			return fmt.Errorf("health.recovery: %w", err)
		}
	}
	if raw.QuietPeriod != nil {
		if _, err := parseQuietPeriod(*raw.QuietPeriod); err != nil {
			return fmt.Errorf("health.quietPeriod: %w", err)
		}
	}
	if raw.ProbeInterval != nil {
		if _, err := parseProbeInterval(*raw.ProbeInterval); err != nil {
			return fmt.Errorf("health.probeInterval: %w", err)
		}
	}
	*h = Health{
		SkipXIDs: raw.SkipXIDs, FatalXIDs: raw.FatalXIDs, DoubleBitECC: raw.DoubleBitECC,
		Recovery: raw.Recovery, QuietPeriod: raw.QuietPeriod, ProbeInterval: raw.ProbeInterval,
		Quarantine: raw.Quarantine, QuarantineFlag: h.QuarantineFlag, Disable: h.Disable, Enable: h.Enable,
	}
	return nil
}

// QuarantineList is a list of quarantine entries: a GPU index (a
// non-negative integer, in the file written as a number or a string), a GPU
// UUID or a MIG device UUID.
type QuarantineList []string

type quarantineError struct{ msg string }

func (e quarantineError) Error() string { return e.msg }

// UnmarshalJSON reads the file's list, taking numbers and strings.
func (l *QuarantineList) UnmarshalJSON(b []byte) error {
	var raw []json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return quarantineError{"wrong type: want a list of GPU UUIDs or indexes, e.g. [\"GPU-…\", 3]"}
	}
	out := make(QuarantineList, 0, len(raw))
	for i, r := range raw {
		var n uint64
		var s string
		switch {
		case json.Unmarshal(r, &n) == nil:
			s = strconv.FormatUint(n, 10)
		case json.Unmarshal(r, &s) == nil:
			if err := checkQuarantineEntry(s); err != nil {
				return quarantineError{fmt.Sprintf("entry %d: %v", i, err)}
			}
			s = strings.TrimSpace(s)
		default:
			return quarantineError{fmt.Sprintf("entry %d: %s is neither a GPU index nor a UUID string", i, clip(string(r)))}
		}
		out = append(out, s)
	}
	*l = out
	return nil
}

func checkQuarantineEntry(s string) error {
	s = strings.TrimSpace(s)
	if s == "" {
		return fmt.Errorf("empty entry: want a GPU UUID (GPU-…), a MIG device UUID (MIG-…) or a GPU index")
	}
	if strings.ContainsAny(s, " \t,") {
		return fmt.Errorf("%s is not a GPU UUID or index (one GPU per entry)", quote(s))
	}
	return nil
}

// ParseQuarantineList parses --health-quarantine: comma-separated GPU
// UUIDs, MIG device UUIDs and GPU indexes.
func ParseQuarantineList(v string) (QuarantineList, error) {
	var out QuarantineList
	for _, tok := range splitList(v) {
		if err := checkQuarantineEntry(tok); err != nil {
			return nil, err
		}
		out = append(out, tok)
	}
	return out, nil
}

func healthFieldType(field string) string {
	switch field {
	case "skipXIDs", "fatalXIDs":
		return "a list of non-negative XID numbers"
	case "doubleBitECC":
		return "true or false"
	}
	return "a string"
}

func checkRecovery(v string) error {
	if v != RecoveryNever && v != RecoveryAfterQuietPeriod {
		return fmt.Errorf("%s is not a recovery policy: want %s or %s", quote(v), RecoveryAfterQuietPeriod, RecoveryNever)
	}
	return nil
}

func parseQuietPeriod(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%s is not a duration ≥ 0 (e.g. 30s, 5m)", quote(v))
	}
	return d, nil
}

func parseProbeInterval(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 || d > time.Hour {
		return 0, fmt.Errorf("%s is not a duration between 1ns and 1h (e.g. 5s)", quote(v))
	}
	return d, nil
}

// healthOptions are the flags of the health capability (group GroupHealth).
func healthOptions() []Option {
	str := func(name, env, def, usage string, check func(string) error, field func(c *Config) **string) Option {
		return Option{Name: name, Env: []string{env}, Default: def, Usage: usage, Group: GroupHealth,
			set: func(c *Config, v string) error {
				if err := check(v); err != nil {
					return err
				}
				*field(c) = &v
				return nil
			},
			inFile: func(c *Config) bool { return *field(c) != nil }}
	}
	list := func(name, env, usage string, allowXIDs bool, field func(c *Config) *HealthCheckList) Option {
		return Option{Name: name, Env: []string{env}, Usage: usage, Group: GroupHealth,
			set: func(c *Config, v string) error {
				l, err := ParseHealthCheckList(v, allowXIDs)
				if err != nil {
					return err
				}
				*field(c) = l
				return nil
			}}
	}
	boolean := func(name, env, usage string, field func(c *Config) *bool) Option {
		return Option{Name: name, Env: []string{env}, Default: "false", Usage: usage, Group: GroupHealth, Bool: true,
			set: func(c *Config, v string) error {
				b, err := strconv.ParseBool(v)
				if err != nil {
					return fmt.Errorf("want true or false")
				}
				*field(c) = b
				return nil
			}}
	}
	return []Option{
		str("health-recovery", "GPU_PLUGIN_HEALTH_RECOVERY", DefaultHealthRecovery,
			"when an unhealthy GPU returns to service: after-quiet-period (it answers NVML again, has no fatal event for --health-quiet-period, the driver's recovery action reads none and no row remap is pending or failed) or never (until the daemon restarts); file: health.recovery",
			checkRecovery, func(c *Config) **string { return &c.Health.Recovery }),
		str("health-quiet-period", "GPU_PLUGIN_HEALTH_QUIET_PERIOD", "1m",
			"how long a GPU must answer NVML without a fatal event before it is healthy again; doubles for a GPU that keeps failing (up to 16×); file: health.quietPeriod",
			func(v string) error { _, err := parseQuietPeriod(v); return err }, func(c *Config) **string { return &c.Health.QuietPeriod }),
		str("health-probe-interval", "GPU_PLUGIN_HEALTH_PROBE_INTERVAL", "5s",
			"how often every GPU is probed with a cheap NVML call (finds lost GPUs, drives recovery, replaces events if they fail); file: health.probeInterval",
			func(v string) error { _, err := parseProbeInterval(v); return err }, func(c *Config) **string { return &c.Health.ProbeInterval }),
		{Name: "health-double-bit-ecc", Env: []string{"GPU_PLUGIN_HEALTH_DOUBLE_BIT_ECC"}, Default: "true", Group: GroupHealth, Bool: true,
			Usage: "a double-bit (uncorrectable) ECC event makes the device unhealthy; file: health.doubleBitECC",
			set: func(c *Config, v string) error {
				b, err := strconv.ParseBool(v)
				if err != nil {
					return fmt.Errorf("want true or false")
				}
				c.Health.DoubleBitECC = &b
				return nil
			},
			inFile: func(c *Config) bool { return c.Health.DoubleBitECC != nil }},
		{Name: "health-quarantine", Env: []string{"GPU_PLUGIN_HEALTH_QUARANTINE"}, Group: GroupHealth,
			Usage: "GPUs to take out of service by hand, comma-separated GPU UUIDs, MIG device UUIDs or GPU indexes: their devices are unhealthy with reason \"quarantined by operator\"; joined with the file's health.quarantine, which applies live on a reload",
			set: func(c *Config, v string) error {
				l, err := ParseQuarantineList(v)
				if err != nil {
					return err
				}
				c.Health.QuarantineFlag = l
				return nil
			}},
		boolean("node-health-condition", "GPU_PLUGIN_NODE_HEALTH_CONDITION",
			"publish GPU health to the API server: a GPUHealthy condition on this node (False with the sick GPUs and why) and an Event on the node for each GPU that turns unhealthy or healthy again; needs get and status patch on its own node and event create (the chart's nodeHealth.condition grants them)",
			func(c *Config) *bool { return &c.Health.NodeCondition }),
		boolean("node-health-taint", "GPU_PLUGIN_NODE_HEALTH_TAINT",
			"with --node-health-condition: taint the node gpu-plugin.io/no-healthy-gpu:NoSchedule while no GPU of the node can be allocated, and remove the taint when one recovers (also at start when this is off)",
			func(c *Config) *bool { return &c.Health.NodeTaint }),
		list("disable-healthchecks", "DP_DISABLE_HEALTHCHECKS",
			"as NVIDIA's: XIDs to ignore, comma-separated; xids: ignore every XID; all: no health checks, except XIDs named in DP_ENABLE_HEALTHCHECKS",
			true, func(c *Config) *HealthCheckList { return &c.Health.Disable }),
		list("enable-healthchecks", "DP_ENABLE_HEALTHCHECKS",
			"as NVIDIA's: XIDs that are always fatal, comma-separated, overriding every skip list (also with DP_DISABLE_HEALTHCHECKS=all); all: every XID is fatal",
			false, func(c *Config) *HealthCheckList { return &c.Health.Enable }),
	}
}

// HealthSettings is the resolved health configuration.
type HealthSettings struct {
	SkipXIDs      []uint64 // file skipXIDs
	FatalXIDs     []uint64 // file fatalXIDs
	Disable       HealthCheckList
	Enable        HealthCheckList
	DoubleBitECC  bool
	Recovery      string
	QuietPeriod   time.Duration
	ProbeInterval time.Duration
	// Quarantine is --health-quarantine and the file's health.quarantine
	// together, without duplicates: GPU UUIDs, MIG UUIDs and GPU indexes.
	Quarantine []string
}

// HealthSettings resolves the health options; unset values take their
// defaults, so a Config built by hand works too.
func (c *Config) HealthSettings() (HealthSettings, error) {
	h := c.Health
	s := HealthSettings{
		SkipXIDs: h.SkipXIDs, FatalXIDs: h.FatalXIDs, Disable: h.Disable, Enable: h.Enable,
		DoubleBitECC: h.DoubleBitECC == nil || *h.DoubleBitECC,
		Recovery:     DefaultHealthRecovery, QuietPeriod: DefaultHealthQuietPeriod, ProbeInterval: DefaultHealthProbeInterval,
	}
	for _, q := range append(slices.Clone(h.QuarantineFlag), h.Quarantine...) {
		if !slices.Contains(s.Quarantine, q) {
			s.Quarantine = append(s.Quarantine, q)
		}
	}
	var err error
	if h.Recovery != nil {
		if err := checkRecovery(*h.Recovery); err != nil {
			return s, fmt.Errorf("health recovery (--health-recovery, health.recovery): %w", err)
		}
		s.Recovery = *h.Recovery
	}
	if h.QuietPeriod != nil {
		if s.QuietPeriod, err = parseQuietPeriod(*h.QuietPeriod); err != nil {
			return s, fmt.Errorf("health quiet period (--health-quiet-period, health.quietPeriod): %w", err)
		}
	}
	if h.ProbeInterval != nil {
		if s.ProbeInterval, err = parseProbeInterval(*h.ProbeInterval); err != nil {
			return s, fmt.Errorf("health probe interval (--health-probe-interval, health.probeInterval): %w", err)
		}
	}
	return s, nil
}
