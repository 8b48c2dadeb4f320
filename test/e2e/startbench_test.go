package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/procfs"
	"github.com/swarmvm/swarmvm/internal/qmp"
	vmstatus "github.com/swarmvm/swarmvm/internal/status"
)

// The start benchmark's driver runs inside the runner image (this test
// binary, mounted into the container, with SWARMVM_BENCH_INSIDE set), so
// that the runner and bare QEMU start in the same place: same QEMU, same
// kernel guest, same container limits.
func TestMain(m *testing.M) {
	if os.Getenv("SWARMVM_BENCH_INSIDE") == "start" {
		os.Exit(startInside())
	}
	os.Exit(m.Run())
}

// startSample is one start, measured inside the container.
type startSample struct {
	Runner, Bare     float64 // ms from exec to the VM's ready answer
	RunnerPre        float64 // ms from the runner's exec to its exec of QEMU
	RunnerRSS, QEMUB int64   // KiB: the runner's and its QEMU's VmRSS once ready
}

const benchStore = "/var/lib/poc-qemu"

// startInside alternates N runner starts with N bare QEMU starts and
// writes the samples as JSON. The runner is ready at its vm-running line
// (kvm-verified comes just before it under KVM); bare QEMU is ready when it
// answers query-status (query-kvm first under KVM) on a monitor socket
// handed to it listening, the quickest way QEMU can be asked.
func startInside() int {
	n, _ := strconv.Atoi(os.Getenv("BENCH_N"))
	accel := os.Getenv("ACCEL")
	var out []startSample
	for i := -1; i < n; i++ { // i = -1: a warm-up that makes the disk
		var s startSample
		var err error
		if s.Runner, s.RunnerPre, s.RunnerRSS, s.QEMUB, err = runnerStart(i); err == nil {
			s.Bare, err = bareStart(accel)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
		if i >= 0 {
			out = append(out, s)
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}

func runnerStart(i int) (ms, pre float64, runnerRSS, qemuRSS int64, err error) {
	run := fmt.Sprintf("/run/bench-%d", i+1)
	cmd := exec.Command("swarmvm", "run")
	cmd.Env = append(os.Environ(), "RUN_DIR="+run, "SHUTDOWN_TIMEOUT=1s", "LOG_LEVEL=debug")
	cmd.Env = append(cmd.Env, strings.Fields(os.Getenv("BENCH_RUNNER_ENV"))...)
	stderr, _ := cmd.StderrPipe()
	began := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, 0, 0, err
	}
	sc := bufio.NewScanner(stderr)
	ready := false
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if pre == 0 && strings.Contains(sc.Text(), `phase="exec QEMU"`) {
			pre = since(began)
		}
		if vmstatus.Parse(sc.Text()).Event == vmstatus.VMRunning {
			ms, ready = since(began), true
			break
		}
	}
	if ready {
		b, _ := os.ReadFile(filepath.Join(run, "state.json"))
		var st struct{ PID int }
		json.Unmarshal(b, &st)
		runnerRSS, qemuRSS = rss(cmd.Process.Pid), rss(st.PID)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	go func() {
		for sc.Scan() {
		}
	}()
	cmd.Wait()
	if !ready {
		return 0, 0, 0, 0, fmt.Errorf("the runner did not get the VM running:\n%s", strings.Join(lines, "\n"))
	}
	return ms, pre, runnerRSS, qemuRSS, nil
}

func bareStart(accel string) (float64, error) {
	disk := filepath.Join(benchStore, "images", "bench-bare.qcow2")
	if _, err := os.Stat(disk); err != nil {
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G").CombinedOutput(); err != nil {
			return 0, fmt.Errorf("qemu-img create: %v %s", err, out)
		}
	}
	sock := "/run/bench-bare.sock"
	os.Remove(sock)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return 0, err
	}
	l.SetUnlinkOnClose(false)
	lf, _ := l.File()
	l.Close()
	a := []string{"-nodefaults", "-display", "none", "-machine", "q35", "-accel", accel, "-m", "256M",
		"-kernel", filepath.Join(benchStore, "isos", "vmlinuz"), "-initrd", filepath.Join(benchStore, "isos", "initrd.img"),
		"-append", "console=ttyS0 quiet", "-drive", "file=" + disk + ",if=virtio,format=qcow2",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control"}
	if accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	if x := os.Getenv("BENCH_BARE_EXTRA"); x != "" {
		a = append(a, strings.Fields(x)...)
	}
	cmd := exec.Command("qemu-system-x86_64", a...)
	cmd.ExtraFiles = []*os.File{lf}
	began := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	lf.Close()
	defer cmd.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, sock)
	if err != nil {
		cmd.Process.Kill()
		return 0, err
	}
	defer c.Close()
	if accel == "kvm" {
		if _, err := c.QueryKVM(ctx); err != nil {
			return 0, err
		}
	}
	if _, err := c.QueryStatus(ctx); err != nil {
		return 0, err
	}
	ms := since(began)
	c.Quit(ctx)
	return ms, nil
}

