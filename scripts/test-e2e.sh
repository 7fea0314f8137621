#!/usr/bin/env bash
# The end-to-end node suite: tests/e2e (make e2e). One real node, built from
# real components under a temporary root: containerd v2 (with CDI) built from
# its Go module (tests/e2e/containerd/go.mod), runc and CNI from Debian's
# packages; etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and the kubelet from k8s.io/kubernetes v1.37.2, linked into
# one binary (tests/e2e/cmd/e2e-node). The project's image is built from the
# Dockerfile, unchanged, by buildah, on local stand-ins for its two base
# images (nothing is pulled from a registry). The Helm chart is installed
# into that node and GPU pods are scheduled, admitted and started; then the
# static manifest is created object by object on the same node.
#
# Needs root (namespaces, mounts, cgroups) and the Debian packages below,
# which it installs when missing. Without them it prints one SKIP line and
# exits 0, except under CI=true, where it fails.
#
# Everything it builds is cached in E2E_CACHE (default
# /var/cache/gpu-plugin-e2e): the e2e-node binary, containerd (one directory
# per version), the stand-in base images' root file systems, buildah's
# storage and the project image, keyed by the sources it is built from. The node itself runs in private mount, network
# and PID namespaces (tests/e2e/nsexec.sh) and leaves nothing running.
#
# Extra go test flags come from E2E_TEST_FLAGS, split on spaces and not unquoted, e.g.
# E2E_TEST_FLAGS="-run TestNode/(1-install|4d-dra)".
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${E2E_CACHE:-/var/cache/gpu-plugin-e2e}
export CGO_ENABLED=1
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g -Wno-deprecated-declarations}"
# The suite shares a 2-core machine with whatever else runs: builds yield.
nice_cmd=(nice -n "${E2E_NICE:-10}" ionice -c3)

skip() {
	if [ "${CI:-}" = true ]; then
		echo "tests/e2e: $* (CI must run this suite)" >&2
		exit 1
	fi
	echo "SKIP tests/e2e: $*"
	exit 0
}
phase_start=$(date +%s)
phase() {
	local now
	now=$(date +%s)
	echo "e2e: $1 ($((now - phase_start)) s)"
	phase_start=$now
}
total_start=$(date +%s)

[ "$(id -u)" = 0 ] || skip "needs root (mount, network and PID namespaces, cgroups); run as root, e.g. sudo -E make e2e"
command -v unshare >/dev/null || skip "needs unshare (Debian package util-linux)"

