# shellcheck shell=bash
# Sourced by scripts/test-e2e.sh: builds the project's image from the
# Dockerfile, unchanged, with buildah (Debian's package), and sets
# E2E_IMAGE (name:tag), E2E_IMAGE_ARCHIVE (a docker-archive tarball for
# `ctr images import`) and E2E_IMAGE_ORIGIN (how it was made). Then it
# derives the MPS scenario's test image from it (build_mps_image), and sets
# E2E_MPS_IMAGE, E2E_MPS_IMAGE_ARCHIVE and E2E_MPS_CONTROL.
#
# No registry is reached: the Dockerfile's two base images are replaced by
# local stand-ins stored under exactly the names its FROM lines resolve to:
#   golang:${GO_VERSION}-${DEBIAN_RELEASE}  a Debian bookworm root file system (debootstrap,
#                                          minbase + gcc, libc6-dev, ca-certificates) with this
#                                          machine's Go toolchain at /usr/local/go and this
#                                          machine's CA bundle
#   ${RUNTIME_IMAGE}                       the files of bookworm's libc6 package, CA certificates,
#                                          passwd/group: the glibc that distroless base-debian12 has
# The build stage's `go mod download` reaches the Go module proxy (host network).

e2e_image_name=gpu-plugin.local/gpu-plugin:e2e

# dockerfile_arg NAME: the default of ARG NAME in the Dockerfile.
dockerfile_arg() {
	sed -n "s/^ARG $1=//p" "$repo/Dockerfile" | head -1
}

bah() { "${nice_cmd[@]}" buildah --root "$cache/buildah/root" --runroot "$cache/buildah/run" --storage-driver overlay "$@"; }

# standin_rootfs: a bookworm root file system with a C toolchain, made once.
standin_rootfs() {
	local dir="$cache/rootfs/bookworm-build"
	if [ ! -f "$dir/.complete" ]; then
		rm -rf "$dir.tmp"
		mkdir -p "$cache/rootfs"
		# stdout is the directory (callers capture it): messages go to stderr.
		echo "e2e: debootstrap bookworm (minbase + gcc, libc6-dev, ca-certificates) into $dir" >&2
		if ! "${nice_cmd[@]}" debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates \
			bookworm "$dir.tmp" http://deb.debian.org/debian >"$cache/rootfs/debootstrap.log" 2>&1; then
			tail -5 "$cache/rootfs/debootstrap.log" >&2
			return 1
		fi
		rm -rf "$dir"
		mv "$dir.tmp" "$dir"
		touch "$dir/.complete"
	fi
	echo "$dir"
}

# standin_images: the two base images, unless buildah's storage has them.
standin_images() {
	local go_version release runtime rootfs goroot ctr stage
	go_version=$(dockerfile_arg GO_VERSION)
	release=$(dockerfile_arg DEBIAN_RELEASE)
	runtime=$(dockerfile_arg RUNTIME_IMAGE)
	build_base="docker.io/library/golang:$go_version-$release"
	runtime_base="$runtime"
	local host_go
	host_go=$(go env GOVERSION)
	if [ "$host_go" != "go$go_version" ]; then
		echo "e2e: the Dockerfile's GO_VERSION is $go_version, this machine has $host_go: the stand-in carries $host_go" >&2
	fi
	if ! bah inspect --type image "$build_base" >/dev/null 2>&1; then
		rootfs=$(standin_rootfs) || return 1
		goroot=$(go env GOROOT)
		ctr=$(bah from --pull=never scratch) || return 1
		bah add "$ctr" "$rootfs" / >/dev/null || return 1
		bah add "$ctr" "$goroot" /usr/local/go >/dev/null || return 1
		# This machine's CA bundle, so that `go mod download` trusts what this machine trusts
		# (an egress proxy's CA, for one).
		bah add "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null || return 1
		bah config --env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			--env GOPATH=/go --env GOLANG_VERSION="${host_go#go}" --workingdir /go \
			--label org.opencontainers.image.description="tests/e2e stand-in for $build_base" "$ctr" || return 1
		bah commit -q --rm "$ctr" "$build_base" >/dev/null || return 1
		echo "e2e: stand-in $build_base committed"
	fi
	if ! bah inspect --type image "$runtime_base" >/dev/null 2>&1; then
		rootfs=$(standin_rootfs) || return 1
		stage=$(mktemp -d)
		(
			cd "$rootfs"
			top=$(pwd -P)
			# The files of libc6 at their real paths (bookworm's /lib is a link to usr/lib),
			# after the merged-/usr links themselves.
			{
				echo lib
				echo lib64
				grep -v '^/usr/share' var/lib/dpkg/info/libc6:amd64.list | sed 's|^/||' |
					while read -r f; do
						{ [ -e "$f" ] || [ -L "$f" ]; } && [ ! -d "$f" ] || continue
						d=$(cd "$(dirname "$f")" && pwd -P)
						echo "${d#"$top"/}/$(basename "$f")"
					done
				printf '%s\n' etc/ssl/certs/ca-certificates.crt etc/passwd etc/group etc/nsswitch.conf
			} | tar -c --no-recursion -T - | tar -x -C "$stage"
		) || return 1
		mkdir -p "$stage/tmp" && chmod 1777 "$stage/tmp"
		ctr=$(bah from --pull=never scratch) || return 1
		bah add "$ctr" "$stage" / >/dev/null || return 1
		bah config --label org.opencontainers.image.description="tests/e2e stand-in for $runtime_base" "$ctr" || return 1
		bah commit -q --rm "$ctr" "$runtime_base" >/dev/null || return 1
		rm -rf "$stage"
		echo "e2e: stand-in $runtime_base committed"
	fi
}

