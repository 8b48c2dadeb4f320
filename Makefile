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

# The test guests: busybox on the Debian cloud kernel, the same behind
# Debian's signed shim and GRUB on a Secure Boot disk (and an unsigned
# copy), and a Debian guest with real cloud-init and sshd.
guest:
	scripts/guest-fixture.sh
	scripts/secureboot-fixture.sh
	scripts/cloud-guest.sh

# The whole test suite, as CI runs it: installs and starts what it needs.
test: image guest
	scripts/test.sh

unit:
	$(GO) test ./...

# Figures, each beside its floor from the same run (they print; nothing is
# timed as a test): broker grants; runner start vs bare QEMU with RSS; a
# health check's cost; guest disk throughput, runner vs bare QEMU; network
# throughput, user vs bridge; deploy vs the Swarm floor on engines 26 and
# 20.10 (the test cluster, brought up and down). The e2e test binary is
# static: the start benchmark runs it inside the runner image.
bench: image guest
	scripts/install.sh && scripts/dockerd.sh && scripts/swarm.sh
	$(GO) test ./internal/broker -run '^$$' -bench Grant -benchtime 1x
	CGO_ENABLED=0 SWARMVM_E2E=1 $(GO) test ./test/e2e -run '^$$' -bench 'Start|HealthCheck|MetricsScrape|DiskThroughput|DiskOptions|DeployMany|Backup|HandOff' -benchtime 1x -timeout 90m
	SWARMVM_E2E=1 $(GO) test ./test/e2e -run '^$$' -bench NetThroughput -benchtime 3x
	SWARMVM_E2E=1 $(GO) test ./test/cluster -run '^$$' -bench 'Deploy|Migrate' -benchtime 1x -timeout 30m

# The demo builds what it needs itself, side by side (scripts/demo.sh).
demo:
	scripts/demo.sh

clean:
	rm -rf bin .cache
