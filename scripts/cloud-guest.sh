#!/usr/bin/env bash
# Builds a guest with real cloud-init, for the cloud-init tests: Debian
# bookworm (debootstrap, minbase) with systemd, cloud-init, openssh-server,
# qemu-guest-agent (which udev starts when its port appears) and ifupdown
# with a DHCP client, its root filesystem made straight into an
# ext4 image (mkfs.ext4 -d, no loop mount) and converted to qcow2, and the
# Debian cloud kernel and its initramfs beside it for a direct kernel boot
# (root=/dev/vda). cloud-init looks at NoCloud only; the guest's default
# user is Debian's "debian".
# Output (git-ignored, cached until this script changes): $OUT/disk.qcow2, $OUT/vmlinuz, $OUT/initrd.img
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"

OUT=${OUT:-.cache/cloud-guest}
stamp=$(sha256sum "$0" | cut -c1-16)
if [ -s "$OUT/disk.qcow2" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
	log "cloud-init guest cached in $OUT"
	exit 0
fi
"$(dirname "$0")/install.sh" e2fsprogs qemu-utils
command -v debootstrap >/dev/null || die "debootstrap missing: run scripts/install.sh"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (e2fsprogs)"
mirror=$(debian_mirror)
work=$(mktemp -d /var/tmp/swarmvm-cloud-guest.XXXXXX)
root=$work/root
cleanup() {
	umount "$root/proc" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
began=$(date +%s)
log "debootstrap bookworm, then cloud-init and openssh-server in it (a few minutes)"
debootstrap --variant=minbase --include=systemd-sysv,udev,dbus,ifupdown,isc-dhcp-client,iproute2,sudo \
	bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
	{ tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
# The rest through apt in the guest's root, which orders the Python
# packages' configuration as debootstrap does not; no service starts.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	cloud-init openssh-server qemu-guest-agent linux-image-cloud-amd64 initramfs-tools >"$work/apt.log" 2>&1 ||
	{ tail -n 30 "$work/apt.log" >&2; die "installing cloud-init in the guest failed"; }
umount "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" >"$root/etc/fstab"
echo localhost >"$root/etc/hostname"
# NoCloud only: no waiting on metadata services that do not exist here.
cat >"$root/etc/cloud/cloud.cfg.d/99-swarmvm.cfg" <<'CFG'
datasource_list: [NoCloud, None]
CFG
# cloud-init makes the host keys at first boot (one per instance).
rm -f "$root"/etc/ssh/ssh_host_*
kernel=$(ls "$root"/boot/vmlinuz-* | head -n1)
initrd=$(ls "$root"/boot/initrd.img-* 2>/dev/null | head -n1)
[ -n "$initrd" ] || die "no initramfs was made in the guest"
mkdir -p "$OUT"
cp "$kernel" "$OUT/vmlinuz.tmp" && cp "$initrd" "$OUT/initrd.img.tmp"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
mkfs.ext4 -q -L root -d "$root" "$work/disk.img" 2G
qemu-img convert -O qcow2 "$work/disk.img" "$OUT/disk.qcow2.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
mv "$OUT/disk.qcow2.tmp" "$OUT/disk.qcow2"
echo "$stamp" >"$OUT/stamp"
log "cloud-init guest in $OUT ($(du -h "$OUT/disk.qcow2" | cut -f1), built in $(($(date +%s) - began)) s)"
