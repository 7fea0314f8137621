package dra_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	drapb "k8s.io/kubelet/pkg/apis/dra/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/dra"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
)

func TestPrepareUnprepare(t *testing.T) {
	r := newRig(t, "dgx-h100")
	g3, g5 := r.inv.GPUs[3], r.inv.GPUs[5]
	dev3, dev5 := "gpu-"+itoa(int64(g3.Minor)), "gpu-"+itoa(int64(g5.Minor))
	c1 := r.claim("one", "uid-1", dev3)
	c2 := r.claim("two", "uid-2", dev5, dev3) // two requests, one of them the same device as c1 (admin access)
	got := r.prepare(c1, c2)
	for uid, want := range map[string][]string{"uid-1": {dev3}, "uid-2": {dev5, dev3}} {
		resp := got[uid]
		if resp == nil || resp.Error != "" {
			t.Fatalf("claim %s: %+v", uid, resp)
		}
		var names []string
		for _, d := range resp.Devices {
			names = append(names, d.DeviceName)
			if d.PoolName != node || len(d.CdiDeviceIds) != 1 || d.CdiDeviceIds[0] != "k8s.gpu.nvidia.com/claim="+uid+"-"+d.DeviceName || len(d.RequestNames) != 1 {
				t.Errorf("claim %s device %+v", uid, d)
			}
		}
		if !slices.Equal(names, want) {
			t.Errorf("claim %s prepared %v, want %v", uid, names, want)
		}
	}
	// The spec resolves as a runtime resolves it: the claimed GPU's device
	// node, and nothing of another GPU's.
	if _, err := os.Stat(filepath.Join(r.dirs.CDIDir, "k8s.gpu.nvidia.com-claim_uid-1.yaml")); err != nil {
		t.Fatalf("claim spec file: %v", err)
	}
	oci, err := r.inject(got["uid-1"].Devices[0].CdiDeviceIds...)
	if err != nil {
		t.Fatal(err)
	}
	nodes := deviceNodes(oci)
	if !slices.Contains(nodes, "/dev/nvidia"+itoa(int64(g3.Minor))) || slices.Contains(nodes, "/dev/nvidia"+itoa(int64(g5.Minor))) || !slices.Contains(nodes, "/dev/nvidiactl") {
		t.Errorf("claim uid-1 injects %v, want /dev/nvidia%d and the control nodes only", nodes, g3.Minor)
	}
	if !r.drv.Held(g3.UUID) || !r.drv.Held(g5.UUID) || r.drv.Held(r.inv.GPUs[0].UUID) {
		t.Errorf("Held: gpu3 %v gpu5 %v gpu0 %v, want true true false", r.drv.Held(g3.UUID), r.drv.Held(g5.UUID), r.drv.Held(r.inv.GPUs[0].UUID))
	}

	// Refusals, each naming the claim and why.
	r.claim("replaced", "uid-new", dev3)
	r.api.addClaim(&kube.ResourceClaim{ObjectMeta: kube.ObjectMeta{Namespace: "default", Name: "pending", UID: "uid-p"}})
	r.claim("elsewhere", "uid-e", "gpu-99")
	for _, tc := range []struct {
		name, uid, want string
	}{
		{"replaced", "uid-old", "has UID uid-new, not uid-old"},
		{"pending", "uid-p", "is not allocated"},
		{"elsewhere", "uid-e", "device gpu-99 (request gpua) is not offered by node node-a"},
		{"missing", "uid-m", "reading ResourceClaim default/missing"},
	} {
		resp := r.prepare(claimRef(tc.name, tc.uid))[tc.uid]
		if resp == nil || !strings.Contains(resp.Error, tc.want) || len(resp.Devices) != 0 {
			t.Errorf("prepare %s: %+v, want an error with %q", tc.name, resp, tc.want)
		}
		if _, err := os.Stat(filepath.Join(r.dirs.CDIDir, "k8s.gpu.nvidia.com-claim_"+tc.uid+".yaml")); err == nil {
			t.Errorf("a spec was written for the refused claim %s", tc.name)
		}
	}

	// A restart keeps the prepared claims: the same answer without the
	// API (the claim is gone from it), and a spec removed meanwhile is
	// written again.
	r.stop()
	r.api.mu.Lock()
	delete(r.api.claims, "default/one")
	r.api.mu.Unlock()
	os.Remove(filepath.Join(r.dirs.CDIDir, "k8s.gpu.nvidia.com-claim_uid-1.yaml"))
	r.start()
	if !r.drv.Held(g3.UUID) {
		t.Error("after a restart the prepared claim's GPU is not held")
	}
	again := r.prepare(c1)["uid-1"]
	if again.Error != "" || len(again.Devices) != 1 || again.Devices[0].DeviceName != dev3 {
		t.Fatalf("prepare after restart: %+v", again)
	}
	if _, err := r.inject(again.Devices[0].CdiDeviceIds...); err != nil {
		t.Errorf("the rewritten spec does not resolve: %v", err)
	}

	// Unprepare: spec gone, checkpoint without it, the GPU free; twice is
	// no error.
	released := r.drv.Released()
	for i := 0; i < 2; i++ {
		if resp := r.unprepare(c1)["uid-1"]; resp == nil || resp.Error != "" {
			t.Fatalf("unprepare %d: %+v", i, resp)
		}
	}
	select {
	case <-released:
	default:
		t.Error("Released did not fire")
	}
	if _, err := os.Stat(filepath.Join(r.dirs.CDIDir, "k8s.gpu.nvidia.com-claim_uid-1.yaml")); !os.IsNotExist(err) {
		t.Errorf("spec still there after unprepare: %v", err)
	}
	var cp struct {
		Claims map[string]json.RawMessage `json:"claims"`
	}
	b, err := os.ReadFile(filepath.Join(r.dirs.PluginsDir, "gpu.nvidia.com", "checkpoint.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &cp); err != nil {
		t.Fatal(err)
	}
	if _, ok := cp.Claims["uid-1"]; ok || len(cp.Claims) != 1 {
		t.Errorf("checkpoint claims %v, want only uid-2", cp.Claims)
	}
	if !r.drv.Held(g3.UUID) { // still in claim two
		t.Error("gpu3 is free though claim two holds it")
	}
	r.unprepare(c2)
	if r.drv.Held(g3.UUID) || r.drv.Held(g5.UUID) {
		t.Error("GPUs still held after every claim was unprepared")
	}
}

func claimRef(name, uid string) *drapb.Claim {
	return &drapb.Claim{Namespace: "default", Name: name, Uid: uid}
}

func TestCorruptCheckpointIsMovedAside(t *testing.T) {
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "plugins", "gpu.nvidia.com")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"garbage":  "{not json",
		"checksum": `{"version":1,"checksum":"00","claims":{"u":{"namespace":"a","name":"b","devices":[]}}}`,
		"NVIDIA's": `{"checksum":123,"v2":{"preparedClaims":{}}}`,
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(filepath.Join(dir, "checkpoint.json"), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			drv, err := dra.New(dra.Options{NodeName: node, PluginsDir: filepath.Join(tmp, "plugins"), RegistrarDir: tmp, API: newFakeAPI()})
			if err != nil {
				t.Fatal(err)
			}
			if st := drv.Status(); len(st.Prepared) != 0 {
				t.Errorf("claims from a corrupt checkpoint: %+v", st.Prepared)
			}
			aside, _ := filepath.Glob(filepath.Join(dir, "checkpoint.json.unreadable-*"))
			if len(aside) == 0 {
				t.Error("the corrupt checkpoint was not kept aside")
			}
			for _, a := range aside {
				os.Remove(a)
			}
		})
	}
}

