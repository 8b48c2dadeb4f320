package broker

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// network is what the broker does to the host's network. The netlink
// implementation is the only one; the interface marks the seam.
type network interface {
	createTAP(name, bridge string, mac net.HardwareAddr) (*os.File, tapState, error)
	deleteTAP(st tapState, name string)
	deleteOrphan(name string)
	orphans() ([]string, error)
}

// TAPName is the stable TAP name for a VM of a uid: the prefix and eight
// hex digits of a hash of both, within IFNAMSIZ. With the uid in it, no
// other uid can take a VM's TAP name first.
func TAPName(prefix string, uid int, vm string) string {
	h := sha256.Sum256([]byte(fmt.Sprintf("swarmvm-tap/%d/%s", uid, vm)))
	return fmt.Sprintf("%s%x", prefix, h[:4])
}

type netlinkNetwork struct{ prefix string }

// tapState is what a TAP looked like when the broker made it: its index,
// its own MAC, and the tun settings its descriptor can change (owner,
// group, persistence). A holder of the descriptor can change the MAC
// without any capability; the broker ends the lease when any of these
// changes. (Link flags are not compared: carrier comes and goes as QEMU
// attaches, and events from the TAP's own setup arrive late.)
type tapState struct {
	index        int
	mac          net.HardwareAddr
	owner, group uint32
	persist      bool
	// The indexes of the TAP's own bridge and of the veth's inner end:
	// they go with the lease, whether or not the TAP went first (with
	// QEMU's last descriptor), and never another lease's of that name.
	bridgeIndex, innerIndex int
}

func stateOf(l netlink.Link) tapState {
	st := tapState{index: l.Attrs().Index, mac: l.Attrs().HardwareAddr}
	if t, ok := l.(*netlink.Tuntap); ok {
		st.owner, st.group, st.persist = t.Owner, t.Group, !t.NonPersist
	}
	return st
}

// A leased TAP is not a port of the allowed bridge: its holder can set its
// MAC (no capability needed), and a bridge port that takes a MAC the bridge
// has learned on another port deletes that entry and keeps the MAC as its
// own: on a shared bridge a tenant could take the gateway's traffic, each
// time for as long as the broker takes to end its lease. So each TAP sits
// on a bridge of its own, joined to the allowed bridge by a veth pair whose
// ends only the broker holds: a changed TAP changes only its own bridge.
// On the shared bridge the VM's port is the veth's outer end: locked to the
// VM's MAC, learning nothing, and given no flooded unicast (a VM is reached
// by its static entry), so no VM gets another's unicast when an entry is
// missing. The names: the TAP's, and with b (its bridge), i and o (the
// veth's ends) after it.
func companions(tap string) (br, inner, outer string) { return tap + "b", tap + "i", tap + "o" }

// createTAP makes a non-persistent TAP (the kernel removes it when the last
// descriptor closes, even if the broker is gone) on a bridge of its own,
// joined to the allowed bridge as a locked port that forwards only frames
// from the VM's own MAC, and brings them up. It returns the broker's
// descriptor for the TAP and its state.
func (n netlinkNetwork) createTAP(name, bridge string, mac net.HardwareAddr) (*os.File, tapState, error) {
	var st tapState
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return nil, st, fmt.Errorf("bridge %q does not exist on this node", bridge)
	}
	if br.Type() != "bridge" {
		return nil, st, fmt.Errorf("%q is a %s, not a bridge", bridge, br.Type())
	}
	if err := pinMAC(br); err != nil {
		return nil, st, fmt.Errorf("bridge %s: %w", bridge, err)
	}
	if _, err := netlink.LinkByName(name); err == nil {
		return nil, st, fmt.Errorf("tap %s already exists: another VM of this name holds it on this node", name)
	}
	// Without its TAP (the kernel removed it with QEMU's last descriptor),
	// a bridge and veth of this name are left from an earlier lease.
	n.deleteCompanions(name)
	f, st, err := n.makeLinks(name, br, mac)
	if err != nil {
		n.deleteCompanions(name)
		return nil, st, fmt.Errorf("setting up tap %s: %w", name, err)
	}
	return f, st, nil
}

