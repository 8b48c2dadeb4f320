#!/usr/bin/env bash
# Makes debian:trixie-slim available to the local engine. Where no registry
# can be reached, it is built with debootstrap from the Debian archive that
# apt already uses and imported; the Dockerfile stays the ordinary one.
. "$(dirname "$0")/lib.sh"

ref=${BASE_IMAGE:-debian:trixie-slim}
if docker image inspect "$ref" >/dev/null 2>&1; then
	log "$ref present"
	exit 0
fi
if timeout 60 docker pull "$ref" >/dev/null 2>&1; then
	log "$ref pulled"
	exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap missing: run scripts/install.sh"
mirror=$(debian_mirror)
dir=$(mktemp -d /var/tmp/swarmvm-rootfs.XXXXXX)
trap 'rm -rf "$dir"' EXIT
log "no registry: debootstrap --variant=minbase trixie (about a minute)"
debootstrap --variant=minbase trixie "$dir" "$mirror" >/var/tmp/swarmvm-debootstrap.log 2>&1 ||
	{ tail -n 20 /var/tmp/swarmvm-debootstrap.log >&2; die "debootstrap failed"; }
rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
tar -C "$dir" -c . | docker import - "$ref" >/dev/null
log "$ref imported from debootstrap"
