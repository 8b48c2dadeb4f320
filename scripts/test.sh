#!/usr/bin/env bash
# The whole test suite (make test runs it after building the image and the
# guest): static checks, then every Go test, end-to-end ones included, with
# real dockerd, QEMU and KVM. Nothing may skip: a skipped test fails the run,
# with one exception. On a host that cannot have KVM at all (the CPU offers
# no VT-x/AMD-V to its kernel; scripts/host-kvm.sh decides), the tests that
# need the kernel's KVM itself, named in internal/kvmtest/needs-kvm.txt,
# skip saying so, and are listed by name, with why, at the end
# (scripts/skips.sh judges the skips); every other test runs, VMs under TCG,
# the code on the KVM path against a stand-in device.
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"

# Chromium (Debian's) opens the web console in TestWebConsole, as a person
# would; ssh reaches the cloud-init guest in TestCloudInitRealGuest; the
# OVMF vars files are read by TestSecureBootKeys.
scripts/install.sh chromium openssh-client e2fsprogs libnbd-bin ovmf prometheus qemu-utils systemd
scripts/dockerd.sh
set +e
kvm=$(scripts/host-kvm.sh)
kvm_status=$?
set -e
case $kvm_status in
0) log "/dev/kvm is root:kvm 0660 (gid $kvm)" ;;
2)
	export SWARMVM_NO_KVM=$kvm
	log "WARNING: $kvm. The tests that need /dev/kvm will not run; they are listed at the end."
	;;
*) exit 1 ;;
esac
scripts/swarm.sh

unformatted=$(gofmt -l cmd internal test)
[ -z "$unformatted" ] || die "gofmt needed: $unformatted"
go vet ./...

# The whole -v output is kept (the lines shown while it runs are a filter of
# it); a failed test's own lines are printed in full at the end.
out=/var/tmp/swarmvm-test-$(date +%Y%m%dT%H%M%S).log
: >"$out"
# Every go test runs under test/outlive, a child subreaper: a process a test
# started (a fake QEMU, a broker, an engine) that is still alive when the
# run ends is named, killed, and fails the run.
outlive=$(mktemp /var/tmp/swarmvm-outlive.XXXXXX)
trap 'rm -f "$outlive"' EXIT
go build -o "$outlive" ./test/outlive
export SWARMVM_E2E=1
filter='^(=== RUN|--- (PASS|FAIL|SKIP)|PASS|FAIL|ok|panic)|^\s+\S+_test\.go:'
set +e
"$outlive" -- go test -race -count=1 -timeout 45m -v $(go list ./... | grep -v /test/cluster) 2>&1 | tee "$out" | grep -E "$filter|^outlive:"
status=${PIPESTATUS[0]}
# The cluster suite on its own, after the rest: three more engines and their
# VMs would otherwise compete for the two cores with the tests above. It
# brings its cluster up (scripts/cluster.sh) and takes it down again.
"$outlive" -- go test -count=1 -timeout 30m -v ./test/cluster 2>&1 | tee -a "$out" | grep -E "$filter|^outlive:"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
set -e
passed=$(grep -c -- '--- PASS' "$out" || true)
# Each failed test's lines, from its start to its verdict, up to 200 a test.
awk '
/^ *=== (RUN|CONT|NAME) / { cur = $3 }
{ if (cur != "") { buf[cur] = buf[cur] $0 "\n"; n[cur]++ } }
/^ *--- FAIL: / { name = $3; print "==== the lines of " name " ===="; split(buf[name], l, "\n");
	for (i = (n[name] > 200 ? n[name] - 200 : 0) + 1; i <= n[name]; i++) print l[i] }' "$out" >&2
log "the whole output: $out"
failed=$(grep -c -- '--- FAIL' "$out" || true)
# A skip fails the run, but for a test that needs the kernel's KVM on a
# host that cannot have it (scripts/skips.sh; the list is
# internal/kvmtest/needs-kvm.txt).
list=internal/kvmtest/needs-kvm.txt
if ! nokvm=$(scripts/skips.sh "$out" "$kvm_status" "$list"); then
	status=1
fi
skipped=$(($(grep -c -- '--- SKIP' "$out" || true) - $(printf '%s' "$nokvm" | grep -c . || true)))
# Fuzz targets, each for a bounded number of executions (seeds are in the
# tests). A count, not a duration: Go 1.26's coordinator can report a
# spurious "context deadline exceeded" at the end of a timed run (Go issue
# 75804, fixed in 1.27). scripts/fuzz.sh tells a crash of the code from the
# engine's own hiccups on a busy machine, and retries only those, once.
fuzzed=0
for target in internal/config:FuzzFromEnv:300000x internal/qmp:FuzzReadMessage:300000x internal/fdpass:FuzzDecodeRequest:100000x \
	internal/console:FuzzVerify:200000x internal/console:FuzzViewOnly:200000x internal/qemu:FuzzQCOW2Header:200000x internal/qemu:FuzzVarStore:100000x internal/qga:FuzzReply:200000x; do
	IFS=: read -r pkg name count <<<"$target"
	if scripts/fuzz.sh "$pkg" "$name" "${FUZZCOUNT:-$count}"; then
		fuzzed=$((fuzzed + 1))
	else
		status=1
		failed=$((failed + 1))
	fi
done
passed=$((passed + fuzzed))
if [ -n "$nokvm" ]; then
	log "NOT RUN, this host having no KVM ($SWARMVM_NO_KVM); each needs the kernel's KVM ($list):"
	sed 's/^/  /' <<<"$nokvm" >&2
fi
echo "$passed passed, $failed failed, $skipped skipped, $(printf '%s' "$nokvm" | grep -c . || true) not run for want of KVM"
exit "$status"
