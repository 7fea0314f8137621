package config

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParse checks that no document crashes Parse, and that what Parse
// accepts survives a round trip: the effective config, written out as
// JSON, parses again to the same thing. The committed corpus is in
// testdata/fuzz/FuzzParse; NVIDIA's documented configs are added too.
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "nvidia", "*.y*ml"))
	more, _ := filepath.Glob(filepath.Join("testdata", "*.yaml"))
	for _, p := range append(files, more...) {
		if raw, err := os.ReadFile(p); err == nil {
			f.Add(raw)
		}
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		c, err := Parse(raw)
		if err != nil {
			if c != nil {
				t.Fatalf("Parse returned a config with an error: %v", err)
			}
			return
		}
		_ = c.Warnings()
		out, err := json.Marshal(c)
		if err != nil {
			t.Fatalf("an accepted config does not marshal: %v", err)
		}
		again, err := Parse(out)
		if err != nil {
			t.Fatalf("an accepted config, written out, no longer parses: %v\n%s", err, out)
		}
		out2, err := json.Marshal(again)
		if err != nil || string(out2) != string(out) {
			t.Fatalf("round trip changed the config:\n%s\n%s", out, out2)
		}
	})
}
