package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Devices is a shared resource's `devices` field: which of the resource's
// devices are shared. Exactly one form is set: All ("all", the default),
// Count (the first N devices in index order), or List.
type Devices struct {
	All   bool
	Count int
	// List holds device references: a GPU index ("0"), a MIG index
	// ("<gpu>:<mig>", e.g. "0:1"), a GPU UUID ("GPU-…") or a MIG UUID
	// ("MIG-…", or the older "MIG-GPU-<uuid>/<gi>/<ci>").
	List []string
}

// DeviceRef kinds, as Classify reports them.
const (
	RefGPUIndex = "GPU index"
	RefMIGIndex = "MIG index"
	RefGPUUUID  = "GPU UUID"
	RefMIGUUID  = "MIG UUID"
)

var (
	// uuidRE takes the forms NVIDIA's parser (github.com/google/uuid)
	// accepts: dashed, 32 hex digits, {dashed} and urn:uuid:dashed.
	dashedRE     = `[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}`
	uuidRE       = `(?:` + dashedRE + `|[0-9a-fA-F]{32}|\{` + dashedRE + `\}|(?i:urn:uuid:)` + dashedRE + `)`
	gpuUUIDRE    = regexp.MustCompile(`^GPU-` + uuidRE + `$`)
	migUUIDRE    = regexp.MustCompile(`^MIG-` + uuidRE + `$`)
	migOldUUIDRE = regexp.MustCompile(`^MIG-GPU-` + uuidRE + `/[0-9]+/[0-9]+$`)
	migIndexRE   = regexp.MustCompile(`^[0-9]+:[0-9]+$`)
	gpuIndexRE   = regexp.MustCompile(`^[0-9]+$`)
)

// ClassifyDeviceRef says what kind of reference s is, or "" if none.
func ClassifyDeviceRef(s string) string {
	switch {
	case gpuIndexRE.MatchString(s):
		return RefGPUIndex
	case migIndexRE.MatchString(s):
		return RefMIGIndex
	case gpuUUIDRE.MatchString(s):
		return RefGPUUUID
	case migUUIDRE.MatchString(s), migOldUUIDRE.MatchString(s):
		return RefMIGUUID
	}
	return ""
}

const devicesHelp = `want "all", a count of devices (1 or more), or a list of GPU indices (0), MIG indices (0:1), GPU UUIDs (GPU-…) and MIG UUIDs (MIG-…)`

// UnmarshalJSON accepts "all", a positive count, or a list of references;
// list elements may be numbers (GPU indices) or strings.
func (d *Devices) UnmarshalJSON(b []byte) error {
	*d = Devices{}
	b = bytes.TrimSpace(b)
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		if s != "all" {
			return fmt.Errorf("%s is not allowed: %s", quote(s), devicesHelp)
		}
		d.All = true
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err == nil {
		c, err := strconv.Atoi(n.String())
		if err != nil || c < 1 {
			return fmt.Errorf("%s is not allowed: a count must be a whole number of 1 or more; %s", clip(n.String()), devicesHelp)
		}
		d.Count = c
		return nil
	}
	var list []json.RawMessage
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("wrong type: %s", devicesHelp)
	}
	// An empty list, and a device listed twice, are accepted as NVIDIA's
	// parser accepts them; by default devices is ignored, as NVIDIA
	// ignores it, and with resource customization on they are refused
	// then (compat.go, the sharing package).
	d.List = make([]string, 0, min(len(list), 64))
	for i, raw := range list {
		path := "[" + strconv.Itoa(i) + "]"
		var ref string
		if err := json.Unmarshal(raw, &n); err == nil {
			if v, err := strconv.ParseUint(n.String(), 10, 63); err == nil {
				ref = strconv.FormatUint(v, 10)
			} else if errors.Is(err, strconv.ErrRange) {
				return fieldErr(path, "%s is too large for a GPU index; list a GPU by its index as nvidia-smi shows it (0, 1, …)", clip(n.String()))
			} else {
				return fieldErr(path, "%s is not a GPU index (a whole number, 0 or more)", clip(n.String()))
			}
		} else if err := json.Unmarshal(raw, &ref); err != nil {
			return fieldErr(path, "wrong type: want a GPU index, a MIG index (<gpu>:<mig>) or a GPU/MIG UUID")
		}
		if ClassifyDeviceRef(ref) == "" {
			return fieldErr(path, "%s is not a GPU index (0), a MIG index (<gpu>:<mig>, e.g. 0:1), a GPU UUID (GPU-…) or a MIG UUID (MIG-…)", quote(ref))
		}
		d.List = append(d.List, ref)
	}
	return nil
}

// MarshalJSON writes the form that is set; the zero value is "all".
func (d Devices) MarshalJSON() ([]byte, error) {
	switch {
	case d.Count > 0:
		return json.Marshal(d.Count)
	case len(d.List) > 0:
		return json.Marshal(d.List)
	}
	return json.Marshal("all")
}

// String is the form as written in a config file.
func (d Devices) String() string {
	switch {
	case d.Count > 0:
		return strconv.Itoa(d.Count)
	case len(d.List) > 0:
		return "[" + strings.Join(d.List, ", ") + "]"
	}
	return "all"
}
