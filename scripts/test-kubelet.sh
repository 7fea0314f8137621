#!/usr/bin/env bash
# The real-kubelet conformance suite: tests/kubelet, a nested Go module that
# runs the daemon against k8s.io/kubernetes' device manager. `make
# test-kubelet` runs it alone; scripts/test.sh (make test, CI) runs it last.
#
# The tests run inside a private mount namespace with a tmpfs over
# /var/lib/kubelet (tests/kubelet/nsexec.sh, the go test -exec wrapper),
# because the device manager wipes /var/lib/kubelet/device-plugins. That
# needs root (CAP_SYS_ADMIN) and util-linux's unshare.
#
# Extra go test flags come from KUBELET_TEST_FLAGS, e.g.
#   KUBELET_TEST_FLAGS="-run Restart -v" make test-kubelet
#   KUBELET_TEST_FLAGS='-run ^$ -bench . -benchtime 20x' make test-kubelet
set -euo pipefail
cd "$(dirname "$0")/../tests/kubelet"
export CGO_ENABLED=1
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g -Wno-deprecated-declarations}"

if [ "$(id -u)" != 0 ]; then
	echo "tests/kubelet needs root: it mounts a tmpfs over /var/lib/kubelet in a private mount namespace." >&2
	echo "Run it as root (CI does), e.g. sudo -E make test-kubelet." >&2
	exit 1
fi
if ! command -v unshare >/dev/null; then
	echo "tests/kubelet needs unshare (Debian package util-linux): apt-get install -y util-linux" >&2
	exit 1
fi

# The real-NVML tests (realnvml_*_test.go) run the gpu-plugin binary on the
# fake libnvidia-ml.so.1 of ../shared/tools/fakenvml, beside the repository.
# Build it into a temporary directory (the source may be read-only) and pass
# it on; without the source those tests skip. FAKE_NVML_LIB set by the
# caller wins.
fakenvml="$(cd ../.. && pwd)/../shared/tools/fakenvml"
if [ -z "${FAKE_NVML_LIB:-}" ] && [ -f "$fakenvml/build.sh" ]; then
	FAKE_NVML_LIB=$(mktemp -d)
	trap 'rm -rf "$FAKE_NVML_LIB"' EXIT
	sh "$fakenvml/build.sh" "$FAKE_NVML_LIB" >/dev/null
	export FAKE_NVML_LIB
	echo "fake NVML library built in $FAKE_NVML_LIB"
fi

go vet ./...
# shellcheck disable=SC2086 # KUBELET_TEST_FLAGS is a list of flags
go test -race -count=1 -exec "$PWD/nsexec.sh" ${KUBELET_TEST_FLAGS:-} ./...
