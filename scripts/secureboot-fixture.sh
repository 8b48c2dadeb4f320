#!/usr/bin/env bash
# Builds the Secure Boot test disks from Debian packages, around the guest
# fixture's kernel (Debian's cloud kernel, signed by Debian) and initramfs:
# a GPT disk with one EFI system partition holding Debian's shim signed by
# Microsoft (EFI/BOOT/BOOTX64.EFI, what firmware boots from a disk without
# boot entries), Debian's signed GRUB beside it (grubx64.efi), and a
# grub.cfg that boots the kernel with swarmvm.platform=1 (the guest prints
# its Secure Boot state and TPM). The second disk is the same but its
# BOOTX64.EFI is unsigned (the signature removed with sbattach): a Secure
# Boot firmware must refuse it.
# Output (git-ignored, cached until this script or the guest fixture
# changes): $OUT/signed.qcow2, $OUT/unsigned.qcow2
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"

OUT=${OUT:-.cache/secureboot}
GUEST=${GUEST:-.cache/guest}
scripts/guest-fixture.sh
stamp=$(cat "$0" "$GUEST/stamp" | sha256sum | cut -c1-16)
if [ -s "$OUT/signed.qcow2" ] && [ -s "$OUT/unsigned.qcow2" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
	log "Secure Boot guest cached in $OUT"
	exit 0
fi
"$(dirname "$0")/install.sh" dosfstools mtools fdisk sbsigntool qemu-utils
for tool in mkfs.vfat mcopy sfdisk sbattach qemu-img; do
	command -v "$tool" >/dev/null || die "$tool missing (dosfstools mtools fdisk sbsigntool qemu-utils)"
done
work=$(mktemp -d /var/tmp/swarmvm-secureboot.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
log "fetching shim-signed and grub-efi-amd64-signed"
(cd "$work" && apt-get download shim-signed grub-efi-amd64-signed >/dev/null) || die "apt-get download failed"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/pkg"; done
shim=$(find "$work/pkg" -name shimx64.efi.signed | head -n1)
grub=$(find "$work/pkg" -name grubx64.efi.signed | head -n1)
[ -n "$shim" ] && [ -n "$grub" ] || die "shimx64.efi.signed or grubx64.efi.signed not in the packages"
sbverify --list "$shim" 2>/dev/null | grep -q "Microsoft Corporation UEFI CA" || die "$shim is not signed by Microsoft's UEFI CA"

cat >"$work/grub.cfg" <<'CFG'
set timeout=0
echo "swarmvm: GRUB loaded; booting the guest kernel"
linux /vmlinuz console=ttyS0 swarmvm.platform=1 swarmvm.tpmnv=swarmvm-nv-test1 swarmvm.shell=1
initrd /initrd.img
boot
CFG
# disk: GPT, one EFI system partition from 1 MiB to the end (FAT16).
esp() {
	local img=$1 boot=$2
	truncate -s 64M "$img"
	printf 'label: gpt\nstart=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="ESP"\n' | sfdisk -q "$img"
	mkfs.vfat -F 16 -n ESP --offset 2048 "$img" $(((64 - 1) * 1024 - 64)) >/dev/null 2>&1
	local fs="$img@@1M"
	mmd -i "$fs" ::/EFI ::/EFI/BOOT ::/EFI/debian
	mcopy -i "$fs" "$boot" ::/EFI/BOOT/BOOTX64.EFI
	mcopy -i "$fs" "$grub" ::/EFI/BOOT/grubx64.efi
	mcopy -i "$fs" "$work/grub.cfg" ::/EFI/debian/grub.cfg
	mcopy -i "$fs" "$work/grub.cfg" ::/EFI/BOOT/grub.cfg
	mcopy -i "$fs" "$GUEST/vmlinuz" ::/vmlinuz
	mcopy -i "$fs" "$GUEST/initrd.img" ::/initrd.img
}
# shim carries one signature per Microsoft CA (2011 and 2023): remove each.
cp "$shim" "$work/unsigned.efi"
for _ in 1 2 3 4; do
	sbverify --list "$work/unsigned.efi" 2>&1 | grep -q "No signature table present" && break
	sbattach --remove "$work/unsigned.efi" 2>/dev/null
done
sbverify --list "$work/unsigned.efi" 2>&1 | grep -q "No signature table present" || die "sbattach left a signature on the unsigned copy"
mkdir -p "$OUT"
for d in signed unsigned; do
	boot=$shim
	[ $d = unsigned ] && boot=$work/unsigned.efi
	esp "$work/$d.img" "$boot"
	qemu-img convert -q -f raw -O qcow2 "$work/$d.img" "$OUT/$d.qcow2.tmp"
	mv "$OUT/$d.qcow2.tmp" "$OUT/$d.qcow2"
done
echo "$stamp" >"$OUT/stamp"
log "Secure Boot guest in $OUT: signed.qcow2, unsigned.qcow2"
