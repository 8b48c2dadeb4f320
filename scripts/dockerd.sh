#!/usr/bin/env bash
# Starts dockerd when no Docker engine answers, and waits until one does.
. "$(dirname "$0")/lib.sh"

if docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
	log "docker engine answers: $(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}')"
	exit 0
fi
command -v dockerd >/dev/null || die "dockerd not installed: run scripts/install.sh"
log "starting dockerd (log: /var/log/swarmvm-dockerd.log)"
nohup dockerd >/var/log/swarmvm-dockerd.log 2>&1 &
for _ in $(seq 1 60); do
	if docker version >/dev/null 2>&1; then
		log "docker engine up: $(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}')"
		exit 0
	fi
	sleep 1
done
tail -n 20 /var/log/swarmvm-dockerd.log >&2 || true
die "dockerd did not answer within 60s"
