package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// The test guest boots under TCG through OVMF (UEFI, the default), prints
// its marker on the serial console, and powers off through ACPI when the
// container is stopped: exit 0, before the shutdown timeout would force it.
func TestTCGBootAndACPIStop(t *testing.T) {
	v := newVM(t)
	// No VM_MEMORY: guest RAM is the container's limit less QEMU's
	// overhead under TCG (768M - 384M).
	v.run([]string{"--memory", "768m"}, append(kernelEnv(""), "ACCEL=tcg", "DISK_SIZE=1G", "SHUTDOWN_TIMEOUT=60s")...)
	began := time.Now()
	v.waitFor("boot marker in the serial log", 180*time.Second, func() bool { return strings.Contains(v.serial(), marker) })
	t.Logf("guest booted under TCG through OVMF in %v", time.Since(began).Round(100*time.Millisecond))

	contains(t, "runner log", v.logs(), "guest=384M qemu_overhead=384M container_limit=768M", "-m 384M")
	runner, qemu := v.qemuPID()
	assertUnprivileged(t, runner, qemu)
	assertOnlyHanded(t, v, qemu)

	code, took := v.stop(90 * time.Second)
	if code != 0 {
		t.Fatalf("exit %d after docker stop, want 0", code)
	}
	logs := v.logs()
	contains(t, "runner log", logs, "pressing the ACPI power button", "guest powered off through ACPI; QEMU exited 0")
	if strings.Contains(logs, "forcing") {
		t.Error("shutdown was forced")
	}
	contains(t, "serial log", v.serial(), "SWARMVM-GUEST-POWEROFF")
	t.Logf("docker stop took %v (SHUTDOWN_TIMEOUT 60s)", took.Round(100*time.Millisecond))
	qemuImgCheck(t, filepath.Join(v.store, "images", v.name+".qcow2"))
}

