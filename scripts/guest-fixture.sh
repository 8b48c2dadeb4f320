#!/usr/bin/env bash
# Builds the test guest from Debian packages: the bookworm cloud kernel and an
# initramfs around busybox-static. Its /init prints a marker line on ttyS0 and
# runs busybox acpid, so the ACPI power button powers it off; with
# swarmvm.acpi=ignore on the kernel command line it ignores the button, with
# swarmvm.acpi=late it starts listening only 8 s after boot. When
# it has a virtio NIC it configures it (swarmvm.ip=ADDR/LEN[,GATEWAY] on the
# command line, else DHCP) and serves HTTP on port 80: / answers
# "SWARMVM-GUEST-HTTP <hostname>", /blob is 32 MiB for throughput figures.
# Faults on request: swarmvm.fill=MIB writes that many MiB of non-zero data
# to /dev/vda (swarmvm.fillafter=SECONDS: that long after boot) and prints
# SWARMVM-GUEST-FILLED when it is on the disk;
# swarmvm.panic=SECONDS panics the kernel that long after boot (the pvpanic
# device reports it to QEMU), once per disk: it marks /dev/vda first, and a
# boot that finds the mark runs on. swarmvm.mark=TEXT: at 8 MiB into /dev/vda,
# a disk with a mark prints SWARMVM-GUEST-MARK <mark>, one without gets TEXT
# written and prints SWARMVM-GUEST-MARKED TEXT. swarmvm.diskbench=MIB runs
# test/guestbench (built here, static): MIB MiB written to /dev/vda and read
# back with direct I/O in 4 MiB blocks, then 4 KiB writes and reads at
# random places from 8 threads; it prints SWARMVM-GUEST-DISK dev=vda mib=MIB
# write_s=… read_s=… randwrite_iops=… randread_iops=… (medians of 3 rounds;
# swarmvm.diskrounds=N for N, swarmvm.diskdevs=vda,vdb,… for several disks
# taking turns, a line each). swarmvm.efivar=TEXT (UEFI):
# an EFI variable (NVRAM) likewise, SWARMVM-GUEST-EFIVAR <value> or
# SWARMVM-GUEST-EFIVAR-SET TEXT. swarmvm.seed=1: the cloud-init seed's
# names and digests, SWARMVM-GUEST-SEED …. swarmvm.shell=1: after all that, an
# interactive shell on the serial console (SWARMVM-GUEST-SHELL first).
# swarmvm.agent=garbage|endless|silent: a hostile guest agent on the
# agent's virtio-serial port, SWARMVM-GUEST-AGENT <kind> <port>;
# swarmvm.agent=answer:SECONDS: one that answers guest-sync-delimited
# alone for that long, then leaves (SWARMVM-GUEST-AGENT-QUIT).
# swarmvm.platform=1: what the firmware gave the guest, right after the boot
# marker: SWARMVM-GUEST-SECUREBOOT 1|0|absent (UEFI's SecureBoot variable),
# SWARMVM-GUEST-TPM version=2 with SWARMVM-GUEST-PCR sha256 <i> <hex> for
# PCRs 0 and 7, or SWARMVM-GUEST-TPM none. swarmvm.tpmnv=TEXT (16 characters;
# with a TPM): NV index 0x01500001 read back, SWARMVM-GUEST-TPMNV <value>, or,
# when the TPM has no such index, defined (owner read/write), TEXT written,
# SWARMVM-GUEST-TPMNV-SET TEXT. Raw TPM 2.0 commands on /dev/tpm0, the owner
# authorisation empty as a new TPM has it.
# swarmvm.dirty=MIB: rewrites MIB MiB of its memory (a tmpfs file) without
# end, and says SWARMVM-GUEST-DIRTY MIBMiB.
# swarmvm.tick=1: SWARMVM-GUEST-TICK <boot id> <n> every 100 ms, n counting
# from 1 (a migration keeps both going).
# swarmvm.writer=N: test/guestwriter writes N 1 MiB blocks from 64 MiB into
# /dev/vda, round after round without pause, each durable before it prints
# SWARMVM-GUEST-WROTE round=R block=K; swarmvm.verify=N reads them back,
# SWARMVM-GUEST-VERIFY ok round=R block=K (the last block written) or bad.
# Output (git-ignored, cached until this script, test/guestbench or
# test/guestwriter changes):
# $OUT/vmlinuz, $OUT/initrd.img
. "$(dirname "$0")/lib.sh"

