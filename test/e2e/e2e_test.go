// Package e2e runs the runner image for real: real dockerd, real QEMU 10,
// the test guest built from Debian packages, the real KVM device. It needs
// root, a Docker engine, the image (make image) and the guest (make guest);
// scripts/test.sh provides them and sets SWARMVM_E2E=1, under which a
// missing prerequisite fails instead of skipping.
package e2e

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/procfs"
	vmstatus "github.com/swarmvm/swarmvm/internal/status"
)

const (
	runnerUID = 10001
	marker    = "SWARMVM-GUEST-BOOTED"
)

var image = envOr("SWARMVM_IMAGE", "swarmvm/runner:dev")

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// require skips loudly outside the full suite and fails inside it.
func require(t testing.TB) {
	t.Helper()
	if os.Getenv("SWARMVM_E2E") != "1" {
		t.Skip("end-to-end test: run it with make test (sets SWARMVM_E2E=1 and provides dockerd, the image and the guest)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("end-to-end tests must run as root (they read other users' /proc entries and chown storage)")
	}
	if out, err := exec.Command("docker", "image", "inspect", image).CombinedOutput(); err != nil {
		t.Fatalf("image %s missing (make image): %v %s", image, err, out)
	}
	if _, err := os.Stat(guestFile("vmlinuz")); err != nil {
		t.Fatalf("test guest missing (make guest): %v", err)
	}
}

func guestFile(name string) string {
	dir := os.Getenv("SWARMVM_GUEST")
	if dir == "" {
		dir = filepath.Join("..", "..", ".cache", "guest")
	}
	return filepath.Join(dir, name)
}

// vm is one runner container and its storage folder on the host.
type vm struct {
	t     testing.TB
	name  string
	store string
	ctr   string // the container: the VM's name, or next's
}

func newVM(t testing.TB) *vm {
	t.Helper()
	require(t)
	name := fmt.Sprintf("e2e-%s-%d", strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-")), time.Now().UnixNano()%100000)
	if len(name) > 60 {
		name = name[len(name)-60:]
		name = "e" + strings.TrimLeft(name, "-_")
	}
	store, err := os.MkdirTemp("/var/tmp", "swarmvm-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	v := &vm{t: t, name: name, store: store, ctr: name}
	os.MkdirAll(filepath.Join(store, "boot"), 0o755)
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		copyFile(t, guestFile(f), filepath.Join(store, "boot", f))
	}
	chownAll(t, store, runnerUID)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command("docker", "logs", v.ctr).CombinedOutput()
			t.Logf("runner log of %s:\n%s", v.ctr, out)
			t.Logf("serial log:\n%s", v.serial())
		}
		exec.Command("docker", "rm", "-f", v.ctr).Run()
		os.RemoveAll(store)
	})
	return v
}

// next is another container of the same VM, on the same storage, as
// Swarm starts the VM's next task beside the running one (a start-first
// update); the test removes it at its end.
func (v *vm) next(suffix string) *vm {
	n := &vm{t: v.t, name: v.name, store: v.store, ctr: v.name + "-" + suffix}
	v.t.Cleanup(func() {
		if v.t.Failed() {
			out, _ := exec.Command("docker", "logs", n.ctr).CombinedOutput()
			v.t.Logf("runner log of %s:\n%s", n.ctr, out)
		}
		exec.Command("docker", "rm", "-f", n.ctr).Run()
	})
	return n
}

// run starts the container hardened as the README says: read-only root, no
// capabilities, no-new-privileges, the non-root user, a tmpfs at /run and
// the storage bind mount. extra holds docker flags, env the VM's variables.
func (v *vm) run(extra []string, env ...string) {
	v.t.Helper()
	v.start(true, extra, env...)
}

// runNoNNP is run without the container-level no-new-privileges, which
// NET_MODE=tap cannot have (the runner still sets it on QEMU).
func (v *vm) runNoNNP(extra []string, env ...string) {
	v.t.Helper()
	v.start(false, extra, env...)
}

