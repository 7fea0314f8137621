package config

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"

	yamlv3 "go.yaml.in/yaml/v3"
)

// Extensions is the file's `extensions` section: this daemon's opt-ins
// beyond what NVIDIA's plugin does. NVIDIA's plugin ignores the section.
type Extensions struct {
	// ResourceCustomization applies resources.gpus, resources.mig and the
	// rename and devices fields of sharing.timeSlicing.resources[], which
	// NVIDIA's plugin v0.20 parses and then ignores. Off by default, so a
	// file advertises what it advertises under NVIDIA's plugin. Also
	// --resource-customization / GPU_PLUGIN_RESOURCE_CUSTOMIZATION.
	ResourceCustomization *bool `json:"resourceCustomization,omitempty"`
}

// ResourceCustomization reports whether the resource customization opt-in
// is on (see Extensions).
func (c *Config) ResourceCustomization() bool {
	return derefBool(c.Extensions.ResourceCustomization)
}

// applyNVIDIASemantics does what NVIDIA's plugin v0.20 does with the
// settings it parses but does not honour, unless the opt-in is on: it
// clears resources.gpus and resources.mig, and every rename and devices of
// sharing.timeSlicing.resources[] and sharing.mps.resources[] (a rename
// other than the renameByDefault one is dropped; devices become "all").
// Each cleared setting gets one warning that names it and says what NVIDIA
// does. With the opt-in it checks what only the opt-in makes meaningful.
// Whatever the opt-in, sharing.mps's failRequestsGreaterThanOne defaults
// to true, and sharing.timeSlicing is ignored (with a warning) when
// sharing.mps is present, as NVIDIA's plugin does.
func (c *Config) applyNVIDIASemantics() error {
	c.compatWarnings = nil
	if m := c.Sharing.MPS; m != nil && m.FailRequestsGreaterThanOne == nil {
		t := true
		m.FailRequestsGreaterThanOne = &t
	}
	if c.Sharing.MPS != nil && c.Sharing.TimeSlicing != nil {
		c.compatWarnings = append(c.compatWarnings, "sharing.timeSlicing: ignored because sharing.mps is set; NVIDIA's device plugin v0.20 shares through MPS alone then; remove one of the two")
	}
	sections := []struct {
		path string
		rr   *ReplicatedResources
	}{{"sharing.timeSlicing", c.Sharing.TimeSlicing}, {"sharing.mps", c.Sharing.MPS}}
	if c.ResourceCustomization() {
		for _, sec := range sections {
			if sec.rr == nil {
				continue
			}
			for i, r := range sec.rr.Resources {
				if d := r.Devices; d != nil && !d.All && d.Count == 0 && len(d.List) == 0 {
					return fieldErr(fmt.Sprintf("%s.resources[%d].devices", sec.path, i), "an empty list selects nothing: %s", devicesHelp)
				}
			}
		}
		return nil
	}
	const optIn = "set extensions.resourceCustomization: true (or --resource-customization) to apply it"
	if r := c.Resources; r != nil {
		if len(r.GPUs) > 0 || len(r.MIGs) > 0 {
			c.compatWarnings = append(c.compatWarnings, "resources: ignored, as NVIDIA's device plugin v0.20 ignores it (devices keep their default resource names); "+optIn)
		}
		c.Resources = nil
	}
	for _, sec := range sections {
		if sec.rr != nil {
			c.compatWarnings = append(c.compatWarnings, sec.rr.applyNVIDIASemantics(sec.path, optIn)...)
		}
	}
	return nil
}

// applyNVIDIASemantics clears one sharing section's rename and devices
// fields and merges resources listed twice, returning a warning for each.
func (rr *ReplicatedResources) applyNVIDIASemantics(path, optIn string) []string {
	var warnings, renamed, selected []string
	for i := range rr.Resources {
		r := &rr.Resources[i]
		p := fmt.Sprintf("%s.resources[%d]", path, i)
		if r.Rename != "" && (!rr.RenameByDefault || r.Rename != r.Name+SharedSuffix) {
			renamed = append(renamed, p+".rename")
		}
		r.Rename = ""
		if d := r.Devices; d != nil && !d.All {
			selected = append(selected, p+".devices")
		}
		r.Devices = nil
	}
	for _, f := range renamed {
		what := "the resource keeps its name"
		if rr.RenameByDefault {
			what = "the resource is named <name>" + SharedSuffix + " (renameByDefault)"
		}
		warnings = append(warnings, fmt.Sprintf("%s: ignored, as NVIDIA's device plugin v0.20 ignores it (%s); %s", f, what, optIn))
	}
	for _, f := range selected {
		warnings = append(warnings, fmt.Sprintf("%s: ignored, as NVIDIA's device plugin v0.20 ignores it (every device of the resource is shared); %s", f, optIn))
	}
	// A resource listed more than once: NVIDIA's plugin writes the replica
	// IDs of each entry into one map, so every device ends up with the
	// largest replica count. Do the same, and say so.
	seen := map[string]int{}
	kept := make([]ReplicatedResource, 0, len(rr.Resources))
	for i, r := range rr.Resources {
		j, dup := seen[r.Name]
		if !dup {
			seen[r.Name] = len(kept)
			kept = append(kept, r)
			continue
		}
		warnings = append(warnings, fmt.Sprintf(
			"%s.resources[%d]: shares %s again; as with NVIDIA's device plugin v0.20, each of its devices gets the largest replica count given (%d); list each resource once",
			path, i, r.Name, max(kept[j].Replicas, r.Replicas)))
		kept[j].Replicas = max(kept[j].Replicas, r.Replicas)
	}
	rr.Resources = kept
	return warnings
}

