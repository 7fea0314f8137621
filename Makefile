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

.PHONY: all build test test-unit test-kubelet demo image lint bench

all: build

build: ## the binary, in bin/
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/gpu-plugin ./cmd/gpu-plugin

test: ## every test suite: vet, unit tests with -race, real-kubelet conformance
	./scripts/test.sh

demo: build ## a simulated dgx-h100 against an in-process stand-in kubelet
	./bin/gpu-plugin demo

image: ## the container image (needs a Docker engine)
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
