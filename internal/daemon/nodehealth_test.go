package daemon_test

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/daemon"
)

// TestNodeHealthNeedsAnAPIServer: --node-health-condition fails the start
// with a message that says what is missing, instead of a daemon that
// silently publishes nothing. (The publisher itself runs against a real
// API server in tests/e2e, scenario 5.)
func TestNodeHealthNeedsAnAPIServer(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	dir := t.TempDir()
	execUser := filepath.Join(dir, "exec.kubeconfig")
	if err := os.WriteFile(execUser, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/true, interactiveMode: Never}}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"outside a pod", nil, "not running in a pod (KUBERNETES_SERVICE_HOST is unset) and no --kubeconfig"},
		{"missing kubeconfig", []string{"--kubeconfig=" + filepath.Join(dir, "absent")}, "reading --kubeconfig " + filepath.Join(dir, "absent")},
		{"credential plugin", []string{"--kubeconfig=" + execUser}, "credential plugin, which the daemon does not run"},
	}
	// --config-dir reads the node's label the same way.
	t.Run("per-node configs outside a pod", func(t *testing.T) {
		d, err := daemon.New(loadConfig(t, socketDir(t), "--simulate=pcie-l4x4", "--node-labels=false", "--pod-resources-socket=", "--config-dir="+dir),
			slog.New(slog.DiscardHandler))
		if err == nil {
			d.Close()
			t.Fatal("New succeeded")
		}
		if !strings.Contains(err.Error(), "--config-dir: no API server") {
			t.Errorf("error %q, want one naming --config-dir and the missing API server", err)
		}
	})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--simulate=pcie-l4x4", "--node-labels=false", "--pod-resources-socket=", "--node-health-condition"}, tt.args...)
			d, err := daemon.New(loadConfig(t, socketDir(t), args...), slog.New(slog.DiscardHandler))
			if err == nil {
				d.Close()
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "--node-health-condition") {
				t.Errorf("error %q, want one naming --node-health-condition and %q", err, tt.want)
			}
		})
	}
}

func TestConfigDirExcludesConfig(t *testing.T) {
	_, _, err := config.Load("gpu-plugin", []string{"--config-dir=/x", "--config=/y"}, func(string) string { return "" }, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "drop --config") {
		t.Fatalf("--config-dir with --config: %v, want an error saying which to drop", err)
	}
}

func TestNodeHealthTaintNeedsCondition(t *testing.T) {
	_, _, err := config.Load("gpu-plugin", []string{"--node-health-taint"}, func(string) string { return "" }, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "needs --node-health-condition") {
		t.Fatalf("--node-health-taint alone: %v, want an error saying it needs --node-health-condition", err)
	}
}
