package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	vmstatus "github.com/swarmvm/swarmvm/internal/status"
)

// A guest kernel panic reaches QEMU through the pvpanic device; the runner
// stops the paused VM and exits 10 naming the cause, and the disk is left
// consistent.
func TestGuestPanicExits10(t *testing.T) {
	v := newVM(t)
	v.run(nil, append(kernelEnv("swarmvm.panic=1"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
	if code := v.waitExit(180 * time.Second); code != 10 {
		t.Fatalf("exit %d, want 10 (guest panicked)", code)
	}
	contains(t, "runner log", v.logs(), "-device pvpanic", "-action panic=pause",
		"guest kernel panicked (pvpanic); stopping QEMU", "event=exit code=10", "the guest kernel panicked (reported through pvpanic)")
	contains(t, "serial log", v.serial(), "SWARMVM-GUEST-PANIC", "Kernel panic - not syncing")
	qemuImgCheck(t, filepath.Join(v.store, "images", v.name+".qcow2"))
}

// QEMU killed by a signal (a crash, or the OOM killer): the runner exits 6
// naming the signal.
func TestQEMUKilledBySignal(t *testing.T) {
	for name, sig := range map[string]syscall.Signal{"SIGSEGV": syscall.SIGSEGV, "SIGKILL": syscall.SIGKILL} {
		t.Run(name, func(t *testing.T) {
			v := newVM(t)
			v.run(nil, append(kernelEnv(""), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
			v.waitFor("boot marker", 180*time.Second, func() bool { return strings.Contains(v.serial(), marker) })
			_, qemu := v.qemuPID()
			if err := syscall.Kill(qemu, sig); err != nil {
				t.Fatal(err)
			}
			if code := v.waitExit(30 * time.Second); code != 6 {
				t.Fatalf("exit %d, want 6 (QEMU crashed)", code)
			}
			contains(t, "runner log", v.logs(), fmt.Sprintf("QEMU ended unexpectedly (killed by signal %d (%s))", int(sig), sig), "event=exit code=6")
		})
	}
}

// A write that finds the storage volume full pauses the VM (QEMU's
// werror=enospc). The runner stays up with the same QEMU, health says
// unhealthy with the reason (and the --liveness check the image and the
// service use passes, so nothing restarts the task), and the VM resumes by
// itself once space returns; the guest's write then completes.
func TestDiskFullPausesAndResumes(t *testing.T) {
	v := newVM(t)
	images := filepath.Join(v.store, "images")
	os.MkdirAll(images, 0o755)
	// Leave 28 MiB: less than the runner's resume mark, and the guest's
	// 64 MiB of writes cannot fit.
	filler := smallVolume(t, images, "uid=10001,gid=10001,mode=0755", 100)
	t.Cleanup(func() { exec.Command("docker", "rm", "-f", v.name).Run() }) // before the unmount
	v.run([]string{"--health-interval", "1s", "--health-start-period", "1s"},
		append(kernelEnv("swarmvm.fill=64"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
	v.waitFor("the warning about the nearly full volume", 60*time.Second, func() bool {
		return strings.Contains(v.logs(), "the storage volume holding the disk is nearly full")
	})
	v.waitFor("the pause on a full volume", 180*time.Second, func() bool {
		return strings.Contains(v.logs(), "VM paused: a disk write found the storage volume full")
	})
	v.waitFor("QEMU's STOP event in the runner log", 30*time.Second, func() bool { return strings.Contains(v.logs(), "event=STOP") })
	runner, qemu := v.qemuPID()
	contains(t, "runner log", v.logs(), `reason="No space left on device"`)

	out, err := exec.Command("docker", "exec", v.name, "swarmvm", "health").CombinedOutput()
	if exitCode(err) != 1 || !strings.Contains(string(out), "no space left on the storage volume") {
		t.Fatalf("swarmvm health while paused: exit %d %q, want 1 and the reason", exitCode(err), out)
	}
	t.Logf("health: %s", strings.TrimSpace(string(out)))
	out, err = exec.Command("docker", "exec", v.name, "swarmvm", "health", "--liveness").CombinedOutput()
	if exitCode(err) != 0 || !strings.Contains(string(out), "unhealthy: ") || !strings.Contains(string(out), "a restart cannot free space") {
		t.Fatalf("swarmvm health --liveness while paused: exit %d %q", exitCode(err), out)
	}
	// Docker's own check (the image's HEALTHCHECK) ran on the paused VM and
	// did not turn the container unhealthy.
	v.waitFor("docker's health check to see the pause", 30*time.Second, func() bool {
		return strings.Contains(dockerHealth(t, v.name).last, "no space left")
	})
	if h := dockerHealth(t, v.name); h.status == "unhealthy" {
		t.Errorf("docker health status %s while waiting for space", h.status)
	}
	if strings.Contains(v.serial(), "SWARMVM-GUEST-FILLED") {
		t.Fatal("the guest's writes completed on a full volume")
	}
	time.Sleep(5 * time.Second) // the runner polls; the VM must stay paused meanwhile
	if strings.Contains(v.logs(), "resuming the VM") {
		t.Fatal("resumed while the volume was still full")
	}

	os.Remove(filler)
	freed := time.Now()
	v.waitFor("the guest's writes to complete", 120*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-FILLED 64MiB") })
	t.Logf("VM resumed and the guest's writes completed %v after space returned", time.Since(freed).Round(100*time.Millisecond))
	contains(t, "runner log", v.logs(), "storage volume has room again; resuming the VM (QMP cont)", "VM resumed after the storage volume had room again")
	if r, q := v.qemuPID(); r != runner || q != qemu {
		t.Errorf("runner/QEMU changed from %d/%d to %d/%d: the VM was restarted, not resumed", runner, qemu, r, q)
	}
	out, err = exec.Command("docker", "exec", v.name, "swarmvm", "health").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "healthy: ") {
		t.Fatalf("swarmvm health after resume: %v %q", err, out)
	}
	if code, _ := v.stop(60 * time.Second); code != 0 {
		t.Fatalf("exit %d after docker stop, want 0", code)
	}
	qemuImgCheck(t, filepath.Join(images, v.name+".qcow2"))
}

// smallVolume mounts a 128 MiB tmpfs at dir (unmounted at cleanup) and
// fills fillMiB of it with one file, whose path it returns: removing that
// file is space returning.
func smallVolume(t *testing.T, dir, opts string, fillMiB int) string {
	t.Helper()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=128m,"+opts, "swarmvm-e2e-full", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	filler := filepath.Join(dir, "filler")
	if out, err := exec.Command("dd", "if=/dev/urandom", "of="+filler, "bs=1M", fmt.Sprintf("count=%d", fillMiB), "status=none").CombinedOutput(); err != nil {
		t.Fatalf("filler: %v %s", err, out)
	}
	return filler
}

type health struct{ status, last string }

func dockerHealth(t testing.TB, container string) health {
	t.Helper()
	out, err := exec.Command("docker", "inspect", "-f", "{{json .State.Health}}", container).Output()
	if err != nil {
		t.Fatalf("docker inspect: %v", err)
	}
	var h struct {
		Status string
		Log    []struct{ Output string }
	}
	json.Unmarshal(out, &h)
	var last string
	if len(h.Log) > 0 {
		last = h.Log[len(h.Log)-1].Output
	}
	return health{status: h.Status, last: last}
}

// A bridge-mode VM whose QEMU is killed: the runner exits 6, its broker
// lease ends and the TAP leaves the bridge.
func TestBridgeTAPReclaimedAfterCrash(t *testing.T) {
	v, l, tap, brokerOut := bridgeVM(t)
	contains(t, "the VM's port "+tap+"o", l.ip("-d", "link", "show", "dev", tap+"o"), "master "+lanBridge)
	_, qemu := v.qemuPID()
	if err := syscall.Kill(qemu, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := v.waitExit(30 * time.Second); code != 6 {
		t.Fatalf("exit %d, want 6", code)
	}
	l.waitTAPGone(tap, brokerOut)
}

// A VM's OVMF vars of the wrong size (another firmware build's) is refused
// with the fix and left as it was; OVMF_VARS_RESET=true sets it aside, and
// the VM starts from the template with the firmware in the image.
func TestOVMFVarsWrongSize(t *testing.T) {
	v := newVM(t)
	images := filepath.Join(v.store, "images")
	os.MkdirAll(images, 0o755)
	vars := filepath.Join(images, v.name+".OVMF_VARS.fd")
	os.WriteFile(vars, []byte(strings.Repeat("N", 131072)), 0o600)
	chownAll(t, v.store, runnerUID)
	before := sha(t, vars)
	env := append(kernelEnv(""), "ACCEL=tcg", "DISK_SIZE=1G", "VM_MEMORY=256M", "SHUTDOWN_TIMEOUT=2s")
	v.run(nil, env...)
	if code := v.waitExit(30 * time.Second); code != 4 {
		t.Fatalf("exit %d, want 4 (storage)", code)
	}
	contains(t, "runner log", v.logs(), "is 131072 bytes but OVMF_VARS_TEMPLATE is 540672", "set OVMF_VARS_RESET=true once")
	if sha(t, vars) != before {
		t.Fatal("the refused vars file changed")
	}
	if _, err := os.Stat(filepath.Join(images, v.name+".qcow2")); !os.IsNotExist(err) {
		t.Errorf("disk created by a refused run: %v", err)
	}

	exec.Command("docker", "rm", v.name).Run()
	v.run(nil, append(env, "OVMF_VARS_RESET=true")...)
	v.waitFor("VM running", 60*time.Second, func() bool { return strings.Contains(v.logs(), `msg="VM running"`) })
	aside, _ := filepath.Glob(vars + ".*.bak")
	if len(aside) != 1 || sha(t, aside[0]) != before {
		t.Fatalf("old vars not set aside intact: %v", aside)
	}
	if fi, err := os.Stat(vars); err != nil || fi.Size() != 540672 {
		t.Fatalf("vars after reset: %v %v", fi, err)
	}
}

// The same full volume under Swarm: the service's health check
// (swarmvm health --liveness) keeps passing while the VM waits, so Swarm
// neither fails nor restarts the task through three check intervals and
// more; the health log names the full volume; the VM resumes in the same
// task once space returns.
func TestSwarmDiskFullNoRestartLoop(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	images := filepath.Join(e.storage, "images")
	// As node label leaves images/: root's, the VMs' group, sticky.
	filler := smallVolume(t, images, "uid=0,gid=10001,mode=1770", 96)
	name := fmt.Sprintf("e2e-full-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	args := append([]string{"deploy", "--wait", "90s"}, e.vmArgs(name, "tcg", "--env", "KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.fill=64")...)
	if out, code := e.swarmvm(args...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	task := containerOf(name)
	waitFor(t, "the pause on a full volume", func() bool {
		out, _ := exec.Command("docker", "logs", task).CombinedOutput()
		return strings.Contains(string(out), "VM paused: a disk write found the storage volume full")
	})
	paused := time.Now()
	// Three failed checks 10 s apart would fail the task; wait well past that.
	time.Sleep(45 * time.Second)
	if c := containerOf(name); c != task {
		t.Fatalf("the task was replaced (%s -> %s) while the VM waited for space", task, c)
	}
	hist, _ := exec.Command("docker", "service", "ps", "-q", name).Output()
	if n := len(strings.Fields(string(hist))); n != 1 {
		t.Fatalf("%d tasks after %v paused, want 1 (no restart)", n, time.Since(paused).Round(time.Second))
	}
	h := dockerHealth(t, task)
	st, ok := vmstatus.ParseHealth(h.last)
	if h.status != "healthy" || !ok || st.State != vmstatus.StateFull || st.Healthy || !st.Waiting || !strings.Contains(st.Reason, "no space left on the storage volume") {
		t.Fatalf("docker health %q, last check %q: want healthy, with the runner's status saying paused on a full volume", h.status, h.last)
	}
	t.Logf("paused %v, one task, health %s: %s", time.Since(paused).Round(time.Second), h.status, strings.TrimSpace(h.last))
	if ps, _ := e.swarmvm("ps"); !strings.Contains(ps, "paused: storage full") {
		t.Errorf("swarmvm ps does not show the pause:\n%s", ps)
	}

	os.Remove(filler)
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), "SWARMVM-GUEST-FILLED 64MiB", 120*time.Second)
	out, _ := exec.Command("docker", "logs", task).CombinedOutput()
	contains(t, "runner log", string(out), "resuming the VM (QMP cont)", "VM resumed after the storage volume had room again")
	if c := containerOf(name); c != task {
		t.Fatalf("the task was replaced (%s -> %s)", task, c)
	}
}
