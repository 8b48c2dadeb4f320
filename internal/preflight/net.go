package preflight

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/swarmvm/swarmvm/internal/fdpass"
)

// BrokerTAP asks the broker for a TAP on bridge (and vhost-net where the
// node has it) for vm. The lease must stay open while the VM runs.
func BrokerTAP(ctx context.Context, socket, vm, bridge string, attempts int) (tap, vhost *os.File, lease *fdpass.Lease, f Finding) {
	const name = "network"
	req := fdpass.Request{VM: vm, TAP: &fdpass.TAPRequest{Bridge: bridge}, VhostNet: true}
	lease, err := ask(ctx, socket, req, attempts)
	if err != nil {
		f = brokerFailure(socket, err)
		f.Name, f.Class, f.Symptom = name, ClassNet, "VM network unavailable"
		var refused *fdpass.RefusedError
		if errors.As(err, &refused) && strings.Contains(refused.Reason, "bridge") {
			f.Fix = fmt.Sprintf("create the bridge on the node and allow it: swarmvm broker --bridge %s; or set NET_BRIDGE to one the broker allows", bridge)
		}
		return nil, nil, nil, f
	}
	tap, vhost = lease.Take(fdpass.FDTAP), lease.Take(fdpass.FDVhostNet)
	if tap == nil {
		lease.Close()
		return nil, nil, nil, fail(name, ClassNet, "VM network unavailable", "the broker granted no TAP", "check the broker's audit log")
	}
	t := lease.Response.TAP
	detail := fmt.Sprintf("tap %s on bridge %s from the broker %s, guest MAC %s", t.Name, t.Bridge, socket, t.MAC)
	if vhost == nil {
		detail += "; no vhost-net (" + strings.Join(lease.Response.Notes, "; ") + ")"
	}
	return tap, vhost, lease, pass(name, ClassNet, "%s", detail)
}

// Ports checks that QEMU, running as this process's user, may listen on
// the forwarded container ports: below net.ipv4.ip_unprivileged_port_start
// only root may, unless the service lowers that (namespaced) sysctl.
func Ports(hostPorts []int) Finding {
	const name = "ports"
	start := 1024
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			start = n
		}
	}
	if os.Geteuid() != 0 {
		for _, p := range hostPorts {
			if p < start {
				return fail(name, ClassConfig, "VM port not reachable",
					fmt.Sprintf("PORTS forwards container port %d, but %s may only listen from port %d up (net.ipv4.ip_unprivileged_port_start)", p, who(), start),
					fmt.Sprintf("map it to a high container port (PORTS=%d:%d), or give the service the sysctl net.ipv4.ip_unprivileged_port_start=0 (swarmvm render/deploy do)", 1024+p, p))
			}
		}
	}
	return pass(name, ClassConfig, "%d forwards; unprivileged ports start at %d", len(hostPorts), start)
}
