#!/usr/bin/env bash
# The demo (make demo): on this machine, a single-node Swarm, this node
# probed and labelled, and the test guest deployed as a Swarm service with
# swarmvm deploy: no device, no capability, no root in the task. With KVM,
# the broker hands the runner the KVM descriptor and QEMU's own word on it
# is shown; without KVM (a CPU that offers its kernel no VT-x/AMD-V) the VM
# runs under TCG, asked for by name, and the demo says so first. It ends
# with the guest's own boot line from its serial console, the web console's
# address with a ticket, and how to remove it.
#
# It builds only what it needs, side by side: the binary, the base image
# and the runner image, and the test guest (kernel and busybox initramfs).
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"
began=$(date +%s)

image=${IMAGE:-swarmvm/runner:dev}
name=${VM_NAME:-swarmvm-demo}
port=${CONSOLE_PORT:-8006}
store=/var/lib/poc-qemu

say() { printf '%s\n' "$*"; }

# First: does this host have KVM? (scripts/host-kvm.sh: exit 2 when it
# cannot have it at all, and why.)
set +e
kvm=$(scripts/host-kvm.sh)
kvm_status=$?
set -e
case $kvm_status in
0)
	accel=kvm
	say "KVM: this host has /dev/kvm (group $kvm): the demo VM runs with KVM, from the broker's descriptor."
	;;
2)
	accel=tcg
	say "KVM: none on this host: $kvm."
	say "The demo VM runs under TCG instead (--accel tcg): QEMU emulates the CPU, without KVM, many times slower."
	say "Nothing else changes: the same image, service, privileges and checks. On a host with KVM the VM gets it from the broker."
	;;
*) exit 1 ;;
esac
say

scripts/install.sh
# Side by side: the binary, the engine and base image, the test guest.
logs=$(mktemp -d /var/tmp/swarmvm-demo.XXXXXX)
trap 'rm -rf "$logs"' EXIT
make -s build >"$logs/build" 2>&1 &
build=$!
{ scripts/dockerd.sh && scripts/base-image.sh; } >"$logs/base" 2>&1 &
base=$!
scripts/guest-fixture.sh >"$logs/guest" 2>&1 &
guest=$!
for job in build:$build base:$base guest:$guest; do
	if ! wait "${job#*:}"; then
		cat "$logs/${job%%:*}" >&2
		die "building the demo's ${job%%:*} failed"
	fi
	sed 's/^/  /' "$logs/${job%%:*}" >&2
done
log "building the runner image $image"
DOCKER_BUILDKIT=0 docker build -q --network host -t "$image" . >/dev/null
scripts/swarm.sh

label=(--image "$image")
if [ "$accel" = kvm ]; then
	# The broker, as a container (hosts with systemd install deploy/systemd instead).
	if [ "$(docker inspect -f '{{.State.Running}}' swarmvm-broker 2>/dev/null)" != true ] && [ ! -S /run/swarmvm/broker.sock ]; then
		docker rm -f swarmvm-broker >/dev/null 2>&1 || true
		install -d -m 0755 /run/swarmvm
		log "starting the broker (container swarmvm-broker)"
		docker run -d --name swarmvm-broker --restart always --user 0:0 --read-only \
			--cap-drop ALL --cap-add NET_ADMIN --cap-add CHOWN --security-opt no-new-privileges \
			--device /dev/kvm --device /dev/net/tun --network host --pid host \
			-v /run/swarmvm:/run/swarmvm --entrypoint swarmvm "$image" broker >/dev/null
	fi
	for _ in $(seq 1 50); do [ -S /run/swarmvm/broker.sock ] && break; sleep 0.2; done
	[ -S /run/swarmvm/broker.sock ] || { docker logs swarmvm-broker >&2; die "the broker did not start"; }
else
	label+=(--accel tcg)
fi

say
say "== swarmvm node label ${label[*]:2} (storage layout, probe, then label) =="
bin/swarmvm node label "${label[@]}"

# The test guest as boot media, readable by every VM.
install -m 0644 .cache/guest/vmlinuz "$store/isos/swarmvm-test-guest.vmlinuz"
install -m 0644 .cache/guest/initrd.img "$store/isos/swarmvm-test-guest.initrd.img"

vm=(--name "$name" --image "$image" --accel "$accel" --memory 256M --disk-size 1G
	--boot-mode bios --shutdown-timeout 30s --console-port "$port"
	--env KERNEL_PATH="$store/isos/swarmvm-test-guest.vmlinuz"
	--env INITRD_PATH="$store/isos/swarmvm-test-guest.initrd.img"
	--env KERNEL_CMDLINE="console=ttyS0")
if [ "$accel" = kvm ]; then
	# host,-arch-capabilities: some nested KVM hosts abort on plain host;
	# on a real host the default is fine.
	vm+=(--cpu-model host,-arch-capabilities)
fi
say
say "== swarmvm deploy --accel $accel =="
bin/swarmvm deploy "${vm[@]}"

say
say "== swarmvm ps =="
bin/swarmvm ps
say
if [ "$accel" = kvm ]; then
	docker service logs --raw "$name" 2>&1 | grep -q 'query_kvm="enabled=true present=true"' ||
		die "the runner did not report KVM enabled: docker service logs $name"
	say "Accelerator: KVM, enabled (QMP query-kvm, on the descriptor the broker handed the runner)"
else
	docker service logs --raw "$name" 2>&1 | grep -q 'event=vm-running.*accel=tcg' ||
		die "the runner did not report the VM running under TCG: docker service logs $name"
	say "Accelerator: TCG, as asked (the runner's log: VM running, accel=tcg)"
fi

serial=$store/logs/$name.serial.log
for _ in $(seq 1 120); do grep -q SWARMVM-GUEST-BOOTED "$serial" 2>/dev/null && break; sleep 0.5; done
grep -q SWARMVM-GUEST-BOOTED "$serial" 2>/dev/null || die "the guest did not boot within 60 s: see $serial"
say "The guest's own boot line, from its serial console ($serial):"
say "  $(grep -m1 SWARMVM-GUEST-BOOTED "$serial" | tr -d '\r')"
say
say "== swarmvm console $name (the screen in a browser; a ticket for 10 minutes) =="
bin/swarmvm console "$name"
say
say "The serial console in this terminal: bin/swarmvm console --serial $name (Ctrl-] leaves)"
say "The runner's log:                    docker service logs $name"
say "Remove it:                           bin/swarmvm rm $name   (ACPI power-off, forced after 30s)"
say "(make demo took $(($(date +%s) - began)) s)"