func TestOpaqueConfig(t *testing.T) {
	r := newRig(t, "dgx-h100")
	dev := "gpu-" + itoa(int64(r.inv.GPUs[0].Minor))
	for _, tc := range []struct {
		name, params, want string
	}{
		{"no sharing", `{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig"}`, ""},
		{"time-slicing default", `{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharing":{"strategy":"TimeSlicing","timeSlicingConfig":{"interval":"Default"}}}`, ""},
		{"time-slicing long", `{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharing":{"strategy":"TimeSlicing","timeSlicingConfig":{"interval":"Long"}}}`, "interval Long is not supported"},
		{"mps without an MPS root", `{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharing":{"strategy":"MPS"}}`, "asks for MPS sharing, but this daemon has no MPS root"},
		{"mps on MIG", `{"apiVersion":"resource.nvidia.com/v1beta1","kind":"MigDeviceConfig","sharing":{"strategy":"MPS"}}`, "MPS sharing is for whole GPUs"},
		{"unknown field", `{"apiVersion":"resource.nvidia.com/v1beta1","kind":"GpuConfig","sharng":{}}`, `unknown field "sharng"`},
		{"other kind", `{"apiVersion":"resource.nvidia.com/v1beta1","kind":"VfioDeviceConfig"}`, "is not a configuration of this driver"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			uid := "uid-" + strings.ReplaceAll(tc.name, " ", "-")
			c := &kube.ResourceClaim{ObjectMeta: kube.ObjectMeta{Namespace: "default", Name: uid, UID: uid}}
			c.Status.Allocation = &kube.AllocationResult{Devices: kube.DeviceAllocationResult{
				Results: []kube.DeviceRequestAllocationResult{{Request: "gpu", Driver: dra.DriverName, Pool: node, Device: dev}},
				Config:  []kube.DeviceAllocationConfiguration{{Source: "FromClaim", Opaque: &kube.OpaqueDeviceConfiguration{Driver: dra.DriverName, Parameters: json.RawMessage(tc.params)}}},
			}}
			r.api.addClaim(c)
			resp := r.prepare(claimRef(uid, uid))[uid]
			if tc.want == "" && resp.Error != "" || tc.want != "" && !strings.Contains(resp.Error, tc.want) {
				t.Errorf("error %q, want %q", resp.Error, tc.want)
			}
			r.unprepare(claimRef(uid, uid))
		})
	}
}