func since(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

// rss is a process's VmRSS in KiB, 0 when it cannot be read.
func rss(pid int) int64 {
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		return 0
	}
	return max(0, st.KiB("VmRSS"))
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// BenchmarkStart: `swarmvm run` start → VM running (KVM verified under
// KVM) against bare QEMU start → query answered, alternating, in one
// container of the runner image, with the runner's and QEMU's RSS. Under
// TCG where the host has no KVM. It prints medians and the difference.
// To weigh an option: BENCH_RUNNER_ENV adds variables to the runner's
// environment (e.g. DISK_CACHE=writeback), BENCH_BARE_EXTRA arguments to
// bare QEMU's.
func BenchmarkStart(b *testing.B) {
	require(b)
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	v := newVM(b)
	os.MkdirAll(filepath.Join(v.store, "images"), 0o750)
	os.Rename(filepath.Join(v.store, "boot"), filepath.Join(v.store, "isos"))
	chownAll(b, v.store, runnerUID)
	accel, extra := "tcg", []string{}
	if _, err := os.Stat("/dev/kvm"); err == nil {
		accel, extra = "kvm", []string{"--device", "/dev/kvm", "--group-add", strconv.Itoa(kvmGID(b))}
	}
	n := 10
	for i := 0; i < b.N; i++ {
		args := append([]string{"run", "--rm", "--read-only", "--tmpfs", "/run:uid=10001", "--tmpfs", "/tmp",
			"--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", "10001:10001", "--memory", "1g",
			"-v", v.store + ":" + benchStore, "-v", self + ":/bench/e2e.test:ro", "--entrypoint", "/bench/e2e.test",
			"-e", "SWARMVM_BENCH_INSIDE=start", "-e", "BENCH_N=" + strconv.Itoa(n), "-e", "VM_NAME=bench", "-e", "ACCEL=" + accel,
			"-e", "BOOT_MODE=bios", "-e", "DISK_SIZE=1G", "-e", "VM_MEMORY=256M", "-e", "KVM_BROKER=off",
			"-e", "KERNEL_PATH=" + benchStore + "/isos/vmlinuz", "-e", "INITRD_PATH=" + benchStore + "/isos/initrd.img",
			"-e", "KERNEL_CMDLINE=console=ttyS0 quiet", "-e", "BENCH_BARE_EXTRA=" + os.Getenv("BENCH_BARE_EXTRA"), "-e", "BENCH_RUNNER_ENV=" + os.Getenv("BENCH_RUNNER_ENV")}, extra...)
		args = append(args, image)
		out, err := exec.Command("docker", args...).Output()
		if err != nil {
			b.Fatalf("docker run: %v\n%s", err, exitStderr(err))
		}
		var samples []startSample
		if err := json.Unmarshal(out, &samples); err != nil || len(samples) != n {
			b.Fatalf("samples: %v %s", err, out)
		}
		var runner, bare, diff, pre, qemu, rrss, qrss []float64
		for _, s := range samples {
			runner, bare, diff = append(runner, s.Runner), append(bare, s.Bare), append(diff, s.Runner-s.Bare)
			pre, qemu = append(pre, s.RunnerPre), append(qemu, s.Runner-s.RunnerPre)
			rrss, qrss = append(rrss, float64(s.RunnerRSS)), append(qrss, float64(s.QEMUB))
		}
		b.ReportMetric(median(runner), "runner-ms")
		b.ReportMetric(median(bare), "bare-ms")
		b.ReportMetric(median(diff), "added-ms")
		fmt.Printf("start → %s, %d each, alternating (ms, median): runner %.1f, bare QEMU %.1f, runner adds %.1f (%.2fx)\n",
			map[string]string{"tcg": "VM running under TCG (no KVM on this host)", "kvm": "KVM verified"}[accel], n,
			median(runner), median(bare), median(diff), median(runner)/median(bare))
		fmt.Printf("of the runner's start (ms, median): its exec to QEMU's exec %.1f (the runner's binary start and its steps), QEMU's exec to running %.1f (bare QEMU %.1f: the runner's VM has a NIC, serial log, pvpanic, a second monitor and the seccomp sandbox)\n",
			median(pre), median(qemu), median(bare))
		fmt.Printf("RSS once running (MiB, median): runner %.1f, QEMU %.1f (guest RAM 256M, %s)\n", median(rrss)/1024, median(qrss)/1024, accel)
	}
}

func exitStderr(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

// BenchmarkHealthCheck: what one health check of a running VM costs (an
// exec into its container of `swarmvm health --liveness --json`: a QMP
// connection, query-status, query-kvm under KVM): wall time, and CPU time
// in the container's cgroup and on the whole host beyond what the idle VM
// uses by itself, measured over the same length of time without checks.
// The health check's interval is chosen with it (docs/design.md).
func BenchmarkHealthCheck(b *testing.B) {
	v := newVM(b)
	v.run(nil, append(kernelEnv(""), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")...)
	v.waitFor("boot marker", 180*time.Second, func() bool { return strings.Contains(v.serial(), marker) })
	time.Sleep(5 * time.Second) // the guest settles
	id, _ := exec.Command("docker", "inspect", "-f", "{{.Id}}", v.name).Output()
	cg := cgroupOf(b, strings.TrimSpace(string(id)))
	const checks = 20
	for i := 0; i < b.N; i++ {
		u0, h0, t0 := cgroupUsec(b, cg), hostBusyUsec(b), time.Now()
		time.Sleep(10 * time.Second)
		idleCG, idleHost, idleFor := cgroupUsec(b, cg)-u0, hostBusyUsec(b)-h0, time.Since(t0)
		u1, h1, t1 := cgroupUsec(b, cg), hostBusyUsec(b), time.Now()
		for j := 0; j < checks; j++ {
			out, err := exec.Command("docker", "exec", v.name, "swarmvm", "health", "--liveness", "--json").CombinedOutput()
			if st, ok := vmstatus.ParseHealth(string(out)); err != nil || !ok || !st.Healthy {
				b.Fatalf("health: %v %s", err, out)
			}
		}
		took := time.Since(t1)
		scale := float64(took) / float64(idleFor)
		inCG := (float64(cgroupUsec(b, cg)-u1) - scale*float64(idleCG)) / checks / 1000
		onHost := (float64(hostBusyUsec(b)-h1) - scale*float64(idleHost)) / checks / 1000
		wall := float64(took.Milliseconds()) / checks
		b.ReportMetric(wall, "wall-ms/check")
		b.ReportMetric(onHost, "host-cpu-ms/check")
		fmt.Printf("health check, %d back to back: %.1f ms wall, %.1f ms CPU in the container, %.1f ms CPU on the host (docker exec included) each\n", checks, wall, inCG, onHost)
		for _, every := range []time.Duration{time.Second, 2 * time.Second, 5 * time.Second, 10 * time.Second} {
			fmt.Printf("  every %v: %.2f%% of one core per VM\n", every, onHost/float64(every.Milliseconds())*100)
		}
	}
}

// cgroupOf is the file with the container's CPU time: cpu.stat under
// cgroup v2, cpuacct.usage under v1.
func cgroupOf(b *testing.B, id string) string {
	pid, _ := exec.Command("docker", "inspect", "-f", "{{.State.Pid}}", id).Output()
	c, err := os.ReadFile("/proc/" + strings.TrimSpace(string(pid)) + "/cgroup")
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(c)), "\n") {
		f := strings.SplitN(l, ":", 3)
		switch {
		case len(f) == 3 && f[0] == "0" && f[1] == "":
			if p := filepath.Join("/sys/fs/cgroup", f[2], "cpu.stat"); fileExists(p) {
				return p
			}
		case len(f) == 3 && slices.Contains(strings.Split(f[1], ","), "cpuacct"):
			return filepath.Join("/sys/fs/cgroup/cpuacct", f[2], "cpuacct.usage")
		}
	}
	b.Fatalf("no CPU accounting for the container in %s", c)
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// cgroupUsec is the container's CPU time so far, in µs.
func cgroupUsec(b *testing.B, file string) int64 {
	c, err := os.ReadFile(file)
	if err != nil {
		b.Fatal(err)
	}
	if filepath.Base(file) == "cpuacct.usage" {
		n, _ := strconv.ParseInt(strings.TrimSpace(string(c)), 10, 64)
		return n / 1000
	}
	for _, l := range strings.Split(string(c), "\n") {
		if v, ok := strings.CutPrefix(l, "usage_usec "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	b.Fatal("no usage_usec in " + file)
	return 0
}

// hostBusyUsec is the host's CPU time spent not idle, from /proc/stat.
func hostBusyUsec(b *testing.B) int64 {
	c, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(strings.SplitN(string(c), "\n", 2)[0])[1:]
	var busy int64
	for i, s := range f {
		n, _ := strconv.ParseInt(s, 10, 64)
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy * 1e6 / 100 // USER_HZ
}

// BenchmarkDiskThroughput: the guest measures its disk with direct I/O
// (test/guestbench, started by the fixture's swarmvm.diskbench): 1 GiB
// written and read back in 4 MiB blocks, then 4 KiB writes and reads at
// random places from 8 threads. The disk is attached the runner's way
// (through its fdsets, O_DIRECT descriptors) and by bare QEMU in the same
// image with each configuration worth weighing; the runner's figure is
// then given, per measure, against the best of them that bypass the host's
// page cache as the runner does, and against the best of all (the goal:
// within 5%).
// Under TCG here: the guest's CPU is emulated, so the figures are lower
// than under KVM, the same for each.
func BenchmarkDiskThroughput(b *testing.B) {
	require(b)
	const mib, runs = 1024, 5
	variants := []struct{ name, drive string }{
		{"runner", ""},
		{"bare QEMU, the runner's drive options", runnerDrive},
		{"bare QEMU, defaults (writeback, threads)", "cache=writeback"},
		{"bare QEMU, cache=none, aio=threads", "cache=none,aio=threads"},
		{"bare QEMU, cache=none, aio=native", "cache=none,aio=native"},
	}
	results := map[string][]diskFigures{}
	hung := map[string]int{}
	for i := 0; i < b.N*runs; i++ {
		for _, v := range variants { // interleaved: a busy moment hits every variant alike
			if d, ok := diskRun(b, v.drive, mib); ok {
				results[v.name] = append(results[v.name], d)
			} else {
				hung[v.name]++
			}
		}
	}
	measures := []struct {
		name string
		of   func(diskFigures) float64
	}{
		{"seq write MiB/s", func(d diskFigures) float64 { return mib / d.writeS }},
		{"seq read MiB/s", func(d diskFigures) float64 { return mib / d.readS }},
		{"4k rand write IOPS", func(d diskFigures) float64 { return d.randWriteIOPS }},
		{"4k rand read IOPS", func(d diskFigures) float64 { return d.randReadIOPS }},
	}
	med := func(v string, of func(diskFigures) float64) float64 {
		var xs []float64
		for _, d := range results[v] {
			xs = append(xs, of(d))
		}
		return median(xs)
	}
	fmt.Printf("disk, guest direct I/O under TCG, medians of %d runs each (of fewer where runs hung):\n", b.N*runs)
	for _, v := range variants {
		fmt.Printf("  %-42s", v.name)
		for _, m := range measures {
			fmt.Printf("  %s %7.0f", m.name, med(v.name, m.of))
		}
		if hung[v.name] > 0 {
			fmt.Printf("  (%d of %d runs hung, left out)", hung[v.name], b.N*runs)
		}
		fmt.Println()
	}
	// The runner's default keeps the guest's data out of the host's page
	// cache (cache=none): it is weighed against the best bare QEMU of that
	// kind, and against the best of all (cache=writeback reads what the
	// guest just wrote back from the host's memory: a second cache).
	within := map[bool]string{true: "within 5%", false: "NOT within 5%"}
	for _, m := range measures {
		run, opts := med("runner", m.of), med(variants[1].name, m.of)
		fmt.Printf("  %s:\n", m.name)
		for _, kind := range []string{"cache=none", "any cache"} {
			best, bestName := 0.0, ""
			for _, v := range variants[2:] {
				if x := med(v.name, m.of); x > best && (kind == "any cache" || strings.Contains(v.drive, "cache=none")) {
					best, bestName = x, v.name
				}
			}
			if kind == "cache=none" {
				b.ReportMetric(run/best, strings.ReplaceAll(m.name, " ", "-")+"-runner/best-uncached")
			}
			fmt.Printf("    best bare with %-9s %7.0f (%s): the runner's drive options %.2fx (%s), the runner %.2fx (%s)\n",
				kind, best, bestName, opts/best, within[opts >= 0.95*best], run/best, within[run >= 0.95*best])
		}
	}
}

// runnerDrive are the drive options the runner gives QEMU (qemu/argv.go)
// for the default DISK_CACHE=none, without the fdset.
const runnerDrive = "cache=none,aio=threads,discard=unmap,detect-zeroes=unmap,werror=enospc,rerror=report"

// diskFigures are what the guest measured on one disk: medians, and under
// all each round's figure by measure (write and read in seconds,
// randwrite and randread in IOPS).
type diskFigures struct {
	dev                                        string
	writeS, readS, randWriteIOPS, randReadIOPS float64
	all                                        map[string][]float64
}

// diskRun boots the test guest with swarmvm.diskbench on a new 2G disk and
// returns what the guest measured. drive "" runs the runner; otherwise
// bare QEMU with these -drive options. A run takes under a minute; one
// whose guest writes nothing for diskRunLimit hung (seen in 4 of 42 runs
// of bare QEMU, with three different drive options, and in none of the
// runner's 11: the guest quiet after its boot; later in a boot of
// BenchmarkDiskOptions, its vCPU halted, QEMU's I/O threads gone, as if a
// disk's completion never reached the guest): it is logged with its serial
// log and left out (ok false).
func diskRun(b *testing.B, drive string, mib int) (figures diskFigures, ok bool) {
	v := newVM(b)
	cmdline := fmt.Sprintf("console=ttyS0 quiet swarmvm.diskbench=%d", mib)
	if drive == "" {
		v.run(nil, append(kernelEnv(""), "KERNEL_CMDLINE="+cmdline, "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=2G", "VM_MEMORY=256M")...)
	} else {
		bareDiskQEMU(b, v, cmdline, []string{drive})
	}
	defer exec.Command("docker", "rm", "-f", v.name).Run()
	lines, ok := diskLines(b, v, 1, diskRunLimit)
	if !ok {
		return diskFigures{}, false
	}
	return parseDisk(b, lines[0]), true
}

// diskLines waits for n SWARMVM-GUEST-DISK lines on v's serial log. A
// guest that wrote nothing to it for quiet (the benchmark writes a line
// per round of a pass) hung: logged with its serial log, ok false.
func diskLines(b *testing.B, v *vm, n int, quiet time.Duration) (lines []string, ok bool) {
	last, lastLen := time.Now(), -1
	for ; ; time.Sleep(250 * time.Millisecond) {
		serial := v.serial()
		if len(serial) != lastLen {
			last, lastLen = time.Now(), len(serial)
		}
		lines = nil
		for _, l := range strings.Split(serial, "\n") {
			if strings.HasPrefix(l, "SWARMVM-GUEST-DISK ") {
				lines = append(lines, l)
			}
		}
		switch {
		case len(lines) >= n:
			return lines, true
		case !v.running():
			b.Fatalf("QEMU ended without the guest's disk figures; serial log:\n%s", serial)
		case time.Since(last) > quiet:
			b.Logf("the guest wrote nothing for %v; serial log:\n%s", quiet, serial)
			return nil, false
		}
	}
}

// parseDisk reads one SWARMVM-GUEST-DISK line: the medians, and each
// round's figures.
func parseDisk(b *testing.B, line string) diskFigures {
	d := diskFigures{all: map[string][]float64{}}
	for _, f := range strings.Fields(line) {
		k, x, _ := strings.Cut(f, "=")
		if name, ok := strings.CutSuffix(k, "_all"); ok {
			for _, y := range strings.Split(x, ",") {
				n, _ := strconv.ParseFloat(y, 64)
				d.all[name] = append(d.all[name], n)
			}
			continue
		}
		n, _ := strconv.ParseFloat(x, 64)
		switch k {
		case "dev":
			d.dev = x
		case "write_s":
			d.writeS = n
		case "read_s":
			d.readS = n
		case "randwrite_iops":
			d.randWriteIOPS = n
		case "randread_iops":
			d.randReadIOPS = n
		}
	}
	if d.writeS <= 0 || d.readS <= 0 || d.randWriteIOPS <= 0 || d.randReadIOPS <= 0 {
		b.Fatalf("disk figures: %q", line)
	}
	return d
}

// diskRunLimit is how long a guest may write nothing on its serial log
// before its run counts as hung: a boot takes seconds, a round of one pass
// on one disk a few.
const diskRunLimit = 2 * time.Minute

// bareDiskQEMU starts bare QEMU in the runner image, as the runner's user
// with no capability, booting the test guest with cmdline and a new 2G
// qcow2 disk for each of drives (its -drive options; vda, vdb, … in
// order), the runner's machine and CPU under TCG (which weigh more than
// any drive option), one vCPU: only the drives differ from the runner's VM.
func bareDiskQEMU(b *testing.B, v *vm, cmdline string, drives []string) {
	os.MkdirAll(filepath.Join(v.store, "images"), 0o755)
	os.MkdirAll(filepath.Join(v.store, "logs"), 0o755)
	st := "/var/lib/poc-qemu"
	args := []string{"run", "-d", "--name", v.name, "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
		"--user", "10001:10001", "--tmpfs", "/run", "-v", v.store + ":" + st, "--entrypoint", "qemu-system-x86_64", image,
		"-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35", "-accel", "tcg,tb-size=128", "-cpu", "max", "-smp", "1", "-m", "256M",
		"-kernel", st + "/boot/vmlinuz", "-initrd", st + "/boot/initrd.img", "-append", cmdline,
		"-serial", "file:" + st + "/logs/" + v.name + ".serial.log"}
	for i, drive := range drives {
		name := fmt.Sprintf("bare%d.qcow2", i)
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(v.store, "images", name), "2G").CombinedOutput(); err != nil {
			b.Fatalf("%v %s", err, out)
		}
		args = append(args, "-drive", "file="+st+"/images/"+name+",if=virtio,format=qcow2,"+drive)
	}
	chownAll(b, v.store, runnerUID)
	if out, err := exec.Command("docker", args...).CombinedOutput(); err != nil {
		b.Fatalf("docker run: %v %s", err, out)
	}
}
