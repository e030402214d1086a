# seamless-snapshotter: build, test, demo, benchmarks.
#
#   make demo    private containerd + registry + our daemon, a container on
#                the seamless snapshotter (root)
#   make test    every test, unit and integration (root)
#   make bench   snapshotter benchmarks against containerd's overlayfs

GO        ?= go
OUTPUT    := $(CURDIR)/_output
BIN_DIR   := $(OUTPUT)/bin
TOOLS_DIR := $(OUTPUT)/tools
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
# Integration tests start containerd, runc and a registry; on 2 cores,
# running test binaries of several packages at once only adds noise.
TEST_FLAGS ?= -count=1 -p 1 -timeout 60m
BENCH_COUNT ?= 6

export SEAMLESS_BIN_DIR   := $(BIN_DIR)
export SEAMLESS_TOOLS_BIN := $(TOOLS_DIR)

.PHONY: all build deps test unit integration demo bench clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN_DIR)/containerd-seamless-grpc ./cmd/containerd-seamless-grpc
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN_DIR)/seamlessctl ./cmd/seamlessctl

# Pinned containerd, ctr, shim, runc and registry, built from the Go module
# proxy, plus the few Debian packages the tests use.
deps:
	hack/install-deps.sh

test: build deps
	$(GO) vet ./...
	$(GO) test $(TEST_FLAGS) ./...

unit: build
	$(GO) test $(TEST_FLAGS) $$($(GO) list ./... | grep -v /integration)

integration: build deps
	$(GO) test $(TEST_FLAGS) ./integration/...

demo: build deps
	$(GO) run ./cmd/seamless-demo

# Every benchmark BENCH_COUNT times, then benchstat with one column per
# snapshotter so the ratio to containerd's overlayfs is read off directly.
bench: build deps
	mkdir -p $(OUTPUT)
	$(GO) test -run '^$$' -bench . -benchmem -count $(BENCH_COUNT) ./integration/ | tee $(OUTPUT)/bench.txt
	GOBIN=$(TOOLS_DIR) $(GO) install golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da
	$(TOOLS_DIR)/benchstat -col /impl $(OUTPUT)/bench.txt

clean:
	rm -rf $(BIN_DIR)
