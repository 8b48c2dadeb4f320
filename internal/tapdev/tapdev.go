// Package tapdev makes and opens TAP devices in the current network
// namespace through the TUN device, for NET_MODE=tap: a privileged helper
// makes the TAP persistent and owned by the runner's user, and the runner,
// unprivileged, attaches to it and hands the descriptor to QEMU.
package tapdev

import (
	"fmt"
	"net"
	"os"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// flags of the TAPs made here: no packet information, with the virtio-net
// header QEMU uses.
const flags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR

type ifreq struct {
	name  [unix.IFNAMSIZ]byte
	flags uint16
	_     [22]byte
}

func setiff(fd uintptr, name string) error {
	var req ifreq
	copy(req.name[:unix.IFNAMSIZ-1], name)
	req.flags = flags
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.TUNSETIFF, uintptr(unsafe.Pointer(&req)))
	if errno != 0 {
		return errno
	}
	return nil
}

func ioctl(fd, req, arg uintptr) error {
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, arg); errno != 0 {
		return errno
	}
	return nil
}

// Create makes a persistent TAP owned by uid and gid, gives it addr (CIDR)
// and brings it up. It needs CAP_NET_ADMIN in this network namespace.
func Create(tun, name string, uid, gid int, addr string) error {
	f, err := os.OpenFile(tun, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", tun, err)
	}
	defer f.Close()
	fd := f.Fd()
	if err := setiff(fd, name); err != nil {
		return fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	for _, step := range []struct {
		what     string
		req, arg uintptr
	}{{"TUNSETOWNER", unix.TUNSETOWNER, uintptr(uid)}, {"TUNSETGROUP", unix.TUNSETGROUP, uintptr(gid)}, {"TUNSETPERSIST", unix.TUNSETPERSIST, 1}} {
		if err := ioctl(fd, step.req, step.arg); err != nil {
			return fmt.Errorf("%s %s: %w", step.what, name, err)
		}
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	if addr != "" {
		a, err := netlink.ParseAddr(addr)
		if err != nil {
			return fmt.Errorf("TAP_ADDR %q: %w", addr, err)
		}
		if err := netlink.AddrReplace(link, a); err != nil {
			return fmt.Errorf("address %s on %s: %w", addr, name, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// Attach opens the TAP name (made by Create for this user) and clears its
// persistence, so that it goes away when the last descriptor closes: when
// QEMU exits. The caller hands the descriptor to QEMU.
func Attach(tun, name string) (*os.File, error) {
	f, err := os.OpenFile(tun, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", tun, err)
	}
	if err := setiff(f.Fd(), name); err != nil {
		f.Close()
		return nil, fmt.Errorf("attach to %s: %w", name, err)
	}
	if err := ioctl(f.Fd(), unix.TUNSETPERSIST, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("TUNSETPERSIST 0 %s: %w", name, err)
	}
	return f, nil
}

// Exists reports whether an interface of that name is in this namespace.
func Exists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}
