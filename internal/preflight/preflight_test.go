package preflight

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// TestMain doubles as a helper process: run with SWARMVM_PREFLIGHT_HELPER
// set, it performs one check under whatever credentials it was started
// with and prints the finding as JSON.
func TestMain(m *testing.M) {
	switch os.Getenv("SWARMVM_PREFLIGHT_HELPER") {
	case "kvm":
		f, fd := OpenKVM(os.Getenv("HELPER_PATH"), nil)
		if f != nil {
			f.Close()
		}
		json.NewEncoder(os.Stdout).Encode(fd)
		os.Exit(0)
	case "disk":
		json.NewEncoder(os.Stdout).Encode(Disk(os.Getenv("HELPER_PATH"), false))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// asNobody runs the helper as uid/gid 65534 and returns its finding.
func asNobody(t *testing.T, check, path string) Finding {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test starts a helper as another uid and must run as root (CI does)")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The go tool's build folder is private to root; the helper needs a copy it can run.
	dir, err := os.MkdirTemp("", "preflight-helper-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "helper")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = []string{"SWARMVM_PREFLIGHT_HELPER=" + check, "HELPER_PATH=" + path}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	var f Finding
	if err := json.Unmarshal(out, &f); err != nil {
		t.Fatalf("helper said %q: %v", out, err)
	}
	return f
}

func TestOpenKVM(t *testing.T) {
	kvmtest.Require(t)
	f, fd := OpenKVM("/dev/kvm", nil)
	if f == nil || !fd.OK {
		t.Fatalf("/dev/kvm: %v", fd)
	}
	defer f.Close()
	if !strings.Contains(fd.Detail, "KVM API 12") {
		t.Errorf("detail %q", fd.Detail)
	}
}

func TestOpenKVMFailures(t *testing.T) {
	regular := filepath.Join(t.TempDir(), "kvm")
	os.WriteFile(regular, nil, 0o600)
	cases := []struct {
		name, path, cause, fix string
	}{
		{"missing", "/dev/kvm-missing", "is missing " + ThisMachine().Where(), ""},
		{"regular file", regular, "is not a character device", "KVM_DEVICE"},
		{"not kvm", "/dev/null", "KVM_GET_API_VERSION", "KVM_DEVICE"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f, fd := OpenKVM(tc.path, nil)
			if f != nil || fd.OK {
				t.Fatalf("%s opened", tc.path)
			}
			if fd.Symptom != "KVM not available" || !strings.Contains(fd.Cause, tc.cause) || !strings.Contains(fd.Fix, tc.fix) {
				t.Errorf("finding %+v", fd)
			}
		})
	}
}

// A device node the user may not open (root:kvm 0660, as udev makes
// /dev/kvm) is explained by uid, mode and the group to add. The node has
// /dev/kvm's numbers; the file mode refuses before any driver is asked.
func TestOpenKVMAsOtherUser(t *testing.T) {
	node := filepath.Join(openDir(t), "kvm")
	kvmtest.FakeNode(t, node, 0, 4242, 0o660)
	fd := asNobody(t, "kvm", node)
	if fd.OK || !strings.Contains(fd.Cause, "uid 65534 gid 65534 may not open "+node) || !strings.Contains(fd.Cause, "mode") {
		t.Fatalf("finding %+v, want an EACCES explanation with uid and mode", fd)
	}
	if !strings.Contains(fd.Fix, "broker") || !strings.Contains(fd.Fix, "gid 4242") {
		t.Errorf("fix %q, want the broker and the device's group", fd.Fix)
	}
}

// openDir is a temporary folder that other users may enter, unlike
// t.TempDir's parent.
func openDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "preflight-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestDisk(t *testing.T) {
	dir := openDir(t)
	img := filepath.Join(dir, "vm.qcow2")
	if f := Disk(img, false); f.OK || !strings.Contains(f.Fix, "DISK_SIZE") {
		t.Errorf("missing disk without DISK_SIZE: %+v", f)
	}
	if f := Disk(img, true); !f.OK {
		t.Errorf("missing disk with DISK_SIZE: %+v", f)
	}
	if f := Disk(dir, false); f.OK || !strings.Contains(f.Cause, "not a regular file") {
		t.Errorf("folder as disk: %+v", f)
	}
	os.WriteFile(img, []byte("x"), 0o600)
	if f := Disk(img, false); !f.OK {
		t.Errorf("own disk: %+v", f)
	}
	// Another uid's disk (another VM's, or one from before VMs had their
	// own uids) is refused, whatever its mode.
	f := asNobody(t, "disk", img)
	for _, want := range []string{img, "belongs to uid 0, not to this VM's uid 65534"} {
		if f.OK || !strings.Contains(f.Cause, want) {
			t.Errorf("finding cause %q lacks %q", f.Cause, want)
		}
	}
	if f.Symptom != "QEMU cannot access disk" || !strings.Contains(f.Fix, "chown 65534:65534") {
		t.Errorf("finding %+v", f)
	}
	// The seed's "QEMU cannot access disk": path, owner, mode and the user.
	os.Chown(img, 65534, 65534)
	os.Chmod(img, 0o400)
	f = asNobody(t, "disk", img)
	for _, want := range []string{img, "owner 65534:65534", "-r--------", "uid 65534 gid 65534"} {
		if f.OK || !strings.Contains(f.Cause, want) {
			t.Errorf("finding cause %q lacks %q", f.Cause, want)
		}
	}
	// A folder on the way that the user may not enter is named.
	os.Chmod(dir, 0o700)
	f = asNobody(t, "disk", img)
	if f.OK || !strings.Contains(f.Cause, "folder "+dir+" may not be entered (owner 0:0 mode drwx------)") {
		t.Errorf("blocked folder: %+v", f)
	}
}

func TestStorageRoot(t *testing.T) {
	if f := StorageRoot("/nonexistent/poc-qemu"); f.OK || !strings.Contains(f.Fix, "mount") {
		t.Errorf("missing root: %+v", f)
	}
	if f := StorageRoot(t.TempDir()); !f.OK {
		t.Errorf("temp dir: %+v", f)
	}
}

func TestOVMF(t *testing.T) {
	dir := t.TempDir()
	code, tmpl, vars := filepath.Join(dir, "C.fd"), filepath.Join(dir, "V.fd"), filepath.Join(dir, "vm.fd")
	os.WriteFile(code, make([]byte, 3653632), 0o644)
	os.WriteFile(tmpl, make([]byte, 540672), 0o644)
	if f := OVMF(code, tmpl, vars, false); !f.OK {
		t.Errorf("pair without vars: %+v", f)
	}
	os.WriteFile(vars, make([]byte, 131072), 0o600)
	if f := OVMF(code, tmpl, vars, false); f.OK || !strings.Contains(f.Fix, "OVMF_VARS_RESET") {
		t.Errorf("wrong-size vars: %+v", f)
	}
	if f := OVMF(code, tmpl, vars, true); !f.OK {
		t.Errorf("wrong-size vars with reset: %+v", f)
	}
	os.WriteFile(tmpl, make([]byte, 131072), 0o644)
	if f := OVMF(code, tmpl, vars, false); f.OK || !strings.Contains(f.Cause, "not a CODE/VARS pair") {
		t.Errorf("mismatched pair: %+v", f)
	}
	if f := OVMF(filepath.Join(dir, "none"), tmpl, vars, false); f.OK || !strings.Contains(f.Cause, "does not exist") {
		t.Errorf("missing code: %+v", f)
	}
	if f := OVMF(code, filepath.Join(dir, "none"), vars, false); f.OK || !strings.Contains(f.Cause, "OVMF_VARS_TEMPLATE") || !strings.Contains(f.Cause, "does not exist") {
		t.Errorf("missing template: %+v", f)
	}
}

// uefi-secure: the template and the VM's own NVRAM must have Secure Boot's
// keys; NVRAM from the plain firmware is refused with the reset as the fix
// (Debian's ovmf files, installed by scripts/test.sh).
func TestSecureBoot(t *testing.T) {
	const ms, plain = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"
	vars := filepath.Join(t.TempDir(), "vm.fd")
	if f := SecureBoot(ms, vars, false); !f.OK {
		t.Errorf("ms template, no vars yet: %+v", f)
	}
	if f := SecureBoot(plain, vars, false); f.OK || f.Class != ClassConfig || !strings.Contains(f.Fix, "OVMF_VARS_4M.ms.fd") {
		t.Errorf("plain template: %+v", f)
	}
	copyFile(t, plain, vars)
	if f := SecureBoot(ms, vars, false); f.OK || !strings.Contains(f.Cause, "no Secure Boot keys") || !strings.Contains(f.Fix, "OVMF_VARS_RESET=true") {
		t.Errorf("vars from the plain template: %+v", f)
	}
	if f := SecureBoot(ms, vars, true); !f.OK {
		t.Errorf("vars from the plain template, reset asked: %+v", f)
	}
	copyFile(t, ms, vars)
	if f := SecureBoot(ms, vars, false); !f.OK {
		t.Errorf("vars from the ms template: %+v", f)
	}
	os.WriteFile(vars, make([]byte, 540672), 0o600)
	if f := SecureBoot(ms, vars, false); f.OK || !strings.Contains(f.Cause, "not an OVMF vars file") {
		t.Errorf("zeroed vars: %+v", f)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestQEMU(t *testing.T) {
	dir := t.TempDir()
	fake := func(version string) string {
		p := filepath.Join(dir, "qemu-"+version)
		os.WriteFile(p, []byte(fmt.Sprintf("#!/bin/sh\necho 'QEMU emulator version %s (Debian)'\n", version)), 0o755)
		return p
	}
	if f := QEMU(context.Background(), fake("7.2.15"), true); f.OK || !strings.Contains(f.Cause, "8.2") {
		t.Errorf("7.2 with kvm: %+v", f)
	}
	if f := QEMU(context.Background(), fake("7.2.15"), false); !f.OK {
		t.Errorf("7.2 with tcg: %+v", f)
	}
	if f := QEMU(context.Background(), fake("10.0.13"), true); !f.OK {
		t.Errorf("10.0: %+v", f)
	}
	if f := QEMU(context.Background(), filepath.Join(dir, "absent"), true); f.OK {
		t.Errorf("absent binary passed")
	}
}

func TestDiskInMissingFolder(t *testing.T) {
	dir := t.TempDir()
	if f := Disk(filepath.Join(dir, "images", "sub", "vm.qcow2"), true); !f.OK {
		t.Errorf("disk to create in a folder to create: %+v", f)
	}
}

// A VM on local storage runs only on its home node, named by ID or by
// hostname (in any case); without a home it runs anywhere.
func TestHome(t *testing.T) {
	for _, c := range []struct {
		home, id, host string
		ok             bool
	}{{"", "", "", true}, {"abc", "abc", "n1", true}, {"N1", "abc", "n1", true}, {"abc", "xyz", "n1", false}, {"n2", "xyz", "", false}} {
		f := Home(c.home, c.id, c.host)
		if f.OK != c.ok || f.Class != ClassStorage {
			t.Errorf("%+v: %+v", c, f)
		}
		if !f.OK && (!strings.Contains(f.Cause, "is not the VM's home node "+c.home) || !strings.Contains(f.Fix, "swarmvm move")) {
			t.Errorf("%+v: cause %q fix %q", c, f.Cause, f.Fix)
		}
	}
}

// OpenOwn accepts only the runner's own regular file with one name,
// reached without a symbolic link; Reopen gives the same file again.
func TestOpenOwn(t *testing.T) {
	root := openDir(t)
	own := filepath.Join(root, "images", "vm.qcow2")
	os.MkdirAll(filepath.Dir(own), 0o755)
	os.WriteFile(own, []byte("disk"), 0o600)
	f, err := OpenOwn(root, "IMAGE_PATH", own, os.O_RDWR)
	if err != nil {
		t.Fatalf("own file: %v", err)
	}
	g, err := Reopen(f, os.O_RDONLY)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	var a, b syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &a)
	syscall.Fstat(int(g.Fd()), &b)
	if a.Ino != b.Ino {
		t.Error("reopen gave another file")
	}
	f.Close()
	g.Close()

	link := filepath.Join(root, "images", "link.qcow2")
	os.Symlink(own, link)
	other := filepath.Join(root, "images", "other.qcow2")
	os.WriteFile(other, nil, 0o666)
	os.Chown(other, 4242, 4242)
	hard := filepath.Join(root, "images", "hard.qcow2")
	os.Link(own, hard)
	fifo := filepath.Join(root, "images", "fifo")
	syscall.Mkfifo(fifo, 0o600)
	for path, want := range map[string]string{link: "symbolic link", other: "owned by uid 4242", hard: "2 names", fifo: "not a regular file"} {
		flag := os.O_RDWR
		if path == fifo {
			flag |= syscall.O_NONBLOCK
		}
		if f, err := OpenOwn(root, "IMAGE_PATH", path, flag); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", path, err, want)
			if f != nil {
				f.Close()
			}
		}
	}
}

// The VM's files may sit only in folders of root's or its own: a folder
// another uid made first is refused, naming it; missing folders pass (the
// runner makes them).
func TestFolders(t *testing.T) {
	root := openDir(t)
	os.MkdirAll(filepath.Join(root, "images", "mine"), 0o755)
	os.MkdirAll(filepath.Join(root, "images", "prod"), 0o755)
	os.Chown(filepath.Join(root, "images", "prod"), 4242, 4242)
	ok := []Var{{Name: "IMAGE_PATH", Path: filepath.Join(root, "images", "mine", "a.qcow2")}, {Name: "OVMF_VARS", Path: filepath.Join(root, "images", "a.fd")},
		{Name: "IMAGE_PATH", Path: filepath.Join(root, "images", "new", "deeper", "a.qcow2")}}
	if f := Folders(root, ok); !f.OK {
		t.Errorf("own and root's folders: %+v", f)
	}
	f := Folders(root, []Var{{Name: "IMAGE_PATH", Path: filepath.Join(root, "images", "prod", "a.qcow2")}})
	if f.OK || !strings.Contains(f.Cause, "a folder of uid 4242") {
		t.Errorf("another uid's folder: %+v", f)
	}
}

// The version recorded at image build is used for the binary it describes,
// and only for it: a binary changed since (another size or time) is asked.
func TestQEMUVersionFromFacts(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "qemu")
	os.WriteFile(bin, []byte("#!/bin/sh\necho 'QEMU emulator version 10.0.13 (Debian)'\n"), 0o755)
	old := QEMUFacts
	QEMUFacts = filepath.Join(dir, "facts")
	defer func() { QEMUFacts = old }()
	fi, _ := os.Stat(bin)
	os.WriteFile(QEMUFacts, []byte(fmt.Sprintf("%s %d %d\nQEMU emulator version 11.1.1 (recorded)\n", bin, fi.Size(), fi.ModTime().Unix())), 0o644)
	if f := QEMU(context.Background(), bin, true); !f.OK || !strings.Contains(f.Detail, "11.1.1") {
		t.Errorf("the recorded version is not used: %+v", f)
	}
	os.WriteFile(bin, []byte("#!/bin/sh\necho 'QEMU emulator version 7.2.15 (Debian)'\n"), 0o755)
	if f := QEMU(context.Background(), bin, true); f.OK || !strings.Contains(f.Cause, "7.2.15") {
		t.Errorf("a changed binary was not asked: %+v", f)
	}
}
