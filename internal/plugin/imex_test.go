package plugin

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/sharing"
)

// TestIMEXChannelInEveryStrategy: with imex.channelIDs [0], channel 0
// reaches the container in every device list strategy, as NVIDIA's plugin
// passes it.
func TestIMEXChannelInEveryStrategy(t *testing.T) {
	dev := []*sharing.Device{{ID: "GPU-a", Physical: "GPU-a", Replica: -1, Minor: 3}}
	for _, tc := range []struct {
		strategy string
		specs    bool
		check    func(t *testing.T, o ResponseOptions)
	}{
		{strategy: config.ListEnvvar, check: func(t *testing.T, o ResponseOptions) {
			r, _ := o.containerResponse(dev)
			if r.Envs["NVIDIA_IMEX_CHANNELS"] != "0" {
				t.Errorf("envs %v; want NVIDIA_IMEX_CHANNELS=0", r.Envs)
			}
		}},
		{strategy: config.ListVolumeMounts, check: func(t *testing.T, o ResponseOptions) {
			r, _ := o.containerResponse(dev)
			var paths []string
			for _, m := range r.Mounts {
				paths = append(paths, m.ContainerPath+"<-"+m.HostPath)
			}
			if !slices.Contains(paths, "/var/run/nvidia-container-devices/imex/0<-/dev/null") {
				t.Errorf("mounts %v; want /var/run/nvidia-container-devices/imex/0", paths)
			}
		}},
		{strategy: config.ListCDICRI, check: func(t *testing.T, o ResponseOptions) {
			r, _ := o.containerResponse(dev)
			var names []string
			for _, c := range r.CdiDevices {
				names = append(names, c.Name)
			}
			if !slices.Contains(names, "k8s.device-plugin.nvidia.com/imex-channel=0") {
				t.Errorf("CDI devices %v; want k8s.device-plugin.nvidia.com/imex-channel=0", names)
			}
		}},
		{strategy: config.ListCDIAnnotations, check: func(t *testing.T, o ResponseOptions) {
			r, _ := o.containerResponse(dev)
			for _, v := range r.Annotations {
				if !strings.Contains(v, "k8s.device-plugin.nvidia.com/imex-channel=0") {
					t.Errorf("annotation %q; want the IMEX channel", v)
				}
			}
			if len(r.Annotations) != 1 {
				t.Errorf("annotations %v", r.Annotations)
			}
		}},
		{strategy: config.ListEnvvar, specs: true, check: func(t *testing.T, o ResponseOptions) {
			r, _ := o.containerResponse(dev)
			var specs []string
			for _, d := range r.Devices {
				specs = append(specs, d.ContainerPath+"<-"+d.HostPath)
			}
			if !slices.Contains(specs, "/dev/nvidia-caps-imex-channels/channel0<-/host/dev/nvidia-caps-imex-channels/channel0") {
				t.Errorf("device specs %v; want the channel 0 node under the dev root", specs)
			}
		}},
	} {
		t.Run(tc.strategy, func(t *testing.T) {
			tc.check(t, ResponseOptions{ListStrategies: []string{tc.strategy}, IDStrategy: config.IDUUID, CDIAnnotationPrefix: "cdi.k8s.io/",
				PassDeviceSpecs: tc.specs, DevRoot: "/host", IMEXChannels: []int{0}})
		})
	}
}

// TestIMEXChannelsChecked: a configured channel is used only when its
// device node exists (looked up under the container's driver root, the
// seam); a missing one is skipped with a reason, or fails when required.
func TestIMEXChannelsChecked(t *testing.T) {
	root := t.TempDir()
	load := func(args ...string) *config.Config {
		t.Helper()
		c, _, err := config.Load("gpu-plugin", append([]string{"--driver-root-ctr-path=" + root}, args...), func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// Missing: skipped, or fatal with imex.required.
	present, missing, err := IMEXChannels(load("--imex-channel-ids=0"))
	if err != nil || len(present) != 0 || len(missing) != 1 || !strings.Contains(missing[0].Error(), "channel0") {
		t.Errorf("missing, not required: %v %v %v; want it skipped with a reason naming channel0", present, missing, err)
	}
	if got := ResponseOptionsFrom(load("--imex-channel-ids=0")).IMEXChannels; len(got) != 0 {
		t.Errorf("a missing channel is injected: %v", got)
	}
	if _, _, err := IMEXChannels(load("--imex-channel-ids=0", "--imex-required")); err == nil || !strings.Contains(err.Error(), "imex.required") {
		t.Errorf("missing and required: %v; want an error naming imex.required", err)
	}
	// Present as a character device (a link to /dev/null stands in for it).
	dir := filepath.Join(root, "dev", "nvidia-caps-imex-channels")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", filepath.Join(dir, "channel0")); err != nil {
		t.Fatal(err)
	}
	present, missing, err = IMEXChannels(load("--imex-channel-ids=0", "--imex-required"))
	if err != nil || !slices.Equal(present, []int{0}) || len(missing) != 0 {
		t.Errorf("present: %v %v %v; want channel 0", present, missing, err)
	}
	if got := ResponseOptionsFrom(load("--imex-channel-ids=0")).IMEXChannels; !slices.Equal(got, []int{0}) {
		t.Errorf("a present channel is not injected: %v", got)
	}
	// A regular file is not a channel.
	if err := os.Remove(filepath.Join(dir, "channel0")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "channel0"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := IMEXChannels(load("--imex-channel-ids=0", "--imex-required")); err == nil || !strings.Contains(err.Error(), "not a character device") {
		t.Errorf("a regular file: %v", err)
	}
}
