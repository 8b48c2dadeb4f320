package preflight

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"github.com/swarmvm/swarmvm/internal/tapdev"
)

// TAPHelper is the copy of swarmvm that carries the file capability
// cap_net_admin+ep in the runner image: it makes the TAP for NET_MODE=tap,
// so that the runner itself never holds the capability.
const TAPHelper = "/usr/local/libexec/swarmvm/netadmin"

// TAPInContainer makes the TAP name in the container's network namespace
// (through the helper) and attaches to it for QEMU.
func TAPInContainer(ctx context.Context, helper, tun, name, addr string) (*os.File, Finding) {
	const fname, symptom = "network", "VM network unavailable"
	f, err := os.OpenFile(tun, os.O_RDWR, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fail(fname, ClassNet, symptom, "TUN_DEVICE "+tun+" is missing in this container",
			"mount it: --device /dev/net/tun (docker run), or a bind mount of /dev/net/tun (swarmvm render/deploy add it for net: tap)")
	case errors.Is(err, syscall.EPERM):
		return nil, fail(fname, ClassNet, symptom, "the device cgroup denies opening "+tun, "give the container the TUN device (--device /dev/net/tun)")
	case errors.Is(err, syscall.EACCES):
		detail := ""
		if fi, serr := os.Stat(tun); serr == nil {
			detail = " (" + owner(fi) + ")"
		}
		return nil, fail(fname, ClassNet, symptom, fmt.Sprintf("%s may not open %s%s", who(), tun, detail),
			"on the node: chmod 0666 /dev/net/tun (Debian's default; opening it grants nothing without CAP_NET_ADMIN)")
	case err != nil:
		return nil, fail(fname, ClassNet, symptom, fmt.Sprintf("opening %s: %v (%s)", tun, err, who()), "make "+tun+" readable and writable by the container user")
	}
	f.Close()
	if !tapdev.Exists(name) {
		if finding, ok := runHelper(ctx, helper, tun, name, addr); !ok {
			return nil, finding
		}
	}
	tap, err := tapdev.Attach(tun, name)
	if err != nil {
		return nil, fail(fname, ClassNet, symptom, err.Error(), "remove the stale interface "+name+" or set TAP_NAME to another name")
	}
	return tap, pass(fname, ClassNet, "tap %s made in the container (%s), descriptor for QEMU; QEMU itself holds no capability", name, addr)
}

func runHelper(ctx context.Context, helper, tun, name, addr string) (Finding, bool) {
	const fname, symptom = "network", "VM network unavailable"
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, helper, "tap-create", "--tun", tun, "--name", name, "--addr", addr,
		"--uid", strconv.Itoa(os.Geteuid()), "--gid", strconv.Itoa(os.Getegid()))
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err == nil {
		return Finding{}, true
	}
	msg := strings.TrimSpace(stderr.String())
	if errors.Is(err, syscall.EPERM) || strings.Contains(msg, "operation not permitted") {
		return fail(fname, ClassNet, symptom,
			fmt.Sprintf("NET_MODE=tap needs CAP_NET_ADMIN to make the TAP, and this container lacks it (%v %s)", err, msg),
			"add exactly that capability (docker run --cap-add NET_ADMIN; swarmvm render/deploy add it for net: tap) and no no-new-privileges at the container level (it disables the helper's file capability); or use NET_MODE=bridge, which needs none"), false
	}
	return fail(fname, ClassNet, symptom, fmt.Sprintf("making the TAP: %v %s", err, msg), "check TUN_DEVICE and TAP_NAME"), false
}
