#!/usr/bin/env bash
# Installs the Debian packages that building, the demo and the tests need on
# a Debian 12 host. Idempotent: packages already present are left alone.
. "$(dirname "$0")/lib.sh"

# These build the image and the test guest, and run the demo; arguments name
# further packages (the fixtures and scripts/test.sh add theirs).
pkgs=(docker.io debootstrap iproute2 procps curl cpio gzip ca-certificates "$@")
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	log "packages present: ${pkgs[*]}"
	exit 0
fi
[ "$(id -u)" -eq 0 ] || die "packages missing (${missing[*]}) and not root: install them or run as root"
log "installing: ${missing[*]}"
apt-get update -q >/dev/null || log "apt-get update reported problems; trying the install anyway"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
