package daemon

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/config"
	"github.com/gpu-plugin/gpu-plugin/internal/health"
)

// TestHealthKnobs: NVIDIA's environment knobs, our flags and the config
// file's health section, resolved as the daemon resolves them, decide
// which XIDs are fatal.
func TestHealthKnobs(t *testing.T) {
	cases := []struct {
		name     string
		env      map[string]string
		args     []string
		file     string
		fatal    []uint64
		skipped  []uint64
		ecc      bool
		disabled bool
		recovery health.Recovery
		quiet    time.Duration
		err      string
	}{
		{name: "defaults", fatal: []uint64{48, 79, 94, 777}, skipped: []uint64{13, 31, 43, 45, 68, 109}, ecc: true,
			recovery: health.RecoverAfterQuietPeriod, quiet: time.Minute},
		{name: "DP_DISABLE_HEALTHCHECKS numbers add to the skip list", env: map[string]string{"DP_DISABLE_HEALTHCHECKS": "48, 94"},
			fatal: []uint64{79}, skipped: []uint64{13, 48, 94}, ecc: true},
		{name: "DP_DISABLE_HEALTHCHECKS=xids skips XIDs only", env: map[string]string{"DP_DISABLE_HEALTHCHECKS": "xids"},
			skipped: []uint64{48, 79}, ecc: true},
		{name: "DP_DISABLE_HEALTHCHECKS=all switches health checks off", env: map[string]string{"DP_DISABLE_HEALTHCHECKS": "all"},
			skipped: []uint64{48, 79}, disabled: true},
		{name: "all plus an enabled XID keeps that XID fatal",
			env:   map[string]string{"DP_DISABLE_HEALTHCHECKS": "all", "DP_ENABLE_HEALTHCHECKS": "48"},
			fatal: []uint64{48}, skipped: []uint64{13, 79}},
		{name: "DP_ENABLE_HEALTHCHECKS forces a default-skipped XID", env: map[string]string{"DP_ENABLE_HEALTHCHECKS": "13"},
			fatal: []uint64{13, 48}, skipped: []uint64{31}, ecc: true},
		{name: "DP_ENABLE_HEALTHCHECKS=all", env: map[string]string{"DP_ENABLE_HEALTHCHECKS": "all"},
			fatal: []uint64{13, 31, 109}, ecc: true},
		{name: "file lists", file: "health:\n  skipXIDs: [94]\n  fatalXIDs: [13]\n",
			fatal: []uint64{13, 48}, skipped: []uint64{94, 31}, ecc: true},
		{name: "file force list survives DP_DISABLE_HEALTHCHECKS=all", file: "health:\n  fatalXIDs: [79]\n",
			env: map[string]string{"DP_DISABLE_HEALTHCHECKS": "all"}, fatal: []uint64{79}, skipped: []uint64{48}},
		{name: "flag twin of DP_DISABLE_HEALTHCHECKS", args: []string{"--disable-healthchecks=94"},
			fatal: []uint64{48}, skipped: []uint64{94}, ecc: true},
		{name: "ECC off by environment beats the file", file: "health:\n  doubleBitECC: true\n",
			env: map[string]string{"GPU_PLUGIN_HEALTH_DOUBLE_BIT_ECC": "false"}, fatal: []uint64{48}},
		{name: "recovery and quiet period: flag > env > file",
			file: "health:\n  recovery: never\n  quietPeriod: 10m\n",
			env:  map[string]string{"GPU_PLUGIN_HEALTH_QUIET_PERIOD": "2m"}, args: []string{"--health-recovery=after-quiet-period"},
			fatal: []uint64{48}, ecc: true, recovery: health.RecoverAfterQuietPeriod, quiet: 2 * time.Minute},
		{name: "file recovery never", file: "health:\n  recovery: never\n", fatal: []uint64{48}, ecc: true, recovery: health.RecoverNever},
		{name: "bad XID in DP_DISABLE_HEALTHCHECKS", env: map[string]string{"DP_DISABLE_HEALTHCHECKS": "13,x48"},
			err: `DP_DISABLE_HEALTHCHECKS="13,x48": "x48" is not an XID number`},
		{name: "xids is not a word for DP_ENABLE_HEALTHCHECKS", env: map[string]string{"DP_ENABLE_HEALTHCHECKS": "xids"},
			err: `DP_ENABLE_HEALTHCHECKS="xids": "xids" is not an XID number`},
		{name: "bad recovery", args: []string{"--health-recovery=sometimes"},
			err: `--health-recovery="sometimes": "sometimes" is not a recovery policy: want after-quiet-period or never`},
		{name: "bad quiet period in the file", file: "health:\n  quietPeriod: soon\n",
			err: `health.quietPeriod: "soon" is not a duration`},
		{name: "unknown health field", file: "health:\n  skipList: [1]\n", err: `health: unknown field "skipList"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range tc.env {
				env[k] = v
			}
			if tc.file != "" {
				path := filepath.Join(t.TempDir(), "config.yaml")
				if err := os.WriteFile(path, []byte("version: v1\n"+tc.file), 0o644); err != nil {
					t.Fatal(err)
				}
				env["CONFIG_FILE"] = path
			}
			cfg, _, err := config.Load("gpu-plugin", tc.args, func(k string) string { return env[k] }, io.Discard)
			var s config.HealthSettings
			if err == nil {
				s, err = cfg.HealthSettings()
			}
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			p := health.NewPolicy(policyConfig(s))
			for _, x := range tc.fatal {
				if !p.XIDFatal(x) {
					t.Errorf("XID %d not fatal under %s", x, p)
				}
			}
			for _, x := range tc.skipped {
				if p.XIDFatal(x) {
					t.Errorf("XID %d fatal under %s", x, p)
				}
			}
			if p.ECCFatal() != tc.ecc || p.Disabled() != tc.disabled {
				t.Errorf("ECC fatal %v disabled %v, want %v %v (%s)", p.ECCFatal(), p.Disabled(), tc.ecc, tc.disabled, p)
			}
			if tc.recovery != "" && health.Recovery(s.Recovery) != tc.recovery {
				t.Errorf("recovery %q, want %q", s.Recovery, tc.recovery)
			}
			if tc.quiet != 0 && s.QuietPeriod != tc.quiet {
				t.Errorf("quiet period %s, want %s", s.QuietPeriod, tc.quiet)
			}
		})
	}
}
