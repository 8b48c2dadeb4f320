package broker

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// helperBroker is the broker inside a test's network namespace.
func helperBroker() {
	cfg := DefaultConfig()
	cfg.Socket, cfg.SocketMode, cfg.SocketGroup = os.Getenv("SOCK"), 0o666, -1
	cfg.AllowUIDs = []int{0}
	if v := os.Getenv("ALLOW_UIDS"); v != "" {
		cfg.AllowUIDs = nil
		for _, u := range strings.Split(v, ",") {
			n, _ := strconv.Atoi(u)
			cfg.AllowUIDs = append(cfg.AllowUIDs, n)
		}
	}
	cfg.Bridges = strings.Split(os.Getenv("BRIDGES"), ",")
	cfg.VhostNet = "/nonexistent/vhost-net"
	if os.Getenv("KVM_STAND_IN") == "1" {
		cfg.KVMDevice, cfg.ProbeKVM = kvmtest.StandInDevice, kvmtest.ProbeStandIn
	}
	if d, err := time.ParseDuration(os.Getenv("CHANGED_TAP_WAIT")); err == nil {
		cfg.ChangedTAPWait = d
	}
	for env, limit := range map[string]*int{"MAX_PER_PEER": &cfg.MaxPerPeer, "MAX_PER_UID": &cfg.MaxPerUID} {
		if v := os.Getenv(env); v != "" {
			*limit, _ = strconv.Atoi(v)
		}
	}
	audit := slog.New(slog.NewJSONHandler(os.Stdout, nil))
	b := New(cfg, audit, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if _, err := b.CleanOrphans(); err != nil {
		fmt.Fprintln(os.Stderr, "orphans:", err)
		os.Exit(1)
	}
	l, err := Listen(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	b.Serve(ctx, l)
	os.Exit(0)
}

// packetSocket opens a raw socket on LINK, for a helper that reads frames.
func packetSocket() (int, *net.Interface) {
	ifc, err := net.InterfaceByName(os.Getenv("LINK"))
	if err != nil {
		fmt.Println(err)
		os.Exit(2)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		fmt.Println(err)
		os.Exit(2)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
		fmt.Println(err)
		os.Exit(2)
	}
	return fd, ifc
}

// helperSniff reads frames on a link until one carries MARKER.
func helperSniff() {
	fd, ifc := packetSocket()
	secs, _ := strconv.Atoi(os.Getenv("TIMEOUT"))
	if secs == 0 {
		secs = 10
	}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: int64(secs)})
	fmt.Println("listening")
	buf := make([]byte, 2048)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			fmt.Println("no frame:", err)
			os.Exit(1)
		}
		if bytes.Contains(buf[:n], []byte(os.Getenv("MARKER"))) {
			fmt.Printf("seen %d bytes on %s\n", n, ifc.Name)
			os.Exit(0)
		}
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// helperAskTAP asks for a TAP for VM on br-test and prints what came back.
func helperAskTAP() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	bridge := os.Getenv("BRIDGE")
	if bridge == "" {
		bridge = "br-test"
	}
	l, err := fdpass.Ask(ctx, os.Getenv("SOCK"), fdpass.Request{VM: os.Getenv("VM"), TAP: &fdpass.TAPRequest{Bridge: bridge}})
	if err == nil {
		fmt.Print("granted ", l.Response.TAP.Name, " ", l.Response.TAP.MAC)
		if hold := os.Getenv("HOLD"); hold != "" { // keep the lease a while
			d, _ := time.ParseDuration(hold)
			time.Sleep(d)
		}
		l.Close()
		os.Exit(0)
	}
	fmt.Print(err)
	os.Exit(0)
}

// netns is a network namespace made by the test, with a bridge in it: the
// stand-in for a node's LAN. Nothing leaves it.
type netns struct {
	t    *testing.T
	name string
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("TAP tests create a network namespace and must run as root (CI does)")
	}
	n := &netns{t: t, name: fmt.Sprintf("svmtest-%d", os.Getpid()%100000)}
	exec.Command("ip", "netns", "del", n.name).Run()
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	n.ip("link", "add", "br-test", "type", "bridge")
	n.ip("link", "set", "br-test", "up")
	return n
}

