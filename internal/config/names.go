package config

import "regexp"

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