func (v *vm) start(nnp bool, extra []string, env ...string) {
	v.t.Helper()
	args := []string{"run", "-d", "--name", v.ctr, "--read-only", "--cap-drop", "ALL"}
	if nnp {
		args = append(args, "--security-opt", "no-new-privileges")
	}
	args = append(args,
		"--user", fmt.Sprintf("%d:%d", runnerUID, runnerUID),
		"--tmpfs", "/run:rw,nosuid,nodev,size=16m",
		"-v", v.store+":/var/lib/poc-qemu",
		"-e", "VM_NAME="+v.name)
	args = append(args, extra...)
	for _, e := range env {
		args = append(args, "-e", e)
	}
	args = append(args, image)
	if out, err := exec.Command("docker", args...).CombinedOutput(); err != nil {
		v.t.Fatalf("docker run: %v %s", err, out)
	}
}

// kernelEnv boots the test guest directly.
func kernelEnv(cmdline string) []string {
	return []string{
		"KERNEL_PATH=/var/lib/poc-qemu/boot/vmlinuz",
		"INITRD_PATH=/var/lib/poc-qemu/boot/initrd.img",
		"KERNEL_CMDLINE=console=ttyS0 quiet " + cmdline,
	}
}

func (v *vm) logs() string {
	out, _ := exec.Command("docker", "logs", v.ctr).CombinedOutput()
	return string(out)
}

func (v *vm) serial() string {
	b, _ := os.ReadFile(filepath.Join(v.store, "logs", v.name+".serial.log"))
	return string(b)
}

// waitFor polls f until it holds or the container stops or time runs out.
func (v *vm) waitFor(what string, timeout time.Duration, f func() bool) {
	v.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if f() {
			return
		}
		if !v.running() {
			if f() {
				return
			}
			v.t.Fatalf("container exited (code %d) before %s", v.exitCode(), what)
		}
		time.Sleep(250 * time.Millisecond)
	}
	v.t.Fatalf("no %s within %v", what, timeout)
}

func (v *vm) running() bool {
	out, _ := exec.Command("docker", "inspect", "-f", "{{.State.Running}}", v.ctr).Output()
	return strings.TrimSpace(string(out)) == "true"
}

func (v *vm) exitCode() int {
	out, _ := exec.Command("docker", "inspect", "-f", "{{.State.ExitCode}}", v.ctr).Output()
	n, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return n
}