func (n *netns) ip(args ...string) string {
	n.t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", n.name}, args...)...).CombinedOutput()
	if err != nil {
		n.t.Fatalf("ip %v: %v %s", args, err, out)
	}
	return string(out)
}

func (n *netns) hasLink(name string) bool {
	return exec.Command("ip", "-n", n.name, "link", "show", "dev", name).Run() == nil
}

// helper starts the test binary in the namespace in the given role.
func (n *netns) helper(role string, env ...string) (*exec.Cmd, *syncBuf) {
	n.t.Helper()
	self, _ := os.Executable()
	cmd := exec.Command("ip", "netns", "exec", n.name, self)
	cmd.Env = append([]string{"BROKER_TEST_HELPER=" + role, "PATH=" + os.Getenv("PATH")}, env...)
	out := &syncBuf{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, out
}

func (n *netns) startBroker(sock string, env ...string) (*exec.Cmd, *syncBuf) {
	n.t.Helper()
	cmd, out := n.helper("broker", append([]string{"SOCK=" + sock, "BRIDGES=br-test"}, env...)...) // a later BRIDGES= wins
	waitFor(n.t, "broker socket", func() bool {
		c, err := net.Dial("unixpacket", sock)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return cmd, out
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func askTAP(t *testing.T, sock, vm string) *fdpass.Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := fdpass.Ask(ctx, sock, fdpass.Request{VM: vm, TAP: &fdpass.TAPRequest{Bridge: "br-test"}, VhostNet: true})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// frame is an Ethernet broadcast carrying marker, behind the 10-byte
// virtio-net header the TAP expects (IFF_VNET_HDR).
func frame(marker string) []byte {
	f := make([]byte, 10)
	f = append(f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x88, 0xb5)
	return append(f, []byte(marker)...)
}

func TestTAPOnBridgeAndLease(t *testing.T) {
	n := newNetns(t)
	sock := filepath.Join(openDir(t), "broker.sock")
	_, audit := n.startBroker(sock)

	lease := askTAP(t, sock, "net-1")
	tap := lease.Take(fdpass.FDTAP)
	defer tap.Close()
	resp := lease.Response
	if resp.TAP == nil || resp.TAP.Name != TAPName("svm", 0, "net-1") || resp.TAP.Bridge != "br-test" {
		t.Fatalf("grant %+v", resp)
	}
	if lease.Take(fdpass.FDVhostNet) != nil || !strings.Contains(strings.Join(resp.Notes, " "), "absent on this node") {
		t.Errorf("vhost-net absent but notes %q", resp.Notes)
	}
	// The TAP on a bridge of its own; on br-test, the VM's port is the
	// outer end of a veth from that bridge: locked, learning nothing, no
	// flooded unicast.
	own, _, outer := companions(resp.TAP.Name)
	for dev, wants := range map[string][]string{
		resp.TAP.Name: {"master " + own, "tun type tap", "UP,LOWER_UP", "multi_queue", "locked on", "learning off"},
		outer:         {"master br-test", "veth", "UP,LOWER_UP", "locked on", "learning off", "flood off", "bcast_flood on"},
	} {
		link := n.ip("-d", "link", "show", "dev", dev)
		for _, want := range wants {
			if !strings.Contains(link, want) {
				t.Errorf("%s lacks %q:\n%s", dev, want, link)
			}
		}
	}

	// A frame written on the received descriptor appears on the bridge.
	marker := fmt.Sprintf("swarmvm-tap-test-%d", time.Now().UnixNano())
	sniff, out := n.helper("sniff", "LINK=br-test", "MARKER="+marker)
	waitFor(t, "sniffer", func() bool { return strings.Contains(out.String(), "listening") })
	sniffed := make(chan error, 1)
	go func() { sniffed <- sniff.Wait() }()
	var serr error
	f := frame(marker)
	vmMAC, _ := net.ParseMAC(resp.TAP.MAC)
	copy(f[10+6:10+12], vmMAC) // the port forwards only the VM's own source MAC
	for sent := 0; ; sent++ {
		if _, err := tap.Write(f); err != nil {
			t.Fatalf("write on the TAP descriptor: %v", err)
		}
		select {
		case serr = <-sniffed:
		case <-time.After(100 * time.Millisecond):
			if sent < 100 {
				continue
			}
			t.Fatal("frame never seen on the bridge")
		}
		break
	}
	if serr != nil {
		t.Fatalf("sniffer: %v: %s", serr, out.String())
	}
	t.Log(strings.TrimSpace(out.String()))

	// The lease-holder reads its TAP's counters through the lease: the
	// frames written on the descriptor are what the TAP received.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// (a frame on the wire is what was written less the virtio-net header)
	wire := uint64(len(f) - 10)
	st, err := lease.Stats(ctx)
	if err != nil {
		t.Fatalf("stats: %v", err)
	}
	if st.RxPackets < 1 || st.RxBytes != st.RxPackets*wire {
		t.Errorf("after frames of %d bytes were written, the TAP's counters say %+v", wire, st)
	}
	tap.Write(f)
	st2, err := lease.Stats(ctx)
	if err != nil || st2.RxPackets != st.RxPackets+1 || st2.RxBytes != st.RxBytes+wire {
		t.Errorf("one more frame: %+v then %+v (%v)", st, st2, err)
	}

	// Closing the lease removes the TAP, even while a descriptor is still
	// open (a QEMU that outlived its runner loses its network), and its
	// bridge and veth.
	lease.Close()
	waitFor(t, "the TAP to go", func() bool { return !n.hasLink(resp.TAP.Name) })
	waitFor(t, "its bridge and veth to go", func() bool { return !n.hasLink(own) && !n.hasLink(outer) })

	// QEMU ends first (its last descriptor closed: the kernel removes the
	// TAP), then the runner's lease: the bridge and veth go with the lease.
	again := askTAP(t, sock, "net-1")
	again.Take(fdpass.FDTAP).Close()
	waitFor(t, "the TAP to go with its descriptor", func() bool { return !n.hasLink(again.Response.TAP.Name) })
	if !n.hasLink(own) || !n.hasLink(outer) {
		t.Fatal("the bridge and veth went with the TAP, before the lease ended")
	}
	again.Close()
	waitFor(t, "its bridge and veth to go with the lease", func() bool { return !n.hasLink(own) && !n.hasLink(outer) })
	waitFor(t, "the lease-ended audit line", func() bool { return strings.Contains(audit.String(), `"result":"lease-ended"`) })
}

// A broker restart leaves a running VM's TAP alone and removes a TAP
// whose VM is gone.
func TestRestartCleansOrphansOnly(t *testing.T) {
	n := newNetns(t)
	sock := filepath.Join(openDir(t), "broker.sock")
	broker, _ := n.startBroker(sock)

	held := askTAP(t, sock, "still-running")
	heldTAP := held.Take(fdpass.FDTAP)
	defer heldTAP.Close()
	heldName := held.Response.TAP.Name
	gone := askTAP(t, sock, "gone")
	goneTAP := gone.Take(fdpass.FDTAP)
	goneBridge, _, goneVeth := companions(gone.Response.TAP.Name)
	// Orphans: persistent TAPs with the broker's prefix and no process on
	// them, one like the broker's own (multi-queue), one single-queue.
	n.ip("tuntap", "add", "dev", "svmdeadbeef", "mode", "tap", "multi_queue")
	n.ip("tuntap", "add", "dev", "svmfeedface", "mode", "tap")
	n.ip("link", "set", "svmfeedface", "up")

	broker.Process.Kill() // a crash: no cleanup of its own
	broker.Wait()
	held.Close()
	// A VM that ends while no broker runs: the kernel removes its TAP with
	// the last descriptor; its bridge and veth are left.
	goneTAP.Close()
	gone.Close()
	waitFor(t, "the ended VM's TAP to go", func() bool { return !n.hasLink(gone.Response.TAP.Name) })
	if !n.hasLink(goneBridge) || !n.hasLink(goneVeth) {
		t.Fatal("the ended VM's bridge and veth went with its TAP: nothing left for the restart to clean")
	}
	_, audit := n.startBroker(sock)

	waitFor(t, "orphan removal", func() bool {
		return !n.hasLink("svmdeadbeef") && !n.hasLink("svmfeedface") && !n.hasLink(goneBridge) && !n.hasLink(goneVeth)
	})
	if own, _, outer := companions(heldName); !n.hasLink(heldName) || !n.hasLink(own) || !n.hasLink(outer) {
		t.Fatalf("restart removed %s or its bridge or veth, which a VM still holds", heldName)
	}
	if _, err := heldTAP.Write(frame("still works")); err != nil {
		t.Errorf("running VM's TAP descriptor broken by the restart: %v", err)
	}
	if !strings.Contains(audit.String(), `"result":"orphan-removed"`) || strings.Contains(audit.String(), heldName) {
		t.Errorf("audit after restart:\n%s", audit.String())
	}
}

// A lease removes the TAP it made and no other: when its VM's TAP went away
// (QEMU closed it) and a new lease made one under the same name, the old
// lease's end leaves the new TAP alone. And a VM's TAP and MAC are bound to
// its uid: uid 4242 asking for uid 0's VM name gets a TAP and MAC of its
// own, never uid 0's.
func TestLeaseRemovesOnlyItsOwnTAP(t *testing.T) {
	n := newNetns(t)
	sock := filepath.Join(openDir(t), "broker.sock")
	_, audit := n.startBroker(sock, "ALLOW_UIDS=0,4242")

	first := askTAP(t, sock, "v1")
	name := first.Response.TAP.Name
	first.Take(fdpass.FDTAP).Close() // QEMU gone: the kernel removes the TAP
	waitFor(t, "the first TAP to go", func() bool { return !n.hasLink(name) })
	second := askTAP(t, sock, "v1")
	defer second.Close()
	tap := second.Take(fdpass.FDTAP)
	defer tap.Close()
	if second.Response.TAP.Name != name {
		t.Fatalf("same uid, same VM: tap %s, want %s", second.Response.TAP.Name, name)
	}
	first.Close()
	waitFor(t, "the first lease to end", func() bool { return strings.Contains(audit.String(), `"result":"lease-ended"`) })
	time.Sleep(200 * time.Millisecond)
	if own, _, outer := companions(name); !n.hasLink(name) || !n.hasLink(own) || !n.hasLink(outer) {
		t.Fatal("the first lease's end removed the second lease's TAP, or its bridge or veth")
	}

	// Another uid, the same VM name, while uid 0 holds it.
	cmd := exec.Command(helperForOthers(t))
	cmd.Env = []string{"BROKER_TEST_HELPER=ask-tap", "SOCK=" + sock, "VM=v1"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
	out, _ := cmd.CombinedOutput()
	want := "granted " + TAPName("svm", 4242, "v1") + " " + config.MAC("v1", 4242)
	if string(out) != want || TAPName("svm", 4242, "v1") == name || config.MAC("v1", 4242) == second.Response.TAP.MAC {
		t.Errorf("uid 4242 asking for uid 0's VM: %q, want %q, a TAP and MAC other than uid 0's %s %s", out, want, name, second.Response.TAP.MAC)
	}
}

// A squatter that asks the broker for a VM's name before the VM does (any
// uid may ask for any name) gets its own MAC, not the VM's, and the VM,
// on its name's uid, still gets its TAP with its MAC. (Before: the real VM
// was refused, and the squatter held the VM's MAC with its static entry.)
func TestNameSquatterGetsNothingOfTheVM(t *testing.T) {
	n := newNetns(t)
	sock := filepath.Join(openDir(t), "broker.sock")
	vmUID := config.DefaultUID("victim")
	n.startBroker(sock, fmt.Sprintf("ALLOW_UIDS=0,4242,%d", vmUID))
	ask := func(uid int, hold string) (*exec.Cmd, *syncBuf) {
		cmd := exec.Command(helperForOthers(t))
		cmd.Env = []string{"BROKER_TEST_HELPER=ask-tap", "SOCK=" + sock, "VM=victim", "HOLD=" + hold}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: 10001}}
		out := &syncBuf{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd, out
	}
	squatter, sq := ask(4242, "3s")
	waitFor(t, "the squatter's grant", func() bool { return strings.Contains(sq.String(), "granted") })
	real, vm := ask(vmUID, "0s")
	real.Wait()
	squatter.Wait()
	vmMAC := config.MAC("victim", vmUID)
	if got := vm.String(); got != "granted "+TAPName("svm", vmUID, "victim")+" "+vmMAC {
		t.Errorf("the VM, while a squatter holds its name: %q, want its TAP and MAC %s", got, vmMAC)
	}
	if strings.Contains(sq.String(), vmMAC) || !strings.HasPrefix(vmMAC, "52:54:00:") {
		t.Errorf("the squatter got %q; the VM's MAC is %s", sq.String(), vmMAC)
	}
}

// A MAC is leased to one uid at a time on a node.
func TestMACClaimedByOneUID(t *testing.T) {
	b := New(DefaultConfig(), slog.New(slog.NewTextHandler(io.Discard, nil)), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err := b.claimMAC("02:00:00:00:00:01", 10); err != nil {
		t.Fatal(err)
	}
	if err := b.claimMAC("02:00:00:00:00:01", 10); err != nil {
		t.Errorf("the same uid again: %v", err)
	}
	if err := b.claimMAC("02:00:00:00:00:01", 11); err == nil || !strings.Contains(err.Error(), "leased to uid 10") {
		t.Errorf("another uid: %v", err)
	}
	b.releaseGrant(&grant{mac: "02:00:00:00:00:01"})
	b.releaseGrant(&grant{mac: "02:00:00:00:00:01"})
	if err := b.claimMAC("02:00:00:00:00:01", 11); err != nil {
		t.Errorf("after both leases ended: %v", err)
	}
}

// A bridge given to a uid range serves those uids only; an open bridge
// serves every allowed peer; entries that cannot be read are refused.
func TestBridgePolicy(t *testing.T) {
	p, err := ParseBridges([]string{"br-open", "br-a@10000000-10499999", "br-a@20001"})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		bridge string
		uid    int
		want   string
	}{
		{"br-open", 0, ""}, {"br-open", 10600000, ""},
		{"br-a", 10000000, ""}, {"br-a", 10499999, ""}, {"br-a", 20001, ""},
		{"br-a", 10500000, "not open to uid 10500000"}, {"br-a", 0, "not open to uid 0"},
		{"docker0", 0, `bridge "docker0" is not allowed by this broker (allowed: br-a, br-open)`},
	} {
		if got := p.allows(c.bridge, c.uid); (c.want == "") != (got == "") || !strings.Contains(got, c.want) {
			t.Errorf("%s for uid %d: %q, want %q", c.bridge, c.uid, got, c.want)
		}
	}
	// A bridge both open and given to uid ranges is refused, in either
	// order (before: "br@1 br" opened it to every uid without a word).
	for _, bad := range [][]string{{"@1"}, {"br@x"}, {"br@5-1"}, {"br", "br@1"}, {"br@1", "br"}} {
		if _, err := ParseBridges(bad); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

// Through the broker: uid 0 is refused a TAP on a bridge given to another
// uid range, and granted one on the bridge given to it.
func TestBridgePolicyEnforced(t *testing.T) {
	n := newNetns(t)
	n.ip("link", "add", "br-b", "type", "bridge")
	sock := filepath.Join(openDir(t), "broker.sock")
	n.startBroker(sock, "BRIDGES=br-test@0,br-b@10000000-10999999")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := fdpass.Ask(ctx, sock, fdpass.Request{VM: "v1", TAP: &fdpass.TAPRequest{Bridge: "br-b"}})
	if err == nil || !strings.Contains(err.Error(), `bridge "br-b" is not open to uid 0`) {
		t.Errorf("uid 0 on another range's bridge: %v", err)
	}
	l := askTAP(t, sock, "v1")
	defer l.Close()
	if l.Response.TAP.Bridge != "br-test" {
		t.Errorf("granted %+v", l.Response.TAP)
	}
}

// setMAC sets a TAP's MAC through its descriptor, as QEMU (or anything
// holding the descriptor) can without a capability.
func setMAC(f *os.File, name string, mac net.HardwareAddr) error {
	var req [40]byte // struct ifreq: name, then a sockaddr
	copy(req[:16], name)
	req[16] = 1 // ARPHRD_ETHER
	copy(req[18:], mac)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.SIOCSIFHWADDR, uintptr(unsafe.Pointer(&req[0])))
	if errno != 0 {
		return errno
	}
	return nil
}

func linkMAC(n *netns, name string) string {
	out := n.ip("-br", "link", "show", "dev", name)
	f := strings.Fields(out)
	if len(f) < 3 {
		n.t.Fatalf("ip -br link show %s: %q", name, out)
	}
	return f[2]
}

// A TAP's holder changes its MAC to the gateway's: the broker ends that
// lease within a second (TAP gone, audited; likewise for a TAP made
// persistent), the bridge keeps its MAC, no
// local FDB entry for the gateway's MAC stays on the bridge, and another
// VM still reaches the gateway. A guest sending with another MAC as its
// source is dropped at its port; with its own, it gets through.
func TestTAPMACChangeEndsLease(t *testing.T) {
	n := newNetns(t)
	n.ip("link", "add", "gwA", "type", "veth", "peer", "name", "gwB")
	n.ip("link", "set", "gwA", "master", "br-test", "up")
	n.ip("addr", "add", "192.168.77.254/24", "dev", "gwB")
	n.ip("link", "set", "gwB", "up")
	gwMAC, _ := net.ParseMAC(linkMAC(n, "gwB"))
	sock := filepath.Join(openDir(t), "broker.sock")
	_, audit := n.startBroker(sock, "CHANGED_TAP_WAIT=0s") // this uid asks again below

	a := askTAP(t, sock, "vm-a")
	defer a.Close()
	tapA := a.Take(fdpass.FDTAP)
	defer tapA.Close()
	bm := askTAP(t, sock, "vm-b")
	defer bm.Close()
	tapB := bm.Take(fdpass.FDTAP)
	defer tapB.Close()
	bridgeMAC := linkMAC(n, "br-test")

	if err := setMAC(tapA, a.Response.TAP.Name, gwMAC); err != nil {
		t.Fatalf("SIOCSIFHWADDR on the TAP descriptor: %v", err)
	}
	changed := time.Now()
	waitFor(t, "the lease to end", func() bool { return strings.Contains(audit.String(), "changed its MAC") })
	waitFor(t, "the TAP to go", func() bool { return !n.hasLink(a.Response.TAP.Name) })
	t.Logf("lease ended %v after the MAC change", time.Since(changed).Round(time.Millisecond))
	if got := linkMAC(n, "br-test"); got != bridgeMAC {
		t.Errorf("the bridge's MAC moved from %s to %s", bridgeMAC, got)
	}
	if fdb := n.bridge("fdb", "show", "br", "br-test"); strings.Contains(fdb, gwMAC.String()+" dev "+a.Response.TAP.Name) || strings.Contains(fdb, gwMAC.String()+" dev br-test") {
		t.Errorf("the gateway's MAC is still local on the bridge:\n%s", fdb)
	}

	// Made persistent through its descriptor (it would outlive QEMU): the
	// lease ends too.
	c := askTAP(t, sock, "vm-c")
	defer c.Close()
	tapC := c.Take(fdpass.FDTAP)
	defer tapC.Close()
	if err := unix.IoctlSetInt(int(tapC.Fd()), unix.TUNSETPERSIST, 1); err != nil {
		t.Fatalf("TUNSETPERSIST: %v", err)
	}
	waitFor(t, "the persistent TAP's lease to end", func() bool { return strings.Contains(audit.String(), "was made persistent") })
	waitFor(t, "the persistent TAP to go", func() bool { return !n.hasLink(c.Response.TAP.Name) })

	// vm-b asks the gateway for its MAC (ARP) and gets the answer.
	myMAC, _ := net.ParseMAC(bm.Response.TAP.MAC)
	tapB.Write(arpRequest(myMAC, net.IPv4(192, 168, 77, 2), net.IPv4(192, 168, 77, 254)))
	if !readUntil(tapB, 3*time.Second, func(b []byte) bool {
		return len(b) >= 10+42 && b[10+12] == 0x08 && b[10+13] == 0x06 && b[10+21] == 2 && bytes.Equal(b[10+22:10+28], gwMAC)
	}) {
		t.Error("vm-b got no ARP answer from the gateway")
	}

	// Spoofed source: dropped at the locked port; its own: forwarded.
	for _, c := range []struct {
		src  net.HardwareAddr
		seen bool
	}{{gwMAC, false}, {myMAC, true}} {
		marker := fmt.Sprintf("swarmvm-spoof-%s-%d", c.src, time.Now().UnixNano())
		sniff, out := n.helper("sniff", "LINK=gwB", "MARKER="+marker, "TIMEOUT=2")
		waitFor(t, "sniffer", func() bool { return strings.Contains(out.String(), "listening") })
		f := frame(marker)
		copy(f[10+6:10+12], c.src)
		for i := 0; i < 5; i++ {
			tapB.Write(f)
			time.Sleep(50 * time.Millisecond)
		}
		err := sniff.Wait()
		if (err == nil) != c.seen {
			t.Errorf("a frame from %s with source %s: seen %v, want %v (%s)", bm.Response.TAP.Name, c.src, err == nil, c.seen, strings.TrimSpace(out.String()))
		}
	}
}

func (n *netns) bridge(args ...string) string {
	n.t.Helper()
	out, err := exec.Command("bridge", append([]string{"-n", n.name}, args...)...).CombinedOutput()
	if err != nil {
		n.t.Fatalf("bridge %v: %v %s", args, err, out)
	}
	return string(out)
}

// arpRequest is an ARP who-has, behind the virtio-net header.
func arpRequest(src net.HardwareAddr, from, to net.IP) []byte {
	f := make([]byte, 10)
	f = append(f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	f = append(f, src...)
	f = append(f, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1)
	f = append(f, src...)
	f = append(f, from.To4()...)
	f = append(f, 0, 0, 0, 0, 0, 0)
	return append(f, to.To4()...)
}

// readUntil reads frames from a TAP until ok says yes or time runs out.
func readUntil(f *os.File, d time.Duration, ok func([]byte) bool) bool {
	deadline := time.Now().Add(d)
	unix.SetNonblock(int(f.Fd()), true)
	buf := make([]byte, 2048)
	for time.Now().Before(deadline) {
		n, err := unix.Read(int(f.Fd()), buf)
		if err == nil && ok(buf[:n]) {
			return true
		}
		if err != nil {
			time.Sleep(20 * time.Millisecond)
		}
	}
	return false
}

// helperCount counts, on LINK, the frames that carry MARKER, for TIMEOUT
// seconds, and prints how many.
func helperCount() {
	fd, ifc := packetSocket()
	secs, _ := strconv.Atoi(os.Getenv("TIMEOUT"))
	end := time.Now().Add(time.Duration(secs) * time.Second)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	fmt.Println("listening")
	seen := map[string]bool{}
	buf := make([]byte, 2048)
	for time.Now().Before(end) {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			continue
		}
		if i := bytes.Index(buf[:n], []byte(os.Getenv("MARKER"))); i >= 0 {
			seen[string(buf[i:n])] = true // each frame carries the marker and its number
		}
	}
	fmt.Printf("counted %d on %s\n", len(seen), ifc.Name)
	os.Exit(0)
}

// helperChurn is a hostile tenant: for SECONDS it takes a TAP, sets its
// MAC to MAC (the gateway's) through the descriptor, and reads what the
// TAP gets; when the broker ends that lease it asks again, under another
// VM name. It prints the frames carrying MARKER it got, and what the
// broker said to its asks.
func helperChurn() {
	secs, _ := strconv.Atoi(os.Getenv("SECONDS"))
	mac, _ := net.ParseMAC(os.Getenv("MAC"))
	end := time.Now().Add(time.Duration(secs) * time.Second)
	got, leases, refusals := 0, 0, map[string]int{}
	buf := make([]byte, 2048)
	for i := 0; time.Now().Before(end); i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		l, err := fdpass.Ask(ctx, os.Getenv("SOCK"), fdpass.Request{VM: fmt.Sprintf("churn-%d", i), TAP: &fdpass.TAPRequest{Bridge: "br-test"}})
		cancel()
		if err != nil {
			refusals[err.Error()]++
			time.Sleep(20 * time.Millisecond)
			continue
		}
		leases++
		tap := l.Take(fdpass.FDTAP)
		setMAC(tap, l.Response.TAP.Name, mac)
		unix.SetNonblock(int(tap.Fd()), true)
		for until := time.Now().Add(200 * time.Millisecond); time.Now().Before(until); {
			n, err := unix.Read(int(tap.Fd()), buf)
			if err != nil {
				time.Sleep(time.Millisecond)
				continue
			}
			if bytes.Contains(buf[:n], []byte(os.Getenv("MARKER"))) {
				got++
			}
		}
		tap.Close()
		l.Close()
	}
	fmt.Printf("leases %d, frames of the victim %d\n", leases, got)
	for why, n := range refusals {
		fmt.Printf("refused %d times: %s\n", n, why)
	}
	os.Exit(0)
}

// A tenant that keeps setting its TAP's MAC to the gateway's (leases are
// cheap) gets none of another tenant's unicast to the gateway, and all of
// that traffic reaches the gateway: the churning TAP's MAC never reaches
// the shared bridge's forwarding table, which keeps what it learned of the
// gateway, and VM ports get no flooded unicast. After the first lease that
// the broker ends for a MAC change, that uid waits before its next.
// (Before: the attacker got 2104 of 2330 such frames, and 8-10% were lost.)
func TestMACChurnHijacksNothing(t *testing.T) {
	n := newNetns(t)
	n.ip("link", "add", "gwA", "type", "veth", "peer", "name", "gwB")
	n.ip("link", "set", "gwA", "master", "br-test", "up")
	n.ip("addr", "add", "192.168.77.254/24", "dev", "gwB")
	n.ip("link", "set", "gwB", "up")
	gwMAC, _ := net.ParseMAC(linkMAC(n, "gwB"))
	sock := filepath.Join(openDir(t), "broker.sock")
	_, audit := n.startBroker(sock, "ALLOW_UIDS=0,4242")

	v := askTAP(t, sock, "victim")
	defer v.Close()
	tapV := v.Take(fdpass.FDTAP)
	defer tapV.Close()
	myMAC, _ := net.ParseMAC(v.Response.TAP.MAC)
	// The bridge learns where the gateway is from its answer.
	tapV.Write(arpRequest(myMAC, net.IPv4(192, 168, 77, 2), net.IPv4(192, 168, 77, 254)))
	if !readUntil(tapV, 3*time.Second, func(b []byte) bool { return len(b) >= 10+42 && bytes.Equal(b[10+6:10+12], gwMAC) }) {
		t.Fatal("no answer from the gateway")
	}

	const seconds = 3
	marker := fmt.Sprintf("swarmvm-churn-%d-", time.Now().UnixNano())
	_, counted := n.helper("count", "LINK=gwB", "MARKER="+marker, fmt.Sprintf("TIMEOUT=%d", seconds+3))
	waitFor(t, "the gateway's counter", func() bool { return strings.Contains(counted.String(), "listening") })
	// It needs no namespace: it talks to the broker's socket and to its
	// TAP's descriptor, as a runner does.
	churn := exec.Command(helperForOthers(t))
	churn.Env = []string{"BROKER_TEST_HELPER=churn", "SOCK=" + sock, "MAC=" + gwMAC.String(), "MARKER=" + marker, fmt.Sprintf("SECONDS=%d", seconds)}
	churn.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
	var churned bytes.Buffer
	churn.Stdout, churn.Stderr = &churned, &churned
	if err := churn.Start(); err != nil {
		t.Fatal(err)
	}
	sent := 0
	for end := time.Now().Add(seconds * time.Second); time.Now().Before(end); sent++ {
		f := make([]byte, 10, 80)
		f = append(append(append(f, gwMAC...), myMAC...), 0x88, 0xb5)
		f = append(f, fmt.Sprintf("%s%06d", marker, sent)...)
		if _, err := tapV.Write(f); err != nil {
			t.Fatalf("victim's write: %v", err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	churn.Wait()
	waitFor(t, "the gateway's count", func() bool { return strings.Contains(counted.String(), "counted") })
	t.Logf("victim sent %d frames to the gateway; the gateway %s; the churning tenant: %s", sent, strings.TrimSpace(counted.String()), strings.TrimSpace(churned.String()))
	if !strings.Contains(churned.String(), "frames of the victim 0") {
		t.Errorf("the churning tenant got the victim's frames to the gateway: %s", churned.String())
	}
	if got := strings.TrimSpace(counted.String()); !strings.Contains(got, fmt.Sprintf("counted %d on gwB", sent)) {
		t.Errorf("of %d frames the victim sent to the gateway, the gateway got: %s", sent, got)
	}
	if !strings.Contains(churned.String(), "leases 1,") || !strings.Contains(churned.String(), "the broker ended its lease") || !strings.Contains(churned.String(), "changed its MAC") {
		t.Errorf("the churning uid was not made to wait after its first MAC change: %s", churned.String())
	}
	if !strings.Contains(audit.String(), "changed its MAC") {
		t.Errorf("no lease ended for the MAC change:\n%s", audit.String())
	}
}
