package broker

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

// grant is what the broker opened for one request.
type grant struct {
	names []string
	files []*os.File
	tap   *fdpass.TAPInfo
	notes []string
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
	if g.tap != nil {
		n.deleteTAP(g.tap.Name)
	}
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
func (b *Broker) grant(req fdpass.Request) (*grant, error) {
	g := &grant{}
	ok := false
	defer func() {
		if !ok {
			g.release(b.net)
		}
	}()
	if req.KVM {
		f, err := openKVM(b.cfg.KVMDevice)
		if err != nil {
			return nil, err
		}
		g.add(fdpass.FDKVM, f)
	}
	if req.TAP != nil {
		if err := b.grantTAP(g, req); err != nil {
			return nil, err
		}
	}
	ok = true
	return g, nil
}

func (b *Broker) grantTAP(g *grant, req fdpass.Request) error {
	br := req.TAP.Bridge
	if !slices.Contains(b.cfg.Bridges, br) {
		return fmt.Errorf("bridge %q is not allowed by this broker (allowed: %s)", br, strings.Join(b.cfg.Bridges, ", "))
	}
	name := TAPName(b.cfg.TAPPrefix, req.VM)
	f, err := b.net.createTAP(name, br)
	if err != nil {
		return err
	}
	g.tap = &fdpass.TAPInfo{Name: name, Bridge: br, MAC: qemu.MAC(req.VM)}
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

// openKVM opens the KVM device and checks it answers as KVM.
func openKVM(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the KVM device on this node: %v", err)
	}
	v, err := unix.IoctlRetInt(int(f.Fd()), 0xAE00) // KVM_GET_API_VERSION
	if err != nil || v != 12 {
		f.Close()
		return nil, fmt.Errorf("%s does not answer as KVM (API %d, %v)", path, v, err)
	}
	return f, nil
}
