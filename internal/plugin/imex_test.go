package plugin

import (
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
			o := ResponseOptions{CDIAnnotationPrefix: "cdi.k8s.io/", PassDeviceSpecs: tc.specs, DevRoot: "/host", IMEXChannels: []int{0}}
			switch tc.strategy {
			case config.ListEnvvar:
				o.Envvar = true
			case config.ListVolumeMounts:
				o.VolumeMounts = true
			case config.ListCDICRI:
				o.CDICRI = true
			case config.ListCDIAnnotations:
				o.CDIAnnotations = true
			}
			tc.check(t, o)
		})
	}
}