// A guest still booting misses the power button: here it listens only 8 s
// after its marker, and the container is stopped before that. The runner
// presses again every 5 s; the guest powers off, with no forced stop.
func TestPowerButtonWhileBooting(t *testing.T) {
	v := newVM(t)
	v.run(nil, append(kernelEnv("swarmvm.acpi=late"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "SHUTDOWN_TIMEOUT=60s")...)
	v.waitFor("boot marker", 180*time.Second, func() bool { return strings.Contains(v.serial(), marker) })
	code, took := v.stop(90 * time.Second)
	if code != 0 {
		t.Fatalf("exit %d after docker stop, want 0", code)
	}
	logs := v.logs()
	contains(t, "runner log", logs, "press=1", "press=2", "guest powered off through ACPI; QEMU exited 0")
	if strings.Contains(logs, "forcing") {
		t.Error("shutdown was forced")
	}
	serial := v.serial()
	contains(t, "serial log", serial, "heard 8 s from now", "acpid started", "SWARMVM-GUEST-POWEROFF")
	t.Logf("docker stop took %v, %d presses", took.Round(100*time.Millisecond), strings.Count(logs, "pressing the ACPI power button"))
}

// A guest that ignores the power button is stopped by force when
// SHUTDOWN_TIMEOUT ends, well before Docker's own SIGKILL, and the runner
// says so with its own exit code.
func TestForcedStopWhenGuestIgnoresACPI(t *testing.T) {
	v := newVM(t)
	v.run(nil, append(kernelEnv("swarmvm.acpi=ignore"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "SHUTDOWN_TIMEOUT=5s")...)
	v.waitFor("boot marker", 180*time.Second, func() bool { return strings.Contains(v.serial(), marker) })
	code, took := v.stop(60 * time.Second)
	if code != 7 {
		t.Fatalf("exit %d, want 7 (forced stop)", code)
	}
	if took > 45*time.Second {
		t.Errorf("stop took %v: the runner's budget did not end it before docker's", took)
	}
	contains(t, "runner log", v.logs(), "guest did not power off in time; forcing", "QMP quit", "forced stop")
	contains(t, "serial log", v.serial(), "ignoring the ACPI power button")
	qemuImgCheck(t, filepath.Join(v.store, "images", v.name+".qcow2"))
}

// With the KVM device passed in (plain docker run), the runner hands QEMU
// the descriptor, QMP query-kvm says enabled, QEMU holds a kvm-vm
// descriptor, health says healthy, and QEMU is still unprivileged.
func TestKVMWithDevice(t *testing.T) {
	kvmtest.Require(t)
	v := newVM(t)
	gid := kvmGID(t)
	// The image's own HEALTHCHECK, polled every second here.
	v.run([]string{"--device", "/dev/kvm", "--group-add", strconv.Itoa(gid), "--health-interval", "1s", "--health-start-period", "1s"},
		append(kernelEnv(""), "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "CPU_MODEL=host,-arch-capabilities")...)
	v.waitFor("KVM verified", 60*time.Second, func() bool { return strings.Contains(v.logs(), "KVM verified") })
	contains(t, "runner log", v.logs(), `query_kvm="enabled=true present=true"`, "kvm-vm=1 kvm-vcpu=1")

	runner, qemu := v.qemuPID()
	fds, _ := os.ReadDir("/proc/" + strconv.Itoa(qemu) + "/fd")
	var kinds []string
	for _, fd := range fds {
		l, _ := os.Readlink("/proc/" + strconv.Itoa(qemu) + "/fd/" + fd.Name())
		kinds = append(kinds, l)
	}
	contains(t, "QEMU's descriptors", strings.Join(kinds, " "), "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0")
	assertUnprivileged(t, runner, qemu)

	out, err := exec.Command("docker", "exec", v.name, "swarmvm", "health").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "healthy: ") || !strings.Contains(string(out), "KVM enabled") {
		t.Fatalf("swarmvm health: %v %q", err, out)
	}
	t.Logf("health: %s", strings.TrimSpace(string(out)))
	v.waitFor("docker's health status healthy", 30*time.Second, func() bool {
		st, _ := exec.Command("docker", "inspect", "-f", "{{.State.Health.Status}}", v.name).Output()
		return strings.TrimSpace(string(st)) == "healthy"
	})
}

// Guest RAM that cannot fit the container's memory limit with QEMU's
// overhead is refused before anything starts, naming the variable.
func TestMemoryOverLimitRefused(t *testing.T) {
	v := newVM(t)
	v.run([]string{"--memory", "512m"}, "VM_MEMORY=1G", "ACCEL=tcg", "DISK_SIZE=1G")
	if code := v.waitExit(30 * time.Second); code != 2 {
		t.Fatalf("exit %d, want 2 (configuration)", code)
	}
	contains(t, "runner log", v.logs(), "VM_MEMORY: 1G plus QEMU's 384M overhead does not fit the container's 512M memory limit", "lower VM_MEMORY to at most 128M")
	if _, err := os.Stat(filepath.Join(v.store, "images", v.name+".qcow2")); !os.IsNotExist(err) {
		t.Errorf("disk created by a run refused for its configuration: %v", err)
	}
}

// Without a usable KVM device the runner stops at preflight with the cause
// and the fix, exit code 3, and leaves an existing disk and NVRAM exactly
// as they were. The device is a node with /dev/kvm's numbers that the test
// makes (kvmtest.FakeNode): what refuses the open (the device cgroup, the
// file mode) acts before any KVM would, so this runs on every host.
func TestKVMUnavailable(t *testing.T) {
	const gid = 4242 // the fake device's group, as udev gives /dev/kvm the kvm group
	cases := []struct {
		name  string
		flags []string
		cause string
	}{
		{"missing", nil, "/dev/kvm is missing in this container"},
		// The Swarm case: a bind mount puts the node in the container, the
		// file mode allows the user, but the device cgroup denies the open.
		{"bind-mounted", []string{"-v", "NODE:/dev/kvm", "--group-add", strconv.Itoa(gid)}, "the device cgroup denies opening it"},
		// Mode and group: the user is not in the device's group.
		{"no-group", []string{"--device", "NODE:/dev/kvm"}, "uid 10001 gid 10001 groups 10001 may not open /dev/kvm"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := newVM(t)
			node := filepath.Join(t.TempDir(), "kvm")
			kvmtest.FakeNode(t, node, 0, gid, 0o660)
			images := filepath.Join(v.store, "images")
			os.MkdirAll(images, 0o755)
			disk := filepath.Join(images, v.name+".qcow2")
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img: %v %s", err, out)
			}
			vars := filepath.Join(images, v.name+".OVMF_VARS.fd")
			os.WriteFile(vars, []byte(strings.Repeat("N", 540672)), 0o600)
			chownAll(t, v.store, runnerUID)
			diskSum, varsSum := sha(t, disk), sha(t, vars)

			flags := append([]string(nil), tc.flags...)
			for i, f := range flags {
				flags[i] = strings.Replace(f, "NODE", node, 1)
			}
			v.run(flags)
			if code := v.waitExit(30 * time.Second); code != 3 {
				t.Fatalf("exit %d, want 3 (KVM unavailable)", code)
			}
			contains(t, "runner log", v.logs(), "KVM not available", tc.cause, "start the broker")
			if sha(t, disk) != diskSum || sha(t, vars) != varsSum {
				t.Error("disk or OVMF vars changed by a run that failed preflight")
			}
		})
	}
}

// swarmvm doctor in the image tells the operator what is wrong here.
func TestDoctorInImage(t *testing.T) {
	require(t)
	out, err := exec.Command("docker", "run", "--rm", "--read-only", "--cap-drop", "ALL", "--entrypoint", "swarmvm", image, "doctor").CombinedOutput()
	if code := exitCode(err); code != 1 {
		t.Fatalf("doctor exit %d, want 1: %s", code, out)
	}
	contains(t, "doctor output", string(out),
		"FAIL  kvm device", "/dev/kvm is missing in this container", "fix:",
		"ok    qemu", "QEMU 10.", "FAIL  storage", "/var/lib/poc-qemu does not exist")
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

// Two VMs on one disk: the second is refused with its own exit code and a
// clear message, and the first VM runs on untouched. (A second runner of
// the same VM takes its guest over instead: TestHandOffOnTheNode.) Nothing in any argv
// turns image locking off, so QEMU's lock is what decides.
func TestTwoRunnersOneDisk(t *testing.T) {
	v := newVM(t)
	env := append(kernelEnv(""), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")
	v.run(nil, env...)
	v.waitFor("boot marker", 120*time.Second, func() bool { return strings.Contains(v.serial(), marker) })

	second := v.name + "-2"
	args := []string{"run", "-d", "--name", second, "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
		"--user", fmt.Sprintf("%d:%d", runnerUID, runnerUID), "--tmpfs", "/run:rw,nosuid,nodev,size=16m",
		"-v", v.store + ":/var/lib/poc-qemu", "-e", "VM_NAME=" + second, "-e", "IMAGE_PATH=/var/lib/poc-qemu/images/" + v.name + ".qcow2"}
	for _, e := range env {
		args = append(args, "-e", e)
	}
	if out, err := exec.Command("docker", append(args, image)...).CombinedOutput(); err != nil {
		t.Fatalf("docker run: %v %s", err, out)
	}
	defer exec.Command("docker", "rm", "-f", second).Run()
	var code int
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _ := exec.Command("docker", "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", second).Output()
		f := strings.Fields(string(out))
		if len(f) == 2 && f[0] == "false" {
			code, _ = strconv.Atoi(f[1])
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second runner is still running on a disk in use")
		}
		time.Sleep(200 * time.Millisecond)
	}
	logs, _ := exec.Command("docker", "logs", second).CombinedOutput()
	if code != 9 {
		t.Fatalf("second runner exit %d, want 9 (disk busy):\n%s", code, logs)
	}
	contains(t, "second runner's log", string(logs), "is in use by another QEMU", "two VMs may not share a disk")
	if !v.running() {
		t.Fatal("the first VM stopped")
	}
}

// QEMU in the image takes KVM from an fdset exactly as the runner hands it
// (-add-fd fd=3,set=1,opaque=kvm -accel kvm,device=/dev/fdset/1): given a
// descriptor that is not KVM (/dev/null), it gets past option parsing and
// the fdset, and fails at the KVM ioctl on that descriptor. Without the
// descriptor it fails finding the fdset; a misspelt property fails at
// parsing. So the path holds on a host without KVM, up to the kernel.
func TestQEMUTakesKVMFromFdset(t *testing.T) {
	require(t)
	qemu := func(script string) string {
		t.Helper()
		out, err := exec.Command("docker", "run", "--rm", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
			"--user", fmt.Sprintf("%d:%d", runnerUID, runnerUID), "--network", "none", "--entrypoint", "sh", image, "-c",
			script+" exec qemu-system-x86_64 -nodefaults -display none -machine q35 "+
				"-add-fd fd=3,set=1,opaque=kvm -accel kvm,device=/dev/fdset/1").CombinedOutput()
		if code := exitCode(err); code != 1 {
			t.Fatalf("QEMU exit %d, want 1: %s", code, out)
		}
		return string(out)
	}
	out := qemu("exec 3<>/dev/null;")
	contains(t, "QEMU given /dev/null as KVM", out, "-accel kvm,device=/dev/fdset/1: failed to initialize kvm: Inappropriate ioctl for device")
	for _, early := range []string{"Property", "Could not access KVM kernel module", "invalid"} {
		if strings.Contains(out, early) {
			t.Errorf("QEMU given /dev/null failed before the ioctl (%q): %s", early, out)
		}
	}
	out = qemu("exec 3<&-;") // fd 3 closed: -add-fd itself refuses
	contains(t, "QEMU given no descriptor", out, "-add-fd fd=3,set=1,opaque=kvm")
	t.Logf("QEMU given /dev/null through the fdset fails at the ioctl; without fd 3: %s", strings.TrimSpace(out))
}
