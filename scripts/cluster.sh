#!/usr/bin/env bash
# A Swarm of three Docker engines on this one machine, for the cluster tests.
#
# Each node is an engine with its own network namespace (svmc-nN, address
# 10.231.0.1N on a bridge in the switch namespace svmc-sw), its own mount and
# UTS namespace (hostname svmc-nN; the node's storage folder bind-mounted over
# /var/lib/poc-qemu, so each node has local storage; one folder every node
# sees at /var/lib/poc-qemu-shared, for storage_mode: shared; the node's
# broker folder over /run/swarmvm), its own data-root, exec-root, socket,
# pidfile, cgroup parent and containerd namespace, and a broker of its own.
# Node 1 is the manager and runs Debian trixie's engine (26.x, API 1.45);
# the others run this machine's (bookworm's 20.10, API 1.41): a Swarm in the
# middle of a rolling upgrade. The runner image comes from the local engine
# by docker save | docker load (there is no registry). Traffic stays between
# the namespaces made here.
#
#   cluster.sh up [--managers 1|3]   bring it up (idempotent; --managers 3 promotes the workers)
#   cluster.sh down                  remove every daemon, namespace, mount and folder it made
#   cluster.sh status                one line a node
#   cluster.sh kill N                node N lost: its engine, containers and broker killed
#   cluster.sh start N               node N's engine and broker started again (same data)
#   cluster.sh cut N | heal N        node N's link down or up (the node keeps running)
#   cluster.sh host N                print DOCKER_HOST for node N
. "$(dirname "$0")/lib.sh"
ROOT=$(repo_root)

NODES=3
STATE=/var/lib/swarmvm-cluster
RUNS=/run/swarmvm-cluster
NET=10.231.0
POOL=10.232.0.0/16
IMAGE=${SWARMVM_IMAGE:-swarmvm/runner:dev}
ENGINE26=${ENGINE26:-$ROOT/.cache/engine-26}
CG=/sys/fs/cgroup/pids
BIN=$ROOT/bin/swarmvm

host() { echo "unix://$RUNS/n$1/docker.sock"; }
dk() { local n=$1; shift; docker -H "$(host "$n")" "$@"; }
addr() { echo "$NET.1$1"; }

