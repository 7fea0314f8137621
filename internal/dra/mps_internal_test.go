package dra

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/mps"
)

func TestQuantityMiB(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		err  string
	}{
		{in: "10Gi", want: 10240},
		{in: "512Mi", want: 512},
		{in: "1.5Gi", want: 1536},
		{in: "4G", want: 3814}, // 4e9 bytes
		{in: "1073741824", want: 1024},
		{in: "1Ki", err: "less than 1 MiB"},
		{in: "-1Gi", err: "not a positive quantity"},
		{in: "ten", err: "not a positive quantity"},
		{in: "1e999999", err: "too large"},
		{in: "1e-999999Pi", err: "less than 1 MiB"},
		{in: "1e9Pi", want: 1e9 * (1 << 30)}, // large, within the bound and uint64
	} {
		got, err := quantityMiB(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: %v, %v; want an error with %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s: %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestParseMPS(t *testing.T) {
	gpus := []mps.GPU{{Index: 2, UUID: "GPU-a"}, {Index: 5, UUID: "GPU-b"}}
	for _, tc := range []struct {
		name, raw string
		threads   int
		limits    []mps.Limit
		err       string
	}{
		{name: "empty", raw: ``, threads: 100, limits: []mps.Limit{}},
		{name: "all", raw: `{"defaultActiveThreadPercentage":25,"defaultPinnedDeviceMemoryLimit":"8Gi"}`, threads: 25,
			limits: []mps.Limit{{Device: "0", Value: "8192M"}, {Device: "1", Value: "8192M"}}},
		{name: "per device by UUID and ordinal", raw: `{"defaultPinnedDeviceMemoryLimit":"8Gi","defaultPerDevicePinnedMemoryLimit":{"GPU-b":"2Gi"}}`, threads: 100,
			limits: []mps.Limit{{Device: "0", Value: "8192M"}, {Device: "1", Value: "2048M"}}},
		{name: "only one device", raw: `{"defaultPerDevicePinnedMemoryLimit":{"0":"1Gi"}}`, threads: 100, limits: []mps.Limit{{Device: "0", Value: "1024M"}}},
		{name: "percentage out of range", raw: `{"defaultActiveThreadPercentage":0}`, err: "not a percentage"},
		{name: "unknown device", raw: `{"defaultPerDevicePinnedMemoryLimit":{"GPU-z":"1Gi"}}`, err: `"GPU-z" is not a GPU of the claim`},
		{name: "unknown field", raw: `{"multiUsr":true}`, err: "unknown field"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseMPS(json.RawMessage(tc.raw), gpus)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.ThreadPercent != tc.threads || !slices.Equal(got.Limits, tc.limits) {
				t.Errorf("threads %d limits %v, want %d %v", got.ThreadPercent, got.Limits, tc.threads, tc.limits)
			}
		})
	}
}
