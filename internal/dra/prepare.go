package dra

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/mps"
)

func claimDeviceID(name string) string { return cdi.ClaimDeviceID(name) }

// Prepare prepares one claim: it reads the claim, checks that it is the
// claim the kubelet means (same UID) and that it is allocated, writes its
// CDI spec with each of its devices on this node, and records it in the
// checkpoint. Preparing a prepared claim again answers as the first time.
func (d *Driver) Prepare(ctx context.Context, namespace, name, uid string) ([]preparedDevice, error) {
	d.prepMu.Lock()
	defer d.prepMu.Unlock()
	ref := namespace + "/" + name
	d.mu.Lock()
	prev := d.claims[uid]
	d.mu.Unlock()
	if prev != nil {
		// Again after a kubelet or daemon restart: the same answer, and
		// the spec rewritten if it went missing.
		if _, err := os.Stat(filepath.Join(d.opts.CDIDir, cdi.ClaimSpecFile(uid))); err != nil {
			if err := d.writeSpec(uid, prev.Devices, prev.MPS); err != nil {
				return nil, err
			}
		}
		if prev.MPS != nil {
			if err := d.waitMPS(ctx, uid); err != nil {
				return nil, fmt.Errorf("ResourceClaim %s: %w", ref, err)
			}
		}
		return prev.Devices, nil
	}
	claim, err := d.opts.API.GetResourceClaim(ctx, namespace, name)
	if err != nil {
		return nil, fmt.Errorf("reading ResourceClaim %s: %w", ref, err)
	}
	if claim.UID != uid {
		return nil, fmt.Errorf("ResourceClaim %s has UID %s, not %s: it was deleted and created again", ref, claim.UID, uid)
	}
	if claim.Status.Allocation == nil {
		return nil, fmt.Errorf("ResourceClaim %s is not allocated", ref)
	}
	alloc := claim.Status.Allocation.Devices
	mpsRequests, mpsRaw, err := checkConfigs(alloc.Config)
	if err != nil {
		return nil, fmt.Errorf("ResourceClaim %s: %w", ref, err)
	}
	var devs []preparedDevice
	var mpsGPUs []mps.GPU
	seen := map[string]string{} // slice device → its name in the claim's spec
	d.mu.Lock()
	for _, r := range alloc.Results {
		if r.Driver != DriverName || r.Pool != d.opts.NodeName {
			continue
		}
		dev, ok := d.byName[r.Device]
		if !ok || !d.offered(r.Device) {
			d.mu.Unlock()
			return nil, fmt.Errorf("ResourceClaim %s: device %s (request %s) is not offered by node %s: it was allocated from a stale ResourceSlice, or the device moved to the device plugin or left the node", ref, r.Device, r.Request, d.opts.NodeName)
		}
		if ok, why := d.healthy(dev); !ok {
			d.log.Warn("preparing a claim on an unhealthy device: it was allocated before its taint was published", "claim", ref, "device", r.Device, "reason", why)
		}
		cdiName, ok := seen[r.Device]
		if !ok {
			cdiName = uid + "-" + r.Device
			seen[r.Device] = cdiName
			if mpsRequests != nil && (len(mpsRequests) == 0 || slices.Contains(mpsRequests, r.Request)) {
				if dev.mig {
					d.mu.Unlock()
					return nil, fmt.Errorf("ResourceClaim %s: device %s is a MIG device: MPS sharing is for whole GPUs", ref, r.Device)
				}
				mpsGPUs = append(mpsGPUs, mps.GPU{Index: dev.gpuIndex, UUID: dev.uuid, MemoryBytes: dev.memory})
			}
		}
		devs = append(devs, preparedDevice{Requests: []string{r.Request}, Pool: r.Pool, Device: r.Device, UUID: dev.uuid, CDIName: cdiName, ShareID: r.ShareID})
	}
	d.mu.Unlock()
	if len(devs) == 0 {
		return nil, fmt.Errorf("ResourceClaim %s has no device of driver %s on node %s", ref, DriverName, d.opts.NodeName)
	}
	var shared *claimMPS
	if len(mpsGPUs) > 0 {
		if d.opts.MPSRoot == "" || d.opts.OnMPSChange == nil {
			return nil, fmt.Errorf("ResourceClaim %s asks for MPS sharing, but this daemon has no MPS root: set --mps-root (the chart's mps.root with mps.enabled)", ref)
		}
		slices.SortFunc(mpsGPUs, func(a, b mps.GPU) int { return a.Index - b.Index })
		if shared, err = parseMPS(mpsRaw, mpsGPUs); err != nil {
			return nil, fmt.Errorf("ResourceClaim %s: %w", ref, err)
		}
	}
	if err := d.writeSpec(uid, devs, shared); err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.claims[uid] = &preparedClaim{Namespace: namespace, Name: name, Devices: devs, Prepared: time.Now().UTC(), MPS: shared}
	err = saveCheckpoint(d.checkpointPath(), d.claims)
	if err != nil {
		delete(d.claims, uid)
	}
	d.mu.Unlock()
	if err != nil {
		cdi.RemoveClaimSpec(d.opts.CDIDir, uid)
		return nil, err
	}
	if shared != nil {
		d.opts.OnMPSChange()
		if err := d.waitMPS(ctx, uid); err != nil {
			// Prepared: the daemon keeps being started, and the kubelet's
			// next try waits for it again.
			return nil, fmt.Errorf("ResourceClaim %s: %w", ref, err)
		}
	}
	d.log.Info("DRA claim prepared", "claim", ref, "uid", uid, "devices", deviceNames(devs), "mps", shared != nil)
	return devs, nil
}