// waitExit waits for the container to stop on its own.
func (v *vm) waitExit(timeout time.Duration) int {
	v.t.Helper()
	deadline := time.Now().Add(timeout)
	for v.running() {
		if time.Now().After(deadline) {
			v.t.Fatalf("container still running after %v", timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return v.exitCode()
}

// stop is `docker stop` (SIGTERM, then SIGKILL after grace) and returns the
// exit code and how long the stop took.
func (v *vm) stop(grace time.Duration) (int, time.Duration) {
	v.t.Helper()
	began := time.Now()
	if out, err := exec.Command("docker", "stop", "-t", strconv.Itoa(int(grace.Seconds())), v.ctr).CombinedOutput(); err != nil {
		v.t.Fatalf("docker stop: %v %s", err, out)
	}
	return v.exitCode(), time.Since(began)
}

// qemuPID finds QEMU on the host: the child of the container's PID 1.
func (v *vm) qemuPID() (runner, qemu int) {
	v.t.Helper()
	out, err := exec.Command("docker", "inspect", "-f", "{{.State.Pid}}", v.ctr).Output()
	if err != nil {
		v.t.Fatal(err)
	}
	runner, _ = strconv.Atoi(strings.TrimSpace(string(out)))
	if qemu = procfs.ChildNamed(runner, "qemu-system"); qemu != 0 {
		return runner, qemu
	}
	v.t.Fatalf("no QEMU child of the container's PID 1 (%d)", runner)
	return 0, 0
}

// status reads /proc/<pid>/status, or fails the test.
func status(t testing.TB, pid int) procfs.Status {
	t.Helper()
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// assertUnprivileged checks QEMU's real process for invariant 2: uid and
// gid not 0, every capability set empty, no_new_privs, seccomp filtering,
// and more filters than PID 1 (QEMU's own -sandbox on top of Docker's).
func assertUnprivileged(t testing.TB, runner, qemu int) {
	t.Helper()
	st, pst := status(t, qemu), status(t, runner)
	for _, k := range []string{"Uid", "Gid"} {
		for _, id := range strings.Fields(st[k]) {
			if id == "0" {
				t.Errorf("QEMU %s: %s includes 0", k, st[k])
			}
		}
	}
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
		if st[k] != "0000000000000000" {
			t.Errorf("QEMU %s = %s, want 0", k, st[k])
		}
	}
	if st["NoNewPrivs"] != "1" {
		t.Errorf("QEMU NoNewPrivs = %s", st["NoNewPrivs"])
	}
	if st["Seccomp"] != "2" {
		t.Errorf("QEMU Seccomp = %s, want 2 (filter)", st["Seccomp"])
	}
	q, _ := strconv.Atoi(st["Seccomp_filters"])
	p, _ := strconv.Atoi(pst["Seccomp_filters"])
	if q <= p {
		t.Errorf("QEMU has %d seccomp filters, PID 1 has %d: -sandbox did not add its own", q, p)
	}
	t.Logf("QEMU pid %d: Uid %s Gid %s CapEff %s CapBnd %s NoNewPrivs %s Seccomp %s filters %d (PID 1: %d)",
		qemu, st["Uid"], st["Gid"], st["CapEff"], st["CapBnd"], st["NoNewPrivs"], st["Seccomp"], q, p)
	assertThreads(t, qemu, q)
}

// assertThreads checks every thread of QEMU (vCPUs, I/O, RCU...), not
// only the main one: the same uid, capabilities, no_new_privs and filters.
func assertThreads(t testing.TB, pid, filters int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		tid, _ := strconv.Atoi(e.Name())
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "status"))
		if err != nil {
			continue // the thread ended
		}
		st := map[string]string{}
		for _, l := range strings.Split(string(b), "\n") {
			if k, val, ok := strings.Cut(l, ":"); ok {
				st[k] = strings.TrimSpace(val)
			}
		}
		f, _ := strconv.Atoi(st["Seccomp_filters"])
		rootID := false
		for _, id := range strings.Fields(st["Uid"] + " " + st["Gid"]) {
			rootID = rootID || id == "0"
		}
		if rootID || st["CapEff"] != "0000000000000000" ||
			st["CapPrm"] != "0000000000000000" || st["NoNewPrivs"] != "1" || st["Seccomp"] != "2" || f != filters {
			t.Errorf("QEMU thread %d (%s): Uid %s CapEff %s CapPrm %s NoNewPrivs %s Seccomp %s filters %d",
				tid, st["Name"], st["Uid"], st["CapEff"], st["CapPrm"], st["NoNewPrivs"], st["Seccomp"], f)
		}
	}
	t.Logf("QEMU pid %d: all %d threads unprivileged and filtered", pid, len(ents))
}

func kvmGID(t testing.TB) int {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat("/dev/kvm", &st); err != nil {
		t.Fatalf("/dev/kvm: %v", err)
	}
	if st.Gid == 0 || st.Mode&0o060 != 0o060 {
		t.Fatalf("/dev/kvm is gid %d mode %o: run scripts/host-kvm.sh (root:kvm 0660, as Debian's udev rule sets it)", st.Gid, st.Mode&0o777)
	}
	return int(st.Gid)
}

func sha(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func copyFile(t testing.TB, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func chownAll(t testing.TB, root string, uid int) {
	t.Helper()
	filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err == nil {
			os.Chown(p, uid, uid)
		}
		return nil
	})
}

func contains(t testing.TB, what, s string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(s, w) {
			t.Errorf("%s lacks %q", what, w)
		}
	}
}

