package broker

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// network is what the broker does to the host's network. The netlink
// implementation is the only one; the interface marks the seam.
type network interface {
	createTAP(name, bridge string) (*os.File, int, error)
	deleteTAP(index int, name string)
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

// createTAP makes a non-persistent TAP (the kernel removes it when the last
// descriptor closes, even if the broker is gone), attaches it to the bridge
// and brings it up. It returns the broker's descriptor for it and its
// interface index.
func (n netlinkNetwork) createTAP(name, bridge string) (*os.File, int, error) {
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return nil, 0, fmt.Errorf("bridge %q does not exist on this node", bridge)
	}
	if br.Type() != "bridge" {
		return nil, 0, fmt.Errorf("%q is a %s, not a bridge", bridge, br.Type())
	}
	if _, err := netlink.LinkByName(name); err == nil {
		return nil, 0, fmt.Errorf("tap %s already exists: another VM of this name holds it on this node", name)
	}
	t := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name, MasterIndex: br.Attrs().Index},
		Mode:      netlink.TUNTAP_MODE_TAP,
		// Multi-queue (with one queue) because only then does the kernel
		// report how many queues are attached, which tells a running VM's
		// TAP from an orphan's.
		Flags:      netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_MULTI_QUEUE,
		Queues:     1,
		NonPersist: true,
	}
	if err := netlink.LinkAdd(t); err != nil {
		return nil, 0, fmt.Errorf("creating tap %s: %w", name, err)
	}
	l, err := netlink.LinkByName(name)
	if err == nil {
		err = netlink.LinkSetUp(l)
	}
	if err != nil {
		fdsClose(t.Fds) // the last descriptor: the kernel removes the TAP
		return nil, 0, fmt.Errorf("bringing tap %s up: %w", name, err)
	}
	return t.Fds[0], l.Attrs().Index, nil
}

func fdsClose(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// deleteTAP removes the TAP with this index if it is still the one of this
// name: a device another lease made under the name since is not touched.
func (n netlinkNetwork) deleteTAP(index int, name string) {
	if l, err := netlink.LinkByIndex(index); err == nil && l.Attrs().Name == name {
		netlink.LinkDel(l)
	}
}

// deleteOrphan removes a TAP left by a VM that is gone, found by name.
func (n netlinkNetwork) deleteOrphan(name string) {
	if l, err := netlink.LinkByName(name); err == nil {
		netlink.LinkDel(l)
	}
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
	return out, nil
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
