package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// manifest is what the test reads of a backup's manifest.json.
type manifest struct {
	ID, Parent, Mode, Consistency, Bitmap string
	ModeReason                            string `json:"mode_reason"`
	ConsistencyWhy                        string `json:"consistency_why"`
	Online                                bool
	DiskSize                              int64 `json:"disk_size"`
	Files                                 []struct {
		Name, Role string
		Size       int64
	}
}

// backupRepo makes a repository as an operator would: root's, mode 1733
// (each VM's uid makes its own folder in it, and lists nobody's).
func backupRepo(t testing.TB) string {
	t.Helper()
	repo, err := os.MkdirTemp("/var/tmp", "swarmvm-e2e-repo-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(repo, 0o1733)
	t.Cleanup(func() { os.RemoveAll(repo) })
	return repo
}

// backupHere runs the backup job's side as the VM's uid on this host, as
// Swarm's job does on the VM's node, and returns the new backup's
// manifest and the job's output.
func (v *vm) backupHere(repo string, args ...string) (manifest, string, error) {
	v.t.Helper()
	cmd := exec.Command(swarmvmBin(v.t), append([]string{"backup", "here", "--repo", repo, "--node-name", "e2e"}, args...)...)
	cmd.Env = []string{"VM_NAME=" + v.name, "STORAGE_DIR=" + v.store, "PATH=" + os.Getenv("PATH")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: runnerUID, Gid: runnerUID}}
	before := backupIDs(v.t, repo, v.name)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return manifest{}, string(out), err
	}
	var added []string
	for _, id := range backupIDs(v.t, repo, v.name) {
		if !slices.Contains(before, id) {
			added = append(added, id)
		}
	}
	if len(added) != 1 {
		v.t.Fatalf("backups %v before, %v new after one more:\n%s", before, added, out)
	}
	var m manifest
	b, err := os.ReadFile(filepath.Join(repo, v.name, added[0], "manifest.json"))
	if err == nil {
		err = json.Unmarshal(b, &m)
	}
	if err != nil {
		v.t.Fatalf("manifest: %v", err)
	}
	v.t.Logf("backup %s: %s (%s), %s (%s), files %+v", m.ID, m.Mode, m.ModeReason, m.Consistency, m.ConsistencyWhy, m.Files)
	return m, string(out), nil
}

// backupIDs lists the complete backups' folders.
func backupIDs(t testing.TB, repo, vm string) []string {
	t.Helper()
	des, _ := os.ReadDir(filepath.Join(repo, vm))
	var ids []string
	for _, de := range des {
		if de.IsDir() && !strings.HasSuffix(de.Name(), ".partial") {
			ids = append(ids, de.Name())
		}
	}
	return ids
}

