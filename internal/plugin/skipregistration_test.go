package plugin_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/plugin"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// TestSkipRegistration: NVIDIA's --kubelet-socket= (empty) serves the
// plugin sockets without registering them. A kubelet listening in the
// directory, even one that restarts, is never registered with, while the
// socket answers ListAndWatch and the manager counts as ready.
func TestSkipRegistration(t *testing.T) {
	dir := shortTempDir(t)
	k, err := fakekubelet.Start(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	logs := &testkit.Buffer{}
	mgr := plugin.NewManager(plugin.Options{
		SocketDir: dir, Health: health.NewState(nil, nil), Respond: defaultRespond(),
		PollInterval: 20 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, StreamGrace: 20 * time.Millisecond,
		SkipRegistration: true,
		Logger:           slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	resources, err := sharing.Build(inventory(t, "pcie-l4x4"), sharing.Options{MigStrategy: config.MigNone})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Run(ctx, resources) }()
	t.Cleanup(func() { cancel(); <-done })

	sock := filepath.Join(dir, "nvidia-gpu.sock")
	wait := waitCtx(t)
	for !mgr.Registered() || !exists(sock) {
		select {
		case <-wait.Done():
			t.Fatalf("manager never ready with its socket served (ready=%v):\n%s", mgr.Registered(), logs)
		case <-time.After(5 * time.Millisecond):
		}
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := pluginapi.NewDevicePluginClient(conn).ListAndWatch(wait, &pluginapi.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil || len(first.Devices) != 4 {
		t.Fatalf("ListAndWatch on the unregistered socket: %v, %d devices, want 4", err, len(first.GetDevices()))
	}

	// A kubelet restart is the strongest prompt to register; give the
	// manager many backoff periods to (wrongly) act on it.
	if err := k.Restart(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // a window for a registration that must not happen
	if n := registrations(k); n != 0 {
		t.Fatalf("%d registrations with --kubelet-socket empty, want 0:\n%s", n, logs)
	}
	if logs.Count("not registering with a kubelet") != 1 {
		t.Errorf("want one line saying registration is off:\n%s", logs)
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
