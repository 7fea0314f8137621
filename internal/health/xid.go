package health

import (
	"fmt"
	"slices"
	"strings"
)

// DefaultSkipXIDs are the XIDs that report application errors, not a sick
// GPU: a program's own fault, the driver cleaning up after it, or a video
// engine exception. NVIDIA's plugin skips the same ones.
var DefaultSkipXIDs = []uint64{13, 31, 43, 45, 68, 109}

// XIDLost is the XID of a GPU that has fallen off the bus.
const XIDLost = 79

// xidMeanings names the XIDs a reason is most likely to show. Anything else
// is named by its number only.
var xidMeanings = map[uint64]string{
	13:  "graphics engine exception (application error)",
	31:  "GPU memory page fault (application error)",
	32:  "invalid or corrupted push buffer stream",
	38:  "driver firmware error",
	43:  "GPU stopped processing (application error)",
	45:  "preemptive cleanup after a previous error",
	48:  "double-bit ECC error",
	56:  "display engine error",
	57:  "error programming video memory interface",
	61:  "internal micro-controller breakpoint",
	62:  "internal micro-controller halt",
	63:  "ECC page retirement or row remapping recorded",
	64:  "ECC page retirement or row remapping failed",
	68:  "video decoder exception (application error)",
	69:  "graphics engine class error",
	74:  "NVLink error",
	79:  "GPU has fallen off the bus",
	92:  "high single-bit ECC error rate",
	94:  "contained ECC error",
	95:  "uncontained ECC error",
	109: "context switch timeout (application error)",
	119: "GSP RPC timeout",
	120: "GSP error",
}

// XIDMeaning describes an XID for a reason string.
func XIDMeaning(code uint64) string {
	if m, ok := xidMeanings[code]; ok {
		return m
	}
	return "unknown XID: treated as fatal"
}

// XIDReason is the reason recorded for a fatal XID.
func XIDReason(code uint64) string {
	if code == XIDLost {
		return fmt.Sprintf("lost: XID %d (%s)", code, XIDMeaning(code))
	}
	return fmt.Sprintf("XID %d (%s)", code, XIDMeaning(code))
}

// PolicyConfig is what decides which events are fatal: NVIDIA's two
// environment knobs and the config file's lists.
type PolicyConfig struct {
	// DisableAll is DP_DISABLE_HEALTHCHECKS=all: no health checks, except
	// XIDs that are explicitly fatal (Fatal, EnableAll).
	DisableAll bool
	// DisableXIDs is DP_DISABLE_HEALTHCHECKS=xids: every XID is skipped
	// unless explicitly fatal; ECC and lost-GPU checks stay on.
	DisableXIDs bool
	// Skip are more XIDs to ignore (DP_DISABLE_HEALTHCHECKS numbers, the
	// file's skipXIDs), added to DefaultSkipXIDs.
	Skip []uint64
	// EnableAll is DP_ENABLE_HEALTHCHECKS=all: every XID is fatal.
	EnableAll bool
	// Fatal are XIDs that are always fatal (DP_ENABLE_HEALTHCHECKS numbers,
	// the file's fatalXIDs); they win over every skip list.
	Fatal []uint64
	// DoubleBitECC makes a double-bit ECC event fatal.
	DoubleBitECC bool
}

// Policy decides which events make a device unhealthy. It is immutable.
//
// Precedence, highest first: explicitly fatal XIDs (Fatal, EnableAll);
// then DP_DISABLE_HEALTHCHECKS=all or xids (skip every XID); then the skip
// lists; every other XID, known or not, is fatal. NVIDIA's plugin switches
// every check off when `all` is combined with an enabled XID; here the
// enabled XID stays fatal.
type Policy struct {
	cfg   PolicyConfig
	skip  map[uint64]bool
	fatal map[uint64]bool
}

// NewPolicy builds a policy.
func NewPolicy(c PolicyConfig) *Policy {
	p := &Policy{cfg: c, skip: map[uint64]bool{}, fatal: map[uint64]bool{}}
	for _, x := range DefaultSkipXIDs {
		p.skip[x] = true
	}
	for _, x := range c.Skip {
		p.skip[x] = true
	}
	for _, x := range c.Fatal {
		p.fatal[x] = true
	}
	return p
}

// DefaultPolicy is the policy without any knob set.
func DefaultPolicy() *Policy { return NewPolicy(PolicyConfig{DoubleBitECC: true}) }

// XIDFatal reports whether an XID makes its device unhealthy.
func (p *Policy) XIDFatal(code uint64) bool {
	switch {
	case p.fatal[code] || p.cfg.EnableAll:
		return true
	case p.cfg.DisableAll || p.cfg.DisableXIDs:
		return false
	}
	return !p.skip[code]
}

// ECCFatal reports whether double-bit ECC events make a device unhealthy.
func (p *Policy) ECCFatal() bool { return p.cfg.DoubleBitECC && !p.cfg.DisableAll }

// anyXIDFatal reports whether some XID can be fatal, i.e. whether XID
// events are worth listening to.
func (p *Policy) anyXIDFatal() bool {
	return p.cfg.EnableAll || len(p.fatal) > 0 || !(p.cfg.DisableAll || p.cfg.DisableXIDs)
}

// Disabled reports whether health checking is off altogether
// (DP_DISABLE_HEALTHCHECKS=all and nothing explicitly enabled): no events,
// no probes, devices stay as they are.
func (p *Policy) Disabled() bool {
	return p.cfg.DisableAll && !p.cfg.EnableAll && len(p.fatal) == 0
}

// String summarises the policy for logs and /debug/devices.
func (p *Policy) String() string {
	if p.Disabled() {
		return "disabled (DP_DISABLE_HEALTHCHECKS=all)"
	}
	var parts []string
	switch {
	case p.cfg.EnableAll:
		parts = append(parts, "every XID fatal")
	case p.cfg.DisableAll || p.cfg.DisableXIDs:
		parts = append(parts, "XIDs skipped except "+xidList(p.fatal))
	default:
		parts = append(parts, "XIDs fatal except "+xidList(p.skip))
		if len(p.fatal) > 0 {
			parts = append(parts, "forced fatal "+xidList(p.fatal))
		}
	}
	if p.ECCFatal() {
		parts = append(parts, "double-bit ECC fatal")
	} else {
		parts = append(parts, "ECC ignored")
	}
	return strings.Join(parts, "; ")
}

func xidList(set map[uint64]bool) string {
	if len(set) == 0 {
		return "none"
	}
	codes := make([]uint64, 0, len(set))
	for c := range set {
		codes = append(codes, c)
	}
	slices.Sort(codes)
	s := make([]string, len(codes))
	for i, c := range codes {
		s[i] = fmt.Sprint(c)
	}
	return strings.Join(s, ",")
}