# Debian packages: runc, the CNI plugins, a static busybox for the pause and
# test pod images, buildah for the project image, debootstrap for the build
# stage's stand-in base image. containerd itself is built below: Debian's
# (1.6) does not apply the CRI CDIDevices field.
pkgs=(runc containernetworking-plugins busybox-static buildah debootstrap iproute2)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	command -v apt-get >/dev/null || skip "needs the Debian packages ${missing[*]} and has no apt-get"
	echo "e2e: installing ${missing[*]}"
	if ! { "${nice_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/e2e-apt.log 2>&1 ||
		{ apt-get update >/dev/null 2>&1 && "${nice_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/e2e-apt.log 2>&1; }; }; then
		tail -5 /tmp/e2e-apt.log >&2
		skip "could not install the Debian packages ${missing[*]} (log: /tmp/e2e-apt.log)"
	fi
	phase "packages installed"
fi
[ -d /sys/fs/cgroup/cpu ] || skip "needs cgroup v1 controllers under /sys/fs/cgroup (the kubelet runs with cgroupDriver cgroupfs)"

mkdir -p "$cache/bin"
cd "$repo/tests/e2e"
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then echo "gofmt needed:"; echo "$unformatted"; exit 1; fi

# 1. The node binary and the test binary (go build relinks only when an input changed).
# The components report the version they are (Helm checks the chart's kubeVersion against it).
k8s_version=$(sed -n 's/^\tk8s.io\/kubernetes v//p' go.mod)
k8s_ldflags="-X k8s.io/component-base/version.gitVersion=v$k8s_version -X k8s.io/component-base/version.gitMajor=${k8s_version%%.*}"
k8s_ldflags="$k8s_ldflags -X k8s.io/component-base/version.gitMinor=$(echo "$k8s_version" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean"
"${nice_cmd[@]}" go build -ldflags "$k8s_ldflags" -o "$cache/bin/e2e-node" ./cmd/e2e-node
# Vet the suite; cmd/e2e-node is a dispatcher whose vet would analyse all of Kubernetes.
"${nice_cmd[@]}" go vet .
phase "e2e-node built, go vet"
# Prometheus for scenario 4, from the Go module pinned in prometheus/go.mod: Debian's is built
# without kubernetes_sd, which README's scrape job uses. Cold ~10 min on 2 cores.
(cd prometheus && "${nice_cmd[@]}" go build -o "$cache/bin/prometheus" github.com/prometheus/prometheus/cmd/prometheus)
export E2E_PROMETHEUS="$cache/bin/prometheus"
phase "prometheus (module $(sed -n 's/^require github.com\/prometheus\/prometheus //p' prometheus/go.mod)) built"
# The node's container runtime: containerd, containerd-shim-runc-v2 and ctr from the Go module pinned
# in containerd/go.mod, as containerd's own Makefile builds them (the shim static, without cgo). Debian's
# containerd 1.6 ignores the CRI CDIDevices field, which carries the CDI devices of a device plugin
# (cdi-cri) and of DRA; v2 applies it. Built once per version and go.sum into its own directory of the
# cache, so a warm run runs no go command here. Cold ~3 min on 2 cores. E2E_CONTAINERD names another
# directory with the three (a containerd 2.x: the node writes a version 3 config) instead.
ctrd_module=github.com/containerd/containerd/v2
ctrd_version=$(sed -n 's/^require github.com\/containerd\/containerd\/v2 //p' containerd/go.mod)
[ -n "$ctrd_version" ] || { echo "tests/e2e/containerd/go.mod requires no $ctrd_module" >&2; exit 1; }
ctrd_dir="$cache/containerd-$ctrd_version-$(cat containerd/go.mod containerd/go.sum | sha256sum | cut -c1-12)"
if [ -n "${E2E_CONTAINERD:-}" ]; then
	ctrd_dir=$E2E_CONTAINERD
	ctrd_version="$("$ctrd_dir/containerd" --version | awk '{print $3}') from E2E_CONTAINERD"
elif [ ! -f "$ctrd_dir/.complete" ]; then
	echo "e2e: building containerd $ctrd_version (cold ~3 min)"
	rm -rf "$ctrd_dir.tmp"
	mkdir -p "$ctrd_dir.tmp"
	ctrd_ldflags="-X $ctrd_module/version.Version=$ctrd_version -X $ctrd_module/version.Package=$ctrd_module"
	(
		cd containerd
		"${nice_cmd[@]}" go build -tags urfave_cli_no_docs -ldflags "$ctrd_ldflags" -o "$ctrd_dir.tmp/containerd" "$ctrd_module/cmd/containerd"
		CGO_ENABLED=0 "${nice_cmd[@]}" go build -tags "urfave_cli_no_docs no_grpc" -ldflags "$ctrd_ldflags" -o "$ctrd_dir.tmp/containerd-shim-runc-v2" "$ctrd_module/cmd/containerd-shim-runc-v2"
		"${nice_cmd[@]}" go build -tags urfave_cli_no_docs -ldflags "$ctrd_ldflags" -o "$ctrd_dir.tmp/ctr" "$ctrd_module/cmd/ctr"
	)
	touch "$ctrd_dir.tmp/.complete"
	rm -rf "$ctrd_dir"
	mv "$ctrd_dir.tmp" "$ctrd_dir"
	# Earlier versions' builds: ~110 MB each.
	for d in "$cache"/containerd-*; do
		[ "$d" = "$ctrd_dir" ] || rm -rf "$d"
	done
fi
export E2E_CONTAINERD="$ctrd_dir"
phase "containerd $ctrd_version ($ctrd_dir)"

# 2. The project image, from the Dockerfile, by buildah.
# shellcheck source=tests/e2e/image.sh
. "$repo/tests/e2e/image.sh"
build_image "$repo" "$cache"
phase "image $E2E_IMAGE ($E2E_IMAGE_ORIGIN)"

# 3. Run the node. Its state lives in a temporary root; its cgroups under one
# cgroup root per run in every v1 hierarchy; the chart's
# /etc/kubernetes/node-feature-discovery hostPath under a tmpfs the test
# mounts on /etc/kubernetes (created here if absent, removed after).
root=$(mktemp -d /var/tmp/gpu-plugin-e2e.XXXXXX)
cgname="gpu-plugin-e2e-$$"
created_etc_kubernetes=
cleanup() {
	local h
	for h in /sys/fs/cgroup/*/; do
		[ -d "$h$cgname" ] || continue
		# The PID namespace is gone, so its cgroups empty within moments.
		for _ in 1 2 3 4 5 6 7 8 9 10; do
			find "$h$cgname" -depth -type d -exec rmdir {} + 2>/dev/null || true
			[ -d "$h$cgname" ] || break
			sleep 0.5
		done
		[ -d "$h$cgname" ] && echo "e2e: could not remove cgroup $h$cgname" >&2
	done
	rm -rf "$root"
	[ -n "$created_etc_kubernetes" ] && rmdir /etc/kubernetes 2>/dev/null
	return 0
}
trap cleanup EXIT
for h in /sys/fs/cgroup/*/; do
	case "$h" in */unified/) continue ;; esac
	mkdir -p "$h$cgname"
	if [ -f "$h/cpuset.cpus" ]; then
		cat "$h/cpuset.cpus" >"$h$cgname/cpuset.cpus"
		cat "$h/cpuset.mems" >"$h$cgname/cpuset.mems"
	fi
done
if [ ! -d /etc/kubernetes ]; then
	mkdir /etc/kubernetes
	created_etc_kubernetes=1
fi
mkdir -p /var/lib/kubelet

busybox=$(command -v busybox)
export E2E_ROOT="$root" E2E_NODE_BIN="$cache/bin/e2e-node" E2E_CGROUP_ROOT="/$cgname" E2E_BUSYBOX="$busybox"
export E2E_IMAGE E2E_IMAGE_ARCHIVE E2E_IMAGE_ORIGIN
rc=0
# shellcheck disable=SC2086 # E2E_TEST_FLAGS is a list of flags
"${nice_cmd[@]}" go test -exec "$PWD/nsexec.sh" -count=1 -v -timeout 40m ${E2E_TEST_FLAGS:-} . || rc=$?
phase "suite run"
echo "e2e: total $(($(date +%s) - total_start)) s"
exit $rc
