# gpu-plugin: build, test and run.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
# go-nvml's cgo headers warn about deprecated declarations on every build;
# setting CGO_CFLAGS replaces the default, so keep -O2 -g.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations
export CGO_ENABLED := 1
LDFLAGS := -X github.com/gpu-plugin/gpu-plugin/internal/version.version=$(VERSION)
IMAGE ?= gpu-plugin:$(VERSION)

.PHONY: all build test test-unit test-kubelet test-deploy e2e demo image lint bench bench-go fuzz soak manifests

all: build

build: ## the binary, in bin/
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/gpu-plugin ./cmd/gpu-plugin

test: ## every test suite: vet, unit tests with -race, real-kubelet conformance
	./scripts/test.sh

test-kubelet: ## only the real-kubelet conformance suite (tests/kubelet; root; KUBELET_TEST_FLAGS adds go test flags)
	./scripts/test-kubelet.sh

demo: build ## a simulated dgx-h100 against an in-process stand-in kubelet
	./bin/gpu-plugin demo

image: ## the container image (needs a Docker engine; IMAGE=registry/name:tag to name it)
	docker build --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
		--build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
		-t $(IMAGE) .

e2e: ## the end-to-end node suite (tests/e2e; root): the image built by buildah, the chart in a real API server, GPU pods run by a real kubelet and containerd; E2E_TEST_FLAGS adds go test flags
	./scripts/test-e2e.sh

test-deploy: ## only the install assets' suite (tests/deploy: manifests, chart, alerts, dashboard, Dockerfile, README)
	./scripts/test-deploy.sh

manifests: ## regenerate deployments/static/*.yaml from the Helm chart
	cd tests/deploy && $(GO) run ./cmd/gen-static

bench: ## run every benchmark once and rewrite docs/benchmarks.md (~8 min; as root for the real-kubelet/NVML rows)
	$(GO) run ./tools/benchreport -o docs/benchmarks.md

bench-go: ## plain go test -bench; BENCH=regexp and PKGS=./internal/... narrow them
	$(GO) test -run '^$$' -bench '$(or $(BENCH),.)' -benchmem $(or $(PKGS),./...)

soak: ## the long soak against the real kubelet device manager (~3 min; root): restarts, allocations, reloads, XID storms
	SOAK=long KUBELET_TEST_FLAGS="-run ^TestSoak$$ -v -timeout 30m" ./scripts/test-kubelet.sh

fuzz: ## every fuzz target, one at a time, FUZZTIME each (default 10s); FUZZ=regexp picks targets
	./scripts/fuzz.sh

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
