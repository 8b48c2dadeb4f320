package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// lan is a stand-in for a node's LAN: a bridge with an address, inside a
// network namespace the test makes. Nothing leaves it.
type lan struct {
	t         testing.TB
	ns        string
	brokerPID int // the broker's pid, once l.broker has started it
}

const (
	lanBridge = "br-lan"
	lanHost   = "10.99.0.1/24"
	lanGuest  = "10.99.0.10"
)

func newLAN(t testing.TB) *lan {
	t.Helper()
	l := &lan{t: t, ns: fmt.Sprintf("svme2e-%d", time.Now().UnixNano()%100000)}
	if out, err := exec.Command("ip", "netns", "add", l.ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", l.ns).Run() })
	l.ip("link", "set", "lo", "up")
	l.ip("link", "add", lanBridge, "type", "bridge")
	l.ip("addr", "add", lanHost, "dev", lanBridge)
	l.ip("link", "set", lanBridge, "up")
	return l
}

func (l *lan) ip(args ...string) string {
	l.t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", l.ns}, args...)...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("ip %v: %v %s", args, err, out)
	}
	return string(out)
}

func (l *lan) exec(args ...string) ([]byte, error) {
	return exec.Command("ip", append([]string{"netns", "exec", l.ns}, args...)...).CombinedOutput()
}

// broker runs swarmvm broker inside the LAN's namespace, allowing its
// bridge, with its socket in a folder a container can mount.
func (l *lan) broker() (dir string, out *lockedBuf) {
	l.t.Helper()
	dir, err := os.MkdirTemp("/run", "swarmvm-e2e-")
	if err != nil {
		l.t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	out = &lockedBuf{}
	cmd := exec.Command("ip", "netns", "exec", l.ns, swarmvmBin(l.t), "broker", "--socket", filepath.Join(dir, "broker.sock"),
		"--socket-group", strconv.Itoa(runnerUID), "--allow-uid", strconv.Itoa(runnerUID), "--bridge", lanBridge)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	l.brokerPID = cmd.Process.Pid // ip netns exec execs the broker in place
	l.t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if l.t.Failed() {
			l.t.Logf("broker output:\n%s", out)
		}
		os.RemoveAll(dir)
	})
	waitSocket(l.t, filepath.Join(dir, "broker.sock"))
	return dir, out
}

var tapRE = regexp.MustCompile(`tap (svm[0-9a-f]{8}) on bridge`)

// Bridge mode: the broker makes a TAP on the LAN's bridge and passes it;
// the guest takes its address there and answers a request from the LAN;
// QEMU still has no capability; the TAP goes when the VM does.
func TestBridgeModeOnLAN(t *testing.T) {
	port := freePort(t)
	v, l, tap, brokerOut := bridgeVMWith(t, port)
	// The TAP sits on a bridge of its own; the VM's port on the LAN's
	// bridge is a veth's outer end, locked to the VM's MAC.
	contains(t, "TAP "+tap, l.ip("-d", "link", "show", "dev", tap), "master "+tap+"b", "UP,LOWER_UP")
	contains(t, "the VM's port "+tap+"o", l.ip("-d", "link", "show", "dev", tap+"o"), "master "+lanBridge, "UP,LOWER_UP", "locked on", "flood off")

	var body []byte
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := l.exec("curl", "-s", "--max-time", "3", "http://"+lanGuest+"/")
		if err == nil && strings.Contains(string(out), "SWARMVM-GUEST-HTTP") {
			body = out
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer from %s on the LAN: %v %s", lanGuest, err, out)
		}
		time.Sleep(time.Second)
	}
	t.Logf("from the LAN: %s", strings.TrimSpace(string(body)))

	// The TAP's counters, which the broker reads in the host's namespace,
	// in the runner's metrics: a second answer adds at least its body to
	// what the guest sent.
	sent0 := guestSent(t, v, port, len(body))
	if out, err := l.exec("curl", "-s", "--max-time", "10", "http://"+lanGuest+"/"); err != nil {
		t.Fatalf("second request: %v %s", err, out)
	}
	if sent1 := guestSent(t, v, port, len(body)); sent1-sent0 < float64(len(body)) {
		t.Errorf("the guest's sent bytes rose by %.0f over a %d-byte answer", sent1-sent0, len(body))
	} else {
		t.Logf("the guest sent %.0f bytes, then %.0f after one more %d-byte answer", sent0, sent1, len(body))
	}
	runner, qemu := v.qemuPID()
	assertUnprivileged(t, runner, qemu)
	assertOnlyHanded(t, v, qemu)
	contains(t, "broker audit", brokerOut.String(), `"what":"tap`, `"result":"granted"`)

	v.stop(60 * time.Second)
	l.waitTAPGone(tap, brokerOut)
}

// guestSent scrapes the runner's metrics on port and returns the bytes the
// guest sent on its interface, which must be at least least and must come
// with received packets.
func guestSent(t *testing.T, v *vm, port, least int) float64 {
	t.Helper()
	vmLabel, net0 := `vm="`+v.name+`"`, `interface="net0"`
	got, code := scrape(t, port, "")
	sent, ok := got.find("swarmvm_vm_network_transmit_bytes_total", vmLabel, net0)
	if code != 200 || !ok || sent < float64(least) {
		t.Fatalf("HTTP %d: the guest sent %.0f bytes by the metrics (present %v), after a %d-byte answer:\n%v", code, sent, ok, least, got)
	}
	if recv, ok := got.find("swarmvm_vm_network_receive_packets_total", vmLabel, net0); !ok || recv < 1 {
		t.Errorf("the guest received %v packets (present %v)", recv, ok)
	}
	return sent
}

