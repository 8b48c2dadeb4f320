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
	// This machine's KVM initialises but runs no guest (TESTING.md), so the
	// guest cannot answer ACPI: a short SHUTDOWN_TIMEOUT ends it by force.
	v.run([]string{"-v", dir + ":/run/swarmvm"},
		append(kernelEnv(""), "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "CPU_MODEL=host,-arch-capabilities", "SHUTDOWN_TIMEOUT=3s")...)
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

	if code, _ := v.stop(60 * time.Second); code != 7 {
		t.Errorf("exit %d after stop, want 7 (forced: the guest cannot run here)", code)
	}
	contains(t, "runner log", v.logs(), "broker lease ended")
}

// A lease ends when the runner's container stops: the broker says so.
func TestBrokerLeaseEndsWithContainer(t *testing.T) {
	kvmtest.Require(t)
	v := newVM(t)
	dir, brokerOut, _ := hostBroker(t)
	v.run([]string{"-v", dir + ":/run/swarmvm"},
		append(kernelEnv(""), "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "CPU_MODEL=host,-arch-capabilities", "SHUTDOWN_TIMEOUT=2s")...)
	v.waitFor("KVM verified", 60*time.Second, func() bool { return strings.Contains(v.logs(), "KVM verified") })
	exec.Command("docker", "kill", v.name).Run() // no chance to say goodbye
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(brokerOut.String(), `"result":"lease-ended"`) {
		if time.Now().After(deadline) {
			t.Fatal("the broker did not see the lease end when the container was killed")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The same broker, run as a plain container for hosts without systemd:
// root in its container, the KVM device, NET_ADMIN and CHOWN only, the host's
// PID namespace (so that peer pids mean something) and network.
func TestBrokerAsContainer(t *testing.T) {
	kvmtest.Require(t)
	v := newVM(t)
	dir, err := os.MkdirTemp("/run", "swarmvm-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	defer os.RemoveAll(dir)
	name := v.name + "-broker"
	out, err := exec.Command("docker", "run", "-d", "--name", name, "--user", "0:0", "--read-only",
		"--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "CHOWN", "--security-opt", "no-new-privileges",
		"--device", "/dev/kvm", "--device", "/dev/net/tun", "--network", "host", "--pid", "host",
		"-v", dir+":/run/swarmvm", "--entrypoint", "swarmvm", image, "broker").CombinedOutput()
	if err != nil {
		t.Fatalf("broker container: %v %s", err, out)
	}
	defer exec.Command("docker", "rm", "-f", name).Run()
	waitSocket(t, filepath.Join(dir, "broker.sock"))
	v.run([]string{"-v", dir + ":/run/swarmvm"},
		append(kernelEnv(""), "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "CPU_MODEL=host,-arch-capabilities")...)
	v.waitFor("KVM verified", 60*time.Second, func() bool { return strings.Contains(v.logs(), "KVM verified") })
	_, qemu := v.qemuPID()
	contains(t, "QEMU's descriptors", fdTargets(t, qemu), "anon_inode:kvm-vm")
	blog, _ := exec.Command("docker", "logs", name).CombinedOutput()
	contains(t, "broker container log", string(blog), "broker listening", `"result":"granted"`, `"peer_uid":10001`)
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
