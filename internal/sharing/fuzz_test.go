package sharing_test

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// FuzzDeviceID feeds one string to every parser of device IDs: the
// replica ID parser (SplitReplicaID), and a time-slicing `devices` list
// through the real path (config.Parse, then NewPlan on a simulated
// dgx-a100-mig, whose mixed strategy has whole GPUs and MIG devices of six
// profiles). Properties:
//   - nothing panics;
//   - a replica ID that parses formats back to itself, and an error quotes
//     the input;
//   - config accepts only strings ClassifyDeviceRef accepts, and its error
//     names the input otherwise;
//   - a reference selects the one device an independent oracle (every
//     device's index and UUID forms, compared canonically) says it names,
//     in the one resource holding it, and nothing else; a reference that
//     names no device fails with an error quoting it;
//   - the replicas made of the selected device split back into its ID and
//     their replica numbers.
//
// The committed corpus is in testdata/fuzz/FuzzDeviceID; the seeds below
// are every form of every device of the inventory.
func FuzzDeviceID(f *testing.F) {
	inv := scan(f, "dgx-a100-mig")
	base, err := sharing.NewPlan(inv, sharing.Options{MigStrategy: config.MigMixed})
	if err != nil {
		f.Fatal(err)
	}
	type named struct{ resource, id string }
	oracle := map[string]named{} // canonical reference → device
	for _, r := range base.Resources {
		for _, d := range r.Devices {
			refs := []string{d.IndexID()}
			if d.MIG == nil {
				refs = append(refs, d.GPUUUID)
			} else {
				refs = append(refs, d.MIG.UUID, fmt.Sprintf("MIG-%s/%d/%d", d.GPUUUID, d.MIG.GPUInstanceID, d.MIG.ComputeInstanceID))
			}
			for _, ref := range refs {
				oracle[canonicalRef(ref)] = named{r.Name, d.ID}
				f.Add(ref)
			}
			f.Add(d.ID + "::3")
		}
	}
	for _, s := range []string{"", "::", "GPU-x::", "::1", "a::-1", "a::+1", "a::01", "a::1::2", "0:99999999999999999999",
		"99999999999999999999", "007", "00:01", "mig-gpu-00000000-0000-0000-0000-000000000000/1/0", "all", "0:", ":0"} {
		f.Add(s)
	}

	f.Fuzz(func(t *testing.T, id string) {
		checkReplicaID(t, id)
		if !utf8.ValidString(id) {
			return // JSON and YAML carry text only
		}
		quoted := fmt.Sprintf("%q", id)
		kind := config.ClassifyDeviceRef(id)
		var accepted []named
		for _, r := range base.Resources {
			c, err := config.Parse(sharedDoc(r.Name, id))
			if kind == "" {
				if err == nil {
					t.Fatalf("config accepts devices: [%s], which ClassifyDeviceRef rejects", quoted)
				}
				if !namesRef(err, id) {
					t.Fatalf("config error for devices: [%s] does not name it: %v", quoted, err)
				}
				return
			}
			if err != nil {
				// A well-formed GPU index may still be out of range (past
				// 2³¹); the error must name it.
				if kind != config.RefGPUIndex || !namesRef(err, id) {
					t.Fatalf("config rejects devices: [%s] (a %s) without naming it: %v", quoted, kind, err)
				}
				return
			}
			plan, err := sharing.NewPlan(inv, sharing.OptionsFrom(c))
			if err != nil {
				if !namesRef(err, id) {
					t.Fatalf("%s devices: [%s]: the error does not quote the reference: %v", r.Name, quoted, err)
				}
				continue
			}
			got := sharedDevice(t, plan, r.Name+config.SharedSuffix, quoted)
			accepted = append(accepted, named{r.Name, got})
		}
		want, names := oracle[canonicalRef(id)]
		switch {
		case !names && len(accepted) > 0:
			t.Fatalf("%s (%s) names no device on this node, yet selects %v", quoted, kind, accepted)
		case names && (len(accepted) != 1 || accepted[0] != want):
			t.Fatalf("%s (%s) names %s in %s, but selects %v", quoted, kind, want.id, want.resource, accepted)
		}
	})
}

