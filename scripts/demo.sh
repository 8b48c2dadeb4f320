#!/usr/bin/env bash
# The demo (make demo): the runner image starts the test guest with KVM on
# this node, unprivileged, and shows KVM verified by QEMU itself.
# For now it uses `docker run --device /dev/kvm`; the Swarm service with the
# broker replaces that as those parts land.
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"

image=${IMAGE:-swarmvm/runner:dev}
name=${VM_NAME:-swarmvm-demo}
store=/var/lib/poc-qemu
uid=10001

scripts/install.sh
scripts/dockerd.sh
gid=$(scripts/host-kvm.sh)

install -d -o "$uid" -g "$uid" -m 0750 "$store" "$store/images" "$store/isos" "$store/logs"
install -o "$uid" -g "$uid" -m 0644 .cache/guest/vmlinuz "$store/isos/swarmvm-test-guest.vmlinuz"
install -o "$uid" -g "$uid" -m 0644 .cache/guest/initrd.img "$store/isos/swarmvm-test-guest.initrd.img"

docker rm -f "$name" >/dev/null 2>&1 || true
log "starting $name: read-only root, no capabilities, no-new-privileges, user $uid, KVM device"
docker run -d --name "$name" --restart on-failure:3 \
	--read-only --cap-drop ALL --security-opt no-new-privileges --user "$uid:$uid" \
	--device /dev/kvm --group-add "$gid" \
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
docker logs "$name" 2>&1 | grep -E 'KVM verified|VM running|starting QEMU|QEMU started' | cut -c1-220
echo
echo "== QEMU process on the host (pid $qemu): /proc/$qemu/status =="
grep -E '^(Uid|Gid|CapPrm|CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$qemu/status"
echo "KVM descriptors: $(ls -l /proc/"$qemu"/fd | grep -oE 'anon_inode:kvm-[a-z]+(:[0-9]+)?' | sort | uniq -c | xargs)"
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
echo "Remove it: docker rm -f $name"