// Duration is NVIDIA's duration type (flags.gfd.sleepInterval): a number of
// nanoseconds, a duration string ("60s") or "infinite".
type Duration time.Duration

// Infinite is the value of "infinite".
const Infinite = Duration(math.MaxInt64)

// UnmarshalJSON accepts a number (nanoseconds, as NVIDIA's plugin reads
// it), a duration string or "infinite".
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		if s == "infinite" {
			*d = Infinite
			return nil
		}
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("%s is not a duration: want a duration such as 60s, \"infinite\", or a number of nanoseconds", quote(s))
		}
		*d = Duration(v)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err == nil {
		f, err := strconv.ParseFloat(n.String(), 64)
		if err != nil || f < math.MinInt64 || f >= math.MaxInt64 {
			return fmt.Errorf("%s is not a number of nanoseconds within ±292 years", clip(n.String()))
		}
		*d = Duration(int64(f))
		return nil
	}
	return fmt.Errorf("wrong type: want a duration such as 60s, \"infinite\", or a number of nanoseconds")
}

// MarshalJSON writes the duration string ("1m0s", "infinite").
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// String is the duration as time.Duration writes it, or "infinite".
func (d Duration) String() string {
	if d == Infinite {
		return "infinite"
	}
	return time.Duration(d).String()
}

// duplicateKeys lists, as warnings, every mapping key written more than
// once. The YAML-to-JSON step keeps the last one silently (as NVIDIA's
// parser does); the warning names the key's path and says which value
// applies. Aliases are not followed, so the walk is linear in the input.
// A document that does not parse gives no warnings here: the real parse
// reports it.
func duplicateKeys(root *yamlv3.Node) []string {
	var out []string
	var walk func(n *yamlv3.Node, path string, depth int)
	walk = func(n *yamlv3.Node, path string, depth int) {
		if n == nil || depth > 100 {
			return
		}
		switch n.Kind {
		case yamlv3.DocumentNode:
			for _, c := range n.Content {
				walk(c, path, depth+1)
			}
		case yamlv3.SequenceNode:
			for i, c := range n.Content {
				walk(c, joinPath(path, "["+strconv.Itoa(i)+"]"), depth+1)
			}
		case yamlv3.MappingNode:
			seen := map[string]int{}
			for i := 0; i+1 < len(n.Content); i += 2 {
				k := n.Content[i]
				if k.Kind != yamlv3.ScalarNode || k.Value == "<<" {
					continue
				}
				p := joinPath(path, clip(k.Value))
				if line, dup := seen[k.Value]; dup {
					out = append(out, fmt.Sprintf("%s: written twice (lines %d and %d); the last one (line %d) applies, as with NVIDIA's plugin; remove the other", p, line, k.Line, k.Line))
				}
				seen[k.Value] = k.Line
				walk(n.Content[i+1], p, depth+1)
			}
		}
	}
	walk(root, "", 0)
	return out
}

// yamlNode parses raw into a YAML node tree without expanding aliases
// (memory linear in the input), or returns nil if it does not parse (the
// real parse then reports why).
func yamlNode(raw []byte) *yamlv3.Node {
	var root yamlv3.Node
	if err := yamlv3.Unmarshal(raw, &root); err != nil {
		return nil
	}
	return &root
}

// checkAliases refuses a document whose aliases expand it to more than
// twice its written size (plus a little): the YAML-to-JSON step expands
// every alias, so a few lines of nested aliases ("billion laughs") would
// otherwise cost memory without bound. Config files have no use for such
// aliasing.
func checkAliases(root *yamlv3.Node) error {
	if root == nil {
		return nil
	}
	written := 0
	memo := map[*yamlv3.Node]int{}
	const limit = 1 << 40
	var size func(n *yamlv3.Node, depth int) int
	size = func(n *yamlv3.Node, depth int) int {
		if n == nil || depth > 1000 {
			return 1
		}
		if v, ok := memo[n]; ok {
			return v
		}
		memo[n] = 1 // a cycle counts once
		total := 1
		if n.Kind == yamlv3.AliasNode {
			total += size(n.Alias, depth+1)
		} else {
			written++
			for _, c := range n.Content {
				total = min(total+size(c, depth+1), limit)
			}
		}
		memo[n] = total
		return total
	}
	expanded := size(root, 0)
	if expanded > 2*written+10000 {
		return fmt.Errorf("YAML aliases expand this %d-node document to about %d nodes; write the values out instead of aliasing them", written, expanded)
	}
	return nil
}

// ParseAs parses a config document and applies what a start applies to the
// file's sharing and resources sections: NVIDIA's semantics, or with
// resourceCustomization the opt-in's checks. It is Load without flags and
// environment, for tests and fuzzing of whole documents.
func ParseAs(raw []byte, resourceCustomization bool) (*Config, error) {
	c, err := Parse(raw)
	if err != nil {
		return nil, err
	}
	c.Extensions.ResourceCustomization = &resourceCustomization
	if err := c.applyNVIDIASemantics(); err != nil {
		return nil, err
	}
	return c, nil
}