// namesRef reports whether err names the reference id: whole, quoted, or,
// when it is long, its quoted beginning (config cuts quoted values at 64
// bytes so a huge value never makes a huge message).
func namesRef(err error, id string) bool {
	msg := err.Error()
	if strings.Contains(msg, id) || strings.Contains(msg, fmt.Sprintf("%q", id)) {
		return true
	}
	if len(id) <= 64 {
		return false
	}
	n := 64
	for n > 0 && !utf8.RuneStart(id[n]) {
		n--
	}
	// Quoted for a string, bare for a number.
	return strings.Contains(msg, fmt.Sprintf("%q… (%d bytes)", id[:n], len(id))) ||
		strings.Contains(msg, fmt.Sprintf("%s… (%d bytes)", id[:n], len(id)))
}

// checkReplicaID: SplitReplicaID either fails quoting id, or returns the
// parts id is made of.
func checkReplicaID(t *testing.T, id string) {
	physical, n, err := sharing.SplitReplicaID(id)
	switch {
	case err != nil:
		if !strings.Contains(err.Error(), fmt.Sprintf("%q", id)) {
			t.Fatalf("SplitReplicaID(%q): the error does not quote the ID: %v", id, err)
		}
	case n == -1:
		if physical != id || strings.Contains(id, sharing.ReplicaSeparator) {
			t.Fatalf("SplitReplicaID(%q) = %q, -1: a plain ID must come back whole", id, physical)
		}
	case n < 0 || physical == "":
		t.Fatalf("SplitReplicaID(%q) = %q, %d", id, physical, n)
	default:
		if again := physical + sharing.ReplicaSeparator + strconv.Itoa(n); again != id {
			t.Fatalf("SplitReplicaID(%q) = %q, %d, which formats as %q: two IDs would name one replica", id, physical, n, again)
		}
	}
}

// sharedDoc is a config that shares resource's device id two ways. id is
// written as a YAML double-quoted string of printable ASCII and escapes,
// so that the YAML reader's rules on raw characters do not hide the
// devices field from the test.
func sharedDoc(resource, id string) []byte {
	return []byte(`{"version": "v1", "flags": {"migStrategy": "mixed"}, "sharing": {"timeSlicing": {"renameByDefault": true,
  "resources": [{"name": "` + resource + `", "replicas": 2, "devices": [` + yamlQuote(id) + `]}]}}}`)
}

func yamlQuote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r >= 0x20 && r < 0x7f:
			b.WriteRune(r)
		case r <= 0xffff:
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			fmt.Fprintf(&b, `\U%08x`, r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// sharedDevice checks that the shared resource holds the two replicas of one
// device and returns that device's ID.
func sharedDevice(t *testing.T, plan *sharing.Plan, name, quoted string) string {
	for _, r := range plan.Resources {
		if r.Name != name {
			continue
		}
		if len(r.Devices) != 2 || r.Devices[0].Physical != r.Devices[1].Physical {
			t.Fatalf("devices: [%s] shares %d devices under %s, want the 2 replicas of one", quoted, len(r.Devices), name)
		}
		base, _, _ := strings.Cut(r.Devices[0].ID, sharing.ReplicaSeparator)
		for n, d := range r.Devices {
			physical, replica, err := sharing.SplitReplicaID(d.ID)
			if err != nil || physical != base || replica != n || d.Replica != n {
				t.Fatalf("replica %d of %s is %q: splits into %q, %d, %v", n, quoted, d.ID, physical, replica, err)
			}
		}
		return base
	}
	t.Fatalf("devices: [%s] is accepted, but there is no %s resource", quoted, name)
	return ""
}

// canonicalRef is the oracle's spelling of a device reference: UUIDs in
// lower case, numbers without leading zeros (as text: no overflow).
func canonicalRef(ref string) string {
	ref = strings.ToLower(ref)
	trim := func(s string) string {
		if t := strings.TrimLeft(s, "0"); t != "" {
			return t
		}
		if s == "" {
			return ""
		}
		return "0"
	}
	if rest, ok := strings.CutPrefix(ref, "mig-gpu-"); ok {
		parts := strings.Split(rest, "/")
		if len(parts) == 3 {
			return "mig-gpu-" + parts[0] + "/" + trim(parts[1]) + "/" + trim(parts[2])
		}
		return ref
	}
	if g, m, ok := strings.Cut(ref, ":"); ok && !strings.Contains(ref, "-") {
		return trim(g) + ":" + trim(m)
	}
	if !strings.Contains(ref, "-") {
		return trim(ref)
	}
	return ref
}