OUT=${OUT:-$(repo_root)/.cache/guest}
stamp=$(cat "$0" "$(repo_root)"/test/guestbench/*.go "$(repo_root)"/test/guestwriter/*.go | sha256sum | cut -d' ' -f1)
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ] && [ "${REBUILD:-0}" != 1 ]; then
	log "guest fixture cached in $OUT"
	exit 0
fi
work=$(mktemp -d /var/tmp/swarmvm-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
log "fetching $kpkg and busybox-static"
(cd "$work" && apt-get download "$kpkg" busybox-static >/dev/null) || die "apt-get download failed"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/pkg"; done

root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,etc/acpi/PWRF,www}
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
(cd "$(repo_root)" && CGO_ENABLED=0 "${GO:-go}" build -trimpath -o "$root/bin/guestbench" ./test/guestbench) || die "building test/guestbench failed"
(cd "$(repo_root)" && CGO_ENABLED=0 "${GO:-go}" build -trimpath -o "$root/bin/guestwriter" ./test/guestwriter) || die "building test/guestwriter failed"
# In load order: input and ACPI button, pvpanic, then virtio disk and
# networking, then ISO9660 (the cloud-init seed).
modules="drivers/input/evdev drivers/acpi/button drivers/misc/pvpanic/pvpanic drivers/misc/pvpanic/pvpanic-mmio
	drivers/virtio/virtio_ring drivers/virtio/virtio
	drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci
	drivers/block/virtio_blk net/core/failover drivers/net/net_failover drivers/net/virtio_net drivers/char/virtio_console
	fs/nls/nls_utf8 drivers/cdrom/cdrom fs/isofs/isofs"
for m in $modules; do
	cp "$(find "$work/pkg/lib/modules" -path "*/$m.ko" | head -n1)" "$root/lib/modules/"
done
echo "$modules" | tr -s ' \t\n' '\n' | sed 's|.*/||' >"$root/lib/modules/order"
# Loaded only under UEFI (it refuses to load without EFI runtime services).
mkdir -p "$root/lib/modules/efi"
cp "$(find "$work/pkg/lib/modules" -path '*/fs/efivarfs/efivarfs.ko' | head -n1)" "$root/lib/modules/efi/"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
echo "swarmvm-guest: input devices: $(cat /sys/class/input/*/name 2>/dev/null | tr '\n' ' ')"
ls /dev/input 2>&1
if grep -q swarmvm.acpi=ignore /proc/cmdline; then
	echo "swarmvm-guest: ignoring the ACPI power button"
else
	late=0
	if grep -q swarmvm.acpi=late /proc/cmdline; then
		late=8
		echo "swarmvm-guest: the ACPI power button is heard 8 s from now"
	fi
	(sleep $late; echo "swarmvm-guest: acpid started"; exec acpid -f -c /etc/acpi -l /dev/console) &
fi
if [ -e /sys/class/net/eth0 ]; then
	ip link set lo up
	ip link set eth0 up
	static=$(sed -n 's/.*swarmvm\.ip=\([^ ]*\).*/\1/p' /proc/cmdline)
	if [ -n "$static" ]; then
		ip addr add "${static%%,*}" dev eth0
		case $static in *,*) ip route add default via "${static#*,}" ;; esac
	else
		udhcpc -i eth0 -q -n -t 10 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1
	fi
	echo "SWARMVM-GUEST-HTTP $(hostname)" >/www/index.html
	dd if=/dev/zero of=/www/blob bs=1M count=32 2>/dev/null
	httpd -p 80 -h /www
	echo "SWARMVM-GUEST-NET $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
