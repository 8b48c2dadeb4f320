package cluster

import (
	"bytes"
	"crypto/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rawWithMark writes a raw disk image of size MiB whose guest mark (8 MiB
// in) is mark, with random data after it so that the image is not sparse.
func rawWithMark(t *testing.T, path, mark string, mib, random int) {
	t.Helper()
	b := make([]byte, mib<<20)
	copy(b[8<<20:], mark)
	rand.Read(b[9<<20 : (9+random)<<20])
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// uidOf is the VM's uid as deploy derives it (render shows it).
func uidOf(t *testing.T, vm string) int {
	t.Helper()
	out, code := swarmvm(t, "render", "--name", vm, "--node", "x")
	for _, l := range strings.Split(out, "\n") {
		if u, ok := strings.CutPrefix(strings.TrimSpace(l), "user: \""); ok && code == 0 {
			n, _ := strconv.Atoi(strings.Split(u, ":")[0])
			return n
		}
	}
	t.Fatalf("no user in render output (%d):\n%s", code, out)
	return 0
}

func ownedBy(t *testing.T, path string, uid int) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Errorf("%v", err)
		return
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != uid || st.Gid != 10001 || fi.Mode().Perm() != 0o600 {
		t.Errorf("%s: owner %d:%d mode %v, want %d:10001 0600", path, st.Uid, st.Gid, fi.Mode().Perm(), uid)
	}
}

// disk import: a qcow2 file on the node, a raw image by URL (served from
// the switch namespace), each the VM's own (uid, 0600), checked, with
// NVRAM; the VM deployed afterwards boots on its home from the imported
// data. An image with a backing file is refused and leaves nothing.
func TestDiskImport(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	src := filepath.Join(state, "n2", "import")
	os.MkdirAll(src, 0o755)
	defer os.RemoveAll(src)

	qvm := uniq("imp-qcow2")
	raw := filepath.Join(src, "src.raw")
	rawWithMark(t, raw, "imported-"+qvm, 32, 1)
	qcow := filepath.Join(src, "src.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
	removeAfter(t, qvm)
	out, code := swarmvm(t, "disk", "import", qvm, qcow, "--node", hostname(2))
	if code != 0 {
		t.Fatalf("disk import (qcow2): exit %d\n%s", code, out)
	}
	contains(t, "import output", out, "importing on node svmc-n2", "converting: 100%", "checked clean", "NVRAM")
	t.Logf("import:\n%s", out)
	uid := uidOf(t, qvm)
	ownedBy(t, filepath.Join(storage(2), "images", qvm+".qcow2"), uid)
	ownedBy(t, filepath.Join(storage(2), "images", qvm+".OVMF_VARS.fd"), uid)
	noCopiesElsewhere(t, qvm, 2)
	// Deployed without a node: its recorded home is where the disk is.
	deploy(t, append(vmArgs(qvm, local, "--boot-mode", "uefi"), cmdline("swarmvm.mark=unused")...)...)
	if tk := newestTask(t, qvm); tk.node != hostname(2) {
		t.Errorf("imported VM runs on %s, not where its disk is", tk.node)
	}
	waitFile(t, serialLog(storage(2), qvm), "SWARMVM-GUEST-MARK imported-"+qvm, 1, 3*time.Minute)

	// By URL, a raw image, onto another node.
	rvm := uniq("imp-url")
	www := t.TempDir()
	os.Chmod(www, 0o755)
	rawWithMark(t, filepath.Join(www, "cloud.raw"), "imported-"+rvm, 24, 1)
	serveInNetns(t, "svmc-sw", "10.231.0.1:8099", www)
	removeAfter(t, rvm)
	out, code = swarmvm(t, "disk", "import", rvm, "--url", "http://10.231.0.1:8099/cloud.raw", "--node", hostname(3), "--boot-mode", "bios")
	if code != 0 {
		t.Fatalf("disk import --url: exit %d\n%s", code, out)
	}
	contains(t, "import --url output", out, "downloading: 100%", "source: raw")
	ownedBy(t, filepath.Join(storage(3), "images", rvm+".qcow2"), uidOf(t, rvm))
	deploy(t, append(vmArgs(rvm, local), cmdline("swarmvm.mark=unused")...)...)
	waitFile(t, serialLog(storage(3), rvm), "SWARMVM-GUEST-MARK imported-"+rvm, 1, 3*time.Minute)

	// A backing file: refused, nothing made.
	bvm := uniq("imp-backing")
	overlay := filepath.Join(src, "overlay.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", qcow, "-F", "qcow2", overlay)
	os.Chmod(overlay, 0o644)
	t.Cleanup(func() { dk(t, manager, "config", "rm", "swarmvm-home-"+bvm) })
	out, code = swarmvm(t, "disk", "import", bvm, overlay, "--node", hostname(2))
	if code == 0 || !strings.Contains(out, "it has a backing file") {
		t.Errorf("import of an image with a backing file: exit %d\n%s", code, out)
	}
	if fs := vmFiles(bvm); len(fs) > 0 {
		t.Errorf("a refused import left files: %v", fs)
	}
	if _, err := dk(t, manager, "config", "inspect", "swarmvm-home-"+bvm); err == nil {
		t.Error("a refused import recorded a home")
	}
}

// An import that fails on a node leaves no home behind, so the retry on
// the node that has the file goes through (it was refused: "its home is
// <the failed node> — move it", and move knew no such VM). A home the
// swarm records for a VM without a service is named, with the command
// that clears it, never with move.
func TestFailedImportLeavesNoHome(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	src := filepath.Join(state, "n2", "import-retry")
	os.MkdirAll(src, 0o755)
	defer os.RemoveAll(src)
	vm := uniq("imp-retry")
	qcow := filepath.Join(src, "src.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M")
	os.Chmod(qcow, 0o644)
	removeAfter(t, vm)
	t.Cleanup(func() { dk(t, manager, "config", "rm", "swarmvm-home-"+vm) })

	// The file is on node 2 only: on node 3 the job cannot even start.
	out, code := swarmvm(t, "disk", "import", vm, "/var/lib/swarmvm-import-retry/src.qcow2", "--node", hostname(3))
	if code == 0 {
		t.Fatalf("import of a file node 3 does not have: exit 0\n%s", out)
	}
	if rec, err := dk(t, manager, "config", "inspect", "swarmvm-home-"+vm); err == nil {
		t.Fatalf("the failed import recorded a home:\n%s", rec)
	}
	out, code = swarmvm(t, "disk", "import", vm, qcow, "--node", hostname(2))
	if code != 0 {
		t.Fatalf("the retry on the node with the file: exit %d\n%s", code, out)
	}
	contains(t, "import output", out, "home recorded: "+hostname(2))

	// A stale record (here: written for node 3, where no disk is) and no
	// service: deploy names the record and how to clear it.
	stale := uniq("imp-stale")
	t.Cleanup(func() { dk(t, manager, "config", "rm", "swarmvm-home-"+stale) })
	id, err := dk(t, manager, "node", "inspect", "--format", "{{.ID}}", hostname(3))
	if err != nil {
		t.Fatal(err)
	}
	rec := filepath.Join(t.TempDir(), "rec")
	os.WriteFile(rec, []byte("stale\n"), 0o644)
	must(t, manager, "config", "create", "--label", "io.swarmvm.vm="+stale, "--label", "io.swarmvm.home="+id,
		"--label", "io.swarmvm.home.hostname="+hostname(3), "swarmvm-home-"+stale, rec)
	out, code = swarmvm(t, append([]string{"deploy", "--wait", "0"}, vmArgs(stale, local, "--node", hostname(2))...)...)
	if code == 0 {
		t.Fatalf("deploy against a recorded home elsewhere: exit 0\n%s", out)
	}
	contains(t, "deploy output", out, "records "+stale+"'s home as "+hostname(3), "docker config rm swarmvm-home-"+stale)
	if strings.Contains(out, "swarmvm move") {
		t.Errorf("deploy points a VM without a service at move, which cannot move it:\n%s", out)
	}
}

// serveInNetns serves dir over HTTP at addr inside the network namespace
// ns (the switch, which every node reaches), until the test ends. The
// socket is made in that namespace by a thread that enters it and leaves.
func serveInNetns(t *testing.T, ns, addr, dir string) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	target, err := os.Open("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	l, lerr := net.Listen("tcp", addr)
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		panic(err) // this thread must not go back to the pool in the wrong namespace
	}
	if lerr != nil {
		t.Fatal(lerr)
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(dir))}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
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
func (l *lockedBuf) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v %s", name, args, err, out)
	}
}

