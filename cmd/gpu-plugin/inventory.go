package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path"
	"strings"
	"text/tabwriter"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
)

const inventoryUsage = `Usage: gpu-plugin inventory [--simulate PROFILE] [--from URL] [-o table|json|yaml]

Prints the node's GPUs, MIG devices and the GPU topology matrix, like
nvidia-smi -L and nvidia-smi topo -m together.

  --simulate PROFILE   a simulated node instead of NVML (environment GPU_PLUGIN_SIMULATE):
                       built-in profiles: %s,
                       or the path of a profile file (schema in docs/simulated-nodes.md)
  --from URL           ask a running daemon instead (its metrics address, e.g.
                       http://localhost:9400): adds each device's health and reason
  -o, --output FORMAT  table (default), json or yaml

The NVML flags of the daemon (--driver-root, --driver-root-ctr-path, --sys-root)
and their environment variables apply too.
`

func runInventory(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("inventory", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	output := fs.String("o", "table", "")
	fs.StringVar(output, "output", "table", "")
	from := fs.String("from", "", "")
	simulate := fs.String("simulate", getenv("GPU_PLUGIN_SIMULATE"), "")
	driverRoot := fs.String("driver-root", "", "")
	ctrRoot := fs.String("driver-root-ctr-path", "", "")
	sysRoot := fs.String("sys-root", "", "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stdout, inventoryUsage, strings.Join(sim.BuiltinNames(), ", "))
			return config.ErrHelp
		}
		return usageError("inventory: %v (see gpu-plugin inventory --help)", err)
	}
	if fs.NArg() > 0 {
		return usageError("inventory: unexpected argument %q", fs.Arg(0))
	}
	switch *output {
	case "table", "json", "yaml":
	default:
		return usageError("inventory: -o %q: want table, json or yaml", *output)
	}

	var doc daemon.DebugDevices
	if *from != "" {
		if err := fetchDebugDevices(ctx, *from, &doc); err != nil {
			return err
		}
	} else {
		cfg, _, err := config.Load(name, nil, getenv, io.Discard)
		if err != nil {
			return err
		}
		cfg.Daemon.Simulate = *simulate
		if *driverRoot != "" {
			cfg.Flags.NvidiaDriverRoot = driverRoot
		}
		if *ctrRoot != "" {
			cfg.Plugin().ContainerDriverRoot = ctrRoot
		}
		if *sysRoot != "" {
			cfg.Daemon.SysRoot = *sysRoot
		}
		cfg.Daemon.MetricsAddress = ""
		fail := true
		cfg.Flags.FailOnInitError = &fail
		d, err := daemon.New(cfg, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
		if err != nil {
			return err
		}
		defer d.Close()
		doc = daemon.DebugDevices{Simulated: d.SimNode() != nil, Inventory: d.Inventory(), Health: d.Health().Snapshot()}
	}

	switch *output {
	case "json":
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(doc)
	case "yaml":
		out, err := yaml.Marshal(doc)
		if err != nil {
			return err
		}
		_, err = stdout.Write(out)
		return err
	}
	if doc.Inventory == nil {
		return fmt.Errorf("the daemon has no inventory: %s", doc.NVMLError)
	}
	return printInventory(stdout, doc.Inventory, doc.Health)
}

func fetchDebugDevices(ctx context.Context, base string, doc *daemon.DebugDevices) error {
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(base, "/")+"/debug/devices", nil)
	if err != nil {
		return usageError("inventory: --from %q: %v", base, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("asking the daemon at %s: %w", base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("asking the daemon at %s: %s", base, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(doc)
}

// printInventory renders the inventory like nvidia-smi -L and topo -m.
func printInventory(w io.Writer, inv *nvml.Inventory, h map[string]health.Status) error {
	fmt.Fprintf(w, "Driver %s, CUDA %s, %d GPUs\n\n", inv.DriverVersion, inv.CUDADriverVersion, len(inv.GPUs))
	healthOf := func(uuid string) string {
		if st, ok := h[uuid]; ok && !st.Healthy {
			return "UNHEALTHY: " + st.Reason
		}
		if h == nil {
			return ""
		}
		return "healthy"
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tNAME\tUUID\tBUS ID\tNUMA\tCC\tMEMORY\tMIG\tHEALTH")
	for _, g := range inv.GPUs {
		if !g.Usable() {
			fmt.Fprintf(tw, "%d\t?\t?\t?\t?\t?\t?\t?\tUNAVAILABLE: %s\n", g.Index, g.Problem)
			continue
		}
		mig := "n/a"
		if g.MIGCapable {
			mig = "disabled"
			if g.MIGEnabled {
				mig = fmt.Sprintf("%d devices", len(g.MIGDevices))
			}
		}
		numa := "n/a"
		if g.NUMANode >= 0 {
			numa = fmt.Sprint(g.NUMANode)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%d MiB\t%s\t%s\n", g.Index, g.Name, g.UUID, g.PCIBusID, numa,
			g.ComputeCapability, g.MemoryBytes>>20, mig, healthOf(g.UUID))
		for _, m := range g.MIGDevices {
			// The MIG column of a MIG device names its /dev/nvidia-caps nodes.
			caps := "no caps"
			if len(m.CapDevicePaths) > 0 {
				names := make([]string, len(m.CapDevicePaths))
				for i, p := range m.CapDevicePaths {
					names[i] = path.Base(p)
				}
				caps = strings.Join(names, ",")
			}
			fmt.Fprintf(tw, "  %d:%d\tMIG %s\t%s\tGI %d CI %d\t\t\t%d MiB\t%s\t%s\n", g.Index, m.Index, m.Profile, m.UUID,
				m.GPUInstanceID, m.ComputeInstanceID, m.MemoryBytes>>20, caps, healthOf(m.UUID))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w, "\nTopology:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprint(tw, "\t")
	for i := range inv.GPUs {
		fmt.Fprintf(tw, "GPU%d\t", i)
	}
	fmt.Fprintln(tw, "NUMA")
	for i, g := range inv.GPUs {
		fmt.Fprintf(tw, "GPU%d\t", i)
		for j := range inv.GPUs {
			fmt.Fprintf(tw, "%s\t", inv.Topology.Cell(i, j))
		}
		numa := "N/A"
		if g.NUMANode >= 0 {
			numa = fmt.Sprint(g.NUMANode)
		}
		fmt.Fprintln(tw, numa)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprint(w, `
Legend: X = self, NV# = # NVLinks, PIX = at most one PCIe bridge, PXB = several PCIe bridges,
        PHB = a PCIe host bridge, NODE = host bridges within a NUMA node, SYS = across NUMA nodes
`)
	return nil
}