// makeLinks makes the TAP's bridge, the veth pair and the TAP, locks the
// ports, and brings them up; on error the caller removes what was made.
func (n netlinkNetwork) makeLinks(name string, shared netlink.Link, mac net.HardwareAddr) (*os.File, tapState, error) {
	var st tapState
	own, inner, outer := companions(name)
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: own}}); err != nil {
		return nil, st, fmt.Errorf("its bridge: %w", err)
	}
	ownBr, err := netlink.LinkByName(own)
	if err == nil {
		err = pinMAC(ownBr)
	}
	if err == nil {
		err = netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: inner, MasterIndex: ownBr.Attrs().Index}, PeerName: outer})
	}
	if err != nil {
		return nil, st, fmt.Errorf("its bridge and veth: %w", err)
	}
	t := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name, MasterIndex: ownBr.Attrs().Index},
		Mode:      netlink.TUNTAP_MODE_TAP,
		// Multi-queue (with one queue) because only then does the kernel
		// report how many queues are attached, which tells a running VM's
		// TAP from an orphan's.
		Flags:      netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_MULTI_QUEUE,
		Queues:     1,
		NonPersist: true,
	}
	if err := netlink.LinkAdd(t); err != nil {
		return nil, st, fmt.Errorf("creating tap %s: %w", name, err)
	}
	fail := func(err error) (*os.File, tapState, error) {
		fdsClose(t.Fds) // the last descriptor: the kernel removes the TAP
		return nil, st, err
	}
	out, err := netlink.LinkByName(outer)
	if err == nil {
		err = netlink.LinkSetMaster(out, shared)
	}
	if err == nil {
		err = lockPort(out, mac, false)
	}
	l, lerr := netlink.LinkByName(name)
	if err == nil && lerr == nil {
		err = lockPort(l, mac, true)
	} else if err == nil {
		err = lerr
	}
	for _, up := range []string{own, inner, outer, name} {
		if err != nil {
			break
		}
		if ul, e := netlink.LinkByName(up); e != nil {
			err = e
		} else {
			err = netlink.LinkSetUp(ul)
		}
	}
	if err == nil {
		l, err = netlink.LinkByIndex(l.Attrs().Index)
	}
	var in netlink.Link
	if err == nil {
		in, err = netlink.LinkByName(inner)
	}
	if err != nil {
		return fail(err)
	}
	st = stateOf(l)
	st.bridgeIndex, st.innerIndex = ownBr.Attrs().Index, in.Attrs().Index
	return t.Fds[0], st, nil
}

// pinMAC gives a bridge its own MAC explicitly, once: a bridge whose MAC
// was never set takes the lowest of its ports', and a TAP's holder can set
// its TAP's MAC to anything, and so move the bridge's (or take the
// gateway's). Set, the bridge keeps it.
func pinMAC(br netlink.Link) error {
	b, err := os.ReadFile("/sys/class/net/" + br.Attrs().Name + "/addr_assign_type")
	if err == nil && strings.TrimSpace(string(b)) == "3" { // NET_ADDR_SET
		return nil
	}
	return netlink.LinkSetHardwareAddr(br, br.Attrs().HardwareAddr)
}

// lockPort makes a VM's port one that learns nothing and forwards only
// frames whose source is the VM's own MAC (a static FDB entry on a locked
// port): a guest cannot send as another VM or as the gateway. Unless
// flood, it gets no unicast the bridge floods for want of an entry.
func lockPort(l netlink.Link, mac net.HardwareAddr, flood bool) error {
	if err := netlink.LinkSetLearning(l, false); err != nil {
		return fmt.Errorf("learning off: %w", err)
	}
	if err := netlink.LinkSetFlood(l, flood); err != nil {
		return fmt.Errorf("unicast flooding: %w", err)
	}
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_BRIDGE)
	msg.Index = int32(l.Attrs().Index)
	req.AddData(msg)
	attr := nl.NewRtAttr(unix.IFLA_PROTINFO|unix.NLA_F_NESTED, nil)
	attr.AddRtAttr(nl.IFLA_BRPORT_LOCKED, []byte{1})
	req.AddData(attr)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("locking the bridge port (kernel 5.18 or later): %w", err)
	}
	return netlink.NeighAppend(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_BRIDGE,
		State: netlink.NUD_NOARP, Flags: netlink.NTF_MASTER, HardwareAddr: mac})
}

