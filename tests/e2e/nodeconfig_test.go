package e2e

// Scenario 3b (issue 20): per-node configs. The chart's config.map holds
// named configs; the node's nvidia.com/device-plugin.config label picks
// one, and a label change applies live, as with NVIDIA's config-manager.

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

const configLabel = "nvidia.com/device-plugin.config"

// perNodeConfigValues are the install values with two named configs.
var perNodeConfigValues = map[string]any{"config": map[string]any{
	"map": map[string]any{
		"whole":  "version: v1\n",
		"shared": "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 4}]}}\n",
	},
	"default": "whole",
}}

// labelNode sets the node's config label (nil removes it).
func (s *suite) labelNode(t *testing.T, value *string) {
	t.Helper()
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{configLabel: value}}})
	if _, err := s.n.client.CoreV1().Nodes().Patch(context.Background(), nodeName, types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatalf("labelling the node %s=%v: %v", configLabel, value, err)
	}
}

func (s *suite) waitAllocatable(t *testing.T, want int64, what string) time.Duration {
	t.Helper()
	t0 := time.Now()
	s.n.waitNode(t, what, 120*time.Second, func(nd *corev1.Node) bool {
		_, al := gpus(nd)
		return al == want
	})
	return time.Since(t0)
}

// replacePlugin upgrades the release with values that change the pod
// template, and waits for the new plugin pod.
func (s *suite) replacePlugin(t *testing.T, extra map[string]any) {
	t.Helper()
	old := s.pluginPod.UID
	s.upgrade(t, extra)
	s.pluginPod = s.waitPluginReady(t, old)
}

func (s *suite) perNodeConfig(t *testing.T) {
	// The chart switches the daemon to --config-dir: a new pod.
	s.replacePlugin(t, perNodeConfigValues)
	s.waitAllocatable(t, nodeGPUs, "allocatable 8 with the default config (whole)")

	t0 := time.Now()
	shared := "shared"
	s.labelNode(t, &shared)
	s.waitAllocatable(t, 4*nodeGPUs, "allocatable 32 after labelling the node shared")
	s.timed("3b node label whole → shared: allocatable 32", time.Since(t0))
	s.samePluginPod(t)
	s.waitNodeEvent(t, corev1.EventTypeNormal, "GPUConfigApplied", "config shared applied")

	typo := "sharde"
	s.labelNode(t, &typo)
	s.waitNodeEvent(t, corev1.EventTypeWarning, "UnknownGPUConfig", `"sharde" names no config file`)
	if !strings.Contains(string(s.pluginDo(t, "GET", "/metrics")), "gpu_plugin_node_config_unknown_label 1") {
		t.Error("gpu_plugin_node_config_unknown_label is not 1 while the label names no config")
	}
	if r := string(s.pluginDo(t, "GET", "/readyz")); !strings.Contains(r, `"sharde" names no config file; shared stays in force`) {
		t.Errorf("/readyz says %q, want a note naming the label value and the config in force", r)
	}
	time.Sleep(2 * time.Second)
	nd, err := s.n.client.CoreV1().Nodes().Get(context.Background(), nodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, al := gpus(nd); al != 4*nodeGPUs {
		t.Errorf("allocatable %d after a label naming no config, want the shared config's 32 kept", al)
	}

	t1 := time.Now()
	s.labelNode(t, nil)
	s.waitAllocatable(t, nodeGPUs, "allocatable 8 after removing the label (default whole)")
	s.timed("3b node label removed → default whole: allocatable 8", time.Since(t1))
	s.samePluginPod(t)

	// Back to the single inline config for the scenarios that follow.
	s.replacePlugin(t, nil)
	s.waitAllocatable(t, nodeGPUs, "allocatable 8 with the inline config again")
}
