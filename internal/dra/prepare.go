package dra

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/cdi"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
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
			if err := d.writeSpec(uid, prev.Devices); err != nil {
				return nil, err
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
	if err := checkConfigs(alloc.Config); err != nil {
		return nil, fmt.Errorf("ResourceClaim %s: %w", ref, err)
	}
	var devs []preparedDevice
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
		}
		devs = append(devs, preparedDevice{Requests: []string{r.Request}, Pool: r.Pool, Device: r.Device, UUID: dev.uuid, CDIName: cdiName, ShareID: r.ShareID})
	}
	d.mu.Unlock()
	if len(devs) == 0 {
		return nil, fmt.Errorf("ResourceClaim %s has no device of driver %s on node %s", ref, DriverName, d.opts.NodeName)
	}
	if err := d.writeSpec(uid, devs); err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.claims[uid] = &preparedClaim{Namespace: namespace, Name: name, Devices: devs, Prepared: time.Now().UTC()}
	err = saveCheckpoint(d.checkpointPath(), d.claims)
	if err != nil {
		delete(d.claims, uid)
	}
	d.mu.Unlock()
	if err != nil {
		cdi.RemoveClaimSpec(d.opts.CDIDir, uid)
		return nil, err
	}
	d.log.Info("DRA claim prepared", "claim", ref, "uid", uid, "devices", deviceNames(devs))
	return devs, nil
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

// writeSpec writes a claim's CDI spec from the node's GPU spec.
func (d *Driver) writeSpec(uid string, devs []preparedDevice) error {
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
func checkConfigs(configs []kube.DeviceAllocationConfiguration) error {
	for i, c := range configs {
		if c.Opaque == nil || c.Opaque.Driver != DriverName {
			continue
		}
		var oc opaqueConfig
		dec := json.NewDecoder(bytes.NewReader(c.Opaque.Parameters))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&oc); err != nil {
			return fmt.Errorf("config[%d] (%s) for %s: %v", i, c.Source, DriverName, err)
		}
		if oc.APIVersion != configAPIVersion || (oc.Kind != kindGpuConfig && oc.Kind != kindMigConfig) {
			return fmt.Errorf("config[%d] for %s: %s %s is not a configuration of this driver: want apiVersion %s, kind %s or %s", i, DriverName, oc.APIVersion, oc.Kind, configAPIVersion, kindGpuConfig, kindMigConfig)
		}
		if oc.Sharing == nil {
			continue
		}
		switch strings.ToLower(oc.Sharing.Strategy) {
		case "timeslicing":
			if t := oc.Sharing.TimeSlicingConfig; t != nil && t.Interval != "" && t.Interval != "Default" {
				return fmt.Errorf("config[%d] %s: sharing.timeSlicingConfig.interval %s is not supported by this daemon: it leaves the GPU's time slice at Default (remove the interval)", i, oc.Kind, t.Interval)
			}
		case "mps":
			return fmt.Errorf("config[%d] %s: sharing.strategy MPS is not supported for DRA claims yet: use the device plugin's sharing.mps, or time-slicing", i, oc.Kind)
		default:
			return fmt.Errorf("config[%d] %s: sharing.strategy %q: want TimeSlicing or MPS", i, oc.Kind, oc.Sharing.Strategy)
		}
	}
	return nil
}