fi
echo "SWARMVM-GUEST-BOOTED"
arg() { sed -n "s/.*swarmvm\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
if [ -n "$(arg platform)" ]; then
	if [ -d /sys/firmware/efi ]; then
		insmod /lib/modules/efi/efivarfs.ko 2>/dev/null
		grep -q efivarfs /proc/mounts || mount -t efivarfs efivarfs /sys/firmware/efi/efivars
		sb=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
		if [ -e "$sb" ]; then
			echo "SWARMVM-GUEST-SECUREBOOT $(tail -c 1 "$sb" | od -An -tu1 | tr -d ' ')"
		else
			echo "SWARMVM-GUEST-SECUREBOOT absent"
		fi
	fi
	if [ -e /sys/class/tpm/tpm0 ]; then
		echo "SWARMVM-GUEST-TPM version=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"
		for i in 0 7; do
			echo "SWARMVM-GUEST-PCR sha256 $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i 2>/dev/null)"
		done
	else
		echo "SWARMVM-GUEST-TPM none"
	fi
fi
# tpm2 HEX: one TPM 2.0 command; prints the response as hex.
tpm2() {
	exec 3<>/dev/tpm0
	printf "$(echo "$1" | sed 's/\(..\)/\\x\1/g')" >&3
	dd bs=4096 count=1 <&3 2>/dev/null | od -An -v -tx1 | tr -d ' \n'
	exec 3<&-
}
nv=$(arg tpmnv)
if [ -n "$nv" ] && [ -e /dev/tpm0 ]; then
	# Owner (0x40000001) with an empty password session (TPM_RS_PW).
	pw=00000009400000090000000000
	r=$(tpm2 800200000023"0000014e"4000000101500001"$pw"00100000)
	if [ "${r:12:8}" = 00000000 ]; then
		echo "SWARMVM-GUEST-TPMNV $(printf "$(echo "${r:32:32}" | sed 's/\(..\)/\\x\1/g')")"
	else
		# NV_DefineSpace: index 0x01500001, SHA-256, OWNERWRITE|OWNERREAD, 16 bytes.
		d=$(tpm2 80020000002d"0000012a"40000001"$pw"0000000e01500001000b000200020000"0010")
		w=$(tpm2 800200000033"00000137"4000000101500001"$pw"0010"$(printf %s "$nv" | od -An -v -tx1 | tr -d ' \n')"0000)
		if [ "${w:12:8}" = 00000000 ]; then
			echo "SWARMVM-GUEST-TPMNV-SET $nv"
		else
			echo "SWARMVM-GUEST-TPMNV-ERROR define=${d:12:8} write=${w:12:8}"
		fi
	fi
fi
fill=$(arg fill)
if [ -n "$fill" ] && [ -b /dev/vda ]; then
	after=$(arg fillafter)
	[ -n "$after" ] && echo "SWARMVM-GUEST-FILL-IN ${after}s" && sleep "$after"
	# Non-zero data: the disk is attached with detect-zeroes=unmap, which
	# would turn zeros into holes and never fill the volume.
	tr '\000' 'S' </dev/zero | dd of=/tmp/pattern bs=1024 count=1024 2>/dev/null
	i=0
	while [ "$i" -lt "$fill" ]; do
		dd if=/tmp/pattern of=/dev/vda bs=1048576 seek="$i" count=1 conv=notrunc 2>/dev/null || break
		i=$((i + 1))
	done
	sync
	echo "SWARMVM-GUEST-FILLED ${i}MiB"
fi
# What a backup holds: swarmvm.verify=N reads back what swarmvm.writer=N
# writes from 64 MiB on, N 1 MiB blocks round after round (test/guestwriter).
verify=$(arg verify)
if [ -n "$verify" ] && [ -b /dev/vda ]; then
	/bin/guestwriter verify /dev/vda 64 "$verify"
fi
writer=$(arg writer)
if [ -n "$writer" ] && [ -b /dev/vda ]; then
	/bin/guestwriter write /dev/vda 64 "$writer" &
fi
bench=$(arg diskbench)
if [ -n "$bench" ] && [ -b /dev/vda ]; then
	rounds=$(arg diskrounds)
	devs=$(arg diskdevs)
	# shellcheck disable=SC2046 # one word per disk
	/bin/guestbench "$bench" "${rounds:-3}" $(echo "${devs:-vda}" | tr ',' '\n' | sed 's|^|/dev/|') ||
		echo "SWARMVM-GUEST-DISK error=\"guestbench ended with status $?\""
fi
# A hostile guest agent on the agent's port: garbage (random bytes),
# endless (one line that never ends) or silent (holds the port, answers
# nothing).
agent=$(arg agent)
if [ -n "$agent" ]; then
	port=
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
	done
	case $agent in
	garbage) (while :; do cat /dev/urandom; done >"$port") 2>/dev/null & ;;
	endless) (while :; do tr '\000' x </dev/zero; done >"$port") 2>/dev/null & ;;
	silent) (exec 3<>"$port"; sleep 100000) & ;;
	answer:*)
		# answers guest-sync-delimited (anything else: CommandNotFound)
		# for that many seconds, then leaves the port
		# (a read while the host has not connected returns end of file)
		(
			exec 3<>"$port"
			while :; do
				if ! IFS= read -r line <&3; then
					sleep 1
					continue
				fi
				case $line in
				*guest-sync-delimited*) printf '\377{"return": %s}\n' "$(echo "$line" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')" >&3 ;;
				*) echo '{"error": {"class": "CommandNotFound", "desc": "the test guest answers guest-sync-delimited alone"}}' >&3 ;;
				esac
			done
		) &
		answering=$!
		(sleep "${agent#answer:}"; kill "$answering"; echo "SWARMVM-GUEST-AGENT-QUIT") &
		agent=answer
		;;
	esac
	echo "SWARMVM-GUEST-AGENT $agent ${port:-no port}"
