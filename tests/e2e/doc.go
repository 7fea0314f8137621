// Package e2e is the end-to-end node suite: one real node, built from real
// components under a temporary root, with the gpu-plugin Helm chart
// installed into it and GPU pods scheduled, admitted and started by a real
// container runtime.
//
// Run it with scripts/test-e2e.sh (make e2e), as root. The script installs
// the Debian packages it needs (runc, containernetworking-plugins,
// busybox-static, buildah, debootstrap, iproute2), builds cmd/e2e-node (etcd
// and kube-apiserver, kube-controller-manager, kube-scheduler and kubelet
// from k8s.io/kubernetes, in one binary), builds the node's container
// runtime, containerd v2 with its runc shim and ctr, from the module pinned in
// containerd/go.mod (CDI: Debian's containerd 1.6 ignores the CRI
// CDIDevices field, v2 applies it), builds the project's image from
// the Dockerfile with buildah on local stand-in base images (image.sh), and
// runs TestNode through nsexec.sh: private mount, network and PID
// namespaces, so that the kubelet's fixed paths (/var/lib/kubelet/…), the
// pod network and every process stay inside and vanish with it.
//
// Without IN_E2E_NS=1 (set by nsexec.sh) the suite skips, so a plain
// `go test ./...` here never starts a node.
//
// TestNode runs issue 18's scenarios in order on one node, each asserted
// and timed (the timings are printed at the end): 1 install, 1b the
// control plane's DRA parts with a stand-in driver's ResourceSlice
// (dracontrolplane_test.go: resource.k8s.io/v1 served, the resourceclaim and
// device-taint-eviction controllers running, a device taint kept, a claim
// from a template refused for the taint and allocated with a toleration),
// 2 GPU pods and quota, 2b the cdi-cri device list strategy (cdi_test.go: a
// GPU pod gets exactly its spec's device nodes, mounts, environment and
// hooks from CDI names alone), 3 time-slicing through the chart's ConfigMap, 3b per-node
// configs picked by the node label (nodeconfig_test.go), 3c the node
// labels as an NFD NodeFeature object (nodefeature_test.go), 4 Prometheus with
// README's scrape job (a Prometheus built from the module in prometheus/,
// since Debian's lacks kubernetes_sd), 4b per-pod accounting (perpod_test.go:
// hostPID, three time-sliced pods whose real container PIDs are registered
// on the simulated GPUs, their own series, a host process unattributed, the
// per-pod autoscaling recipe evaluated in that Prometheus), 4c CUDA MPS sharing
// (mps_test.go: sharing.mps in the chart's config, the chart's hostPID and
// MPS mounts, the daemon running the fake nvidia-cuda-mps-control that
// image.sh adds to a derived test image; two client pods sharing one
// /dev/shm with the host and the plugin, a 2-replica pod refused, the
// control daemon killed and restarted, and quit on the way back), 4d DRA
// through the chart's dra.* values (dra_test.go: the DeviceClasses and the
// node's ResourceSlice, claims from templates, a CEL selector on memory,
// a shared claim, a pod asking for nvidia.com/gpu given a GPU through DRA,
// each container with exactly its claim's device nodes from the claim's
// CDI spec, an XID as a device taint, the plugin's restart, DCGM series
// attributed to a claim's pod, a MIG claim by profile, split mode, and
// the way back), 5 health (XID 79 through the
// simulated node's /sim API; the GPUHealthy condition, Events, the taint
// under a 1,000-XID storm and the service account's limits in
// nodehealth_test.go), 6 kubelet and
// plugin pod restarts, 7 uninstall; then 8, the second install path on the
// same node (static_test.go): deployments/static/gpu-plugin.yaml created
// object by object through the dynamic client, with the image and
// GPU_PLUGIN_SIMULATE edited in, its 2-GPU pod, and its deletion. A failure
// prints every component's log and every pod's.
//
// It is a nested module (like tests/kubelet and tests/deploy) so that the
// main module does not depend on k8s.io/kubernetes, etcd or Helm.
package e2e
