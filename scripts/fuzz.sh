#!/usr/bin/env bash
# fuzz.sh PKG NAME COUNT: fuzz one target for COUNT executions with one
# worker, and tell a failure of the code under test from a hiccup of the
# fuzzing engine on a loaded machine.
#
# Go's coordinator reports a worker it lost ("fuzzing process hung or
# terminated unexpectedly", often "while minimizing: EOF") as a failure and
# saves the input it was on. On a busy machine that happens without a bug:
# the saved input passes when run on its own. So, on a failure:
#   - each input the run saved is run alone, in the package's test binary
#     (built first, so that the build is not timed); one that fails is a
#     real failure, and so is one that takes longer than the engine's hang
#     limit (HANG_LIMIT, 10 s: a slow input is a finding too, a denial of
#     service by a crafted input): it is kept in testdata/fuzz for the fix,
#     and the target fails;
#   - if every saved input passes alone, the failure was the engine's: it
#     is reported, the saved inputs are removed, and the target is fuzzed
#     once more; a second failure fails the target.
# Exit 0 when the target passed (possibly on the retry), 1 otherwise.
. "$(dirname "$0")/lib.sh"
[ $# -eq 3 ] || die "usage: fuzz.sh PKG NAME COUNT"
pkg=$1 name=$2 count=$3
GO=${GO:-go}
hang=${HANG_LIMIT:-10}
corpus=$pkg/testdata/fuzz/$name
out=$(mktemp)
trap 'rm -f "$out" "$out.before" "$out.test"' EXIT

# alone runs one saved input by itself; it fails when the input fails or
# takes longer than the hang limit (a hard stop at 2 minutes).
alone() {
	local began took
	began=$(date +%s%N)
	if ! (cd "$pkg" && timeout 120 "$out.test" -test.count=1 -test.run "^$name/$(basename "$1")\$" >&2); then
		return 1
	fi
	took=$((($(date +%s%N) - began) / 1000000))
	if [ "$took" -gt $((hang * 1000)) ]; then
		log "fuzz $name: $(basename "$1") passes on its own but takes ${took} ms, over the ${hang} s hang limit"
		return 1
	fi
}

saved() { [ ! -d "$corpus" ] || find "$corpus" -type f | sort; }

for attempt in 1 2; do
	saved >"$out.before"
	if "$GO" test -run '^$' -fuzz "^$name\$" -fuzztime "$count" -parallel 1 "./$pkg" >"$out" 2>&1; then
		log "fuzz $name: $(grep -o 'execs: [0-9]*' "$out" | tail -n1), no failure${retried:+ (on the retry)}"
		exit 0
	fi
	cat "$out" >&2
	new=$(saved | comm -13 "$out.before" -)
	real=
	if [ -n "$new" ]; then
		"$GO" test -c -o "$out.test" "./$pkg" || die "fuzz $name: cannot build the test binary of $pkg"
	fi
	for f in $new; do
		alone "$f" || real="$real $f"
	done
	if [ -n "$real" ]; then
		log "error: fuzz $name found an input that fails, or hangs, on its own:$real (kept for the fix)"
		exit 1
	fi
	if [ -z "$new" ] && ! grep -q 'fuzzing process hung or terminated unexpectedly\|context deadline exceeded' "$out"; then
		log "error: fuzz $name failed without saving an input"
		exit 1
	fi
	[ "$attempt" -eq 1 ] || break
	log "fuzz $name: the fuzzing engine failed, not the code: every input it saved (${new:-none}) passes on its own; removing them and fuzzing once more"
	[ -z "$new" ] || rm -f $new
	retried=1
done
log "error: fuzz $name failed twice"
exit 1