fi
mark=$(arg mark)
if [ -n "$mark" ] && [ -b /dev/vda ]; then
	have=$(dd if=/dev/vda bs=1048576 skip=8 count=1 2>/dev/null | head -c 64 | tr -d '\000')
	if [ -n "$have" ]; then
		echo "SWARMVM-GUEST-MARK $have"
	else
		# fsync: a flush the disk must honour, so the mark survives QEMU
		# being killed (sync alone sends no flush for a bare block device).
		printf '%s' "$mark" | dd of=/dev/vda bs=1048576 seek=8 conv=notrunc,fsync 2>/dev/null
		echo "SWARMVM-GUEST-MARKED $mark"
	fi
fi
if [ -n "$(arg tick)" ]; then
	# A heartbeat that shows a live migration: the boot id stays, the
	# counter goes on; a reboot starts both anew.
	boot=$(cat /proc/sys/kernel/random/boot_id)
	(n=0; while :; do n=$((n + 1)); echo "SWARMVM-GUEST-TICK $boot $n"; usleep 100000 2>/dev/null || sleep 0.1; done) &
fi
dirty=$(arg dirty)
if [ -n "$dirty" ]; then
	# Memory the guest keeps rewriting (a tmpfs file of that many MiB, not
	# zeros): what a migration has to send again and again.
	mount -t tmpfs -o size=$((dirty + 8))m tmpfs /mnt 2>/dev/null
	yes swarmvm-dirty | head -c 1048576 >/mnt/pattern
	(while :; do
		i=0
		while [ "$i" -lt "$dirty" ]; do
			dd if=/mnt/pattern of=/mnt/dirty bs=1M seek="$i" count=1 conv=notrunc 2>/dev/null
			i=$((i + 1))
		done
	done) &
	echo "SWARMVM-GUEST-DIRTY ${dirty}MiB"
