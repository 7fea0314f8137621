//go:build !race

package kubelet

// raceEnabled says the test binary runs under the race detector, which
// slows the kubelet side of every latency figure.
const raceEnabled = false
