package nodeconfig

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// configMapDir lays out dir as the kubelet mounts a ConfigMap: the keys
// are links into a ..data generation directory.
func configMapDir(t *testing.T, keys ...string) string {
	t.Helper()
	dir := t.TempDir()
	gen := filepath.Join(dir, "..2026_12_03_06_00_00.1")
	if err := os.Mkdir(gen, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := os.WriteFile(filepath.Join(gen, k), []byte("version: v1\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Base(gen), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := os.Symlink(filepath.Join("..data", k), filepath.Join(dir, k)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestChoose(t *testing.T) {
	tests := []struct {
		name     string
		keys     []string
		label    string
		labelled bool
		def      string
		want     string // chosen name
		by       string
		unknown  string // the name an UnknownError reports
	}{
		{name: "label names a file", keys: []string{"a", "b"}, label: "b", labelled: true, def: "a", want: "b", by: ByLabel},
		{name: "no label: the default", keys: []string{"a", "b"}, def: "a", want: "a", by: ByDefault},
		{name: "empty label: the default", keys: []string{"a", "b"}, labelled: true, def: "b", want: "b", by: ByDefault},
		{name: "no label, no default: the only file", keys: []string{"only"}, want: "only", by: OnlyFile},
		{name: "no label, no default, several files: none", keys: []string{"a", "b"}, by: NoFile},
		{name: "no files at all", by: NoFile},
		{name: "unknown label", keys: []string{"a"}, label: "mig", labelled: true, def: "a", unknown: "mig"},
		{name: "unknown default", keys: []string{"a", "b"}, def: "c", unknown: "c"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := configMapDir(t, tt.keys...)
			got, err := Choose(dir, tt.label, tt.labelled, tt.def)
			if tt.unknown != "" {
				var ue *UnknownError
				if !errors.As(err, &ue) || ue.Name != tt.unknown || len(ue.Have) != len(tt.keys) {
					t.Fatalf("Choose = %+v, %v; want an UnknownError naming %q and the %d files", got, err, tt.unknown, len(tt.keys))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Name != tt.want || got.By != tt.by {
				t.Errorf("Choose = %+v, want %q by %s", got, tt.want, tt.by)
			}
			if tt.want != "" && got.Path != filepath.Join(dir, tt.want) {
				t.Errorf("path %q, want %q", got.Path, filepath.Join(dir, tt.want))
			}
		})
	}
}
