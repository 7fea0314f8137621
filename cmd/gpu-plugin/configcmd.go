package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

const configUsage = `Usage: gpu-plugin config check FILE [--strict] [flags]

Validates a config file (NVIDIA's version: v1 format, YAML or JSON) and prints
the effective configuration after flags, environment and defaults are applied
(precedence: flag > environment > file > default). Exits non-zero, naming the
bad field and what it accepts, if the file is invalid. Settings that are
accepted but not applied, unknown keys and keys written twice are listed as
warnings on stderr (each names its field); with --strict any warning makes
it exit 1, for CI pipelines that want typos caught.

With --simulate=PROFILE it also derives the resources that node would
advertise (MIG strategy, time-slicing, rename, devices), so a config can be
tried against e.g. dgx-a100-mig without a GPU.
`

func runConfig(args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, configUsage)
		if len(args) == 0 {
			return usageError("config: missing subcommand (want: config check FILE)")
		}
		return config.ErrHelp
	}
	if args[0] != "check" {
		return usageError("config: unknown subcommand %q (want: config check FILE)", args[0])
	}
	if len(args) < 2 {
		return usageError("config check: missing FILE")
	}
	strict := false
	flags := make([]string, 0, len(args))
	for _, a := range args[2:] {
		if a == "--strict" || a == "-strict" || a == "--strict=true" {
			strict = true
			continue
		}
		flags = append(flags, a)
	}
	cfg, rest, err := config.Load(name, append([]string{"--config", args[1]}, flags...), getenv, stdout)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return usageError("config check: unexpected argument %q", rest[0])
	}
	warnings := cfg.Warnings()
	for _, w := range warnings {
		fmt.Fprintf(stderr, "warning: %s\n", w)
	}
	var resources string
	var planWarnings int
	if cfg.Daemon.Simulate != "" {
		if resources, planWarnings, err = describeResources(cfg, stderr); err != nil {
			return err
		}
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	// The daemon settings, with the interval readable ("30s").
	daemonJSON, err := json.Marshal(cfg.Daemon)
	if err != nil {
		return err
	}
	var daemonDoc map[string]any
	if err := json.Unmarshal(daemonJSON, &daemonDoc); err != nil {
		return err
	}
	daemonDoc["rescanInterval"] = cfg.Daemon.RescanInterval.String()
	daemonOut, err := yaml.Marshal(map[string]any{"daemon": daemonDoc})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "# %s is valid; effective configuration (flag > environment > file > default):\n%s", args[1], out)
	fmt.Fprintf(stdout, "# daemon settings (flags and environment only):\n%s%s", daemonOut, resources)
	if n := len(warnings) + planWarnings; strict && n > 0 {
		return fmt.Errorf("config check --strict: %s gives %d warnings (listed above)", args[1], n)
	}
	return nil
}

// describeResources says, as YAML comments, what a simulated node would
// advertise under cfg.
func describeResources(cfg *config.Config, stderr io.Writer) (string, int, error) {
	p, err := sim.LoadProfile(cfg.Daemon.Simulate)
	if err != nil {
		return "", 0, err
	}
	lib, err := nvml.Open(sim.NewNode(p, nil).NVML())
	if err != nil {
		return "", 0, err
	}
	defer lib.Close()
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		return "", 0, err
	}
	var draUnits, warnings []string
	pluginInv := inv
	if cfg.UsesDRA() {
		draUnits, pluginInv, warnings = advert.SplitForDRA(inv, cfg)
	}
	plan, err := sharing.NewPlan(pluginInv, sharing.OptionsFrom(cfg))
	if err != nil {
		return "", 0, fmt.Errorf("on simulated node %s: %w", p.Name, err)
	}
	warnings = append(warnings, plan.Warnings...)
	for _, w := range warnings {
		fmt.Fprintf(stderr, "warning: %s\n", w)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# resources on simulated node %s:\n", p.Name)
	if cfg.UsesDRA() {
		fmt.Fprintf(&b, "#   DRA (driver gpu.nvidia.com, --allocation-mode=%s): %d devices%s\n", cfg.AllocationMode(), len(draUnits), describeUnits(inv, draUnits))
	}
	for _, r := range plan.Resources {
		physical := map[string]bool{}
		for _, d := range r.Devices {
			physical[d.Physical] = true
		}
		var detail []string
		if r.Shared() {
			detail = append(detail, fmt.Sprintf("%d devices × %d replicas", len(physical), r.Replicas))
			if r.MPS {
				detail = append(detail, fmt.Sprintf("MPS: %d%% of the SMs each", 100/r.Replicas))
			}
			if r.FailRequestsGreaterThanOne {
				detail = append(detail, "at most 1 per container")
			}
		}
		if r.Base != r.Name {
			detail = append(detail, "renamed from "+r.Base)
		}
		line := fmt.Sprintf("#   %s: %d", r.Name, len(r.Devices))
		if len(detail) > 0 {
			line += " (" + strings.Join(detail, ", ") + ")"
		}
		fmt.Fprintln(&b, line)
	}
	return b.String(), len(warnings), nil
}

// describeUnits names GPUs and MIG devices by index and profile:
// " (GPU 0, GPU 1, MIG 1g.10gb on GPU 2)".
func describeUnits(inv *nvml.Inventory, units []string) string {
	if len(units) == 0 {
		return ""
	}
	var names []string
	for _, u := range units {
		for _, g := range inv.GPUs {
			if g.UUID == u {
				names = append(names, fmt.Sprintf("GPU %d", g.Index))
			}
			for _, m := range g.MIGDevices {
				if m.UUID == u {
					names = append(names, fmt.Sprintf("MIG %s on GPU %d", m.Profile, g.Index))
				}
			}
		}
	}
	return " (" + strings.Join(names, ", ") + ")"
}
