package dra

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// preparedClaim is what the checkpoint keeps of a prepared claim: enough
// to answer a repeated NodePrepareResources the same way, to rewrite its
// CDI spec, and to know which devices are in use.
type preparedClaim struct {
	Namespace string           `json:"namespace"`
	Name      string           `json:"name"`
	Devices   []preparedDevice `json:"devices"`
	Prepared  time.Time        `json:"prepared"`
	// MPS is set for a claim shared through MPS: its daemon's settings.
	MPS *claimMPS `json:"mps,omitempty"`
}

// preparedDevice is one allocation result of a claim as prepared.
type preparedDevice struct {
	Requests []string `json:"requests"`
	Pool     string   `json:"pool"`
	Device   string   `json:"device"`
	UUID     string   `json:"uuid"`
	CDIName  string   `json:"cdiName"` // the device's name in the claim's spec
	ShareID  string   `json:"shareID,omitempty"`
}

// checkpointFile is the file's shape: the claims and a checksum over them,
// so a torn or edited file is recognized.
type checkpointFile struct {
	Version  int                       `json:"version"`
	Checksum string                    `json:"checksum"`
	Claims   map[string]*preparedClaim `json:"claims"`
}

const checkpointVersion = 1

func claimsSum(claims map[string]*preparedClaim) (string, error) {
	b, err := json.Marshal(claims) // map keys are sorted: stable
	if err != nil {
		return "", err
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:]), nil
}

// loadCheckpoint reads the prepared claims; a missing file is none.
func loadCheckpoint(path string) (map[string]*preparedClaim, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]*preparedClaim{}, nil
	}
	if err != nil {
		return nil, err
	}
	var f checkpointFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("checkpoint %s is not valid JSON: %w", path, err)
	}
	if f.Version != checkpointVersion {
		var other map[string]json.RawMessage
		if json.Unmarshal(b, &other) == nil && (other["v2"] != nil || other["v1"] != nil) {
			return nil, fmt.Errorf("checkpoint %s was written by another DRA driver for %s (NVIDIA's dra-driver-nvidia-gpu writes this shape); its claims are prepared again by this daemon as the kubelet asks", path, DriverName)
		}
		return nil, fmt.Errorf("checkpoint %s has version %d; this daemon reads version %d", path, f.Version, checkpointVersion)
	}
	if f.Claims == nil {
		f.Claims = map[string]*preparedClaim{}
	}
	sum, err := claimsSum(f.Claims)
	if err != nil {
		return nil, err
	}
	if sum != f.Checksum {
		return nil, fmt.Errorf("checkpoint %s is corrupt: its checksum does not match its content", path)
	}
	return f.Claims, nil
}

// saveCheckpoint writes the claims atomically (a temporary file, fsync,
// rename), so a crash leaves the old file or the new one.
func saveCheckpoint(path string, claims map[string]*preparedClaim) error {
	sum, err := claimsSum(claims)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(checkpointFile{Version: checkpointVersion, Checksum: sum, Claims: claims}, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".checkpoint-*")
	if err != nil {
		return fmt.Errorf("writing the checkpoint: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("writing the checkpoint: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing the checkpoint: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing the checkpoint: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing the checkpoint: %w", err)
	}
	return nil
}
