package broker

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/kvmdev"
)

// grant is what the broker opened for one request.
type grant struct {
	names []string
	files []*os.File
	tap   *fdpass.TAPInfo
	notes []string
	// The TAP this grant made, by interface index (never reused while the
	// node runs): the grant removes that device and no other, whatever
	// took its name since.
	tapIndex int
	tapState tapState
	mac      string // the MAC it holds for its uid, when it made a TAP
	ended    string // why the broker ended the lease, when it did
}

func (g *grant) add(name string, f *os.File) {
	g.names = append(g.names, name)
	g.files = append(g.files, f)
}

// closeFiles closes the broker's copies once they have been sent.
func (g *grant) closeFiles() {
	fdpass.Close(g.files)
	g.files = nil
}

// release undoes what the grant created on the host.
func (g *grant) release(n network) {
	g.closeFiles()
	if g.tapIndex != 0 {
		n.deleteTAP(g.tapState, g.tap.Name)
	}
}

// releaseGrant undoes a grant and lets go of its MAC.
func (b *Broker) releaseGrant(g *grant) {
	g.release(b.net)
	if g.mac == "" {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if o := b.macOwner[g.mac]; o.n <= 1 {
		delete(b.macOwner, g.mac)
	} else {
		o.n--
		b.macOwner[g.mac] = o
	}
}

// claimMAC gives the MAC to uid for a TAP lease, unless another uid holds
// it on this node.
func (b *Broker) claimMAC(mac string, uid int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	o, held := b.macOwner[mac]
	if held && o.uid != uid {
		return fmt.Errorf("MAC %s has a TAP on this node leased to uid %d: a MAC belongs to one uid", mac, o.uid)
	}
	b.macOwner[mac] = macLease{uid: uid, n: o.n + 1}
	return nil
}

func (g *grant) what() string { return strings.Join(g.names, ",") }

func (g *grant) summary() string {
	s := "descriptors " + g.what()
	if g.tap != nil {
		s += fmt.Sprintf("; tap %s on bridge %s", g.tap.Name, g.tap.Bridge)
	}
	if len(g.notes) > 0 {
		s += "; " + strings.Join(g.notes, "; ")
	}
	return s
}

func (g *grant) releaseSummary() string {
	if g.tap != nil {
		return "tap " + g.tap.Name + " removed"
	}
	return "nothing to remove"
}

// grant opens what req asks for; on any failure it closes and removes
// everything it had made and says why.
func (b *Broker) grant(peer fdpass.PeerCred, req fdpass.Request) (*grant, error) {
	g := &grant{}
	ok := false
	defer func() {
		if !ok {
			b.releaseGrant(g)
		}
	}()
	if req.KVM {
		f, err := b.openKVM(b.cfg.KVMDevice)
		if err != nil {
			return nil, err
		}
		g.add(fdpass.FDKVM, f)
	}
	if req.TAP != nil {
		if err := b.grantTAP(g, peer.UID, req); err != nil {
			return nil, err
		}
	}
	ok = true
	return g, nil
}

func (b *Broker) grantTAP(g *grant, uid int, req fdpass.Request) error {
	br := req.TAP.Bridge
	if why := b.bridges.allows(br, uid); why != "" {
		return errors.New(why)
	}
	if err := b.changedWait(uid); err != nil {
		return err
	}
	name := TAPName(b.cfg.TAPPrefix, uid, req.VM)
	mac := config.MAC(req.VM, uid)
	if err := b.claimMAC(mac, uid); err != nil {
		return err
	}
	g.mac = mac
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return err
	}
	f, st, err := b.net.createTAP(name, br, hw)
	if err != nil {
		return err
	}
	g.tapIndex, g.tapState = st.index, st
	g.tap = &fdpass.TAPInfo{Name: name, Bridge: br, MAC: mac}
	g.add(fdpass.FDTAP, f)
	if !req.VhostNet {
		return nil
	}
	v, err := os.OpenFile(b.cfg.VhostNet, os.O_RDWR, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		g.notes = append(g.notes, b.cfg.VhostNet+" is absent on this node: no vhost-net, QEMU moves packets itself")
	case err != nil:
		g.notes = append(g.notes, "vhost-net unavailable: "+err.Error())
	default:
		g.add(fdpass.FDVhostNet, v)
	}
	return nil
}

// openKVM opens the KVM device and proves it works (kvmdev.Probe: the API
// version, and a test VM) before it is granted.
func openKVM(path string) (*os.File, error) { return kvmOpener(nil)(path) }

// kvmOpener is openKVM with another probe (nil: kvmdev.Probe).
func kvmOpener(probe func(*os.File) error) func(string) (*os.File, error) {
	if probe == nil {
		probe = kvmdev.Probe
	}
	return func(path string) (*os.File, error) { return openProbed(path, probe) }
}

func openProbed(path string, probe func(*os.File) error) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the KVM device on this node: %v", err)
	}
	if err := probe(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s does not work as KVM: %v", path, err)
	}
	return f, nil
}