# engine26 fetches Debian trixie's docker.io and containerd once into
# $ENGINE26 (git-ignored), with an apt state of its own: the host's apt
# sources and packages are not touched. The host's runc and tini serve both
# engines.
engine26() {
	[ -x "$ENGINE26/root/usr/sbin/dockerd" ] && return 0
	local apt=$ENGINE26/apt mirror
	mirror=$(debian_mirror)
	rm -rf "$ENGINE26" && mkdir -p "$apt"/{lists/partial,cache/archives/partial,dl} "$ENGINE26/root"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$apt/sources.list"
	touch "$apt/status"
	local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o "Dir::State::Status=$apt/status"
		-o APT::Sandbox::User=root)
	log "fetching Debian trixie's docker.io and containerd (engine 26.x for node 1)"
	apt-get "${o[@]}" update -q >/dev/null || die "apt-get update (trixie) failed"
	(cd "$apt/dl" && apt-get "${o[@]}" download docker.io containerd >/dev/null) || die "apt-get download (trixie) failed"
	for d in "$apt"/dl/*.deb; do dpkg-deb -x "$d" "$ENGINE26/root"; done
	rm -f "$ENGINE26/root/usr/bin/docker-init" # a link to tini-static, not in these packages
	rm -rf "$apt"
	"$ENGINE26/root/usr/sbin/dockerd" --version >&2 || die "trixie's dockerd does not run here"
}

network() {
	ip netns add svmc-sw
	ip -n svmc-sw link add br0 type bridge
	ip -n svmc-sw addr add "$NET.1/24" dev br0
	ip -n svmc-sw link set br0 up
	ip -n svmc-sw link set lo up
	for n in $(seq 1 $NODES); do
		ip netns add "svmc-n$n"
		ip -n "svmc-n$n" link add eth0 type veth peer name "sw-n$n" netns svmc-sw
		ip -n svmc-sw link set "sw-n$n" master br0 up
		ip -n "svmc-n$n" addr add "$(addr "$n")/24" dev eth0
		ip -n "svmc-n$n" link set eth0 up
		ip -n "svmc-n$n" link set lo up
		ip -n "svmc-n$n" route add default via "$NET.1"
	done
}

# start runs node n's engine and broker in the node's namespaces (its own
# sysfs, so that the engine sees its own interfaces), in the
# cgroup svmc-nN/daemon (containers go below svmc-nN too, through the
# engine's cgroup parent), so that kill finds every process of the node.
start() {
	local n=$1 d=$STATE/n$1 r=$RUNS/n$1 path=$PATH
	[ "$n" = 1 ] && path=$ENGINE26/root/usr/sbin:$ENGINE26/root/usr/bin:$PATH
	mkdir -p "$d/docker" "$r/exec" "$r/broker" "$CG/svmc-n$n/daemon"
	# Names resolve to nothing outside: the switch answers no DNS, so no
	# lookup leaves the namespaces made here.
	echo "nameserver $NET.1" >"$d/resolv.conf"
	(
		echo "$BASHPID" >"$CG/svmc-n$n/daemon/cgroup.procs"
		export PATH=$path
		# No registry: tasks use the image each node has, without trying a pull.
		export DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1
		exec nsenter --net="/run/netns/svmc-n$n" unshare --mount --uts --propagation private sh -ec '
			hostname "svmc-n$1"
			mount -t sysfs sysfs /sys
			echo "$6" | while read -r mp type opts; do
				mkdir -p "$mp" && mount -t "$type" -o "$opts" "$type" "$mp"
			done
			mount --bind "$2/storage" /var/lib/poc-qemu
			mount --bind "$4" /var/lib/poc-qemu-shared
			mount --bind "$3/broker" /run/swarmvm
			mount --bind "$2/resolv.conf" /etc/resolv.conf
			setsid "$5" broker --socket /run/swarmvm/broker.sock --audit-log "$2/broker-audit.log" >>"$2/broker.log" 2>&1 &
			exec dockerd --data-root "$2/docker" --exec-root "$3/exec" -H "unix://$3/docker.sock" \
				--pidfile "$3/docker.pid" --cgroup-parent "svmc-n$1" \
				--containerd-namespace "svmc-n$1" --containerd-plugins-namespace "svmc-n$1-plugins"
		' sh "$n" "$d" "$r" "$STATE/shared" "$BIN" "$(cgroupmounts)"
	) >>"$d/dockerd.log" 2>&1 &
	local engine=$! attempt=${START_ATTEMPT:-1}
	for _ in $(seq 1 120); do
		dk "$n" version >/dev/null 2>&1 && return 0
		# On a loaded machine dockerd can give up on its containerd
		# ("timeout waiting for containerd to start") and exit, leaving
		# that containerd running: the next dockerd would only wait for
		# it again ("containerd is still running"). So what the attempt
		# left (containerd, the broker) goes, and the engine starts
		# afresh, four times at most.
		if ! kill -0 "$engine" 2>/dev/null && [ "$attempt" -lt 5 ]; then
			log "node $n: the engine exited while starting (attempt $attempt): $(tail -n 1 "$d/dockerd.log")"
			killdaemon "$n"
			START_ATTEMPT=$((attempt + 1)) start "$n"
			return
		fi
		sleep 0.5
	done
	tail -n 20 "$d/dockerd.log" >&2
	die "node $n: engine did not answer within 60s"
}

# cgroupmounts lists the host's cgroup mounts: a node remounts them over
# the sysfs of its own network namespace (the engine needs the devices
# cgroup, among others).
cgroupmounts() {
	awk '$3=="cgroup" || $3=="cgroup2" || ($3=="tmpfs" && $2=="/sys/fs/cgroup") {print $2, $3, $4}' /proc/mounts
}

# killdaemon kills what is left in node n's daemon cgroup (an engine's
# failed start: its containerd, the broker).
killdaemon() {
	local procs=$CG/svmc-n$1/daemon/cgroup.procs pids
	for _ in $(seq 1 50); do
		pids=$(cat "$procs" 2>/dev/null) || break
		[ -z "$pids" ] && break
		kill -9 $pids 2>/dev/null || true
		sleep 0.1
	done
	stalepid "$1"
}

# stalepid removes the pidfile of node n's killed containerd. The engine
# trusts any live process with that pid to be its containerd, and on a
# busy machine the pid is soon another process's: the engine then waits
# for a containerd that is not there ("containerd is still running",
# "timeout waiting for containerd to start") on every attempt.
stalepid() {
	rm -f "$RUNS/n$1/exec/containerd/containerd.pid"
}

# killnode kills every process of node n (engine, containerd, shims,
# containers, broker): a node lost. Its mount namespace goes with them.
killnode() {
	local cg=$CG/svmc-n$1
	[ -d "$cg" ] || return 0
	for _ in $(seq 1 50); do
		local pids
		pids=$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
		[ -z "$pids" ] && break
		kill -9 $pids 2>/dev/null || true
		sleep 0.1
	done
	# Every hierarchy: the engine gave containers cgroups in each.
	find /sys/fs/cgroup/*/svmc-n"$1" -depth -type d -exec rmdir {} \; 2>/dev/null || true
	rm -f "$RUNS/n$1/docker.sock" "$RUNS/n$1/docker.pid" "$RUNS/n$1/broker/broker.sock"
	stalepid "$1"
}

storage() {
	local s=$1
	install -d -o root -g 10001 -m 0750 "$s" "$s/isos"
	install -d -o root -g 10001 -m 1770 "$s/images" "$s/logs"
}