// diskOf is the size a backup's disk0.qcow2 takes.
func diskOf(t testing.TB, repo, vm, id string) int64 {
	t.Helper()
	fi, err := os.Stat(filepath.Join(repo, vm, id, "disk0.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// Online backups of a running VM through its runner: full, then an
// incremental holding only what changed; a restore of the chain is the
// disk bit for bit once the VM stopped; a stopped VM is backed up whole and
// its next online backup is incremental again (the bitmap is kept in the
// qcow2); after QEMU is killed the next backup is full and says why; a
// second backup while one runs is refused.
func TestBackupOnline(t *testing.T) {
	v := newVM(t)
	repo := backupRepo(t)
	v.run(nil, append(kernelEnv("swarmvm.fill=48"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
	v.waitFor("the guest's 48 MiB", 180*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-FILLED 48MiB") })
	v.waitFor("the control socket", 30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(v.store, "images", v.name+".ctl"))
		return err == nil
	})

	full, _, err := v.backupHere(repo)
	if err != nil {
		t.Fatal(err)
	}
	if full.Mode != "full" || !full.Online || full.Consistency != "crash" || full.Parent != "" || full.DiskSize != 1<<30 {
		t.Errorf("first backup: %+v", full)
	}
	fullSize := diskOf(t, repo, v.name, full.ID)
	inc, _, err := v.backupHere(repo)
	if err != nil {
		t.Fatal(err)
	}
	incSize := diskOf(t, repo, v.name, inc.ID)
	t.Logf("full backup's disk %d bytes, the incremental's after no guest writes %d bytes", fullSize, incSize)
	if inc.Mode != "incremental" || inc.Parent != full.ID || !strings.Contains(inc.ModeReason, "changes since backup "+full.ID) {
		t.Errorf("second backup: %+v", inc)
	}
	if fullSize < 48<<20 || incSize > 4<<20 {
		t.Errorf("full %d bytes (the guest wrote 48 MiB), incremental %d bytes (nothing changed)", fullSize, incSize)
	}
	// One backup at a time: the repository lock.
	lockf, err := os.Open(filepath.Join(repo, v.name, ".lock"))
	if err != nil {
		t.Fatal(err)
	}
	syscall.Flock(int(lockf.Fd()), syscall.LOCK_EX)
	if _, out, err := v.backupHere(repo); err == nil || !strings.Contains(out, "a backup of "+v.name+" is running") {
		t.Errorf("a second backup while one runs: %v\n%s", err, out)
	}
	lockf.Close()

	// Stopped cleanly, the disk is what the incremental's chain restores.
	if code, _ := v.stop(60 * time.Second); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	restored := filepath.Join(t.TempDir(), "restored.qcow2")
	run(t, "qemu-img", "convert", "-O", "qcow2", filepath.Join(repo, v.name, inc.ID, "disk0.qcow2"), restored)
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", restored, filepath.Join(v.store, "images", v.name+".qcow2"))

	// Stopped: a full backup from the disk, and a bitmap for the next.
	off, _, err := v.backupHere(repo)
	if err != nil {
		t.Fatal(err)
	}
	if off.Mode != "full" || off.Online || !strings.Contains(off.ModeReason, "stopped") {
		t.Errorf("backup of the stopped VM: %+v", off)
	}
	v.startAgain()
	again, _, err := v.backupHere(repo)
	if err != nil {
		t.Fatal(err)
	}
	if again.Mode != "incremental" || again.Parent != off.ID {
		t.Errorf("online backup after an offline one: %+v", again)
	}

	// QEMU killed before it saved the bitmap it made: the next backup is
	// full, and says why.
	v.killQEMU()
	afterKill, _, err := v.backupHere(repo)
	if err != nil {
		t.Fatal(err)
	}
	if afterKill.Mode != "full" || !strings.Contains(afterKill.ModeReason, "no dirty bitmap of backup "+again.ID) || !strings.Contains(afterKill.ModeReason, "killed") {
		t.Errorf("backup after QEMU was killed: %+v", afterKill)
	}
	// A bitmap saved by a clean stop, loaded by the next start, and QEMU
	// killed: the image marks it inconsistent; the next backup is full.
	if code, _ := v.stop(60 * time.Second); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	v.startAgain()
	v.killQEMU()
	inconsistent, _, err := v.backupHere(repo)
	if err != nil {
		t.Fatal(err)
	}
	if inconsistent.Mode != "full" || !strings.Contains(inconsistent.ModeReason, "the dirty bitmap of backup "+afterKill.ID+" is inconsistent") {
		t.Errorf("backup after QEMU was killed with a saved bitmap: %+v", inconsistent)
	}
	v.stop(60 * time.Second)

	// verify re-reads all six; prune keeps the newest and what it builds
	// on (it is full: itself alone); a damaged backup fails verify, named.
	bin := swarmvmBin(t)
	if out, err := exec.Command(bin, "backup", "verify", v.name, "--repo", repo).CombinedOutput(); err != nil || strings.Count(string(out), " ok (") != 6 {
		t.Errorf("verify: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "backup", "prune", v.name, "--repo", repo, "--keep-last", "1").CombinedOutput()
	if ids := backupIDs(t, repo, v.name); err != nil || len(ids) != 1 || ids[0] != inconsistent.ID || strings.Count(string(out), "remove ") != 5 {
		t.Errorf("prune --keep-last 1: %v, left %v\n%s", err, ids, out)
	}
	f, err := os.OpenFile(filepath.Join(repo, v.name, inconsistent.ID, "disk0.qcow2"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("X"), 2<<20)
	f.Close()
	if out, err := exec.Command(bin, "backup", "verify", v.name, "--repo", repo).CombinedOutput(); err == nil || !strings.Contains(string(out), inconsistent.ID+"  DAMAGED: backup "+inconsistent.ID+": disk0.qcow2 does not match its manifest") {
		t.Errorf("verify of a damaged backup: %v\n%s", err, out)
	}
}

// A backup cut short, its job and the runner killed while QEMU copies: ls
// lists nothing; the next backup removes what was left and is full; verify
// passes.
func TestBackupCutShort(t *testing.T) {
	v := newVM(t)
	repo := backupRepo(t)
	v.run(nil, append(kernelEnv("swarmvm.fill=400"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
	v.waitFor("the guest's 400 MiB", 300*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-FILLED 400MiB") })
	v.waitFor("the control socket", 30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(v.store, "images", v.name+".ctl"))
		return err == nil
	})
	job := exec.Command(swarmvmBin(t), "backup", "here", "--repo", repo, "--node-name", "e2e")
	job.Env = []string{"VM_NAME=" + v.name, "STORAGE_DIR=" + v.store, "PATH=" + os.Getenv("PATH")}
	job.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: runnerUID, Gid: runnerUID}}
	var jobOut lockedBuf
	job.Stdout, job.Stderr = &jobOut, &jobOut
	if err := job.Start(); err != nil {
		t.Fatal(err)
	}
	// Killed once QEMU has copied some of the disk, not all.
	var copied int64
	v.waitFor("the copy under way", 60*time.Second, func() bool {
		parts, _ := filepath.Glob(filepath.Join(repo, v.name, "*.partial", "disk0.qcow2"))
		if len(parts) == 1 {
			if fi, err := os.Stat(parts[0]); err == nil {
				copied = fi.Size()
			}
		}
		return copied > 8<<20
	})
	job.Process.Kill()
	exec.Command("docker", "kill", "-s", "KILL", v.name).Run()
	job.Wait()
	if copied >= 400<<20 {
		t.Fatalf("the copy had finished (%d bytes) before the kill", copied)
	}
	t.Logf("killed the job and the runner with %d bytes copied", copied)
	out, err := exec.Command(swarmvmBin(t), "backup", "ls", v.name, "--repo", repo, "--json").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "[]" {
		t.Errorf("ls after a cut backup: %v\n%s", err, out)
	}
	v.waitExit(30 * time.Second)
	v.startAgain()
	m, jout, err := v.backupHere(repo)
	if err != nil || m.Mode != "full" || !strings.Contains(jout, ".partial, left by a backup that did not finish") {
		t.Fatalf("the backup after: %v %+v\n%s", err, m, jout)
	}
	if out, err := exec.Command(swarmvmBin(t), "backup", "verify", v.name, "--repo", repo).CombinedOutput(); err != nil || strings.Count(string(out), " ok (") != 1 {
		t.Errorf("verify: %v\n%s", err, out)
	}
	v.stop(60 * time.Second)
}

// startAgain starts the stopped container and waits for its VM to run.
func (v *vm) startAgain() {
	v.t.Helper()
	runs := strings.Count(v.logs(), `msg="VM running"`)
	if out, err := exec.Command("docker", "start", v.name).CombinedOutput(); err != nil {
		v.t.Fatalf("docker start: %v %s", err, out)
	}
	v.waitFor("the VM to run again", 120*time.Second, func() bool { return strings.Count(v.logs(), `msg="VM running"`) > runs })
}

// killQEMU kills QEMU (its runner exits: crashed) and starts the VM again.
func (v *vm) killQEMU() {
	v.t.Helper()
	_, qemu := v.qemuPID()
	syscall.Kill(qemu, syscall.SIGKILL)
	v.waitExit(60 * time.Second)
	v.startAgain()
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// Through Swarm: swarmvm backup finds the VM's node and runs the job
// there as the VM's uid; online full, then incremental; ls lists both;
// scaled to 0, the VM is backed up from its disk on its home. The manifest
// keeps the service's definition.
func TestSwarmBackup(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	repo := backupRepo(t)
	name := fmt.Sprintf("e2e-backup-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	args := e.vmArgs(name, "tcg", "--env", "KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.fill=16")
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "120s"}, args...)...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	for i, want := range []string{"full backup (the first backup of this VM in the repository)", "incremental backup (changes since backup"} {
		var out string
		var code int
		// the runner binds its control socket once the VM runs
		deadline := time.Now().Add(60 * time.Second)
		for {
			out, code = e.swarmvm("backup", name, "--repo", repo)
			if code == 0 || time.Now().After(deadline) || i > 0 {
				break
			}
			time.Sleep(2 * time.Second)
		}
		if code != 0 || !strings.Contains(out, "running there: online") || !strings.Contains(out, want) || !strings.Contains(out, "complete") {
			t.Fatalf("backup %d: exit %d, want %q:\n%s", i+1, code, want, out)
		}
		t.Logf("backup %d:\n%s", i+1, out)
	}
	out, code := e.swarmvm("backup", "ls", name, "--repo", repo, "--json")
	var list []struct {
		ID, Mode, Parent string
		Used             int64
		Definition       struct{ Name string }
	}
	if err := json.Unmarshal([]byte(out), &list); code != 0 || err != nil || len(list) != 2 {
		t.Fatalf("backup ls --json: exit %d, %v:\n%s", code, err, out)
	}
	if list[0].Mode != "full" || list[1].Mode != "incremental" || list[1].Parent != list[0].ID || list[0].Definition.Name != name {
		t.Errorf("listed: %+v", list)
	}
	if fi, err := os.Stat(filepath.Join(repo, name)); err != nil || fi.Mode().Perm() != 0o700 || fi.Sys().(*syscall.Stat_t).Uid == 0 {
		t.Errorf("the VM's folder in the repository: %v %v", fi.Mode(), err)
	}
	if out, err := exec.Command("docker", "service", "scale", "--detach", name+"=0").CombinedOutput(); err != nil {
		t.Fatalf("scale to 0: %v %s", err, out)
	}
	waitGone(t, name)
	out, code = e.swarmvm("backup", name, "--repo", repo)
	if code != 0 || !strings.Contains(out, "stopped: from its disk on its home") || !strings.Contains(out, "full backup of the stopped VM's disk") {
		t.Fatalf("backup of the stopped VM: exit %d:\n%s", code, out)
	}
	t.Logf("backup of the stopped VM:\n%s", out)

	// Restore of a running VM: refused without --replace; with it, the VM
	// is stopped, its files set aside, the backup restored, and started.
	if out, err := exec.Command("docker", "service", "scale", "--detach", name+"=1").CombinedOutput(); err != nil {
		t.Fatalf("scale to 1: %v %s", err, out)
	}
	waitTask(t, name, "Running", 120*time.Second)
	out, code = e.swarmvm("restore", name, "--backup", list[0].ID, "--repo", repo)
	if code == 0 || !strings.Contains(out, "give --replace") {
		t.Errorf("restore of a running VM without --replace: exit %d:\n%s", code, out)
	}
	out, code = e.swarmvm("restore", name, "--backup", list[0].ID, "--repo", repo, "--replace")
	if code != 0 || !strings.Contains(out, "stopped") || !strings.Contains(out, "restored "+name+" from backup "+list[0].ID) || !strings.Contains(out, ".replaced-") {
		t.Fatalf("restore --replace: exit %d:\n%s", code, out)
	}
	t.Logf("restore:\n%s", out)
	waitTask(t, name, "Running", 120*time.Second)
	out, code = e.swarmvm("backup", name, "--repo", repo)
	if code != 0 || !strings.Contains(out, "full backup (no dirty bitmap of backup") {
		t.Errorf("the backup after a restore: exit %d:\n%s", code, out)
	}

	// Restored as another VM, deployed first with its own identity: it
	// gets the incremental's disk, as its own uid's, and the source is
	// untouched.
	copyName := name + "-copy"
	if out, code := e.swarmvm("restore", name, "--backup", list[1].ID, "--repo", repo, "--as", copyName); code == 0 || !strings.Contains(out, "deploy it first") {
		t.Errorf("restore --as a VM not deployed: exit %d:\n%s", code, out)
	}
	e.removeAfter(copyName)
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "120s"}, e.vmArgs(copyName, "tcg")...)...); code != 0 {
		t.Fatalf("deploy %s: exit %d\n%s", copyName, code, out)
	}
	out, code = e.swarmvm("restore", name, "--backup", list[1].ID, "--repo", repo, "--as", copyName, "--replace")
	t.Logf("restore --as:\n%s", out)
	if code != 0 || !strings.Contains(out, copyName+" is a copy of "+name+" with its own identity") {
		t.Fatalf("restore --as %s --replace: exit %d", copyName, code)
	}
	waitTask(t, copyName, "Running", 120*time.Second)
	if out, err := exec.Command("docker", "service", "scale", "--detach", copyName+"=0").CombinedOutput(); err != nil {
		t.Fatalf("scale to 0: %v %s", err, out)
	}
	waitGone(t, copyName)
	copyDisk := filepath.Join(e.storage, "images", copyName+".qcow2")
	for _, f := range []string{copyDisk, filepath.Join(e.storage, "images", copyName+".OVMF_VARS.fd")} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; uid != vmUID(t, copyName) || uid == vmUID(t, name) || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: uid %d mode %v; the copy's uid is %d, the source's %d", f, uid, fi.Mode().Perm(), vmUID(t, copyName), vmUID(t, name))
		}
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", filepath.Join(repo, name, list[1].ID, "disk0.qcow2"), copyDisk)
}

var wroteRE = regexp.MustCompile(`SWARMVM-GUEST-WROTE round=(\d+) block=(\d+)`)
var verifyRE = regexp.MustCompile(`SWARMVM-GUEST-VERIFY (ok round=(\d+) block=(\d+)|.*)`)

const writerBlocks = 128

// lastWrote is the guest writer's last durable block in the serial log so
// far, counted from its first ((round-1) × blocks + block); -1 before it.
func (v *vm) lastWrote() int {
	m := wroteRE.FindAllStringSubmatch(v.serial(), -1)
	if len(m) == 0 {
		return -1
	}
	r, _ := strconv.Atoi(m[len(m)-1][1])
	k, _ := strconv.Atoi(m[len(m)-1][2])
	return (r-1)*writerBlocks + k
}

// verifyBoot boots the VM's disk with the guest's verifier and returns the
// last block it finds written, as lastWrote counts.
func (v *vm) verifyBoot() int {
	v.t.Helper()
	exec.Command("docker", "rm", "-f", v.name).Run()
	seen := len(verifyRE.FindAllString(v.serial(), -1))
	v.run(nil, append(kernelEnv(fmt.Sprintf("swarmvm.verify=%d", writerBlocks)), "ACCEL=tcg", "BOOT_MODE=bios", "VM_MEMORY=256M")...)
	var m []string
	v.waitFor("the guest's verdict", 180*time.Second, func() bool {
		all := verifyRE.FindAllStringSubmatch(v.serial(), -1)
		if len(all) > seen {
			m = all[len(all)-1]
		}
		return m != nil
	})
	if m[2] == "" {
		v.t.Fatalf("the restored disk: %s", m[0])
	}
	if code, _ := v.stop(60 * time.Second); code != 0 {
		v.t.Fatalf("stop after the verdict: exit %d", code)
	}
	r, _ := strconv.Atoi(m[2])
	k, _ := strconv.Atoi(m[3])
	return (r-1)*writerBlocks + k
}

// A guest writes numbered blocks to its disk without pause, each durable
// before it says so. A full backup and an incremental are taken while it
// writes; the VM's disk is then replaced by a restore of each in turn, and
// the guest reads it back: every block whole and of one writer's order,
// and the last one written between what the guest had said before the
// backup started and one past what it had said when the backup ended. The
// incremental holds about what changed between the two points.
func TestBackupRestoresWhatTheGuestWrote(t *testing.T) {
	v := newVM(t)
	repo := backupRepo(t)
	v.run(nil, append(kernelEnv(fmt.Sprintf("swarmvm.writer=%d", writerBlocks)), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
	v.waitFor("the guest's writes", 180*time.Second, func() bool { return v.lastWrote() >= 4 })
	v.waitFor("the control socket", 30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(v.store, "images", v.name+".ctl"))
		return err == nil
	})
	type point struct {
		m             manifest
		before, after int
	}
	var points []point
	for i := 0; i < 2; i++ {
		if i > 0 {
			from := v.lastWrote()
			v.waitFor("more writes", 120*time.Second, func() bool { return v.lastWrote() >= from+8 })
		}
		p := point{before: v.lastWrote()}
		m, out, err := v.backupHere(repo)
		if err != nil {
			t.Fatalf("backup %d: %v\n%s", i+1, err, out)
		}
		p.m, p.after = m, v.lastWrote()
		points = append(points, p)
		t.Logf("backup %d (%s): the guest had written block %d before it began, %d when it ended", i+1, m.Mode, p.before, p.after)
	}
	full, inc := points[0], points[1]
	if full.m.Mode != "full" || inc.m.Mode != "incremental" {
		t.Fatalf("modes %s, %s", full.m.Mode, inc.m.Mode)
	}
	// What changed between the points, in blocks of 1 MiB: at least what
	// the guest wrote from the end of the first to the start of the second,
	// at most from the start of the first to the end of the second (+1 in
	// flight at each), the region's size at most.
	least, most := min(inc.before-full.after-1, writerBlocks), min(inc.after-full.before+2, writerBlocks)
	incSize := diskOf(t, repo, v.name, inc.m.ID)
	t.Logf("incremental: %d bytes on the repository; the guest changed %d to %d MiB between the points", incSize, least, most)
	if incSize < int64(least)<<20 || incSize > int64(most+1)<<20 {
		t.Errorf("the incremental takes %d bytes, for %d to %d MiB changed", incSize, least, most)
	}
	if code, _ := v.stop(60 * time.Second); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	restore := func(args ...string) (string, error) {
		cmd := exec.Command(swarmvmBin(t), append([]string{"restore", "here", "--repo", repo}, args...)...)
		cmd.Env = []string{"VM_NAME=" + v.name, "STORAGE_DIR=" + v.store, "PATH=" + os.Getenv("PATH")}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: runnerUID, Gid: runnerUID}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := restore("--backup", inc.m.ID); err == nil || !strings.Contains(out, "restore never writes over a VM's file; give --replace") {
		t.Errorf("a restore over the VM's disk without --replace: %v\n%s", err, out)
	}
	for _, p := range points {
		out, err := restore("--backup", p.m.ID, "--replace")
		if err != nil || !strings.Contains(out, "restored "+v.name+" from backup "+p.m.ID) {
			t.Fatalf("restore %s: %v\n%s", p.m.ID, err, out)
		}
		got := v.verifyBoot()
		t.Logf("restored %s (%s): the guest finds block %d written last; it had said %d before the backup, %d after", p.m.ID, p.m.Mode, got, p.before, p.after)
		if got < p.before || got > p.after+1 {
			t.Errorf("backup %s holds the guest's writes up to block %d, outside [%d, %d]", p.m.ID, got, p.before, p.after+1)
		}
	}
	// A damaged backup is refused, naming the file.
	f, err := os.OpenFile(filepath.Join(repo, v.name, full.m.ID, "disk0.qcow2"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("X"), 1<<20)
	f.Close()
	if out, err := restore("--backup", inc.m.ID, "--replace"); err == nil || !strings.Contains(out, "backup "+full.m.ID+": disk0.qcow2 does not match its manifest") {
		t.Errorf("a restore through a damaged backup: %v\n%s", err, out)
	}
	// Nothing written over: each restore set the disk before it aside.
	aside, _ := filepath.Glob(filepath.Join(v.store, "images", v.name+".qcow2.replaced-*"))
	if len(aside) == 0 {
		t.Error("no disk set aside by the restores")
	}
}

// A one-minute schedule makes backups on its own: the first 30 s after the
// VM runs (full), the next a minute after it (incremental), each followed
// by a prune to the newest one, which keeps the full backup the newest
// builds on; each logged with its event key and counted in the metrics.
func TestScheduledBackups(t *testing.T) {
	v := newVM(t)
	repo := backupRepo(t)
	port := freePort(t)
	v.run([]string{"-v", repo + ":" + repo, "-p", fmt.Sprintf("127.0.0.1:%d:%d", port, port)},
		append(kernelEnv("swarmvm.fill=16"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", fmt.Sprintf("METRICS_PORT=%d", port),
			"BACKUP_REPO="+repo, "BACKUP_EVERY=1m", "BACKUP_KEEP_LAST=1")...)
	v.waitFor("two scheduled backups and their prunes", 4*time.Minute, func() bool {
		return strings.Count(v.logs(), "scheduled backup in the repository") >= 2 && strings.Count(v.logs(), "backup: keep") >= 3
	})
	logs := v.logs()
	if n := strings.Count(logs, "event=backup-done"); n != 2 {
		t.Errorf("%d backup-done events, want 2", n)
	}
	contains(t, "runner log", logs, "next scheduled backup", "mode=full", "mode=incremental", "a kept backup builds on it")
	ids := backupIDs(t, repo, v.name)
	var modes []string
	for _, id := range ids {
		b, err := os.ReadFile(filepath.Join(repo, v.name, id, "manifest.json"))
		var m manifest
		if err == nil {
			err = json.Unmarshal(b, &m)
		}
		if err != nil {
			t.Fatal(err)
		}
		modes = append(modes, m.Mode)
	}
	if strings.Join(modes, ",") != "full,incremental" {
		t.Errorf("backups after the prune to 1: %v %v (the newest and the full one it builds on)", ids, modes)
	}
	got, _ := scrape(t, port, "")
	vmLabel := `vm="` + v.name + `"`
	if n, ok := got.find("swarmvm_vm_backups_total", vmLabel, `result="ok"`); !ok || n != 2 {
		t.Errorf("swarmvm_vm_backups_total{ok} %v (%v), want 2", n, ok)
	}
	if ts, ok := got.find("swarmvm_vm_backup_next_timestamp_seconds", vmLabel); !ok || ts < float64(time.Now().Unix()) {
		t.Errorf("swarmvm_vm_backup_next_timestamp_seconds %v (%v): want a time to come", ts, ok)
	}
	if ts, ok := got.find("swarmvm_vm_backup_last_success_timestamp_seconds", vmLabel); !ok || ts < float64(time.Now().Add(-2*time.Minute).Unix()) {
		t.Errorf("swarmvm_vm_backup_last_success_timestamp_seconds %v (%v)", ts, ok)
	}
	v.stop(60 * time.Second)
}

// snapshotHere runs the snapshot job's side as the VM's uid on this host.
func (v *vm) snapshotHere(args ...string) (string, error) {
	cmd := exec.Command(swarmvmBin(v.t), append([]string{"snapshot", "here"}, args...)...)
	cmd.Env = []string{"VM_NAME=" + v.name, "STORAGE_DIR=" + v.store, "BOOT_MODE=bios", "PATH=" + os.Getenv("PATH")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: runnerUID, Gid: runnerUID}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// A snapshot taken online, while the VM runs, is reverted with it
// stopped: the mark the guest wrote before the snapshot is back after the
// disk was overwritten; the state before the revert is kept as a snapshot
// of its own, which is then removed online.
func TestSnapshotRevert(t *testing.T) {
	v := newVM(t)
	boot := func(cmdline, want string) {
		t.Helper()
		exec.Command("docker", "rm", "-f", v.name).Run()
		v.run(nil, append(kernelEnv(cmdline), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
		v.waitFor(want, 180*time.Second, func() bool { return strings.Count(v.serial(), want) >= 1 })
	}
	boot("swarmvm.mark=before-the-snapshot", "SWARMVM-GUEST-MARKED before-the-snapshot")
	v.waitFor("the control socket", 30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(v.store, "images", v.name+".ctl"))
		return err == nil
	})
	if out, err := v.snapshotHere("create", "s1"); err != nil || !strings.Contains(out, "snapshot s1 of "+v.name+" taken online, crash-consistent") {
		t.Fatalf("snapshot online: %v\n%s", err, out)
	}
	if out, err := v.snapshotHere("revert", "s1"); err == nil || !strings.Contains(out, "a snapshot is reverted with the VM stopped") {
		t.Errorf("revert while it runs: %v\n%s", err, out)
	}
	v.stop(60 * time.Second)
	boot("swarmvm.fill=16", "SWARMVM-GUEST-FILLED 16MiB") // over the mark at 8 MiB
	v.stop(60 * time.Second)
	out, err := v.snapshotHere("revert", "s1")
	if err != nil || !strings.Contains(out, "reverted to snapshot s1; its state before is snapshot before-revert-") {
		t.Fatalf("revert: %v\n%s", err, out)
	}
	t.Log(strings.TrimSpace(out))
	boot("swarmvm.mark=after-the-revert", "SWARMVM-GUEST-MARK ")
	if !strings.Contains(v.serial(), "SWARMVM-GUEST-MARK before-the-snapshot") {
		t.Errorf("after the revert the guest finds another mark:\n%s", tail(v.serial(), 600))
	}
	out, err = v.snapshotHere("ls", "--json")
	var list []struct{ Name string }
	if err == nil {
		err = json.Unmarshal([]byte(out), &list)
	}
	if err != nil || len(list) != 2 || list[0].Name != "s1" || !strings.HasPrefix(list[1].Name, "before-revert-") {
		t.Fatalf("ls: %v %+v\n%s", err, list, out)
	}
	if out, err := v.snapshotHere("rm", list[1].Name); err != nil || !strings.Contains(out, "removed") {
		t.Errorf("rm online: %v\n%s", err, out)
	}
	if out, _ := v.snapshotHere("ls", "--json"); strings.Contains(out, "before-revert-") {
		t.Errorf("ls after rm: %s", out)
	}
	v.stop(60 * time.Second)
}

// A repository that fills during a backup: the backup fails naming the
// cause, the VM runs on unharmed, nothing partial is listed; with room
// again the next backup is whole and restores (checked with qemu-img
// compare once the VM stopped).
func TestBackupRepositoryFull(t *testing.T) {
	v := newVM(t)
	repo := backupRepo(t)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m,mode=1733", "tmpfs", repo).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", repo).Run() })
	v.run(nil, append(kernelEnv("swarmvm.fill=48"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
	v.waitFor("the guest's 48 MiB", 180*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-FILLED 48MiB") })
	v.waitFor("the control socket", 30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(v.store, "images", v.name+".ctl"))
		return err == nil
	})
	_, out, err := v.backupHere(repo)
	if err == nil || !strings.Contains(out, "No space left on device") {
		t.Fatalf("a backup into a full repository: %v\n%s", err, out)
	}
	t.Logf("the backup into a 24 MiB repository: %s", strings.TrimSpace(tail(out, 300)))
	if ids := backupIDs(t, repo, v.name); len(ids) != 0 {
		t.Errorf("listed after the failure: %v", ids)
	}
	if !v.running() || !strings.Contains(v.logs(), "event="+"backup-failed") {
		t.Fatalf("the VM after the failed backup: running %v\n%s", v.running(), tail(v.logs(), 2000))
	}
	if out, err := exec.Command("mount", "-o", "remount,size=256m", repo).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v %s", err, out)
	}
	m, out, err := v.backupHere(repo)
	if err != nil || m.Mode != "full" {
		t.Fatalf("the backup with room: %v %+v\n%s", err, m, out)
	}
	if code, _ := v.stop(60 * time.Second); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	restored := filepath.Join(t.TempDir(), "restored.qcow2")
	run(t, "qemu-img", "convert", "-O", "qcow2", filepath.Join(repo, v.name, m.ID, "disk0.qcow2"), restored)
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", restored, filepath.Join(v.store, "images", v.name+".qcow2"))
}
