package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// Exit codes of `gpu-plugin health`, those of the Node Problem Detector's
// custom-plugin monitor.
const (
	healthOK      = 0
	healthNotOK   = 1
	healthUnknown = 2
)

const healthUsage = `Usage: gpu-plugin health [--from URL]

Asks the running daemon for each GPU's health and prints one line per GPU,
unhealthy GPUs first:

  GPU 3 GPU-… unhealthy: quarantined by operator
  GPU 0 GPU-… healthy

Exit code, as the Node Problem Detector's custom-plugin monitor reads it:
0 every GPU healthy, 1 some GPU unhealthy (a MIG device counts for its GPU),
2 the daemon could not be asked (or has no GPUs).

  --from URL   the daemon's metrics address (default http://127.0.0.1:9400;
               environment GPU_PLUGIN_HEALTH_FROM)
`

// runHealth is `gpu-plugin health`; it returns the exit code.
func runHealth(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("health", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	def := getenv("GPU_PLUGIN_HEALTH_FROM")
	if def == "" {
		def = "http://127.0.0.1:9400"
	}
	from := fs.String("from", def, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, healthUsage)
			return healthOK
		}
		fmt.Fprintf(stderr, "%s: health: %v (see gpu-plugin health --help)\n", name, err)
		return healthUnknown
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: health: unexpected argument %q\n", name, fs.Arg(0))
		return healthUnknown
	}
	var doc daemon.DebugDevices
	if err := fetchDebugDevices(ctx, *from, &doc); err != nil {
		fmt.Fprintf(stdout, "unknown: %v\n", err)
		return healthUnknown
	}
	if doc.Inventory == nil || len(doc.Inventory.GPUs) == 0 {
		why := "the daemon lists no GPUs"
		if doc.NVMLError != "" {
			why += ": " + doc.NVMLError
		}
		fmt.Fprintf(stdout, "unknown: %s\n", why)
		return healthUnknown
	}
	var bad, good []string
	for _, g := range doc.Inventory.GPUs {
		if reason := gpuProblem(g, doc); reason != "" {
			bad = append(bad, fmt.Sprintf("GPU %d %s unhealthy: %s", g.Index, orUnknown(g.UUID), reason))
		} else {
			good = append(good, fmt.Sprintf("GPU %d %s healthy", g.Index, g.UUID))
		}
	}
	for _, l := range append(bad, good...) {
		fmt.Fprintln(stdout, l)
	}
	if len(bad) > 0 {
		return healthNotOK
	}
	return healthOK
}

// gpuProblem is why a GPU or one of its MIG devices is unhealthy, or "".
func gpuProblem(g nvml.GPU, doc daemon.DebugDevices) string {
	if g.Lost || !g.Usable() {
		if g.Problem != "" {
			return g.Problem
		}
		return "lost or unidentified"
	}
	if st, ok := doc.Health[g.UUID]; ok && !st.Healthy {
		return st.Reason
	}
	var migs []string
	for _, m := range g.MIGDevices {
		if st, ok := doc.Health[m.UUID]; ok && !st.Healthy {
			migs = append(migs, m.UUID+": "+st.Reason)
		}
	}
	return strings.Join(migs, "; ")
}

func orUnknown(uuid string) string {
	if uuid == "" {
		return "(no UUID)"
	}
	return uuid
}
