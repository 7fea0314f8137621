package main

import (
	"fmt"
	"io"

	"sigs.k8s.io/yaml"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
)

const configUsage = `Usage: gpu-plugin config check FILE [flags]

Validates a config file (NVIDIA's version: v1 format, YAML or JSON) and prints
the effective configuration after flags, environment and defaults are applied
(precedence: flag > environment > file > default). Exits non-zero, naming the
bad field, if the file is invalid.
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
	cfg, rest, err := config.Load(name, append([]string{"--config", args[1]}, args[2:]...), getenv, stdout)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return usageError("config check: unexpected argument %q", rest[0])
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "# %s is valid; effective configuration:\n%s", args[1], out)
	return nil
}
