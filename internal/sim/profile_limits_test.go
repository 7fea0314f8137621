package sim

import (
	"strings"
	"testing"
)

// TestProfileGPULimit: a profile cannot ask for more GPUs than
// maxProfileGPUs. YAML aliases make each 64 GPUs cost a few bytes, and the
// topology grows with the square of the count, so without the bound a
// 4 KiB file would ask for ~60,000 GPUs and gigabytes of matrix.
func TestProfileGPULimit(t *testing.T) {
	doc := "name: many\ngpus:\n  - &a {model: L4, count: 64}\n" + strings.Repeat("  - *a\n", 1000)
	_, err := ParseProfile("many.yaml", []byte(doc))
	if err == nil || !strings.Contains(err.Error(), "more than 512 GPUs") || !strings.Contains(err.Error(), "gpus[8].count") {
		t.Fatalf("a profile of 64,064 GPUs: %v; want an error naming gpus[8].count and the 512-GPU bound", err)
	}
}
