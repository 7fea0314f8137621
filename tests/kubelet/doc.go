// Package kubelet holds conformance tests that run the gpu-plugin daemon,
// in process, against the real kubelet device manager
// (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager).
//
// It is a nested module so that the main module does not depend on
// k8s.io/kubernetes. The device manager hard-codes
// /var/lib/kubelet/device-plugins and wipes its sockets on start, so the
// tests run only inside a private mount namespace:
//
//	cd tests/kubelet && go test -exec "$PWD/nsexec.sh" ./...
//
// Without IN_KUBELET_NS=1 (set by nsexec.sh) every test skips.
//
// The module imports the main module's internal packages through
// `replace github.com/gpu-plugin/gpu-plugin => ../..`, so a dependency the
// main module gains must be added here too: run `go mod tidy` in this
// directory. For a module the checksum database does not know (go-dcgm),
// copy its two lines from the root go.sum into go.sum first.
package kubelet
