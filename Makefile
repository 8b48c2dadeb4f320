# swarmvm — see README.md. Targets run on a Debian 12 host as root.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
IMAGE ?= swarmvm/runner:dev
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
GO ?= go
export DOCKER_BUILDKIT := 0

.PHONY: build image deps base-image guest test unit e2e demo bench clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X github.com/swarmvm/swarmvm/internal/cli.Version=$(VERSION)" -o bin/swarmvm ./cmd/swarmvm

# Host prerequisites: Debian packages and a running Docker engine.
deps:
	scripts/install.sh
	scripts/dockerd.sh

base-image: deps
	scripts/base-image.sh

image: build base-image
	docker build --network host -t $(IMAGE) .

# The test guests: busybox on the Debian cloud kernel, and a Debian guest
# with real cloud-init and sshd.
guest:
	scripts/guest-fixture.sh
	scripts/cloud-guest.sh

# The whole test suite, as CI runs it: installs and starts what it needs.
test: image guest
	scripts/test.sh

unit:
	$(GO) test ./...

# Throughput of user-mode and bridged networking under TCG, with the ratio.
bench: image guest
	scripts/install.sh && scripts/dockerd.sh
	SWARMVM_E2E=1 $(GO) test ./test/e2e -run '^$$' -bench NetThroughput -benchtime 3x

demo: image guest
	scripts/demo.sh

clean:
	rm -rf bin .cache
