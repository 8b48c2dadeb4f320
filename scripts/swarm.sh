#!/usr/bin/env bash
# Makes this engine a single-node Swarm manager unless it is in a swarm
# already. The advertise address is loopback: nothing leaves the machine.
. "$(dirname "$0")/lib.sh"

state=$(docker info --format '{{.Swarm.LocalNodeState}}')
if [ "$state" = active ]; then
	log "swarm active (node $(docker info --format '{{.Swarm.NodeID}}'))"
	exit 0
fi
docker swarm init --advertise-addr 127.0.0.1 >/dev/null
log "swarm initialised: single-node manager on 127.0.0.1"
