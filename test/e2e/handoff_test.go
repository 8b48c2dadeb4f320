package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/test/heartbeat"
)

func ticks(serial string) []heartbeat.Tick { return heartbeat.Ticks(serial) }

// A second container of a running VM, on the same node and storage, takes
// the running guest over (a live migration through a socket pair the new
// runner made and handed to the old one): the guest does not reboot (its
// boot id stays, its heartbeat counts on, the mark it wrote is not read
// again at a boot), the old runner quits its paused QEMU without pressing
// the power button, and the new one owns the guest: its stop powers the
// guest off, and the disk is sound after. A backup's dirty bitmap goes
// with the disk: the backup after the hand-off is an incremental of the
// one before.
func TestHandOffOnTheNode(t *testing.T) {
	v := newVM(t)
	env := append(kernelEnv("swarmvm.tick=1 swarmvm.mark=handoff"), "ACCEL=tcg", "DISK_SIZE=1G", "VM_MEMORY=256M", "SHUTDOWN_TIMEOUT=30s")
	v.run([]string{"--memory", "768m"}, env...)
	v.waitFor("the guest's mark and heartbeat", 120*time.Second, func() bool {
		return strings.Contains(v.serial(), "SWARMVM-GUEST-MARKED handoff") && len(ticks(v.serial())) >= 5
	})
	repo := backupRepo(t)
	full, out, err := v.backupHere(repo)
	if err != nil || full.Mode != "full" {
		t.Fatalf("the backup before the hand-off: %v %+v\n%s", err, full, out)
	}
	before := ticks(v.serial())
	boot := before[0].Boot

	n := v.next("next")
	n.run([]string{"--memory", "768m"}, env...)
	n.waitFor("the hand-off", 90*time.Second, func() bool { return strings.Contains(n.logs(), "event=handoff-done") })
	contains(t, "the old runner's log", v.logs(), "handing the guest over to the VM's next task", "guest handed over")
	t.Logf("the new runner: %s", lastLine(n.logs(), "event=handoff-done"))
	// The new task is healthy: its QEMU runs the guest.
	if h, err := exec.Command("docker", "exec", n.ctr, "swarmvm", "health").CombinedOutput(); err != nil || !strings.Contains(string(h), "running") {
		t.Errorf("health of the new task: %v %s", err, h)
	}
	code, took := v.stop(60 * time.Second)
	if code != 0 {
		t.Errorf("the old task's exit %d, want 0", code)
	}
	if logs := v.logs(); strings.Contains(logs, "pressing the ACPI power button") || !strings.Contains(logs, "handed over to the VM's next task") {
		t.Errorf("the old runner's stop after the hand-off:\n%s", logs)
	}
	t.Logf("the old task stopped in %v", took.Round(100*time.Millisecond))
	// The new runner binds the control socket once its QEMU runs the guest.
	var inc manifest
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Second) {
		if inc, out, err = v.backupHere(repo); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || inc.Mode != "incremental" || inc.Parent != full.ID {
		t.Errorf("the backup after the hand-off: %v %+v, want an incremental of %s\n%s", err, inc, full.ID, out)
	}
	last := before[len(before)-1].N
	n.waitFor("heartbeats after the hand-off", 30*time.Second, func() bool {
		ts := ticks(v.serial())
		return ts[len(ts)-1].N > last+10
	})
	serial := v.serial()
	assertHeartbeats(t, serial, boot)
	if strings.Count(serial, marker) != 1 || strings.Contains(serial, "SWARMVM-GUEST-MARK handoff") {
		t.Errorf("the guest booted again: %d boot markers; serial:\n%s", strings.Count(serial, marker), serial)
	}
	// The new task owns the guest: its stop powers the guest off.
	if code, _ := n.stop(60 * time.Second); code != 0 {
		t.Errorf("the new task's exit %d after its stop, want 0", code)
	}
	contains(t, "the new runner's log", n.logs(), "guest powered off through ACPI; QEMU exited 0")
	qemuImgCheck(t, filepath.Join(v.store, "images", v.name+".qcow2"))
}

