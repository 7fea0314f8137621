package telemetry_test

import (
	"bytes"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// TestHostilePodNames: pod, namespace and container names reach label
// values unchanged whatever they hold. Names with quotes, backslashes,
// newlines, braces, '#', control characters, Unicode, 10,000 characters
// and label or series injection attempts are attributed on a simulated DGX
// A100 (whole GPUs held by one container each, a MIG device shared by two),
// the daemon's fast path writes the exposition, and Prometheus' own text
// parser reads it back: every series parses, every label value equals the
// original string exactly, no label or series appears that was not meant
// to, and the registry's encoder writes the same text.
func TestHostilePodNames(t *testing.T) {
	long := strings.Repeat("p", 10_000)
	hostile := []podresources.Holder{
		{Namespace: `a",namespace="kube-system`, Pod: `x"} 1` + "\nDCGM_FI_DEV_GPU_TEMP{pod=\"forged\"} 999\n# HELP", Container: `c",pod="other`},
		{Namespace: `back\slash\\`, Pod: `\"escaped\"\n`, Container: `\`},
		{Namespace: "new\nline\r\n", Pod: "}{#,=\t ", Container: "# TYPE DCGM_FI_DEV_GPU_TEMP counter"},
		{Namespace: "ünïcødé-名前-🚀", Pod: long, Container: "\x00\x01\x7f\u2028\ufeff"},
		{Namespace: "a", Pod: `{pod="b"}`, Container: `"`},
	}
	e := newSimEnv(t, "dgx-a100-mig", envOptions{})
	e.sample()
	// GPUs 5, 6 and 7 are whole; MIG devices on GPU 0 are shared.
	held := map[string]podresources.Holder{}
	byUnit := map[string][]podresources.Holder{}
	for k, h := range hostile[:3] {
		h.Resource = "nvidia.com/gpu"
		uuid := e.inv.GPUs[5+k].UUID
		held[uuid] = h
		byUnit[uuid] = []podresources.Holder{h}
	}
	shared := e.inv.GPUs[0].MIGDevices[0].UUID
	for _, h := range hostile[3:] {
		h.Resource = "nvidia.com/mig-1g.5gb.shared"
		byUnit[shared] = append(byUnit[shared], h)
	}
	e.setPods(byUnit)
	e.clk.Advance(time.Second)
	e.sample()

	var b bytes.Buffer
	e.collector.WriteText(&b)
	parser := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(b.Bytes()))
	if err != nil {
		t.Fatalf("hostile names break the exposition: %v", err)
	}
	if fast, slow := withoutScrapeFamilies(b.String()), withoutScrapeFamilies(formatAll(t, e.collector)); fast != slow {
		t.Errorf("WriteText and the registry's encoder differ on hostile names\n--- WriteText\n%s\n--- registry\n%s", fast, slow)
	}

	wantFamilies := []string{telemetry.PodInfoName, "gpu_plugin_scrape_collector_duration_seconds", "gpu_plugin_scrape_collector_success"}
	for _, m := range telemetry.DefaultMetricSet().Metrics {
		wantFamilies = append(wantFamilies, m.Name)
	}
	for name := range fams {
		if !slices.Contains(wantFamilies, name) {
			t.Errorf("a family %q appeared that the collector does not write", name)
		}
	}

	// Every DCGM series: pod labels exactly when one container holds the
	// device, equal to the original strings, and no other labels.
	temp := fams["DCGM_FI_DEV_GPU_TEMP"]
	if temp == nil {
		t.Fatal("no DCGM_FI_DEV_GPU_TEMP family")
	}
	targets := 0
	for _, g := range e.inv.GPUs {
		targets += max(1, len(g.MIGDevices))
	}
	if len(temp.Metric) != targets {
		t.Errorf("DCGM_FI_DEV_GPU_TEMP has %d series, want one per device (%d)", len(temp.Metric), targets)
	}
	for _, fam := range fams {
		if !strings.HasPrefix(fam.GetName(), "DCGM_") {
			continue
		}
		for _, m := range fam.Metric {
			l := labelMap(m)
			want := []string{"DCGM_FI_DRIVER_VERSION", "Hostname", "UUID", "device", "gpu", "modelName", "pci_bus_id"}
			if _, mig := l["GPU_I_ID"]; mig {
				want = append(want, "GPU_I_ID", "GPU_I_PROFILE")
			}
			if h, ok := held[l["UUID"]]; ok && l["GPU_I_ID"] == "" {
				want = append(want, "container", "namespace", "pod")
				if l["pod"] != h.Pod || l["namespace"] != h.Namespace || l["container"] != h.Container {
					t.Errorf("%s of %s: pod %q namespace %q container %q, want %q %q %q",
						fam.GetName(), l["UUID"], l["pod"], l["namespace"], l["container"], h.Pod, h.Namespace, h.Container)
				}
			}
			if got := slices.Sorted(maps.Keys(l)); !slices.Equal(got, slices.Sorted(slices.Values(want))) {
				t.Errorf("%s of %s: labels %v, want %v", fam.GetName(), l["UUID"], got, slices.Sorted(slices.Values(want)))
			}
		}
	}

	// The info metric: one series per holder, its names exact.
	info := fams[telemetry.PodInfoName]
	if info == nil {
		t.Fatal("no " + telemetry.PodInfoName + " family")
	}
	var got, want []string
	for _, m := range info.Metric {
		l := labelMap(m)
		got = append(got, l["namespace"]+"\x00"+l["pod"]+"\x00"+l["container"]+"\x00"+l["resource"])
		names := []string{"Hostname", "UUID", "container", "gpu", "namespace", "pod", "resource"}
		if l["GPU_I_ID"] != "" {
			names = append(names, "GPU_I_ID", "GPU_I_PROFILE")
		}
		if keys := slices.Sorted(maps.Keys(l)); !slices.Equal(keys, slices.Sorted(slices.Values(names))) {
			t.Errorf("%s series has labels %v, want %v", telemetry.PodInfoName, keys, slices.Sorted(slices.Values(names)))
		}
	}
	for _, hs := range byUnit {
		for _, h := range hs {
			want = append(want, h.Namespace+"\x00"+h.Pod+"\x00"+h.Container+"\x00"+h.Resource)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s holders:\n got %q\nwant %q", telemetry.PodInfoName, got, want)
	}
}

func labelMap(m *dto.Metric) map[string]string {
	out := make(map[string]string, len(m.Label))
	for _, p := range m.Label {
		out[p.GetName()] = p.GetValue()
	}
	return out
}
