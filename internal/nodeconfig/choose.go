// Package nodeconfig picks a node's config file from a directory of named
// ones by a node label, with the rules of NVIDIA's config-manager sidecar:
// the label names the file; without the label (or with it empty), the
// named default, else the directory's only file, else no file (defaults).
package nodeconfig

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// How a Choice was made.
const (
	ByLabel   = "label"
	ByDefault = "default"
	OnlyFile  = "only-file"
	NoFile    = "none"
)

// maxConfigs bounds the listing; a ConfigMap holds far fewer keys.
const maxConfigs = 1000

// Choice is the config file a node uses.
type Choice struct {
	Name string // the file's name in the directory; "" for no file
	Path string // its path; "" for no file
	By   string // ByLabel, ByDefault, OnlyFile or NoFile
}

// UnknownError is a label (or default) naming no file in the directory.
type UnknownError struct {
	What, Name, Dir string
	Have            []string
}

func (e *UnknownError) Error() string {
	return fmt.Sprintf("%s %q names no config file in %s (it has %s)", e.What, e.Name, e.Dir, have(e.Have))
}

func have(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// Names lists the config files in dir: a mounted ConfigMap's keys, without
// its ..data bookkeeping entries.
func Names(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading the config directory: %w", err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if fi, err := os.Stat(filepath.Join(dir, e.Name())); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		out = append(out, e.Name())
		if len(out) > maxConfigs {
			return nil, fmt.Errorf("the config directory %s holds over %d files", dir, maxConfigs)
		}
	}
	slices.Sort(out)
	return out, nil
}

// Choose picks the file for a node whose label value is label (labelled
// false when the node has no such label). A label or default that names no
// file is an *UnknownError.
func Choose(dir, label string, labelled bool, def string) (Choice, error) {
	names, err := Names(dir)
	if err != nil {
		return Choice{}, err
	}
	pick := func(name, by string) Choice {
		return Choice{Name: name, Path: filepath.Join(dir, name), By: by}
	}
	switch {
	case labelled && label != "":
		if !slices.Contains(names, label) {
			return Choice{}, &UnknownError{What: "node label value", Name: label, Dir: dir, Have: names}
		}
		return pick(label, ByLabel), nil
	case def != "":
		if !slices.Contains(names, def) {
			return Choice{}, &UnknownError{What: "--default-config", Name: def, Dir: dir, Have: names}
		}
		return pick(def, ByDefault), nil
	case len(names) == 1:
		return pick(names[0], OnlyFile), nil
	}
	return Choice{By: NoFile}, nil
}
