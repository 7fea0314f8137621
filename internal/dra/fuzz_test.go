package dra

import (
	"encoding/json"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/mps"
)

// FuzzClaimConfig: a claim's opaque configuration is written by whoever
// may create claims, and the daemon reads it on every prepare. Whatever
// the bytes, checkConfigs and parseMPS return a value or an error, never
// panic, and what they accept is within its documented bounds.
func FuzzClaimConfig(f *testing.F) {
	for _, seed := range []string{
		`{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharing":{"strategy":"TimeSlicing","timeSlicingConfig":{"interval":"Default"}}}`,
		`{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharing":{"strategy":"MPS","mpsConfig":{"defaultActiveThreadPercentage":50,"defaultPinnedDeviceMemoryLimit":"10Gi","defaultPerDevicePinnedMemoryLimit":{"0":"4096Mi"}}}}`,
		`{"apiVersion":"resource.nvidia.com/v1beta1","kind":"MigDeviceConfig","sharing":{"strategy":"TimeSlicing"}}`,
		`{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharing":{"strategy":"MPS","mpsConfig":{"defaultPinnedDeviceMemoryLimit":"1e999999"}}}`,
		`{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","unknown":1}`,
		`[]`, `null`, ``,
	} {
		f.Add([]byte(seed))
	}
	gpus := []mps.GPU{{UUID: "GPU-0"}, {UUID: "GPU-1"}}
	f.Fuzz(func(t *testing.T, params []byte) {
		cfgs := []kube.DeviceAllocationConfiguration{{Source: "FromClaim", Requests: []string{"gpu"},
			Opaque: &kube.OpaqueDeviceConfiguration{Driver: DriverName, Parameters: json.RawMessage(params)}}}
		reqs, raw, err := checkConfigs(cfgs)
		if err != nil || reqs == nil {
			return
		}
		m, err := parseMPS(raw, gpus)
		if err != nil {
			return
		}
		if m.ThreadPercent < 1 || m.ThreadPercent > 100 {
			t.Fatalf("thread percentage %d accepted from %q", m.ThreadPercent, params)
		}
		if len(m.Limits) > len(gpus) {
			t.Fatalf("%d limits for %d GPUs from %q", len(m.Limits), len(gpus), params)
		}
	})
}