func qemuImgCheck(t *testing.T, path string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", path).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "No errors were found") {
		t.Errorf("qemu-img check %s: %v\n%s", path, err, out)
	}
}

// psLine is the VM's line of swarmvm ps, in fields: name, home, node,
// state, health...
func psLine(t *testing.T, vm string) []string {
	t.Helper()
	out, _ := swarmvm(t, "ps")
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == vm {
			return f
		}
	}
	t.Errorf("%s not in ps:\n%s", vm, out)
	return nil
}

// move: the guest's disk mark and an EFI variable it set survive a move to
// another node; the source copy is set aside, not deleted; the VM runs on
// its new home. A move killed mid-copy leaves the VM startable on its
// source with its data, and a move run again completes.
func TestMove(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	vm := uniq("mv")
	mark := "mark-" + vm
	// 160 MiB of random data in the disk make the copy take a while at
	// --max-rate 16M: time to kill a move in the middle of it.
	src := filepath.Join(state, "n2", "import")
	os.MkdirAll(src, 0o755)
	defer os.RemoveAll(src)
	raw := filepath.Join(src, "big.raw")
	rawWithMark(t, raw, mark, 192, 160)
	removeAfter(t, vm)
	if out, code := swarmvm(t, "disk", "import", vm, raw, "--node", hostname(2)); code != 0 {
		t.Fatalf("import: %d\n%s", code, out)
	}
	deploy(t, append(vmArgs(vm, local, "--boot-mode", "uefi", "--disk-size", ""), cmdline("swarmvm.mark=unused", "swarmvm.efivar=nv-"+vm)...)...)
	waitFile(t, serialLog(storage(2), vm), "SWARMVM-GUEST-EFIVAR-SET nv-"+vm, 1, 3*time.Minute)
	waitFile(t, serialLog(storage(2), vm), "SWARMVM-GUEST-MARK "+mark, 1, time.Minute)

	// Killed mid-copy: the VM is still at home, startable, with its data.
	disk2 := filepath.Join(storage(2), "images", vm+".qcow2")
	cmd := exec.Command(bin, "move", vm, "--to", hostname(3), "--max-rate", "16M")
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+dockerHost(manager))
	var mout lockedBuf
	cmd.Stdout, cmd.Stderr = &mout, &mout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for !strings.Contains(mout.String(), "send: sending:  20%") && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Logf("move killed mid-copy:\n%s", mout.String())
	if !strings.Contains(mout.String(), "send: sending:  20%") || strings.Contains(mout.String(), "installed") {
		t.Fatal("the move was not killed in the middle of the copy")
	}
	// The sender only read it: the source disk is whole.
	qemuImgCheck(t, disk2)
	// The operator starts it again where it was.
	out := deploy(t, append(vmArgs(vm, local, "--boot-mode", "uefi", "--disk-size", ""), cmdline("swarmvm.mark=unused", "swarmvm.efivar=nv-"+vm)...)...)
	contains(t, "deploy after the killed move", out, "home node svmc-n2")
	waitFile(t, serialLog(storage(2), vm), "SWARMVM-GUEST-MARK "+mark, 2, 3*time.Minute)
	if tk := newestTask(t, vm); tk.node != hostname(2) {
		t.Errorf("after the killed move the VM runs on %s", tk.node)
	}

	// The move again, to the end.
	out, code := swarmvm(t, "move", vm, "--to", hostname(3))
	if code != 0 {
		t.Fatalf("move: exit %d\n%s", code, out)
	}
	t.Logf("move:\n%s", out)
	// The killed move's jobs ran on and left a copy on the target, which
	// never counted; this move sets it aside.
	contains(t, "move output", out, "removed what an unfinished run left", "the copied disk is clean", "an older copy here was set aside",
		"home is now svmc-n3", "set aside", "moved to svmc-n3 and running")
	log3 := serialLog(storage(3), vm)
	waitFile(t, log3, "SWARMVM-GUEST-MARK "+mark, 1, 3*time.Minute)
	waitFile(t, log3, "SWARMVM-GUEST-EFIVAR nv-"+vm, 1, time.Minute)
	aside, _ := filepath.Glob(filepath.Join(storage(2), "images", vm+".qcow2.moved-*"))
	if len(aside) != 1 {
		t.Errorf("source copy set aside: %v", aside)
	}
	if _, err := os.Stat(disk2); !os.IsNotExist(err) {
		t.Errorf("the source still has a disk under the VM's name: %v", err)
	}
	if f := psLine(t, vm); len(f) < 4 || f[1] != hostname(3) || f[2] != hostname(3) || f[3] != "running" {
		t.Errorf("ps after the move: %v, want home and node svmc-n3, running", f)
	}
	for where, fs := range vmFiles(vm) {
		t.Logf("%s: %v", where, fs)
	}
}
