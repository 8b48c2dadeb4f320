package config

import (
	"crypto/sha256"
	"fmt"
	"hash/fnv"
	"regexp"
)

// The runner's user and group in the image (Dockerfile), and the group every
// VM service runs in whatever its own uid: the broker's socket and the
// storage folders are open to this group.
const (
	RunnerUID = 10001
	RunnerGID = 10001
)

// The broker's folder on the host and in a VM's container (the folder is
// bind-mounted, not the socket, so a restarted broker's new socket shows),
// and its socket in that folder.
const (
	BrokerDir           = "/run/swarmvm"
	DefaultBrokerSocket = BrokerDir + "/broker.sock"
)

// VMNameRule says what a VM name may be: it names a Swarm service (a DNS
// label), files, a QEMU guest and a MAC address, so the shortest of those
// limits holds for all.
const VMNameRule = "1 to 63 letters, digits and '-', starting with a letter or digit"

var vmNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9-]{0,62}$`)

// ValidVMName reports whether s follows VMNameRule; the runner, a
// definition and the broker's wire protocol all check names with it.
func ValidVMName(s string) bool { return vmNameRE.MatchString(s) }

// IfNameRule says what a network interface name (a bridge, a TAP) may be.
const IfNameRule = "1 to 15 letters, digits, '-', '_' or '.', starting with a letter or digit"

var ifNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$`)

// ValidIfName reports whether s follows IfNameRule. Linux takes more, but a
// name starting with '-' reads as an option to ip(8), and the broker
// refuses what it does not take here.
func ValidIfName(s string) bool { return ifNameRE.MatchString(s) }

// A VM without a uid gets UIDBase plus a hash of its name below UIDRange:
// stable across nodes and restarts, and away from the uids of a node's own
// users.
const (
	UIDBase  = 10_000_000
	UIDRange = 1_000_000
)

// DefaultUID is the uid a VM without one runs as.
func DefaultUID(name string) int {
	h := fnv.New32a()
	h.Write([]byte("swarmvm/" + name))
	return UIDBase + int(h.Sum32()%UIDRange)
}

// MAC is the MAC address of the VM name runs as uid: the guest's NIC and,
// in bridge mode, the one address its port on the bridge lets through.
// It is bound to the uid, so that a tenant who takes another's VM name
// (anyone may ask the broker for any name) gets a MAC of its own, not the
// other VM's. A VM on its name's default uid keeps the MAC it always had,
// QEMU's 52:54:00 and three bytes of a hash of the name; any other uid
// gets a locally administered MAC of 46 bits of a hash of both, outside
// 52:54:00, which another uid cannot hit by choosing a name.
func MAC(name string, uid int) string {
	if uid == DefaultUID(name) {
		h := sha256.Sum256([]byte("swarmvm/" + name))
		return fmt.Sprintf("52:54:00:%02x:%02x:%02x", h[0], h[1], h[2])
	}
	h := sha256.Sum256([]byte(fmt.Sprintf("swarmvm-mac/%d/%s", uid, name)))
	h[0] = h[0]&^1 | 2 // unicast, locally administered
	if h[0] == 0x52 && h[1] == 0x54 && h[2] == 0 {
		h[2] = 1
	}
	return fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", h[0], h[1], h[2], h[3], h[4], h[5])
}