func fdsClose(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// deleteTAP removes the TAP, its bridge and its veth this lease made, each
// by its index while it still has its name: the TAP may be gone already
// (QEMU's last descriptor closed), and the devices another lease made under
// these names since are not touched.
func (n netlinkNetwork) deleteTAP(st tapState, name string) {
	own, inner, _ := companions(name)
	for _, d := range []struct {
		index int
		name  string
	}{{st.index, name}, {st.innerIndex, inner}, {st.bridgeIndex, own}} {
		if l, err := netlink.LinkByIndex(d.index); d.index != 0 && err == nil && l.Attrs().Name == d.name {
			netlink.LinkDel(l) // a veth goes with both its ends
		}
	}
}

// deleteCompanions removes a TAP's bridge and veth pair, by name and kind.
func (n netlinkNetwork) deleteCompanions(name string) {
	own, inner, _ := companions(name)
	for _, c := range []struct{ name, kind string }{{inner, "veth"}, {own, "bridge"}} {
		if l, err := netlink.LinkByName(c.name); err == nil && l.Type() == c.kind {
			netlink.LinkDel(l) // a veth goes with both its ends
		}
	}
}

// deleteOrphan removes a TAP left by a VM that is gone, found by name, and
// its companions (or companions left without a TAP).
func (n netlinkNetwork) deleteOrphan(name string) {
	if l, err := netlink.LinkByName(name); err == nil && l.Type() == "tuntap" {
		netlink.LinkDel(l)
	}
	n.deleteCompanions(name)
}

// orphans lists this broker's TAPs (by prefix) that no process holds: left
// by a VM that is gone. The broker's own TAPs are multi-queue, and the
// kernel reports their attached queues; for a single-queue TAP of the
// prefix, made by other hands, the lack of a carrier (no reader) stands in.
func (n netlinkNetwork) orphans() ([]string, error) {
	taps, err := prefixTAPs(n.prefix)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, t := range taps {
		held := t.Queues > 0
		if t.Flags&netlink.TUNTAP_MULTI_QUEUE == 0 {
			held = t.RawFlags&unix.IFF_LOWER_UP != 0
		}
		if !held {
			out = append(out, t.Name)
		}
	}
	// A TAP's bridge and veth stay when the kernel removes the TAP with its
	// last descriptor while no broker runs: they are orphans too.
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		name := l.Attrs().Name
		if len(name) != len(n.prefix)+9 || !strings.HasPrefix(name, n.prefix) {
			continue
		}
		tap, kind := name[:len(name)-1], name[len(name)-1:]
		if (kind == "b" && l.Type() == "bridge" || kind == "i" && l.Type() == "veth") && !contains(taps, tap) {
			out = append(out, tap)
		}
	}
	return out, nil
}

func contains(taps []*netlink.Tuntap, name string) bool {
	for _, t := range taps {
		if t.Name == name {
			return true
		}
	}
	return false
}

// prefixTAPs lists the node's TAPs whose names start with prefix.
func prefixTAPs(prefix string) ([]*netlink.Tuntap, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	var out []*netlink.Tuntap
	for _, l := range links {
		if t, ok := l.(*netlink.Tuntap); ok && strings.HasPrefix(t.Name, prefix) && t.Mode == netlink.TUNTAP_MODE_TAP {
			out = append(out, t)
		}
	}
	return out, nil
}

// TAPs names the TAPs of the broker's prefix on this node, held or not.
func (b *Broker) TAPs() ([]string, error) {
	taps, err := prefixTAPs(b.cfg.TAPPrefix)
	var names []string
	for _, t := range taps {
		names = append(names, t.Name)
	}
	return names, err
}

// CleanOrphans removes TAPs left by VMs that are gone, and says which.
func (b *Broker) CleanOrphans() ([]string, error) {
	names, err := b.net.orphans()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	for _, name := range names {
		b.net.deleteOrphan(name)
		b.audit.Info("broker", "what", "tap", "result", "orphan-removed", "detail", "tap "+name+" had no VM attached")
	}
	return names, nil
}

var errAnotherBroker = errors.New("another broker is listening on this socket")
