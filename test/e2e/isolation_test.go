package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A process of another uid (in the VMs' group) that plants a disk and an
// NVRAM file under a VM's names in a loop, world-writable, while the VM
// starts, never gets its file used: each start either refuses (exit 4,
// before QEMU) or runs on files of the VM's own uid, which QEMU holds
// through the descriptors the runner checked (seen in /proc/<qemu>/fd).
func TestPlantedFilesNeverUsed(t *testing.T) {
	const attacker = 4242
	refused, ran := 0, 0
	for round := 0; round < 6; round++ {
		v := newVM(t)
		images := filepath.Join(v.store, "images")
		os.MkdirAll(images, 0o777)
		os.Chmod(images, 0o1777) // shared like the node's images/, sticky
		planted := filepath.Join(v.store, "planted.qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", planted, "64M").CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		os.Chmod(planted, 0o644)
		os.Chmod(v.store, 0o755)
		disk, vars := filepath.Join(images, v.name+".qcow2"), filepath.Join(images, v.name+".OVMF_VARS.fd")
		loop := exec.Command("/bin/sh", "-c", fmt.Sprintf(
			"while :; do cp %s %s.x 2>/dev/null && chmod 666 %s.x && mv -n %s.x %s 2>/dev/null; head -c 540672 /dev/zero > %s.y 2>/dev/null && chmod 666 %s.y && mv -n %s.y %s 2>/dev/null; done",
			planted, disk, disk, disk, disk, vars, vars, vars, vars))
		loop.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: attacker, Gid: runnerUID}}
		// The planter starts at a different moment of each start: before
		// the runner looks, while it creates, after.
		started := make(chan error, 1)
		go func() {
			time.Sleep(time.Duration(round*300) * time.Millisecond)
			started <- loop.Start()
		}()
		if round == 0 { // the planter wins this one: its files are in place first
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				_, derr := os.Stat(disk)
				_, verr := os.Stat(vars)
				if derr == nil && verr == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the planter planted nothing in 10 s")
				}
			}
		}
		v.run(nil, append(kernelEnv(""), "ACCEL=tcg", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
		deadline := time.Now().Add(60 * time.Second)
		for v.running() && !strings.Contains(v.logs(), "VM running") && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if v.running() {
			_, qemu := v.qemuPID()
			for _, f := range []string{disk, vars} {
				if uid := heldBy(t, qemu, f); uid != runnerUID {
					t.Errorf("round %d: QEMU holds %s of uid %d", round, f, uid)
				}
			}
			ran++
			if round == 0 {
				t.Errorf("round 0: the VM ran though the planter's files held its names before it started")
			}
		} else {
			if code := v.exitCode(); code != 4 {
				t.Errorf("round %d: exit %d, want 4 (refused) or running:\n%s", round, code, v.logs())
			}
			for _, l := range strings.Split(v.logs(), "\n") {
				if strings.Contains(l, "level=ERROR") {
					t.Logf("round %d refused: %s", round, l[strings.Index(l, "msg="):])
					break
				}
			}
			refused++
		}
		if err := <-started; err != nil {
			t.Fatalf("the planter: %v", err)
		}
		time.Sleep(500 * time.Millisecond) // it plants a while after this start, too
		loop.Process.Kill()
		loop.Wait()
		exec.Command("docker", "rm", "-f", v.name).Run()
	}
	t.Logf("6 starts against a planting loop: %d ran on their own files, %d refused before QEMU", ran, refused)
	if refused == 0 {
		t.Error("the planter never got a file under the VM's names in time: the defence was not put to the test")
	}
}

// heldBy returns the owner uid of the file QEMU holds open under path
// (-1 when it holds none).
func heldBy(t *testing.T, pid int, path string) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var want syscall.Stat_t
	if err := syscall.Stat(path, &want); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	for _, e := range ents {
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(dir, e.Name()), &st) == nil && st.Dev == want.Dev && st.Ino == want.Ino {
			return int(st.Uid)
		}
	}
	// QEMU holds a file, of some owner, that the name no longer leads to.
	for _, e := range ents {
		link, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if strings.HasPrefix(link, filepath.Dir(path)) {
			var st syscall.Stat_t
			syscall.Stat(filepath.Join(dir, e.Name()), &st)
			t.Logf("QEMU fd %s -> %s (uid %s)", e.Name(), link, strconv.Itoa(int(st.Uid)))
			return int(st.Uid)
		}
	}
	return -1
}
