#!/usr/bin/env bash
# Gives /dev/kvm the owner and mode Debian's udev rule gives it on a normal
# host (root:kvm 0660), so that a container user in the kvm group can open
# it with `docker run --device /dev/kvm --group-add <gid>`. Some machines
# (this project's CI among them) start with root:root 0600. Prints the gid.
. "$(dirname "$0")/lib.sh"

[ -c /dev/kvm ] || die "/dev/kvm is missing: load kvm_intel or kvm_amd"
getent group kvm >/dev/null || groupadd --system kvm
chgrp kvm /dev/kvm
chmod 0660 /dev/kvm
getent group kvm | cut -d: -f3