// assertHeartbeats fails the test unless every heartbeat in serial is of
// one boot and its counter only went on (heartbeat.Check).
func assertHeartbeats(t testing.TB, serial, boot string) {
	t.Helper()
	if err := heartbeat.Check(serial, boot); err != nil {
		t.Fatal(err)
	}
}

// A service update of a running local VM that changes only its runner
// image (here the same image under another tag) hands the guest over to
// the new task on its node: deploy makes that update start-first, Swarm
// starts the new task beside the old one, the new task is healthy only
// once it runs the guest, and only then does Swarm stop the old one. The
// guest never reboots. A service an earlier swarmvm made (no hand-off
// label: its runner cannot hand over) is updated stop-first, as before.
func TestSwarmUpdateHandsOver(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-handoff-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	next := strings.Split(image, ":")[0] + ":handoff-test"
	if out, err := exec.Command("docker", "tag", image, next).CombinedOutput(); err != nil {
		t.Fatalf("docker tag: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("docker", "rmi", next).Run() })
	args := e.vmArgs(name, "tcg", "--env", "KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.tick=1")
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "120s"}, args...)...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	serialLog := filepath.Join(e.storage, "logs", name+".serial.log")
	serial := func() string { b, _ := os.ReadFile(serialLog); return string(b) }
	waitFor(t, "the guest's heartbeat", func() bool { return len(ticks(serial())) >= 5 })

	// As an earlier swarmvm made it: no hand-off label. The update is
	// stop-first: the guest boots again.
	if out, err := exec.Command("docker", "service", "update", "--detach", "--label-rm", "io.swarmvm.handoff", name).CombinedOutput(); err != nil {
		t.Fatalf("service update: %v %s", err, out)
	}
	first := ticks(serial())[0].Boot
	out, code := e.swarmvm(append([]string{"deploy", "--wait", "120s"}, append(args, "--image", next)...)...)
	if code != 0 || strings.Contains(out, "handed over") {
		t.Fatalf("deploy over a service without the hand-off label: exit %d\n%s", code, out)
	}
	var boot string
	waitFor(t, "the rebooted guest's heartbeat", func() bool {
		ts := ticks(serial())
		boot = ts[len(ts)-1].Boot
		return boot != first
	})

	old := containerOf(name)
	began := time.Now()
	out, code = e.swarmvm(append([]string{"deploy", "--wait", "120s"}, args...)...)
	if code != 0 || !strings.Contains(out, "only the runner's image changed: the running guest is handed over") {
		t.Fatalf("deploy with %s: exit %d\n%s", image, code, out)
	}
	t.Logf("deploy with the image before took %v:\n%s", time.Since(began).Round(100*time.Millisecond), out)
	waitFor(t, "the old task's end", func() bool {
		o, _ := exec.Command("docker", "inspect", "-f", "{{.State.Running}}", old).Output()
		return strings.TrimSpace(string(o)) != "true"
	})
	cur := containerOf(name)
	img, _ := exec.Command("docker", "inspect", "-f", "{{.Config.Image}}", cur).Output()
	if cur == old || !strings.HasPrefix(strings.TrimSpace(string(img)), image) {
		t.Fatalf("the running task is %s of image %s, want a new one of %s", cur, img, image)
	}
	newLog, _ := exec.Command("docker", "logs", cur).CombinedOutput()
	oldLog, _ := exec.Command("docker", "logs", old).CombinedOutput()
	contains(t, "the new task's log", string(newLog), "event=handoff-done")
	contains(t, "the old task's log", string(oldLog), "guest handed over", "handed over to the VM's next task")
	if strings.Contains(string(oldLog), "pressing the ACPI power button") {
		t.Errorf("the old task asked the guest to power off:\n%s", oldLog)
	}
	t.Logf("%s", lastLine(string(newLog), "event=handoff-done"))
	before := ticks(serial())
	last := before[len(before)-1].N
	waitFor(t, "heartbeats from the new task", func() bool { ts := ticks(serial()); return ts[len(ts)-1].N > last+10 })
	// From the second boot on: one boot, a counter that went on.
	assertHeartbeats(t, serial()[strings.Index(serial(), "SWARMVM-GUEST-TICK "+boot):], boot)
	if n := strings.Count(serial(), marker); n != 2 {
		t.Errorf("%d boot markers, want 2 (the first boot, the stop-first update's)", n)
	}
}

