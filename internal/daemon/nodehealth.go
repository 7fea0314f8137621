package daemon

import (
	"errors"
	"fmt"
	"os"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/nodehealth"
)

// newNodeHealth builds the publisher of the node's GPU health to the API
// server when --node-health-condition is on (nil otherwise). The default
// install never talks to the API server.
func (d *Daemon) newNodeHealth() (*nodehealth.Publisher, error) {
	if !d.cfg.Health.NodeCondition {
		return nil, nil
	}
	return nodehealth.New(nodehealth.Options{
		NodeName: d.cfg.Daemon.NodeName, Client: d.kube, Health: d.health, Inventory: d.inv.Load,
		Taint: d.cfg.Health.NodeTaint, Logger: d.log.With("component", "node-health"),
	})
}

// newKubeClient makes the API client when an opt-in feature needs one.
func (d *Daemon) newKubeClient() error {
	var needs string
	switch {
	case d.cfg.Health.NodeCondition:
		needs = "--node-health-condition"
	case d.cfg.Daemon.ConfigDir != "":
		needs = "--config-dir"
	case d.cfg.UseNodeFeatureAPI() && d.cfg.Daemon.NodeLabels:
		needs = "--use-node-feature-api"
	case d.cfg.Telemetry.PerPodUsage && d.cfg.Telemetry.Backend != config.TelemetryNone:
		needs = "--per-pod-usage"
	case d.cfg.UsesDRA():
		needs = "--allocation-mode=" + d.cfg.AllocationMode()
	default:
		return nil
	}
	rc, err := apiServerConfig(d.cfg.Daemon.Kubeconfig)
	if err != nil {
		return fmt.Errorf("%s: %w", needs, err)
	}
	rc.UserAgent = "gpu-plugin"
	if d.kube, err = kube.NewClient(rc); err != nil {
		return fmt.Errorf("%s: %w", needs, err)
	}
	return nil
}

// apiServerConfig reads kubeconfig, or the pod's service account when it
// is empty.
func apiServerConfig(kubeconfig string) (*kube.Config, error) {
	if kubeconfig != "" {
		rc, err := kube.LoadKubeconfig(kubeconfig)
		// The daemon never runs another program.
		if errors.Is(err, kube.ErrCredentialPlugin) {
			return nil, fmt.Errorf("--kubeconfig %s: its user authenticates through a credential plugin, which the daemon does not run: use a token or client certificate", kubeconfig)
		}
		if err != nil {
			return nil, fmt.Errorf("reading --kubeconfig %s: %w", kubeconfig, err)
		}
		return rc, nil
	}
	rc, err := kube.InClusterConfig()
	if err != nil {
		if os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
			return nil, fmt.Errorf("no API server: not running in a pod (KUBERNETES_SERVICE_HOST is unset) and no --kubeconfig given")
		}
		return nil, fmt.Errorf("the pod's service account: %w (the chart mounts its token with nodeHealth.condition or config.map)", err)
	}
	return rc, nil
}