# loadimage gives every node the local engine's runner image, where it has
# another one (or none).
loadimage() {
	local tar=$STATE/image.tar id n
	id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null) || die "$IMAGE is not in the local engine: make image"
	for n in $(seq 1 $NODES); do
		[ "$(dk "$n" image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null)" = "$id" ] && continue
		[ -f "$tar" ] || docker save "$IMAGE" -o "$tar"
		dk "$n" load -q -i "$tar" >/dev/null || die "node $n: docker load failed"
	done
	rm -f "$tar"
}

swarm() {
	local managers=$1 tok
	dk 1 swarm init --advertise-addr "$(addr 1):2377" --listen-addr "$(addr 1):2377" --default-addr-pool "$POOL" >/dev/null
	for n in $(seq 2 $NODES); do
		tok=$(dk 1 swarm join-token -q worker)
		[ "$n" -le "$managers" ] && tok=$(dk 1 swarm join-token -q manager)
		dk "$n" swarm join --token "$tok" --advertise-addr "$(addr "$n"):2377" --listen-addr "$(addr "$n"):2377" "$(addr 1):2377" >/dev/null
	done
}

# healthy: the namespaces are there, every engine answers, and within a
# minute every node is ready (a node just demoted or restarted re-registers).
healthy() {
	[ -d /run/netns ] && [ -e /run/netns/svmc-sw ] || return 1
	for n in $(seq 1 $NODES); do dk "$n" version >/dev/null 2>&1 || return 1; done
	for _ in $(seq 1 60); do
		[ "$(dk 1 node ls --format '{{.Status}}' 2>/dev/null | grep -c Ready)" = "$NODES" ] && return 0
		sleep 1
	done
	return 1
}

up() {
	local managers=1
	[ "${1:-}" = --managers ] && managers=$2
	[ -x "$BIN" ] || die "$BIN missing: make build"
	if ! healthy; then
		down
		engine26
		network
		mkdir -p "$STATE/shared" /var/lib/poc-qemu /var/lib/poc-qemu-shared /run/swarmvm
		storage "$STATE/shared"
		for n in $(seq 1 $NODES); do
			storage "$STATE/n$n/storage"
			start "$n"
		done
		swarm "$managers"
	fi
	loadimage
	if [ "$managers" -gt 1 ]; then
		for n in $(seq 2 "$managers"); do dk 1 node promote "svmc-n$n" >/dev/null; done
		# A promotion is done when the node is a raft member: until then
		# losing node 1 would lose the quorum.
		for _ in $(seq 1 240); do
			[ "$(dk 1 node ls --filter role=manager --format '{{.ManagerStatus}}' | grep -cE 'Leader|Reachable')" -ge "$managers" ] && break
			sleep 0.5
		done
	fi
	status
}

down() {
	for n in $(seq 1 $NODES); do killnode "$n"; done
	for ns in svmc-sw $(seq -f 'svmc-n%g' 1 $NODES); do
		[ -e "/run/netns/$ns" ] && ip netns del "$ns"
	done
	rm -rf "$STATE" "$RUNS"
	rmdir /var/lib/poc-qemu-shared 2>/dev/null || true
	leftovers
}

# leftovers fails when anything the cluster made is still there.
leftovers() {
	local left=()
	ip netns list | grep -q '^svmc-' && left+=("namespaces: $(ip netns list | grep '^svmc-' | tr '\n' ' ')")
	grep -q swarmvm-cluster /proc/mounts && left+=("mounts: $(grep swarmvm-cluster /proc/mounts | cut -d' ' -f2 | tr '\n' ' ')")
	pgrep -f "$RUNS/" >/dev/null && left+=("processes: $(pgrep -f "$RUNS/" | tr '\n' ' ')")
	ls -d /sys/fs/cgroup/*/svmc-* >/dev/null 2>&1 && left+=("cgroups: $(ls -d /sys/fs/cgroup/*/svmc-* | tr '\n' ' ')")
	[ -e "$STATE" ] && left+=("folder $STATE")
	[ ${#left[@]} -eq 0 ] || die "cluster.sh down left: ${left[*]}"
}

status() {
	for n in $(seq 1 $NODES); do
		local v
		v=$(dk "$n" version --format '{{.Server.Version}} API {{.Server.APIVersion}}' 2>/dev/null || echo down)
		echo "svmc-n$n $(addr "$n") $(host "$n") engine $v"
	done
	dk 1 node ls --format '{{.Hostname}} {{.Status}} {{.Availability}} {{.ManagerStatus}}' 2>/dev/null || true
}

case "${1:-}" in
up) shift; up "$@" ;;
down) down ;;
status) status ;;
kill) killnode "$2" ;;
start) start "$2" ;;
cut) ip -n svmc-sw link set "sw-n$2" down ;;
heal) ip -n svmc-sw link set "sw-n$2" up ;;
host) host "$2" ;;
*) die "usage: cluster.sh up [--managers 1|3] | down | status | kill N | start N | cut N | heal N | host N" ;;
esac
