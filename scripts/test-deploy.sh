#!/usr/bin/env bash
# The install assets' suite: tests/deploy, a nested Go module (Helm, k8s.io/api,
# the Prometheus parser) that checks the static manifests, the Helm chart, the
# alerts (promtool), the Grafana dashboard, the Dockerfile's build line and
# README's references against the daemon itself. `make test-deploy` runs it
# alone; scripts/test.sh (make test, CI) runs it too.
#
# promtool comes from the Debian package prometheus (scripts/test.sh installs
# it); without it the alert checks skip with one line.
# Extra go test flags come from DEPLOY_TEST_FLAGS, e.g. DEPLOY_TEST_FLAGS="-run Chart -v".
set -euo pipefail
cd "$(dirname "$0")/../tests/deploy"
export CGO_ENABLED=1
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g -Wno-deprecated-declarations}"

unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then echo "gofmt needed:"; echo "$unformatted"; exit 1; fi
go vet ./...
# shellcheck disable=SC2086 # DEPLOY_TEST_FLAGS is a list of flags
go test -count=1 ${DEPLOY_TEST_FLAGS:-} ./...
