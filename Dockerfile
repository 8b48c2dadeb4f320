# The swarmvm VM runner: QEMU 10 (needed to take KVM as a descriptor) and
# swtpm (TPM=on) on Debian trixie, run as an unprivileged user with a read-only root. The
# binary is built outside (make image) and copied in.
FROM debian:trixie-slim

# noVNC's files (the web console's viewer) and xterm.js (the serial
# console's page) come out of Debian's novnc and libjs-xterm packages,
# unpacked without installing them: novnc's dependencies (nodejs, websockify,
# python) are not needed, the runner serves the files and bridges the
# websockets itself.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      qemu-system-x86 qemu-utils ovmf seabios ipxe-qemu iproute2 libcap2-bin swtpm \
 && cd /tmp && apt-get download novnc libjs-xterm \
 && dpkg-deb -x novnc_*.deb /tmp/novnc && mv /tmp/novnc/usr/share/novnc /usr/share/novnc \
 && dpkg-deb -x libjs-xterm_*.deb /tmp/xterm && mkdir -p /usr/share/javascript \
 && mv /tmp/xterm/usr/share/javascript/xterm /usr/share/javascript/xterm \
 && test -f /usr/share/novnc/vnc.html && test -f /usr/share/javascript/xterm/xterm.js \
 && rm -rf /tmp/novnc /tmp/xterm /tmp/*.deb \
 && rm -rf /var/lib/apt/lists/* \
 && q=/usr/bin/qemu-system-x86_64 && mkdir -p /usr/share/swarmvm \
 && { stat -c "$q %s %Y" $q; $q --version; } >/usr/share/swarmvm/qemu-version \
 && groupadd --gid 10001 swarmvm \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin swarmvm \
 && chmod 1777 /run

COPY bin/swarmvm /usr/local/bin/swarmvm
# NET_MODE=tap only: a copy that carries CAP_NET_ADMIN as a file capability
# makes the TAP. It can gain the capability only where the container's
# bounding set has it (cap_add NET_ADMIN); the runner and QEMU never do.
RUN install -D -m 0755 /usr/local/bin/swarmvm /usr/local/libexec/swarmvm/netadmin \
 && setcap cap_net_admin+ep /usr/local/libexec/swarmvm/netadmin

# Writable places: the storage volume (bind mount) and a tmpfs at /run.
# Docker gives a tmpfs the mode of the image's folder it covers (and ignores
# a mode option), so /run is made sticky and world-writable like /tmp; the
# runner creates RUN_DIR inside it, 0700.
USER 10001:10001
ENV STORAGE_DIR=/var/lib/poc-qemu RUN_DIR=/run/vm
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["swarmvm", "health", "--liveness", "--json"]
ENTRYPOINT ["swarmvm", "run"]
