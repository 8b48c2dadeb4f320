package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// swarmvmBin is the binary built by make (bin/swarmvm), run on the host.
func swarmvmBin(t testing.TB) string {
	t.Helper()
	p := envOr("SWARMVM_BIN", filepath.Join("..", "..", "bin", "swarmvm"))
	abs, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(abs); err != nil {
		t.Fatalf("swarmvm binary missing (make build): %v", err)
	}
	return abs
}

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// hostBroker runs `swarmvm broker` on the host, as the systemd unit does,
// with its socket in a fresh folder that containers mount at /run/swarmvm.
func hostBroker(t testing.TB) (dir string, out *lockedBuf, cmd *exec.Cmd) {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "swarmvm-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	out = &lockedBuf{}
	cmd = exec.Command(swarmvmBin(t), "broker", "--socket", filepath.Join(dir, "broker.sock"),
		"--socket-group", strconv.Itoa(runnerUID), "--allow-uid", strconv.Itoa(runnerUID))
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() {
			t.Logf("broker output:\n%s", out)
		}
		os.RemoveAll(dir)
	})
	waitSocket(t, filepath.Join(dir, "broker.sock"))
	return dir, out, cmd
}

func waitSocket(t testing.TB, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no broker socket at %s", path)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The decisive test: a runner container with no device, no capability, a
// read-only root, a non-root user and no-new-privileges, given nothing but
// the broker's socket folder, runs QEMU with KVM.
func TestKVMThroughBrokerWithoutDevice(t *testing.T) {
	kvmtest.Require(t)
	v := newVM(t)
	dir, brokerOut, brokerCmd := hostBroker(t)
	v.run([]string{"-v", dir + ":/run/swarmvm"},
		append(kernelEnv(""), "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "CPU_MODEL=host,-arch-capabilities", "SHUTDOWN_TIMEOUT=20s")...)
	v.waitFor("KVM verified", 60*time.Second, func() bool { return strings.Contains(v.logs(), "KVM verified") })
	logs := v.logs()
	contains(t, "runner log", logs, "broker /run/swarmvm/broker.sock: KVM API 12", `query_kvm="enabled=true present=true"`)

	runner, qemu := v.qemuPID()
	fds := fdTargets(t, qemu)
	contains(t, "QEMU's descriptors", fds, "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0")
	if strings.Contains(fds, "/dev/kvm") && !strings.Contains(fds, "/dev/kvm (deleted)") {
		t.Logf("QEMU holds the broker's /dev/kvm descriptor: %s", fds)
	}
	assertUnprivileged(t, runner, qemu)
	assertOnlyHanded(t, v, qemu)
	inspect, _ := exec.Command("docker", "inspect", "-f", "{{.HostConfig.Devices}} {{.HostConfig.Privileged}} {{.HostConfig.CapAdd}}", v.name).Output()
	if got := strings.TrimSpace(string(inspect)); got != "[] false []" {
		t.Errorf("container devices/privileged/capadd: %s, want none", got)
	}
	contains(t, "broker audit", brokerOut.String(), `"result":"granted"`, `"vm":"`+v.name+`"`, `"peer_uid":10001`)

	// A broker crash does not disturb the running VM: QEMU already holds
	// its descriptor.
	brokerCmd.Process.Kill()
	brokerCmd.Wait()
	time.Sleep(500 * time.Millisecond)
	if out, err := exec.Command("docker", "exec", v.name, "swarmvm", "health").CombinedOutput(); err != nil || !strings.Contains(string(out), "KVM enabled") {
		t.Errorf("health after the broker died: %v %s", err, out)
	}
	if !v.running() {
		t.Fatal("the VM stopped when the broker died")
	}

	// On a host whose KVM runs guests, the guest boots and answers the
	// power button. Some nested hosts' KVM initialises but stops the guest
	// at its first instructions ("KVM internal error"): then the stop is
	// forced. Either way the evidence must agree with the exit code.
	booted := false
	for deadline := time.Now().Add(30 * time.Second); !booted && time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		booted = strings.Contains(v.serial(), marker)
	}
	code, _ := v.stop(60 * time.Second)
	switch {
	case booted && code != 0:
		t.Errorf("the guest booted under KVM, but the stop exited %d, want 0 (ACPI power-off)", code)
	case !booted && code != 7:
		t.Errorf("the guest did not boot within 30 s under this host's KVM; exit %d, want 7 (forced)", code)
	}
	t.Logf("guest booted under KVM: %v; exit %d", booted, code)
	contains(t, "runner log", v.logs(), "broker lease ended")
}

// A lease ends when the runner's container is killed, with no chance to say
// goodbye: the broker sees its connection close, ends the lease and
// removes what it made (here a TAP under TCG; a KVM lease ends the same).
func TestBrokerLeaseEndsWithContainer(t *testing.T) {
	v, l, tap, brokerOut := bridgeVM(t)
	exec.Command("docker", "kill", v.name).Run()
	l.waitTAPGone(tap, brokerOut)
}

// The same broker, run as a plain container for hosts without systemd:
// root in its container, NET_ADMIN and CHOWN only, the host's PID namespace
// (so that peer pids mean something) and network. It knows a runner
// container's peer by its credentials and audits what it decides: here a
// refusal, a bridge it was not given (a grant needs KVM: the kvm subtest).
func TestBrokerAsContainer(t *testing.T) {
	v := newVM(t)
	dir, name := brokerContainer(t, v.name+"-broker", nil)
	v.run([]string{"-v", dir + ":/run/swarmvm"}, "ACCEL=tcg", "DISK_SIZE=1G", "NET_MODE=bridge", "NET_BRIDGE=br-nope")
	if code := v.waitExit(30 * time.Second); code != 8 {
		t.Fatalf("exit %d, want 8 (network unavailable)", code)
	}
	contains(t, "runner log", v.logs(), `bridge \"br-nope\" is not allowed`)
	blog, _ := exec.Command("docker", "logs", name).CombinedOutput()
	contains(t, "broker container log", string(blog), "broker listening", `"result":"refused"`, `"peer_uid":10001`, `"vm":"`+v.name+`"`)
	if strings.Contains(string(blog), `"peer_pid":0`) {
		t.Errorf("the broker container sees peers as pid 0: %s", blog)
	}

	t.Run("kvm", func(t *testing.T) {
		kvmtest.Require(t)
		v := newVM(t)
		dir, name := brokerContainer(t, v.name+"-broker", []string{"--device", "/dev/kvm"})
		v.run([]string{"-v", dir + ":/run/swarmvm"},
			append(kernelEnv(""), "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "CPU_MODEL=host,-arch-capabilities")...)
		v.waitFor("KVM verified", 60*time.Second, func() bool { return strings.Contains(v.logs(), "KVM verified") })
		_, qemu := v.qemuPID()
		contains(t, "QEMU's descriptors", fdTargets(t, qemu), "anon_inode:kvm-vm")
		blog, _ := exec.Command("docker", "logs", name).CombinedOutput()
		contains(t, "broker container log", string(blog), "broker listening", `"result":"granted"`, `"peer_uid":10001`)
	})
}

// brokerContainer runs `swarmvm broker` as the demo does, in a container
// named name with extra docker flags, and returns its socket's folder.
func brokerContainer(t *testing.T, name string, extra []string) (string, string) {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "swarmvm-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	args := append([]string{"run", "-d", "--name", name, "--user", "0:0", "--read-only",
		"--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "CHOWN", "--security-opt", "no-new-privileges",
		"--device", "/dev/net/tun", "--network", "host", "--pid", "host"}, extra...)
	args = append(args, "-v", dir+":/run/swarmvm", "--entrypoint", "swarmvm", image, "broker")
	if out, err := exec.Command("docker", args...).CombinedOutput(); err != nil {
		t.Fatalf("broker container: %v %s", err, out)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command("docker", "logs", name).CombinedOutput()
			t.Logf("broker container log:\n%s", out)
		}
		exec.Command("docker", "rm", "-f", name).Run()
	})
	waitSocket(t, filepath.Join(dir, "broker.sock"))
	return dir, name
}

func fdTargets(t testing.TB, pid int) string {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink(filepath.Join(dir, e.Name()))
		out = append(out, l)
	}
	return strings.Join(out, " ")
}
