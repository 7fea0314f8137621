package nodehealth

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/health"
	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

func testInventory() *nvml.Inventory {
	return &nvml.Inventory{GPUs: []nvml.GPU{
		{Index: 0, UUID: "GPU-0"},
		{Index: 1, UUID: "GPU-1", MIGDevices: []nvml.MIGDevice{{UUID: "MIG-1a"}, {UUID: "MIG-1b"}}},
		{Index: 2, UUID: ""}, // unidentified: reported, never advertised
	}}
}

func sick(reason string) health.Status { return health.Status{Healthy: false, Reason: reason} }

func TestNodeGPUs(t *testing.T) {
	tests := []struct {
		name        string
		snap        map[string]health.Status
		healthy     []bool
		usable      []bool
		reasonOf1   string
		condStatus  string
		noneUsable  bool
		msgContains []string
	}{
		{name: "all healthy", snap: nil, healthy: []bool{true, true}, usable: []bool{true, true},
			condStatus: "True", msgContains: []string{"all 2 GPUs are healthy"}},
		{name: "a GPU", snap: map[string]health.Status{"GPU-0": sick("XID 79")}, healthy: []bool{false, true}, usable: []bool{false, true},
			condStatus: "False", msgContains: []string{"1 of 2 GPUs unhealthy: GPU 0 (GPU-0): XID 79"}},
		{name: "one MIG device", snap: map[string]health.Status{"MIG-1b": sick("XID 94")}, healthy: []bool{true, false}, usable: []bool{true, true},
			reasonOf1: "MIG device MIG-1b: XID 94", condStatus: "False", msgContains: []string{"GPU 1 (GPU-1): MIG device MIG-1b: XID 94"}},
		{name: "every MIG device and the other GPU", snap: map[string]health.Status{"GPU-0": sick("lost"), "MIG-1a": sick("a"), "MIG-1b": sick("b")},
			healthy: []bool{false, false}, usable: []bool{false, false}, reasonOf1: "MIG device MIG-1a: a", condStatus: "False", noneUsable: true,
			msgContains: []string{"2 of 2 GPUs unhealthy", "GPU 0 (GPU-0): lost; GPU 1"}},
		{name: "recovered units stay healthy", snap: map[string]health.Status{"GPU-0": {Healthy: true}}, healthy: []bool{true, true}, usable: []bool{true, true},
			condStatus: "True"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gpus := nodeGPUs(testInventory(), tt.snap)
			if len(gpus) != 2 {
				t.Fatalf("%d GPUs, want the 2 identified ones", len(gpus))
			}
			for i, g := range gpus {
				if g.Healthy != tt.healthy[i] || g.Usable != tt.usable[i] {
					t.Errorf("GPU %d: healthy %v usable %v, want %v %v", i, g.Healthy, g.Usable, tt.healthy[i], tt.usable[i])
				}
			}
			if tt.reasonOf1 != "" && gpus[1].Reason != tt.reasonOf1 {
				t.Errorf("GPU 1 reason %q, want %q", gpus[1].Reason, tt.reasonOf1)
			}
			c := conditionFor(gpus)
			if c.Status != tt.condStatus {
				t.Errorf("condition %s, want %s (%s)", c.Status, tt.condStatus, c.Message)
			}
			for _, m := range tt.msgContains {
				if !strings.Contains(c.Message, m) {
					t.Errorf("message %q lacks %q", c.Message, m)
				}
			}
			if got := noneUsable(gpus); got != tt.noneUsable {
				t.Errorf("noneUsable %v, want %v", got, tt.noneUsable)
			}
		})
	}
}

// The message stays bounded whatever the node has: the GPUs beyond the
// limit are counted.
func TestConditionMessageBounded(t *testing.T) {
	inv := &nvml.Inventory{}
	snap := map[string]health.Status{}
	for i := range 64 {
		u := "GPU-" + strings.Repeat("f", 30) + string(rune('A'+i%26)) + string(rune('a'+i/26))
		inv.GPUs = append(inv.GPUs, nvml.GPU{Index: i, UUID: u})
		snap[u] = sick(strings.Repeat("r", 100))
	}
	c := conditionFor(nodeGPUs(inv, snap))
	if len(c.Message) > maxMessage {
		t.Errorf("message is %d bytes, over %d", len(c.Message), maxMessage)
	}
	if !strings.HasPrefix(c.Message, "64 of 64 GPUs unhealthy: ") || !strings.Contains(c.Message, " more") {
		t.Errorf("message %q does not count the GPUs left out", c.Message)
	}
}

func TestTransitions(t *testing.T) {
	g := func(uuid string, healthy bool) gpuHealth { return gpuHealth{UUID: uuid, Healthy: healthy} }
	got := transitions(
		[]gpuHealth{g("A", true), g("B", false), g("C", false)},
		[]gpuHealth{g("A", false), g("B", true), g("C", false), g("D", false), g("E", true)})
	var names []string
	for _, tr := range got {
		names = append(names, tr.UUID)
	}
	// A sick, B recovered, D new and sick; C unchanged, E new and healthy: no Event.
	if strings.Join(names, ",") != "A,B,D" {
		t.Errorf("transitions %v, want A,B,D", names)
	}
}

func TestConditionPatch(t *testing.T) {
	now := time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC)
	then := kube.NewTime(now.Add(-time.Hour))
	node := func(conds ...kube.NodeCondition) *kube.Node {
		n := &kube.Node{}
		n.Status.Conditions = conds
		return n
	}
	sickCond := condition{Status: "False", Reason: ReasonUnhealthy, Message: "1 of 8 GPUs unhealthy: x"}
	ready := kube.NodeCondition{Type: "Ready", Status: "True"}
	tests := []struct {
		name           string
		node           *kube.Node
		want           condition
		none           bool
		keepTransition bool
	}{
		{name: "absent", node: node(ready), want: sickCond},
		{name: "same", node: node(ready, kube.NodeCondition{Type: ConditionType, Status: "False", Reason: ReasonUnhealthy, Message: sickCond.Message, LastTransitionTime: then}), want: sickCond, none: true},
		{name: "new message, same status", node: node(kube.NodeCondition{Type: ConditionType, Status: "False", Reason: ReasonUnhealthy, Message: "other", LastTransitionTime: then}), want: sickCond, keepTransition: true},
		{name: "status flips", node: node(kube.NodeCondition{Type: ConditionType, Status: "True", Reason: ReasonHealthy, LastTransitionTime: then}), want: sickCond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := conditionPatch(tt.node, tt.want, now)
			if tt.none {
				if p != nil {
					t.Fatalf("patch %s for a node that already shows the condition", p)
				}
				return
			}
			var got struct {
				Status struct {
					Conditions []kube.NodeCondition `json:"conditions"`
				} `json:"status"`
			}
			if err := json.Unmarshal(p, &got); err != nil || len(got.Status.Conditions) != 1 {
				t.Fatalf("patch %s: %v", p, err)
			}
			c := got.Status.Conditions[0]
			if c.Type != ConditionType || string(c.Status) != tt.want.Status || c.Message != tt.want.Message {
				t.Errorf("patch sets %+v, want %+v", c, tt.want)
			}
			wantTransition := now
			if tt.keepTransition {
				wantTransition = then.Time
			}
			if !c.LastTransitionTime.Time.Equal(wantTransition) || !c.LastHeartbeatTime.Time.Equal(now) {
				t.Errorf("transition %v heartbeat %v, want %v and %v", c.LastTransitionTime, c.LastHeartbeatTime, wantTransition, now)
			}
		})
	}
}
