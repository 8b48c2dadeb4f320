#!/usr/bin/env bash
# The demo (make demo): on this machine, a single-node Swarm with the
# broker, a node labelled vm-capable after a probe, and the test guest
# deployed as a Swarm service with KVM from the broker's descriptor: no
# device, no capability, no root in the task. Prints where it runs, the
# privilege audit of the running task and QEMU's own word on KVM.
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"

image=${IMAGE:-swarmvm/runner:dev}
name=${VM_NAME:-swarmvm-demo}
store=/var/lib/poc-qemu

scripts/install.sh
scripts/dockerd.sh
# The demo's point is KVM verified; on a host that cannot have KVM it stops
# here, saying why (the test suite still runs there: make test).
if ! kvm=$(scripts/host-kvm.sh); then
	[ -n "$kvm" ] && die "the demo runs its VM with KVM, and this host has none: $kvm. On such a host, make test runs every test that does not need KVM and lists the others"
	exit 1
fi
scripts/swarm.sh

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

echo
echo "== swarmvm node label (storage layout, probe, then label) =="
bin/swarmvm node label --image "$image"

# The test guest as boot media, readable by every VM.
install -m 0644 .cache/guest/vmlinuz "$store/isos/swarmvm-test-guest.vmlinuz"
install -m 0644 .cache/guest/initrd.img "$store/isos/swarmvm-test-guest.initrd.img"

echo
echo "== swarmvm deploy =="
# CPU_MODEL host,-arch-capabilities: this machine's nested KVM aborts on
# plain host (TESTING.md); on a real host the default is fine.
bin/swarmvm deploy --name "$name" --image "$image" --memory 256M --disk-size 1G \
	--boot-mode bios --cpu-model host,-arch-capabilities --shutdown-timeout 30s \
	--env KERNEL_PATH="$store/isos/swarmvm-test-guest.vmlinuz" \
	--env INITRD_PATH="$store/isos/swarmvm-test-guest.initrd.img" \
	--env KERNEL_CMDLINE="console=ttyS0"

echo
echo "== docker service logs $name (the runner) =="
docker service logs --raw "$name" 2>&1 | grep -E 'check="kvm broker"|KVM verified' | tail -n 2 | cut -c1-240
echo
echo "== swarmvm ps =="
bin/swarmvm ps
echo
if docker service logs --raw "$name" 2>&1 | grep -q 'query_kvm="enabled=true present=true"'; then
	echo "KVM: enabled (QMP query-kvm, on the descriptor the broker handed the runner)"
else
	die "KVM not reported enabled"
fi
echo "Console log: $store/logs/$name.serial.log   Runner log: docker service logs $name"
echo "Remove it:   bin/swarmvm rm $name   (ACPI power-off, forced after 30s)"
