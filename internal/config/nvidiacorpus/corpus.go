// Package nvidiacorpus reads the compatibility corpus in
// internal/config/testdata/nvidia: NVIDIA-shaped config files, each with
// what NVIDIA's device plugin v0.20 does with it (cases.yaml). Tests of
// `config check` and of the daemon run every case and compare.
package nvidiacorpus

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"

	"sigs.k8s.io/yaml"
)

// Outcome is what a plugin does with a config on a node.
type Outcome struct {
	// Outcome is "accepted" or "refused".
	Outcome string `json:"outcome"`
	// Resources is the advertised resource name → device count, when
	// accepted.
	Resources map[string]int `json:"resources,omitempty"`
	// Error is a substring of gpu-plugin's refusal (ours and optIn only).
	Error string `json:"error,omitempty"`
}

// Accepted reports whether the outcome is "accepted".
func (o Outcome) Accepted() bool { return o.Outcome == "accepted" }

// Case is one config file of the corpus.
type Case struct {
	File    string            `json:"file"`
	From    string            `json:"from"`
	Profile string            `json:"profile"`
	Env     map[string]string `json:"env,omitempty"`
	// NVIDIA is what NVIDIA's plugin v0.20 does.
	NVIDIA Outcome `json:"nvidia"`
	// Ours is set only where gpu-plugin deliberately differs by default.
	Ours *Outcome `json:"ours,omitempty"`
	// Warnings are substrings, one per warning gpu-plugin gives.
	Warnings []string `json:"warnings,omitempty"`
	// OptIn is set where --resource-customization changes the outcome.
	OptIn *Outcome `json:"optIn,omitempty"`
}

// Path is the case's config file.
func (c Case) Path() string { return filepath.Join(Dir(), c.File) }

// Want is what gpu-plugin must do by default: NVIDIA's outcome unless the
// case records a deliberate difference.
func (c Case) Want() Outcome {
	if c.Ours != nil {
		return *c.Ours
	}
	return c.NVIDIA
}

// WantOptIn is what gpu-plugin must do with --resource-customization.
func (c Case) WantOptIn() Outcome {
	if c.OptIn != nil {
		return *c.OptIn
	}
	return c.Want()
}

// Getenv reads the case's environment.
func (c Case) Getenv(k string) string { return c.Env[k] }

// Dir is the corpus directory.
func Dir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "testdata", "nvidia")
}

// Load reads cases.yaml and checks that it covers every file in the
// directory and names only files that exist.
func Load() ([]Case, error) {
	raw, err := os.ReadFile(filepath.Join(Dir(), "cases.yaml"))
	if err != nil {
		return nil, err
	}
	var cases []Case
	if err := yaml.UnmarshalStrict(raw, &cases); err != nil {
		return nil, fmt.Errorf("cases.yaml: %w", err)
	}
	entries, err := os.ReadDir(Dir())
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if n := e.Name(); n != "README.md" && n != "cases.yaml" &&
			!slices.ContainsFunc(cases, func(c Case) bool { return c.File == n }) {
			return nil, fmt.Errorf("cases.yaml has no case for %s", n)
		}
	}
	for _, c := range cases {
		if _, err := os.Stat(c.Path()); err != nil {
			return nil, fmt.Errorf("cases.yaml: %w", err)
		}
		if c.Profile == "" || (c.NVIDIA.Outcome != "accepted" && c.NVIDIA.Outcome != "refused") {
			return nil, fmt.Errorf("cases.yaml: %s: want a profile and nvidia.outcome accepted or refused", c.File)
		}
	}
	return cases, nil
}
