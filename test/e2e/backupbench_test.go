package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// BenchmarkBackup measures backups side by side in one run, on a 2 GiB
// disk the guest has filled:
//   - a full online backup against the floor, qemu-img convert of the same
//     disk to the same repository's filesystem (goal: within 1.3x);
//   - an incremental after the guest rewrote 5% of the disk (102 MiB),
//     against the full one (goal: at most 15% of its time);
//   - the guest's write throughput (test/guestwriter's durable 1 MiB
//     writes) while a full backup runs, against the same guest's without.
func BenchmarkBackup(b *testing.B) {
	require(b)
	v := newVM(b)
	repo := backupRepo(b)
	boot := func(cmdline, want string) {
		b.Helper()
		exec.Command("docker", "rm", "-f", v.name).Run()
		seen := strings.Count(v.serial(), want)
		v.run(nil, append(kernelEnv(cmdline), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=2G", "VM_MEMORY=256M")...)
		v.waitFor(want, 10*time.Minute, func() bool { return strings.Count(v.serial(), want) > seen })
		v.waitFor("the control socket", 30*time.Second, func() bool {
			_, err := os.Stat(filepath.Join(v.store, "images", v.name+".ctl"))
			return err == nil
		})
	}
	timed := func(args ...string) (manifest, time.Duration) {
		b.Helper()
		t0 := time.Now()
		m, out, err := v.backupHere(repo, args...)
		if err != nil {
			b.Fatalf("backup: %v\n%s", err, out)
		}
		return m, time.Since(t0)
	}
	boot("swarmvm.fill=2048", "SWARMVM-GUEST-FILLED 2048MiB")
	full, tFull := timed("--full")
	floor := filepath.Join(repo, "floor.qcow2")
	t0 := time.Now()
	if out, err := exec.Command("qemu-img", "convert", "-U", "-O", "qcow2", filepath.Join(v.store, "images", v.name+".qcow2"), floor).CombinedOutput(); err != nil {
		b.Fatalf("qemu-img convert: %v %s", err, out)
	}
	tFloor := time.Since(t0)
	fi, _ := os.Stat(floor)
	os.Remove(floor)
	fmt.Printf("backup: full online %.2f s for %d MiB (%.0f MiB/s); qemu-img convert of the same disk %.2f s (%d MiB): %.2fx the floor (goal 1.3x)\n",
		tFull.Seconds(), diskOf(b, repo, v.name, full.ID)>>20, float64(diskOf(b, repo, v.name, full.ID)>>20)/tFull.Seconds(), tFloor.Seconds(), fi.Size()>>20, tFull.Seconds()/tFloor.Seconds())
	b.ReportMetric(tFull.Seconds()/tFloor.Seconds(), "full/convert")

	v.stop(60 * time.Second)
	boot("swarmvm.fill=102", "SWARMVM-GUEST-FILLED 102MiB")
	inc, tInc := timed()
	if inc.Mode != "incremental" {
		b.Fatalf("after a clean restart the backup is %s: %s", inc.Mode, inc.ModeReason)
	}
	fmt.Printf("backup: incremental after 5%% of the disk changed: %.2f s, %d MiB; %.1f%% of the full one's time (goal 15%%)\n",
		tInc.Seconds(), diskOf(b, repo, v.name, inc.ID)>>20, 100*tInc.Seconds()/tFull.Seconds())
	b.ReportMetric(100*tInc.Seconds()/tFull.Seconds(), "inc%full")

	v.stop(60 * time.Second)
	boot(fmt.Sprintf("swarmvm.writer=%d", writerBlocks), "SWARMVM-GUEST-WROTE round=2 ")
	rate := func(d time.Duration) float64 {
		w0, t0 := v.lastWrote(), time.Now()
		time.Sleep(d)
		return float64(v.lastWrote()-w0) / time.Since(t0).Seconds()
	}
	before := rate(15 * time.Second)
	w0, t1 := v.lastWrote(), time.Now()
	_, tDuring := timed("--full")
	during := float64(v.lastWrote()-w0) / time.Since(t1).Seconds()
	after := rate(15 * time.Second)
	fmt.Printf("backup: the guest's durable 1 MiB writes: %.1f/s before, %.1f/s during a %.1f s full backup (%.2fx), %.1f/s after\n",
		before, during, tDuring.Seconds(), during/before, after)
	b.ReportMetric(during/before, "writes-during/before")
	v.stop(60 * time.Second)
}
