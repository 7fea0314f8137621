package dra

import (
	"encoding/json"
	"fmt"
	"math/big"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/gpu-plugin/gpu-plugin/internal/mps"
)

// MPS sharing of a claim, as NVIDIA's DRA driver offers it through
// GpuConfig's sharing.mpsConfig: the claim's GPUs get their own MPS
// control daemon (the same supervised daemon as the device plugin's
// sharing.mps), limited as the config says, and the claim's containers
// its pipe directory and shared memory.

// claimMPS is a prepared claim's MPS daemon settings.
type claimMPS struct {
	ThreadPercent int         `json:"threadPercent,omitempty"`
	Limits        []mps.Limit `json:"limits,omitempty"`
	GPUs          []mps.GPU   `json:"gpus"`
}

// mpsConfig is GpuConfig's sharing.mpsConfig.
type mpsConfig struct {
	DefaultActiveThreadPercentage     *int              `json:"defaultActiveThreadPercentage,omitempty"`
	DefaultPinnedDeviceMemoryLimit    string            `json:"defaultPinnedDeviceMemoryLimit,omitempty"`
	DefaultPerDevicePinnedMemoryLimit map[string]string `json:"defaultPerDevicePinnedMemoryLimit,omitempty"`
}

// MPSResource is the name a claim's MPS daemon goes by (its directories
// are <mps root>/dra/<claim UID>/…).
func MPSResource(claimUID string) string { return "dra/" + claimUID }

// mpsPipeInContainer is where a claim's containers find the MPS pipe
// directory: CUDA's default, so clients need no setting.
const mpsPipeInContainer = "/tmp/nvidia-mps"

// parseMPS reads mpsConfig for the GPUs of a claim (in CUDA ordinal
// order under the daemon's CUDA_VISIBLE_DEVICES). Per-device limits are
// keyed by GPU UUID or by the ordinal.
func parseMPS(raw json.RawMessage, gpus []mps.GPU) (*claimMPS, error) {
	var c mpsConfig
	if len(raw) > 0 {
		dec := json.NewDecoder(strings.NewReader(string(raw)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			return nil, fmt.Errorf("sharing.mpsConfig: %v", err)
		}
	}
	out := &claimMPS{GPUs: gpus}
	if p := c.DefaultActiveThreadPercentage; p != nil {
		if *p < 1 || *p > 100 {
			return nil, fmt.Errorf("sharing.mpsConfig.defaultActiveThreadPercentage: %d is not a percentage from 1 to 100", *p)
		}
		out.ThreadPercent = *p
	} else {
		out.ThreadPercent = 100
	}
	var all string
	if c.DefaultPinnedDeviceMemoryLimit != "" {
		mib, err := quantityMiB(c.DefaultPinnedDeviceMemoryLimit)
		if err != nil {
			return nil, fmt.Errorf("sharing.mpsConfig.defaultPinnedDeviceMemoryLimit: %v", err)
		}
		all = strconv.FormatUint(mib, 10) + "M"
	}
	per := map[int]string{}
	for k, v := range c.DefaultPerDevicePinnedMemoryLimit {
		i := -1
		for j, g := range gpus {
			if strings.EqualFold(g.UUID, k) || strconv.Itoa(j) == k {
				i = j
			}
		}
		if i < 0 {
			return nil, fmt.Errorf("sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit: %q is not a GPU of the claim: name it by UUID or by its position in the claim (0 to %d)", k, len(gpus)-1)
		}
		mib, err := quantityMiB(v)
		if err != nil {
			return nil, fmt.Errorf("sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit[%s]: %v", k, err)
		}
		per[i] = strconv.FormatUint(mib, 10) + "M"
	}
	out.Limits = []mps.Limit{} // set: no limit unless named, not the replica-derived default
	for i := range gpus {
		v := all
		if p, ok := per[i]; ok {
			v = p
		}
		if v != "" {
			out.Limits = append(out.Limits, mps.Limit{Device: strconv.Itoa(i), Value: v})
		}
	}
	return out, nil
}

// maxQuantityExp bounds a quantity's decimal exponent: 1e40 bytes is far
// beyond any GPU's memory, 1e-40 far below a byte.
const maxQuantityExp = 40

// quantityMiB reads a Kubernetes quantity of bytes ("10Gi", "512Mi",
// "4G", "1073741824") as whole MiB.
func quantityMiB(q string) (uint64, error) {
	q = strings.TrimSpace(q)
	mult := map[string]int64{
		"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
		"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "": 1,
	}
	num, suffix := q, ""
	for _, s := range []string{"Ki", "Mi", "Gi", "Ti", "Pi", "k", "M", "G", "T", "P"} {
		if strings.HasSuffix(q, s) {
			num, suffix = strings.TrimSuffix(q, s), s
			break
		}
	}
	// A claim's author picks the string: "1e999999" would parse into a
	// number of millions of bits (tens of milliseconds of CPU a prepare);
	// no memory limit needs an exponent beyond maxQuantityExp.
	if i := strings.IndexAny(num, "eE"); i >= 0 {
		if e, err := strconv.Atoi(num[i+1:]); err == nil && (e > maxQuantityExp || e < -maxQuantityExp) {
			return 0, fmt.Errorf("%q is less than 1 MiB or too large", q)
		}
	}
	r, ok := new(big.Rat).SetString(num)
	if !ok || r.Sign() <= 0 {
		return 0, fmt.Errorf("%q is not a positive quantity of bytes such as 10Gi or 4096Mi", q)
	}
	r.Mul(r, new(big.Rat).SetInt64(mult[suffix]))
	r.Quo(r, new(big.Rat).SetInt64(1<<20))
	mib := new(big.Int).Quo(r.Num(), r.Denom())
	if !mib.IsUint64() || mib.Uint64() == 0 {
		return 0, fmt.Errorf("%q is less than 1 MiB or too large", q)
	}
	return mib.Uint64(), nil
}

// MPSSpecs are the MPS daemons the prepared claims need, for the daemon's
// MPS manager (with the device plugin's own).
func (d *Driver) MPSSpecs() []mps.Spec {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []mps.Spec
	for uid, c := range d.claims {
		if c.MPS == nil {
			continue
		}
		out = append(out, mps.Spec{Root: d.opts.MPSRoot, Resource: MPSResource(uid), Replicas: 1,
			GPUs: c.MPS.GPUs, ThreadPercent: c.MPS.ThreadPercent, Limits: c.MPS.Limits})
	}
	return out
}

// mpsEdits are what a claim's containers need to reach its MPS daemon.
func (d *Driver) mpsMounts(uid string) (pipe, shm string) {
	return mps.DirsOf(d.opts.MPSRoot, MPSResource(uid)).Pipe, filepath.Join(d.opts.MPSRoot, "shm")
}