// A hand-off that cannot finish leaves the guest where it was. The test is
// the next task's runner, as a hostile or dying one would be: through the
// VM's control socket (root may ask) it hands the running runner a socket
// that no QEMU reads, so the migration stalls; meanwhile a real next task
// is refused (one hand-off at a time) and exits, and the stalled one is
// cancelled at its deadline. A socket whose reader is gone fails at once.
// After each, the guest runs on, unrebooted, and a real hand-off then
// works.
func TestHandOffFaults(t *testing.T) {
	v := newVM(t)
	env := append(kernelEnv("swarmvm.tick=1"), "ACCEL=tcg", "DISK_SIZE=1G", "VM_MEMORY=256M", "SHUTDOWN_TIMEOUT=30s")
	v.run([]string{"--memory", "768m"}, env...)
	v.waitFor("the guest's heartbeat", 120*time.Second, func() bool { return len(ticks(v.serial())) >= 3 })
	boot := ticks(v.serial())[0].Boot
	socket := filepath.Join(v.store, "images", v.name+".ctl")
	ask := func(id string, until time.Duration, peer func(*os.File)) error {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		ours, theirs := os.NewFile(uintptr(fds[0]), "ours"), os.NewFile(uintptr(fds[1]), "theirs")
		defer ours.Close()
		peer(ours)
		ctx, cancel := context.WithTimeout(context.Background(), until+30*time.Second)
		defer cancel()
		_, err = control.Ask(ctx, socket, control.Request{Op: control.OpMigrate, ID: id, Files: []string{control.FileMigration}, Until: time.Now().Add(until)}, theirs)
		theirs.Close()
		return err
	}
	goesOn := func(w *vm, what string) {
		t.Helper()
		last := ticks(v.serial())
		w.waitFor("heartbeats "+what, 30*time.Second, func() bool { ts := ticks(v.serial()); return ts[len(ts)-1].N > last[len(last)-1].N+3 })
		assertHeartbeats(t, v.serial(), boot)
		if out, err := exec.Command("docker", "exec", w.ctr, "swarmvm", "health").CombinedOutput(); err != nil {
			t.Fatalf("health %s: %v %s", what, err, out)
		}
	}

	stalled := make(chan error, 1)
	go func() { stalled <- ask("stalled", 8*time.Second, func(*os.File) {}) }()
	v.waitFor("the stalled hand-off", 10*time.Second, func() bool { return strings.Contains(v.logs(), "migration=stalled event=handoff-began") })
	n := v.next("refused")
	n.run([]string{"--memory", "768m"}, env...)
	if code := n.waitExit(60 * time.Second); code == 0 {
		t.Errorf("the next task exited 0 while a hand-off ran")
	}
	contains(t, "the refused task's log", n.logs(), "did not send the guest", "a hand-off of this VM is running")
	if err := <-stalled; err == nil || !strings.Contains(err.Error(), "cancelled: its deadline passed") {
		t.Errorf("the stalled hand-off: %v", err)
	}
	goesOn(v, "after the stalled hand-off")

	gone := ask("gone", 8*time.Second, func(f *os.File) { f.Close() })
	if gone == nil || !strings.Contains(gone.Error(), "the migration failed") {
		t.Errorf("a hand-off into a closed socket: %v", gone)
	}
	goesOn(v, "after the hand-off into a closed socket")

	m := v.next("next")
	m.run([]string{"--memory", "768m"}, env...)
	m.waitFor("the hand-off", 60*time.Second, func() bool { return strings.Contains(m.logs(), "event=handoff-done") })
	v.stop(60 * time.Second)
	goesOn(m, "in the next task")
}