// mpsWait bounds how long a prepare waits for a claim's MPS daemon.
const mpsWait = 30 * time.Second

// waitMPS waits until the claim's MPS daemon is ready.
func (d *Driver) waitMPS(ctx context.Context, uid string) error {
	ctx, cancel := context.WithTimeout(ctx, mpsWait)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !d.opts.MPSReady(MPSResource(uid)) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("its MPS control daemon is not ready (see /debug/devices, mps %s): %w", MPSResource(uid), ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// offered reports whether a device is in the slice now. Call with d.mu.
func (d *Driver) offered(name string) bool {
	for _, dev := range d.devices {
		if dev.name == name {
			return true
		}
	}
	return false
}

func deviceNames(devs []preparedDevice) []string {
	var out []string
	for _, pd := range devs {
		out = append(out, pd.Device)
	}
	return out
}

// writeSpec writes a claim's CDI spec from the node's GPU spec; a claim
// shared through MPS also gets its daemon's pipe directory (at CUDA's
// default, /tmp/nvidia-mps) and the MPS root's shared memory as /dev/shm.
func (d *Driver) writeSpec(uid string, devs []preparedDevice, shared *claimMPS) error {
	d.mu.Lock()
	node := d.nodeSpec
	d.mu.Unlock()
	var cds []cdi.ClaimDevice
	seen := map[string]bool{}
	for _, pd := range devs {
		if !seen[pd.CDIName] {
			seen[pd.CDIName] = true
			cds = append(cds, cdi.ClaimDevice{Name: pd.CDIName, UUID: pd.UUID})
		}
	}
	s, err := cdi.ClaimSpec(node, cds)
	if err != nil {
		return fmt.Errorf("the CDI spec of claim %s: %w", uid, err)
	}
	if shared != nil {
		pipe, shm := d.mpsMounts(uid)
		e := s.ContainerEdits // a copy: the node spec's edits are shared
		e.Env = append(slices.Clone(e.Env), "CUDA_MPS_PIPE_DIRECTORY="+mpsPipeInContainer)
		e.Mounts = append(slices.Clone(e.Mounts),
			&specs.Mount{HostPath: pipe, ContainerPath: mpsPipeInContainer, Options: []string{"rbind", "rw"}},
			&specs.Mount{HostPath: shm, ContainerPath: "/dev/shm", Options: []string{"rbind", "rw"}})
		s.ContainerEdits = e
	}
	_, err = cdi.WriteClaimSpec(d.opts.CDIDir, uid, s)
	return err
}

// Unprepare releases a claim: its CDI spec is removed and it leaves the
// checkpoint. A claim not prepared here is no error (the kubelet may ask
// twice).
func (d *Driver) Unprepare(uid string) error {
	d.prepMu.Lock()
	defer d.prepMu.Unlock()
	if err := cdi.RemoveClaimSpec(d.opts.CDIDir, uid); err != nil {
		return err
	}
	d.mu.Lock()
	c := d.claims[uid]
	if c == nil {
		d.mu.Unlock()
		return nil
	}
	delete(d.claims, uid)
	err := saveCheckpoint(d.checkpointPath(), d.claims)
	if err != nil {
		d.claims[uid] = c
	}
	d.mu.Unlock()
	if err != nil {
		return err
	}
	d.log.Info("DRA claim unprepared", "claim", c.Namespace+"/"+c.Name, "uid", uid)
	if c.MPS != nil && d.opts.OnMPSChange != nil {
		d.opts.OnMPSChange() // its daemon quits
	}
	d.released.Notify()
	return nil
}

// NVIDIA's DRA driver's opaque configuration group and kinds.
const (
	configAPIVersion = "resource.nvidia.com/v1beta1"
	kindGpuConfig    = "GpuConfig"
	kindMigConfig    = "MigDeviceConfig"
)

// opaqueConfig is GpuConfig and MigDeviceConfig: the sharing settings.
type opaqueConfig struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Sharing    *struct {
		Strategy          string `json:"strategy"`
		TimeSlicingConfig *struct {
			Interval string `json:"interval,omitempty"`
		} `json:"timeSlicingConfig,omitempty"`
		MPSConfig json.RawMessage `json:"mpsConfig,omitempty"`
	} `json:"sharing,omitempty"`
}

// checkConfigs reads the claim's opaque configuration for this driver as
// NVIDIA's driver does (strictly: an unknown field is an error) and
// refuses what this daemon cannot apply, rather than ignore it: time-slice
// intervals other than Default and MPS.
//
// It returns the requests shared through MPS (nil: none; empty: all) and
// their mpsConfig.
func checkConfigs(configs []kube.DeviceAllocationConfiguration) (mpsRequests []string, mpsRaw json.RawMessage, err error) {
	for i, c := range configs {
		if c.Opaque == nil || c.Opaque.Driver != DriverName {
			continue
		}
		var oc opaqueConfig
		dec := json.NewDecoder(bytes.NewReader(c.Opaque.Parameters))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&oc); err != nil {
			return nil, nil, fmt.Errorf("config[%d] (%s) for %s: %v", i, c.Source, DriverName, err)
		}
		if oc.APIVersion != configAPIVersion || (oc.Kind != kindGpuConfig && oc.Kind != kindMigConfig) {
			return nil, nil, fmt.Errorf("config[%d] for %s: %s %s is not a configuration of this driver: want apiVersion %s, kind %s or %s", i, DriverName, oc.APIVersion, oc.Kind, configAPIVersion, kindGpuConfig, kindMigConfig)
		}
		if oc.Sharing == nil {
			continue
		}
		switch strings.ToLower(oc.Sharing.Strategy) {
		case "timeslicing":
			if t := oc.Sharing.TimeSlicingConfig; t != nil && t.Interval != "" && t.Interval != "Default" {
				return nil, nil, fmt.Errorf("config[%d] %s: sharing.timeSlicingConfig.interval %s is not supported by this daemon: it leaves the GPU's time slice at Default (remove the interval)", i, oc.Kind, t.Interval)
			}
		case "mps":
			if oc.Kind == kindMigConfig {
				return nil, nil, fmt.Errorf("config[%d] %s: sharing.strategy MPS: MPS sharing is for whole GPUs (GpuConfig), not MIG devices", i, oc.Kind)
			}
			mpsRequests = append([]string{}, c.Requests...)
			mpsRaw = oc.Sharing.MPSConfig
		default:
			return nil, nil, fmt.Errorf("config[%d] %s: sharing.strategy %q: want TimeSlicing or MPS", i, oc.Kind, oc.Sharing.Strategy)
		}
	}
	return mpsRequests, mpsRaw, nil
}
