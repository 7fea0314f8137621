//go:build tools

// Package containerd pins the container runtime of the tests/e2e node:
// containerd v2 and its runc shim, built from this module by
// scripts/test-e2e.sh. Debian bookworm's containerd 1.6 ignores the CRI
// CDIDevices field, through which the kubelet hands a container the CDI
// devices that a device plugin (cdi-cri) or a DRA driver names; containerd
// v2 applies it, with CDI always on. The version comes from the Go module
// proxy, like every other dependency of the suite.
package containerd

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
