#!/usr/bin/env bash
# Judges the skips of a test run: scripts/skips.sh OUTPUT KVM_STATUS LIST.
# OUTPUT is `go test -v` output; KVM_STATUS is scripts/host-kvm.sh's exit
# status (2: this host cannot have KVM at all); LIST is the file naming the
# tests that need the kernel's KVM (internal/kvmtest/needs-kvm.txt).
#
# A skip is a failure unless, on a host that cannot have KVM, it is the
# skip of a listed test (kvmtest.Require ends its message with the name as
# listed). On a host with KVM every test runs, so such a skip fails too.
# Prints the tests not run for want of KVM, one a line, with why; says
# what else skipped on stderr; exits 1 when any skip is not allowed.
. "$(dirname "$0")/lib.sh"
[ $# -eq 3 ] || die "usage: skips.sh OUTPUT KVM_STATUS LIST"
out=$1 kvm_status=$2 list=$3

# With -v, a test's words follow a "=== RUN/CONT/NAME" line naming it, and
# its "--- SKIP" line comes later.
nokvm=$(awk '
/^ *=== (RUN|CONT|NAME) / { cur = $3; next }
index($0, ": needs /dev/kvm, which this host cannot have: ") { i = index($0, "; listed as: "); if (i) kvm[cur] = substr($0, i + 13); next }
/--- SKIP: / && ($3 in kvm) { print kvm[$3] }' "$out")
status=0
unlisted=""
while IFS= read -r name; do
	[ -n "$name" ] || continue
	grep -v '^#' "$list" | cut -d: -f1 | grep -qxF "$name" || unlisted+="$name"$'\n'
done <<<"$nokvm"
if [ -n "$unlisted" ]; then
	log "error: skipped for want of KVM but not in $list: ${unlisted%$'\n'}"
	nokvm=""
elif [ -n "$nokvm" ] && [ "$kvm_status" -ne 2 ]; then
	log "error: this host has KVM (or may get it), yet these tests skipped for want of it: $(tr '\n' ',' <<<"$nokvm")"
	nokvm=""
fi
skipped=$(($(grep -c -- '--- SKIP' "$out" || true) - $(printf '%s' "$nokvm" | grep -c . || true)))
if [ "$skipped" -gt 0 ]; then
	grep -A2 -- '--- SKIP' "$out" >&2 || true
	log "error: $skipped tests skipped; in this suite every test must run"
	status=1
fi
while IFS= read -r name; do
	[ -n "$name" ] || continue
	printf '%s: %s\n' "$name" "$(grep -F "$name:" "$list" | head -n1 | cut -d: -f2- | sed 's/^ //')"
done <<<"$nokvm"
exit "$status"
