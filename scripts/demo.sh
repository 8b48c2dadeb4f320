#!/usr/bin/env bash
# The demo (make demo): the broker runs on this node (as a container), and
# the runner image starts the test guest with KVM from the broker's
# descriptor: no device, no capability, no root in the VM container. QEMU
# itself reports KVM enabled. (The Swarm service replaces `docker run` when
# the deploy tooling lands.)
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"

image=${IMAGE:-swarmvm/runner:dev}
name=${VM_NAME:-swarmvm-demo}
store=/var/lib/poc-qemu
uid=10001

scripts/install.sh
scripts/dockerd.sh

install -d -o "$uid" -g "$uid" -m 0750 "$store" "$store/images" "$store/isos" "$store/logs"
install -o "$uid" -g "$uid" -m 0644 .cache/guest/vmlinuz "$store/isos/swarmvm-test-guest.vmlinuz"
install -o "$uid" -g "$uid" -m 0644 .cache/guest/initrd.img "$store/isos/swarmvm-test-guest.initrd.img"

if [ "$(docker inspect -f '{{.State.Running}}' swarmvm-broker 2>/dev/null)" != true ]; then
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

docker rm -f "$name" >/dev/null 2>&1 || true
log "starting $name: read-only root, no capabilities, no-new-privileges, user $uid, no device"
docker run -d --name "$name" --restart on-failure:3 \
	--read-only --cap-drop ALL --security-opt no-new-privileges --user "$uid:$uid" \
	-v /run/swarmvm:/run/swarmvm \
	--tmpfs /run:rw,nosuid,nodev,size=16m -v "$store:$store" \
	-e VM_NAME="$name" -e VM_MEMORY=256M -e DISK_SIZE=1G -e BOOT_MODE=bios \
	-e CPU_MODEL=host,-arch-capabilities \
	-e KERNEL_PATH="$store/isos/swarmvm-test-guest.vmlinuz" \
	-e INITRD_PATH="$store/isos/swarmvm-test-guest.initrd.img" \
	-e KERNEL_CMDLINE="console=ttyS0" \
	"$image" >/dev/null

for _ in $(seq 1 60); do
	docker logs "$name" 2>&1 | grep -q "KVM verified" && break
	[ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || { docker logs "$name" >&2; die "the runner exited"; }
	sleep 1
done
docker logs "$name" 2>&1 | grep -q "KVM verified" || { docker logs "$name" >&2; die "KVM not verified within 60s"; }

pid=$(docker inspect -f '{{.State.Pid}}' "$name")
qemu=$(pgrep -P "$pid" -f qemu-system || true)
echo
echo "== runner log (docker logs $name) =="
docker logs "$name" 2>&1 | grep -E 'check="kvm|KVM verified|VM running|QEMU started' | cut -c1-220
echo
echo "== the VM container: devices, capabilities added, privileged =="
docker inspect -f 'devices={{.HostConfig.Devices}} cap_add={{.HostConfig.CapAdd}} cap_drop={{.HostConfig.CapDrop}} privileged={{.HostConfig.Privileged}} read_only={{.HostConfig.ReadonlyRootfs}} user={{.Config.User}}' "$name"
echo
echo "== broker audit (docker logs swarmvm-broker) =="
docker logs swarmvm-broker 2>&1 | grep "\"vm\":\"$name\"" | tail -n 1
echo
echo "== QEMU process on the host (pid $qemu): /proc/$qemu/status =="
grep -E '^(Uid|Gid|CapPrm|CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$qemu/status"
echo "KVM descriptors: $(ls -l /proc/"$qemu"/fd | grep -oE 'anon_inode:kvm-[a-z-]+(:[0-9]+)?' | sort | uniq -c | xargs)"
echo
echo "== health =="
health=$(docker exec "$name" swarmvm health) || { echo "$health"; die "the VM is not healthy"; }
echo "$health"
echo
case $health in
*"KVM enabled"*) echo "KVM: enabled (QMP query-kvm, on the descriptor the runner handed QEMU)" ;;
*) die "KVM not reported enabled" ;;
esac
echo "Serial console log: $store/logs/$name.serial.log"
echo "Stop it (ACPI power-off, then forced after SHUTDOWN_TIMEOUT): docker stop -t 120 $name"
echo "Remove it: docker rm -f $name (and the broker: docker rm -f swarmvm-broker)"
