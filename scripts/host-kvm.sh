#!/usr/bin/env bash
# Gives the host's device nodes the owner and mode Debian's udev rules give
# them on a normal host: /dev/kvm root:kvm 0660, so that a container user in
# the kvm group can open it with `docker run --device /dev/kvm --group-add
# <gid>`, and /dev/net/tun 0666 (opening it grants nothing without
# CAP_NET_ADMIN). Some machines (this project's CI among them) start with
# root:root 0600. Prints the kvm group's gid.
. "$(dirname "$0")/lib.sh"

[ -c /dev/kvm ] || die "/dev/kvm is missing: load kvm_intel or kvm_amd"
getent group kvm >/dev/null || groupadd --system kvm
chgrp kvm /dev/kvm
chmod 0660 /dev/kvm
[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun
getent group kvm | cut -d: -f3
