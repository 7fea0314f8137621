// Command e2e-node is the end-to-end suite's node in one binary, as k3s and
// the old hyperkube were: its first argument names the component to run,
// and the remaining arguments are that component's own flags.
//
//	e2e-node etcd DATA_DIR CLIENT_URL PEER_URL
//	e2e-node kube-apiserver --etcd-servers=... ...
//	e2e-node kube-controller-manager ...
//	e2e-node kube-scheduler ...
//	e2e-node kubelet ...
//
// The components are the unmodified k8s.io/kubernetes v1.37.2 commands and
// etcd's embed package; tests/e2e starts each one as its own process so
// that each has its own log and the kubelet can be restarted alone.
package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as the real mains register it
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as the real mains register them
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as the real mains register it
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: e2e-node etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet [flags]")
		os.Exit(2)
	}
	name, args := os.Args[1], os.Args[2:]
	var cmd *cobra.Command
	switch name {
	case "etcd":
		if err := runEtcd(args); err != nil {
			fmt.Fprintln(os.Stderr, "etcd:", err)
			os.Exit(1)
		}
		return
	case "kube-apiserver":
		cmd = apiserver.NewAPIServerCommand()
	case "kube-controller-manager":
		cmd = controllermanager.NewControllerManagerCommand()
	case "kube-scheduler":
		cmd = scheduler.NewSchedulerCommand()
	case "kubelet":
		cmd = kubelet.NewKubeletCommand(context.Background())
	default:
		fmt.Fprintf(os.Stderr, "e2e-node: unknown component %q\n", name)
		os.Exit(2)
	}
	cmd.SetArgs(args)
	os.Exit(cli.Run(cmd))
}

// runEtcd serves a single-member etcd from dataDir until SIGTERM or SIGINT.
func runEtcd(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("want DATA_DIR CLIENT_URL PEER_URL, got %q", args)
	}
	client, err := url.Parse(args[1])
	if err != nil {
		return fmt.Errorf("client URL %q: %w", args[1], err)
	}
	peer, err := url.Parse(args[2])
	if err != nil {
		return fmt.Errorf("peer URL %q: %w", args[2], err)
	}
	cfg := embed.NewConfig()
	cfg.Name = "e2e"
	cfg.Dir = args[0]
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	// A test node: no fsync on every write, which a 2-core CI disk makes slow.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return fmt.Errorf("not ready after 60s")
	}
	fmt.Fprintln(os.Stderr, "etcd: ready on", client)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		fmt.Fprintln(os.Stderr, "etcd: stopping on", s)
		return nil
	case err := <-e.Err():
		return err
	}
}
