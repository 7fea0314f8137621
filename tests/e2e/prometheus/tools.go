//go:build tools

// Package prometheus pins the Prometheus server that tests/e2e runs for
// scenario 4 (README's kubernetes_sd scrape job): Debian's Prometheus 2.42
// is built without kubernetes_sd. scripts/test-e2e.sh builds
// github.com/prometheus/prometheus/cmd/prometheus from this module, so the
// version comes from the Go module proxy, like every other dependency.
package prometheus

import _ "github.com/prometheus/prometheus/cmd/prometheus"
