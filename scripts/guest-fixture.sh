#!/usr/bin/env bash
# Builds the test guest from Debian packages: the bookworm cloud kernel and an
# initramfs around busybox-static. Its /init prints a marker line on ttyS0 and
# runs busybox acpid, so the ACPI power button powers it off; with
# swarmvm.acpi=ignore on the kernel command line it ignores the button.
# Output (git-ignored, cached): $OUT/vmlinuz, $OUT/initrd.img
. "$(dirname "$0")/lib.sh"

OUT=${OUT:-$(repo_root)/.cache/guest}
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ "${REBUILD:-0}" != 1 ]; then
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
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,etc/acpi/PWRF}
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
for m in input/evdev.ko acpi/button.ko; do
	cp "$(find "$work/pkg/lib/modules" -path "*/drivers/$m" | head -n1)" "$root/lib/modules/"
done
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
insmod /lib/modules/evdev.ko
insmod /lib/modules/button.ko
echo "swarmvm-guest: input devices: $(cat /sys/class/input/*/name 2>/dev/null | tr '\n' ' ')"
ls /dev/input 2>&1
if grep -q swarmvm.acpi=ignore /proc/cmdline; then
	echo "swarmvm-guest: ignoring the ACPI power button"
else
	acpid -f -c /etc/acpi -l /dev/console &
	echo "swarmvm-guest: acpid started"
fi
echo "SWARMVM-GUEST-BOOTED"
while :; do sleep 3600; done
INIT
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
log "guest fixture in $OUT ($kpkg)"
