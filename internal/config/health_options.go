package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
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
type Health struct {
	SkipXIDs      []uint64 `json:"skipXIDs,omitempty"`
	FatalXIDs     []uint64 `json:"fatalXIDs,omitempty"`
	DoubleBitECC  *bool    `json:"doubleBitECC,omitempty"`
	Recovery      *string  `json:"recovery,omitempty"`
	QuietPeriod   *string  `json:"quietPeriod,omitempty"`
	ProbeInterval *string  `json:"probeInterval,omitempty"`

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
		SkipXIDs      []uint64 `json:"skipXIDs"`
		FatalXIDs     []uint64 `json:"fatalXIDs"`
		DoubleBitECC  *bool    `json:"doubleBitECC"`
		Recovery      *string  `json:"recovery"`
		QuietPeriod   *string  `json:"quietPeriod"`
		ProbeInterval *string  `json:"probeInterval"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&raw); err != nil {
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return fmt.Errorf("health: unknown field %s: the section takes skipXIDs, fatalXIDs, doubleBitECC, recovery, quietPeriod, probeInterval", clip(f))
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
		Disable: h.Disable, Enable: h.Enable,
	}
	return nil
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
