package kubelet

import "testing"

func TestZZNegative(t *testing.T) {
	k := startKubelet(t)
	d := startReal(t, realOptions{Profile: "dgx-h100", Flags: []string{"--health-probe-interval=50ms"}})
	k.waitCapacity(gpuResource, healthy8)
	for _, p := range measureHotPathCalls(t, d, 1000, 1000, 100) {
		t.Logf("%s", p)
	}
}
