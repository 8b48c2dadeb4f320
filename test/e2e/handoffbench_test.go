package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkHandOff measures the hand-off on one node (a service update of
// a local VM) for a 512 MiB guest, idle and rewriting 64 MiB of its memory
// without end: QEMU's measured downtime and total time, the bytes sent, the
// new runner's wall time, and the guest's real pause — from the old QEMU's
// STOP to the new one's RESUME, as each runner logged them, which adds the
// moment the new QEMU takes the disk. Goal for the idle guest: QEMU's
// downtime at most 300 ms (its default target).
func BenchmarkHandOff(b *testing.B) {
	require(b)
	for _, c := range []struct{ name, key, cmdline, want string }{
		{"idle", "idle", "swarmvm.tick=1", "SWARMVM-GUEST-TICK"},
		{"dirtying 64 MiB", "dirtying", "swarmvm.tick=1 swarmvm.dirty=64", "SWARMVM-GUEST-DIRTY 64MiB"},
	} {
		v := newVM(b)
		env := append(kernelEnv(c.cmdline), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=512M", "SHUTDOWN_TIMEOUT=30s")
		v.run([]string{"--memory", "1g"}, env...)
		v.waitFor(c.want, 3*time.Minute, func() bool { return strings.Contains(v.serial(), c.want) })
		time.Sleep(3 * time.Second) // the guest at its work
		n := v.next("next")
		n.run([]string{"--memory", "1g"}, env...)
		n.waitFor("the hand-off", 3*time.Minute, func() bool { return strings.Contains(n.logs(), "event=handoff-done") })
		n.waitFor("the guest resumed", 30*time.Second, func() bool { return strings.Contains(n.logs(), "event=RESUME") })
		done := lastLine(n.logs(), "event=handoff-done")
		stop, resume := logTime(b, lastLine(v.logs(), "event=STOP")), logTime(b, lastLine(n.logs(), "event=RESUME"))
		down, total, mib, wall := field(done, "downtime_ms"), field(done, "migration_ms"), field(done, "transferred_mib"), field(done, "wall_ms")
		fmt.Printf("hand-off, %s 512 MiB guest (TCG): QEMU's downtime %d ms (goal ≤ 300), migration %d ms, %d MiB sent (%.1fx the guest's RAM); the new runner's hand-off %d ms; the guest's pause, STOP to RESUME, %d ms (%.1fx QEMU's downtime)\n",
			c.name, down, total, mib, float64(mib)/512, wall, resume.Sub(stop).Milliseconds(), float64(resume.Sub(stop).Milliseconds())/float64(max(down, 1)))
		b.ReportMetric(float64(down), c.key+"-downtime-ms")
		v.stop(60 * time.Second)
		n.stop(60 * time.Second)
	}
}

// field is the integer value of key=… in a log line.
func field(line, key string) int {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return -1
}

// logTime is a runner log line's time.
func logTime(b testing.TB, line string) time.Time {
	b.Helper()
	f := strings.Fields(line)
	if len(f) == 0 {
		b.Fatalf("no such log line")
	}
	t, err := time.Parse(time.RFC3339Nano, strings.TrimPrefix(f[0], "time="))
	if err != nil {
		b.Fatalf("log line %q: %v", line, err)
	}
	return t
}
