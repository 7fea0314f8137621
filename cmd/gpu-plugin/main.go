// Command gpu-plugin is a Kubernetes GPU device plugin and telemetry daemon.
// Run `gpu-plugin --help` for the flags and subcommands.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"

	"github.com/gpu-plugin/gpu-plugin/internal/advert"
	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
	"github.com/gpu-plugin/gpu-plugin/internal/version"
)

const name = "gpu-plugin"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches to a subcommand and returns the process exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "--version", "-version", "version":
			fmt.Fprintf(stdout, "%s %s\n", name, version.String())
			return 0
		case "inventory":
			return report(stderr, runInventory(ctx, args[1:], getenv, stdout, stderr))
		case "health":
			return runHealth(ctx, args[1:], getenv, stdout, stderr)
		case "config":
			return report(stderr, runConfig(args[1:], getenv, stdout, stderr))
		case "demo":
			return report(stderr, runDemo(ctx, args[1:], getenv, stdout, stderr))
		}
	}
	if wantsVersion(args) {
		fmt.Fprintf(stdout, "%s %s\n", name, version.String())
		return 0
	}
	return report(stderr, runDaemon(ctx, args, getenv, stdout, stderr))
}

// wantsVersion reports whether the flags ask for the version: --version
// anywhere, or -v as NVIDIA's plugin has it, a bare -v. -v followed by a
// number (-v 2) and -v=N stay the verbosity setting (--v, --verbosity).
func wantsVersion(args []string) bool {
	for i, a := range args {
		switch a {
		case "--":
			return false
		case "--version", "-version":
			return true
		case "-v", "--v":
			if i+1 == len(args) {
				return true
			}
			if _, err := strconv.Atoi(args[i+1]); err != nil {
				return true
			}
		}
	}
	return false
}

// report prints a command's error and turns it into an exit code.
func report(stderr io.Writer, err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, config.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return 2
	}
	fmt.Fprintf(stderr, "%s: %v\n", name, err)
	return 1
}

var errUsage = errors.New("usage")

func usageError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

func runDaemon(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	// SIGHUP reloads the config and re-scans the GPUs, as NVIDIA's
	// config-manager sidecar expects; take it before anything can send it.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	cfg, rest, err := config.Load(name, args, getenv, stdout)
	if err != nil {
		if errors.Is(err, config.ErrHelp) {
			return err
		}
		return usageError("%v", err)
	}
	if len(rest) > 0 {
		return usageError("unexpected argument %q (subcommands: inventory, config check, demo; see --help)", rest[0])
	}
	log := newLogger(cfg.Daemon.LogFormat, cfg.Daemon.Verbosity, stderr)
	// IMEX channels are checked once at start, as NVIDIA's plugin does: a
	// required channel that is missing fails the start.
	_, missing, err := advert.IMEXChannels(cfg)
	if err != nil {
		return err
	}
	for _, m := range missing {
		log.Warn("IMEX channel not found; allocations go without it", "err", m)
	}
	if cfg.Daemon.NodeName == "" {
		cfg.Daemon.NodeName, _ = os.Hostname()
	}
	d, err := daemon.New(cfg, log)
	if err != nil {
		return err
	}
	defer d.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Add(1)
	go func() {
		defer wg.Done()
		forwardHangups(ctx, hup, d.Reload)
	}()
	return d.Run(ctx)
}

// forwardHangups turns each SIGHUP into a reload request until ctx ends.
func forwardHangups(ctx context.Context, hup <-chan os.Signal, reload func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			reload()
		}
	}
}

// newLogger builds the one logger: verbosity 0 logs state changes and
// problems, 1 adds lifecycle detail, 2 and more everything.
func newLogger(format string, verbosity int, w io.Writer) *slog.Logger {
	level := slog.LevelInfo
	switch {
	case verbosity == 1:
		level = slog.LevelDebug
	case verbosity >= 2:
		level = slog.LevelDebug - 4
	}
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
