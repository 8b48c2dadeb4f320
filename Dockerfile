# The swarmvm VM runner: QEMU 10 (needed to take KVM as a descriptor) on
# Debian trixie, run as an unprivileged user with a read-only root. The
# binary is built outside (make image) and copied in.
FROM debian:trixie-slim

# noVNC's files (the web console's viewer) come out of Debian's novnc
# package, unpacked without installing it: its dependencies (nodejs,
# websockify, python) are not needed, the runner serves the files and
# bridges the websocket itself.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      qemu-system-x86 qemu-utils ovmf seabios ipxe-qemu iproute2 libcap2-bin \
 && cd /tmp && apt-get download novnc \
 && dpkg-deb -x novnc_*.deb /tmp/novnc && mv /tmp/novnc/usr/share/novnc /usr/share/novnc \
 && test -f /usr/share/novnc/vnc.html && rm -rf /tmp/novnc /tmp/novnc_*.deb \
 && rm -rf /var/lib/apt/lists/* \
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
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["swarmvm", "health", "--liveness"]
ENTRYPOINT ["swarmvm", "run"]
