#!/usr/bin/env bash
# Gives the host's device nodes the owner and mode Debian's udev rules give
# them on a normal host: /dev/kvm root:kvm 0660, so that a container user in
# the kvm group can open it with `docker run --device /dev/kvm --group-add
# <gid>`, and /dev/net/tun 0666 (opening it grants nothing without
# CAP_NET_ADMIN). Some machines (this project's CI among them) start with
# root:root 0600. Prints the kvm group's gid.
#
# Where /dev/kvm is missing, loads kvm_intel or kvm_amd if the CPU offers
# VT-x or AMD-V, and fails if that does not give a device. Where the CPU
# offers neither (a guest whose hypervisor does not pass virtualization on),
# no step on this host can give one: it prints why and exits 2, so that
# scripts/test.sh can say which tests could not run and why.
. "$(dirname "$0")/lib.sh"

if [ -c /dev/net/tun ]; then chmod 0666 /dev/net/tun; fi
if [ ! -c /dev/kvm ]; then
	if grep -qwE 'vmx|svm' /proc/cpuinfo; then
		modprobe kvm_intel 2>/dev/null || modprobe kvm_amd 2>/dev/null || true
		[ -c /dev/kvm ] || die "/dev/kvm is missing though the CPU offers VT-x/AMD-V: load kvm_intel or kvm_amd, and enable virtualization in the firmware"
	else
		why="/dev/kvm is missing and the CPU offers neither VT-x (vmx) nor AMD-V (svm) to kernel $(uname -r)"
		if grep -qw hypervisor /proc/cpuinfo; then
			why+=", itself a guest whose hypervisor does not pass virtualization on"
		fi
		if [ -d /sys/module/kvm ]; then
			why+="; the kernel's KVM is loaded but registered no device"
		fi
		printf '%s\n' "$why"
		exit 2
	fi
fi
getent group kvm >/dev/null || groupadd --system kvm
chgrp kvm /dev/kvm
chmod 0660 /dev/kvm
getent group kvm | cut -d: -f3
