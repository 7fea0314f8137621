package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
)

const demoUsage = `Usage: gpu-plugin demo [--once] [daemon flags]

Runs the whole daemon on a simulated node (default --simulate=dgx-h100) against
an in-process stand-in kubelet in a temporary directory, prints the advertised
resources and a sample allocation, and keeps serving /metrics and the /sim
control API (default on 127.0.0.1:9400) until interrupted. --once exits after
the sample allocation. Every daemon flag is accepted (see gpu-plugin --help).
`

func runDemo(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if slices.Contains(args, "-h") || slices.Contains(args, "--help") {
		fmt.Fprint(stdout, demoUsage)
		return config.ErrHelp
	}
	once := slices.Contains(args, "--once")
	args = slices.DeleteFunc(slices.Clone(args), func(a string) bool { return a == "--once" })

	dir, err := os.MkdirTemp("", "gpu-plugin-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// Defaults first: flags given by the user come later and win.
	// The stand-in kubelet serves no pod-resources API: attribution is off.
	defaults := []string{"--simulate=dgx-h100", "--metrics-address=127.0.0.1:9400", "--kubelet-socket-dir=" + dir, "--pod-resources-socket="}
	cfg, rest, err := config.Load(name, append(defaults, args...), getenv, stdout)
	if err != nil {
		return usageError("demo: %v", err)
	}
	if len(rest) > 0 {
		return usageError("demo: unexpected argument %q", rest[0])
	}
	cfg.Daemon.KubeletSocketDir = dir
	if cfg.Daemon.NodeName == "" {
		cfg.Daemon.NodeName = "demo-node"
	}
	log := newLogger(cfg.Daemon.LogFormat, cfg.Daemon.Verbosity, stderr)

	kubelet, err := fakekubelet.Start(dir, log)
	if err != nil {
		return err
	}
	defer kubelet.Stop()
	d, err := daemon.New(cfg, log)
	if err != nil {
		return err
	}
	defer d.Close()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()

	wait, cancelWait := context.WithTimeout(ctx, 10*time.Second)
	defer cancelWait()
	err = kubelet.WaitFor(wait, func(k *fakekubelet.Kubelet) bool {
		st := d.Plugins().Status()
		if len(st) == 0 {
			return false
		}
		for _, s := range st {
			if c, _ := k.Capacity(s.Resource); c != s.Devices {
				return false
			}
		}
		return true
	})
	if err != nil {
		cancel()
		return errors.Join(fmt.Errorf("the daemon did not register with the stand-in kubelet: %w", err), <-done)
	}

	fmt.Fprintf(stdout, "\nSimulated node %q: the kubelet sees\n", d.SimNode().Name())
	resources := kubelet.Resources()
	for _, r := range resources {
		capacity, allocatable := kubelet.Capacity(r)
		fmt.Fprintf(stdout, "  %-28s capacity %d, allocatable %d\n", r, capacity, allocatable)
	}
	if len(resources) > 0 {
		// A shared resource may refuse 2 replicas to one container
		// (failRequestsGreaterThanOne; MPS's default).
		rr, _ := cfg.ReplicatedSharing()
		one := rr != nil && rr.FailRequestsGreaterThanOne != nil && *rr.FailRequestsGreaterThanOne
		if err := sampleAllocation(ctx, stdout, kubelet, resources[0], one); err != nil {
			fmt.Fprintf(stdout, "sample allocation failed: %v\n", err)
		}
	}
	fmt.Fprintf(stdout, "\nMetrics:      http://%s/metrics\nReadiness:    http://%s/readyz\nDevices:      http://%s/debug/devices\n"+
		"Sim control:  curl -X POST 'http://%s/sim/gpus/0/xid?code=79'\n", d.Addr(), d.Addr(), d.Addr(), d.Addr())
	if once {
		cancel()
		return <-done
	}
	fmt.Fprintln(stdout, "\nPress Ctrl-C to stop.")
	return <-done
}

func sampleAllocation(ctx context.Context, w io.Writer, k *fakekubelet.Kubelet, resource string, oneReplica bool) error {
	var ids []string
	for _, dev := range k.Devices(resource) {
		ids = append(ids, dev.ID)
	}
	size := min(2, len(ids))
	if oneReplica && len(ids) > 0 && strings.Contains(ids[0], "::") {
		size = 1
	}
	preferred, err := k.Preferred(ctx, resource, ids, nil, size)
	if err != nil {
		return err
	}
	resp, err := k.Allocate(ctx, resource, preferred...)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\nA pod asking for %s: %d gets %s\n", resource, size, strings.Join(preferred, ", "))
	keys := make([]string, 0, len(resp.Envs))
	for key := range resp.Envs {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	for _, key := range keys {
		fmt.Fprintf(w, "  env %s=%s\n", key, resp.Envs[key])
	}
	for _, c := range resp.CdiDevices {
		fmt.Fprintf(w, "  CDI device %s\n", c.Name)
	}
	for _, m := range resp.Mounts {
		fmt.Fprintf(w, "  mount %s at %s\n", m.HostPath, m.ContainerPath)
	}
	return nil
}
