package config

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Networking modes.
const (
	NetUser   = "user"   // QEMU user-mode networking; PORTS forwarded from the container
	NetBridge = "bridge" // a TAP on a host bridge, from the broker
	NetTAP    = "tap"    // a TAP made in the container from TUN_DEVICE (CAP_NET_ADMIN)
	NetNone   = "none"
)

// netModes is what each networking mode gives QEMU (its -netdev type) and
// asks of the container (the capabilities it adds): the one place either
// is said.
var netModes = map[string]struct {
	backend string
	capAdd  []string
}{
	NetUser:   {backend: "user"},
	NetBridge: {backend: "tap"}, // the broker's TAP: the container needs nothing
	NetTAP:    {backend: "tap", capAdd: []string{"NET_ADMIN"}},
	NetNone:   {backend: "none"},
}

// NetModes are the networking modes' names, for messages.
const NetModes = "user, bridge, tap, none"

// ValidNetMode says whether mode is one of NetModes.
func ValidNetMode(mode string) bool { _, ok := netModes[mode]; return ok }

// NetBackend is QEMU's -netdev type for mode: user, tap or none.
func NetBackend(mode string) string { return netModes[mode].backend }

// NetCapAdd are the capabilities a container in mode needs added: in tap
// mode, NET_ADMIN in the bounding set, for the image's helper that makes
// the TAP (the runner and QEMU never hold it); in every other, none.
func NetCapAdd(mode string) []string { return netModes[mode].capAdd }

// Port forwards a container port to a guest port (user mode).
type Port struct {
	Host  int    // port on the container's interfaces (and the service's published port)
	Guest int    // port in the guest
	Proto string // tcp or udp
}

func (p Port) String() string {
	if p.Host == p.Guest {
		return fmt.Sprintf("%d/%s", p.Host, p.Proto)
	}
	return fmt.Sprintf("%d:%d/%s", p.Host, p.Guest, p.Proto)
}

// ParsePorts reads PORTS: comma-separated entries PORT or HOST:GUEST, each
// with an optional /tcp or /udp (tcp by default). Every problem is reported.
func ParsePorts(s string) ([]Port, error) {
	var out []Port
	var problems []string
	seen := map[string]bool{}
	for _, e := range strings.Split(s, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		p, err := parsePort(e)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		key := fmt.Sprintf("%d/%s", p.Host, p.Proto)
		if seen[key] {
			problems = append(problems, fmt.Sprintf("%q: port %s is given twice", e, key))
			continue
		}
		seen[key] = true
		out = append(out, p)
	}
	if len(problems) > 0 {
		return out, fmt.Errorf("%s", strings.Join(problems, "; "))
	}
	return out, nil
}

func parsePort(e string) (Port, error) {
	spec, proto, hasProto := strings.Cut(e, "/")
	p := Port{Proto: "tcp"}
	if hasProto {
		p.Proto = strings.ToLower(proto)
		if p.Proto != "tcp" && p.Proto != "udp" {
			return p, fmt.Errorf("%q: protocol %q is not tcp or udp", e, proto)
		}
	}
	host, guest, mapped := strings.Cut(spec, ":")
	if !mapped {
		guest = host
	}
	var err error
	if p.Host, err = portNumber(host); err != nil {
		return p, fmt.Errorf("%q: %v", e, err)
	}
	if p.Guest, err = portNumber(guest); err != nil {
		return p, fmt.Errorf("%q: %v", e, err)
	}
	return p, nil
}

func portNumber(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %q is outside 1–65535", s)
	}
	return n, nil
}

func (c *Config) checkNet() {
	switch c.NetMode {
	case NetUser, NetNone:
	case NetBridge:
		if !ValidIfName(c.NetBridge) {
			c.problem("NET_BRIDGE", "%q is not a bridge name", "name the host bridge the VM joins, e.g. NET_BRIDGE=br0 (allowed by the broker's --bridge)", c.NetBridge)
		}
	case NetTAP:
		if c.TUNDevice == "" {
			c.problem("TUN_DEVICE", "is not set but NET_MODE=tap", "set TUN_DEVICE=/dev/net/tun and mount it, or use NET_MODE=user or bridge")
		}
		if !ValidIfName(c.TAPName) {
			c.problem("TAP_NAME", "%q is not an interface name", "use at most 15 letters, digits, '-', '_' or '.'", c.TAPName)
		}
		if _, _, err := net.ParseCIDR(c.TAPAddr); err != nil {
			c.problem("TAP_ADDR", "%q is not an address with a prefix length", "write e.g. 10.0.3.1/24", c.TAPAddr)
		}
	default:
		c.problem("NET_MODE", "%q is not one of "+NetModes, "pick one of those", c.NetMode)
	}
	if len(c.Ports) > 0 && c.NetMode != NetUser {
		c.problem("PORTS", "is set but NET_MODE=%s forwards no ports", "unset PORTS, or use NET_MODE=user", c.NetMode)
	}
}