# build_image REPO CACHE: the project image, then the MPS scenario's image derived from it.
build_image() {
	build_product_image "$@" && build_mps_image
}

# build_product_image REPO CACHE
build_product_image() {
	local key archive log
	key=$(cd "$repo" && { cat Dockerfile .dockerignore go.mod go.sum 2>/dev/null; find cmd internal -type f -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
	mkdir -p "$cache/images"
	archive="$cache/images/gpu-plugin-$key.tar"
	E2E_IMAGE=$e2e_image_name
	E2E_IMAGE_ARCHIVE=$archive
	E2E_IMAGE_ORIGIN="built from the Dockerfile by buildah $(buildah --version | awk '{print $3}') on stand-in base images"
	if [ -f "$archive" ]; then
		E2E_IMAGE_ORIGIN="$E2E_IMAGE_ORIGIN (cached)"
		return 0
	fi
	standin_images || { echo "e2e: could not make the stand-in base images" >&2; return 1; }
	log="$cache/images/build.log"
	echo "e2e: buildah build -f Dockerfile (log: $log)"
	if ! bah build --isolation chroot --network host --pull=never \
		--build-arg VERSION=e2e --build-arg REVISION="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)" \
		-t "$e2e_image_name" -f "$repo/Dockerfile" "$repo" >"$log" 2>&1; then
		tail -30 "$log" >&2
		echo "e2e: buildah could not build the Dockerfile (log: $log)" >&2
		return 1
	fi
	rm -f "$cache"/images/gpu-plugin-*.tar
	bah push -q "$e2e_image_name" "docker-archive:$archive.tmp:$e2e_image_name" >/dev/null
	mv "$archive.tmp" "$archive"
}

e2e_mps_image_name=gpu-plugin.local/gpu-plugin:e2e-mps

# build_mps_image: scenario 4c's image, the project image plus the test fake
# of nvidia-cuda-mps-control (internal/testkit/fakempscontrol) at
# /usr/local/bin/nvidia-cuda-mps-control. A simulated node has no driver and
# so no control binary, and the chart has no general way to add a volume to
# the plugin's pod (no extraVolumes), so the fake travels in a derived image
# that only scenario 4c installs (through the chart's image values, with
# --mps-control-binary naming it); the product image and the Dockerfile are
# left as they are. FROM is the product image's archive, so nothing is
# rebuilt and no registry is reached. Sets E2E_MPS_IMAGE, its
# E2E_MPS_IMAGE_ARCHIVE, and E2E_MPS_CONTROL: the same fake on this machine,
# through which the test sends the daemon its commands (die).
build_mps_image() {
	local bin key archive ctr
	bin="$cache/bin/nvidia-cuda-mps-control"
	# Static (CGO_ENABLED=0), as its doc comment says: it runs in the distroless image and on the host.
	(cd "$repo" && CGO_ENABLED=0 "${nice_cmd[@]}" go build -trimpath -o "$bin" ./internal/testkit/fakempscontrol) || return 1
	key=$({ basename "$E2E_IMAGE_ARCHIVE"; sha256sum <"$bin"; } | sha256sum | cut -c1-16)
	archive="$cache/images/gpu-plugin-e2e-mps-$key.tar"
	export E2E_MPS_IMAGE=$e2e_mps_image_name E2E_MPS_IMAGE_ARCHIVE=$archive E2E_MPS_CONTROL=$bin
	if [ -f "$archive" ]; then
		echo "e2e: MPS test image $e2e_mps_image_name (cached)"
		return 0
	fi
	ctr=$(bah from -q "docker-archive:$E2E_IMAGE_ARCHIVE") || return 1
	bah copy --chmod 0755 "$ctr" "$bin" /usr/local/bin/nvidia-cuda-mps-control >/dev/null || return 1
	bah config --label org.opencontainers.image.description="tests/e2e: $E2E_IMAGE plus the test fake of nvidia-cuda-mps-control (scenario 4c)" "$ctr" || return 1
	bah commit -q --rm "$ctr" "$e2e_mps_image_name" >/dev/null || return 1
	rm -f "$cache"/images/gpu-plugin-e2e-mps-*.tar
	bah push -q "$e2e_mps_image_name" "docker-archive:$archive.tmp:$e2e_mps_image_name" >/dev/null || return 1
	mv "$archive.tmp" "$archive"
	echo "e2e: MPS test image $e2e_mps_image_name: $E2E_IMAGE + /usr/local/bin/nvidia-cuda-mps-control (fake)"
}