func qemuImgCheck(t testing.TB, path string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", path).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("No errors were found")) {
		t.Errorf("qemu-img check %s: %v\n%s", path, err, out)
	}
}

// assertOnlyHanded proves "only the descriptors it was handed" on QEMU's
// real process: every descriptor in /proc/<qemu>/fd is stdin or one of the
// two pipes (0-2), a kernel object QEMU made for itself (anon_inode: event,
// signal and timer descriptors, KVM's VM and vCPUs), a unix socket bound in
// the VM's run folder (its QMP, display and TPM sockets and their
// connections), a device it was handed (KVM, a TAP, vhost-net), or a file
// its argv names: the VM's own disk and NVRAM (through fdsets) and the
// read-only files it opens by name (firmware code, kernel, initrd, ISO).
// Nothing of the runner's (its broker lease, keys, logs) and no network
// socket beyond the ports it forwards.
func assertOnlyHanded(t testing.TB, v *vm, qemu int) {
	t.Helper()
	line, ok := findLog(v.logs(), "starting QEMU")
	if !ok {
		t.Fatal("the runner did not log QEMU's argv")
	}
	argv := strings.Fields(line.Attrs["argv"])
	allowed := map[string]bool{
		"/var/lib/poc-qemu/images/" + v.name + ".qcow2":        true,
		"/var/lib/poc-qemu/images/" + v.name + ".OVMF_VARS.fd": true,
	}
	for i, a := range argv {
		if (a == "-kernel" || a == "-initrd") && i+1 < len(argv) {
			allowed[argv[i+1]] = true
		}
		for _, kv := range strings.Split(a, ",") {
			if k, val, _ := strings.Cut(kv, "="); (k == "filename" || k == "file") && strings.HasPrefix(val, "/") && !strings.HasPrefix(val, "/dev/fdset/") {
				allowed[val] = true
			}
		}
	}
	joined := strings.Join(argv, " ")
	if strings.Contains(joined, "device=/dev/fdset/1") {
		allowed["/dev/kvm"] = true
	}
	if strings.Contains(joined, "-netdev tap,") {
		allowed["/dev/net/tun"], allowed["/dev/vhost-net"] = true, true
	}
	sockets := unixSocketPaths(t, qemu)
	dir := fmt.Sprintf("/proc/%d/fd", qemu)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, e := range ents {
		fd, _ := strconv.Atoi(e.Name())
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		seen = append(seen, e.Name()+"="+target)
		switch {
		case fd == 0 && (target == "/dev/null" || strings.HasPrefix(target, "pipe:")):
		case (fd == 1 || fd == 2) && strings.HasPrefix(target, "pipe:"):
		case strings.HasPrefix(target, "anon_inode:"):
		case strings.HasPrefix(target, "socket:["):
			ino := strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")
			if p, unix := sockets[ino]; !unix || !strings.HasPrefix(p, "/run/") {
				if unix || !strings.Contains(joined, "hostfwd=") {
					t.Errorf("QEMU fd %d is a socket (%s, unix path %q) that is neither in the run folder nor a forwarded port", fd, target, p)
				}
			}
		case allowed[target]:
		default:
			t.Errorf("QEMU fd %d is %s: not a descriptor it was handed nor a file its argv names", fd, target)
		}
	}
	t.Logf("QEMU's descriptors, each handed or its own: %s", strings.Join(seen, " "))
}

// unixSocketPaths maps the inode of each unix socket in pid's network
// namespace to its path ("" for an unnamed one).
func unixSocketPaths(t testing.TB, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) < 7 {
			continue
		}
		out[f[6]] = ""
		if len(f) > 7 {
			out[f[6]] = f[7]
		}
	}
	return out
}

// findLog finds the runner's last log line with msg.
func findLog(logs, msg string) (vmstatus.Line, bool) {
	var found vmstatus.Line
	ok := false
	for _, l := range strings.Split(logs, "\n") {
		if line := vmstatus.Parse(l); line.Attrs["msg"] == msg {
			found, ok = line, true
		}
	}
	return found, ok
}
