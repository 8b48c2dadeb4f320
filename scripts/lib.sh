# shellcheck shell=bash
# Helpers shared by the scripts in this folder. Sourced, not run.
set -euo pipefail

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# debian_mirror prints the Debian archive URL this machine's apt already
# uses, so no script has to name a mirror of its own.
debian_mirror() {
	local uri
	uri=$(apt-get --print-uris download busybox-static 2>/dev/null | head -n1 | cut -d"'" -f2)
	[ -n "$uri" ] || die "cannot find the Debian mirror from apt (run apt-get update first)"
	printf '%s\n' "${uri%%/pool/*}"
}

repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }
