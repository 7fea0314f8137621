# gpu-plugin's container image:  make image  (= docker build --build-arg VERSION=... -t gpu-plugin:... .)
# Needs BuildKit (Docker 23 or newer by default, or buildah/podman) for the cache mounts.
#
# Build stage: Go with cgo (go-nvml needs it), on Debian bookworm.
# Runtime stage: distroless base-debian12 -- glibc 2.36 and CA certificates, no shell, no package
# manager. The binary is dynamically linked against glibc (cgo; NVML is dlopen()ed at run time), so a
# static or musl base will not do; and since the build stage is bookworm too, the glibc the binary
# was linked against is the one it runs on. tests/deploy checks the pairing, that the binary needs
# nothing beyond glibc, and runs this file's go build line outside Docker.
#
# The NVIDIA container runtime (or CDI) injects libnvidia-ml.so.1 and the GPU device nodes at start;
# the image carries no NVIDIA bits.

ARG GO_VERSION=1.26.8
ARG DEBIAN_RELEASE=bookworm
# The root (not "nonroot") distroless variant; pin it by digest (…@sha256:…) for reproducible builds.
ARG RUNTIME_IMAGE=gcr.io/distroless/base-debian12:latest

FROM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
ENV CGO_ENABLED=1 \
    CGO_CFLAGS="-O2 -g -Wno-deprecated-declarations" \
    GOFLAGS=-buildvcs=false
# Modules first, so that a source change reuses the downloaded modules.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY cmd/ cmd/
COPY internal/ internal/
ARG VERSION=devel
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    go build -trimpath -ldflags "-s -w -X github.com/gpu-plugin/gpu-plugin/internal/version.version=${VERSION}" -o /out/gpu-plugin ./cmd/gpu-plugin && \
    /out/gpu-plugin --version

FROM ${RUNTIME_IMAGE}
ARG VERSION=devel
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="gpu-plugin" \
      org.opencontainers.image.description="Kubernetes GPU device plugin and dcgm-exporter compatible GPU telemetry in one daemon" \
      org.opencontainers.image.source="https://github.com/gpu-plugin/gpu-plugin" \
      org.opencontainers.image.url="https://github.com/gpu-plugin/gpu-plugin" \
      org.opencontainers.image.documentation="https://github.com/gpu-plugin/gpu-plugin#install" \
      org.opencontainers.image.vendor="gpu-plugin" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/base-debian12"
COPY --from=build /out/gpu-plugin /usr/bin/gpu-plugin
# root (uid 0): the kubelet's /var/lib/kubelet/device-plugins is root's, mode 0755, and the daemon must
# create its sockets there. As the directory's owner root needs no capability for that, and the
# manifests drop every capability (drop: [ALL]) and forbid privilege escalation; a non-root user would
# need CAP_DAC_OVERRIDE instead, which bypasses every file permission check on the node's mounts.
USER 0:0
EXPOSE 9400
ENTRYPOINT ["/usr/bin/gpu-plugin"]