// bridgeVM starts a broker on a new LAN and a bridge-mode VM on it, waits
// for the guest to take its address, and returns the VM's TAP.
func bridgeVM(t *testing.T) (*vm, *lan, string, *lockedBuf) {
	t.Helper()
	return bridgeVMWith(t, 0)
}

// bridgeVMWith is bridgeVM with the runner's metrics on metricsPort (0:
// none), published on loopback.
func bridgeVMWith(t *testing.T, metricsPort int) (*vm, *lan, string, *lockedBuf) {
	t.Helper()
	v := newVM(t)
	l := newLAN(t)
	dir, brokerOut := l.broker()
	args := []string{"-v", dir + ":/run/swarmvm"}
	env := append(kernelEnv("swarmvm.ip="+lanGuest+"/24"),
		"ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "NET_MODE=bridge", "NET_BRIDGE="+lanBridge)
	if metricsPort != 0 {
		args = append(args, "-p", fmt.Sprintf("127.0.0.1:%d:%d", metricsPort, metricsPort))
		env = append(env, fmt.Sprintf("METRICS_PORT=%d", metricsPort))
	}
	v.run(args, env...)
	v.waitFor("the guest on the LAN", 120*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-NET "+lanGuest) })
	m := tapRE.FindStringSubmatch(v.logs())
	if m == nil {
		t.Fatalf("runner log names no TAP:\n%s", v.logs())
	}
	return v, l, m[1], brokerOut
}

// waitTAPGone waits for the TAP to leave the LAN, and for the broker to
// have audited the end of its lease.
func (l *lan) waitTAPGone(tap string, brokerOut *lockedBuf) {
	l.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, dev := range []string{tap, tap + "o", tap + "b"} { // the TAP, its port on the LAN, its bridge
		for exec.Command("ip", "-n", l.ns, "link", "show", "dev", dev).Run() == nil {
			if time.Now().After(deadline) {
				l.t.Fatalf("%s still on the LAN after its VM ended", dev)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	contains(l.t, "broker audit", brokerOut.String(), `"result":"lease-ended"`, "tap "+tap+" removed")
}

// Bridge mode without a broker that allows the bridge fails before QEMU
// starts, with its own exit code and the fix.
func TestBridgeModeRefused(t *testing.T) {
	v := newVM(t)
	l := newLAN(t)
	dir, _ := l.broker()
	v.run([]string{"-v", dir + ":/run/swarmvm"}, "ACCEL=tcg", "DISK_SIZE=1G", "NET_MODE=bridge", "NET_BRIDGE=br-other")
	if code := v.waitExit(30 * time.Second); code != 8 {
		t.Fatalf("exit %d, want 8 (network unavailable)", code)
	}
	contains(t, "runner log", v.logs(), "VM network unavailable", `bridge \"br-other\" is not allowed`, "--bridge br-other")
}

// Bridge mode as a Swarm service: the task's runner gets the TAP from the
// broker on the LAN, the guest answers there, and docker service rm takes
// the TAP away.
func TestSwarmBridgeMode(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	l := newLAN(t)
	dir, brokerOut := l.broker()
	name := fmt.Sprintf("e2e-br-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	args := []string{"deploy", "--wait", "90s", "--name", name, "--accel", "tcg", "--memory", "256M", "--disk-size", "1G",
		"--storage", e.storage, "--broker-dir", dir, "--image", image, "--boot-mode", "bios", "--node", e.node,
		"--net", "bridge", "--bridge", lanBridge,
		"--env", "KERNEL_PATH=" + e.storage + "/isos/vmlinuz", "--env", "INITRD_PATH=" + e.storage + "/isos/initrd.img",
		"--env", "KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.ip=" + lanGuest + "/24"}
	if out, code := e.swarmvm(args...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), "SWARMVM-GUEST-NET "+lanGuest, 120*time.Second)
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := l.exec("curl", "-s", "--max-time", "3", "http://"+lanGuest+"/")
		if err == nil && strings.Contains(string(out), "SWARMVM-GUEST-HTTP") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer from the guest on the LAN: %v %s", err, out)
		}
		time.Sleep(time.Second)
	}
	m := tapRE.FindStringSubmatch(serviceLogs(name))
	if m == nil {
		t.Fatalf("runner log names no TAP")
	}
	if out, err := exec.Command("docker", "service", "rm", name).CombinedOutput(); err != nil {
		t.Fatalf("service rm: %v %s", err, out)
	}
	waitGone(t, name)
	deadline = time.Now().Add(10 * time.Second)
	for exec.Command("ip", "-n", l.ns, "link", "show", "dev", m[1]).Run() == nil {
		if time.Now().After(deadline) {
			t.Fatalf("TAP %s still on the LAN after docker service rm", m[1])
		}
		time.Sleep(100 * time.Millisecond)
	}
	contains(t, "broker audit", brokerOut.String(), "tap "+m[1]+" removed")
}
