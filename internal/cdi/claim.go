package cdi

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"
)

// Vendor and class of the per-claim specs of DRA, as NVIDIA's DRA driver
// names them.
const (
	ClaimVendor = "k8s.gpu.nvidia.com"
	ClaimClass  = "claim"
)

// ClaimDevice is one device of a claim: the name it gets in the claim's
// spec, and the UUID of the GPU or MIG device it is.
type ClaimDevice struct {
	Name string // e.g. "<claim UID>-gpu-0"
	UUID string
}

// ClaimDeviceID is the qualified CDI name of a claim's device.
func ClaimDeviceID(name string) string { return ClaimVendor + "/" + ClaimClass + "=" + name }

// ClaimSpec makes the transient spec of one prepared claim from the node's
// GPU spec (Generate's gpu class): the node spec's common edits, and for
// each claim device the edits of the GPU or MIG device it is. So a DRA
// container gets exactly what a CDI-mode device plugin container gets.
func ClaimSpec(node *specs.Spec, devices []ClaimDevice) (*specs.Spec, error) {
	if node == nil {
		return nil, errors.New("no CDI spec of the node's GPUs to take the claim's devices from")
	}
	byName := make(map[string]*specs.Device, len(node.Devices))
	for i := range node.Devices {
		byName[node.Devices[i].Name] = &node.Devices[i]
	}
	s := &specs.Spec{Kind: ClaimVendor + "/" + ClaimClass, ContainerEdits: node.ContainerEdits}
	for _, d := range devices {
		nd, ok := byName[d.UUID]
		if !ok {
			return nil, fmt.Errorf("the node's CDI spec has no device %s", d.UUID)
		}
		s.Devices = append(s.Devices, specs.Device{Name: d.Name, ContainerEdits: nd.ContainerEdits})
	}
	if err := setVersion(s); err != nil {
		return nil, err
	}
	return s, nil
}

// ClaimSpecFile is the file name of a claim's spec.
func ClaimSpecFile(claimUID string) string {
	return cdi.GenerateTransientSpecName(ClaimVendor, ClaimClass, claimUID) + ".yaml"
}

// WriteClaimSpec stores a claim's spec in dir, atomically, after the CDI
// library has validated it, and returns its path.
func WriteClaimSpec(dir, claimUID string, s *specs.Spec) (string, error) {
	cache, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	if err != nil {
		return "", fmt.Errorf("opening the CDI spec directory %s: %w", dir, err)
	}
	name := ClaimSpecFile(claimUID)
	if err := cache.WriteSpec(s, name); err != nil {
		return "", fmt.Errorf("writing the CDI spec of claim %s to %s: %w", claimUID, dir, err)
	}
	return filepath.Join(dir, name), nil
}

// RemoveClaimSpec removes a claim's spec from dir; a spec already gone is
// no error.
func RemoveClaimSpec(dir, claimUID string) error {
	err := os.Remove(filepath.Join(dir, ClaimSpecFile(claimUID)))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the CDI spec of claim %s: %w", claimUID, err)
	}
	return nil
}

// NodeSpec picks the spec of the node's GPUs (the gpu class) from
// Generate's result; nil if there is none.
func NodeSpec(ss []*specs.Spec) *specs.Spec {
	for _, s := range ss {
		if s.Kind == Kind {
			return s
		}
	}
	return nil
}