fi
efivar=$(arg efivar)
if [ -n "$efivar" ] && [ -d /sys/firmware/efi ]; then
	insmod /lib/modules/efi/efivarfs.ko 2>/dev/null
	grep -q efivarfs /proc/mounts || mount -t efivarfs efivarfs /sys/firmware/efi/efivars
	v=/sys/firmware/efi/efivars/SwarmvmTest-5f1b7c2e-8d1a-4f7e-9a4b-2c6d0e3f1a90
	if [ -e "$v" ]; then
		echo "SWARMVM-GUEST-EFIVAR $(tail -c +5 "$v")"
	else
		# Attributes (non-volatile, boot and runtime access), then the
		# value, in one write as efivarfs wants it.
		printf '\007\000\000\000%s' "$efivar" >/tmp/efivar
		dd if=/tmp/efivar of="$v" bs=4096 2>/dev/null && echo "SWARMVM-GUEST-EFIVAR-SET $efivar"
	fi
fi
if [ -n "$(arg seed)" ]; then
	# The cloud-init seed, read as cloud-init's NoCloud source finds it: the
	# filesystem labelled CIDATA. Its files' names, the hostname and
	# instance-id from meta-data, and a digest of user-data (never its
	# content) go to the console.
	# (busybox here has no blkid: the ISO9660 volume label is read by hand,
	# from the primary volume descriptor at 32 KiB + 40.)
	dev=
	for d in /dev/vd? /dev/sr?; do
		[ -b "$d" ] && [ "$(dd if="$d" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' \000')" = CIDATA ] && dev=$d && break
	done
	mkdir -p /seed
	if [ -n "$dev" ] && mount -t iso9660 -o ro "$dev" /seed; then
		md() { sed -n "s/^$1: *//p" /seed/meta-data | head -n1; }
		echo "SWARMVM-GUEST-SEED dev=$dev files=$(ls /seed | tr '\n' ',') hostname=$(md local-hostname) instance-id=$(md instance-id) user-data-sha256=$(sha256sum /seed/user-data | cut -c1-64)"
		grep -o 'ssh-[a-z0-9-]* [A-Za-z0-9+/=]*' /seed/meta-data | sed 's/^/SWARMVM-GUEST-SEED-KEY /'
		umount /seed
	else
		echo "SWARMVM-GUEST-SEED none: $(ls /dev/vd* /dev/sr* 2>&1 | tr '\n' ' ')"
	fi
fi
delay=$(arg panic)
if [ -n "$delay" ] && [ -b /dev/vda ] && [ "$(head -c 16 /dev/vda | tr -d '\000')" = SWARMVM-PANICKED ]; then
	echo "swarmvm-guest: this disk has seen its panic; running on"
elif [ -n "$delay" ]; then
	# Once per disk: the mark lets a restarted VM run on.
	[ -b /dev/vda ] && printf SWARMVM-PANICKED | dd of=/dev/vda conv=notrunc 2>/dev/null && sync
	sleep "$delay"
	echo "SWARMVM-GUEST-PANIC"
	echo c >/proc/sysrq-trigger
fi
if [ -n "$(arg shell)" ]; then
	# An interactive shell on the serial console, for the console tests.
	echo "SWARMVM-GUEST-SHELL"
	while :; do setsid cttyhack sh -i; sleep 1; done
fi
while :; do sleep 3600; done
INIT
cat >"$root/etc/udhcpc.script" <<'DHCP'
#!/bin/sh
case $1 in
bound|renew)
	ip addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	[ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
	;;
esac
DHCP
chmod 0755 "$root/etc/udhcpc.script"
cat >"$root/etc/acpi/PWRF/00000080" <<'ACT'
#!/bin/sh
echo "SWARMVM-GUEST-POWEROFF" >/dev/console
poweroff -f
ACT
chmod 0755 "$root/init" "$root/etc/acpi/PWRF/00000080"

mkdir -p "$OUT"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) >"$OUT/initrd.img.tmp"
cp "$(ls "$work"/pkg/boot/vmlinuz-*)" "$OUT/vmlinuz.tmp"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "$stamp" >"$OUT/stamp"
log "guest fixture in $OUT ($kpkg)"
