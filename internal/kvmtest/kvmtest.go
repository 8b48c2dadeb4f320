// Package kvmtest is for tests around KVM. Most of the code on the KVM path
// (descriptor numbering, -add-fd wiring, the query-kvm verdict, the broker's
// retries, descriptor flags) does not need the kernel's KVM to be tested:
// such tests use a stand-in device, StandInDevice, and ProbeStandIn in place
// of the KVM probe, and run on every host.
//
// What does need the kernel's KVM calls Require, and is named, with why, in
// needs-kvm.txt in this folder: Require fails a test that is not listed
// there. Where /dev/kvm exists the test runs. Where it is missing, the test
// fails, unless the run was told why this host cannot have KVM at all:
// scripts/host-kvm.sh finds that out (no VT-x/AMD-V offered to the kernel)
// and scripts/test.sh passes its words in SWARMVM_NO_KVM. Then the test is
// skipped with those words and its listed name, and scripts/test.sh lists
// every test skipped so at the end of the run; any other skip fails it.
package kvmtest

import (
	"bufio"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Marker starts the message of every test skipped for want of KVM;
// scripts/test.sh looks for it.
const Marker = "needs /dev/kvm"

// ListedAs precedes a skipped test's name as needs-kvm.txt gives it, at the
// end of its skip message; scripts/test.sh reads the name from there.
const ListedAs = "listed as: "

// ListFile is the list's path in the repository.
const ListFile = "internal/kvmtest/needs-kvm.txt"

//go:embed needs-kvm.txt
var list string

// Present reports whether /dev/kvm is a character device on this host.
func Present() bool {
	st, err := os.Stat("/dev/kvm")
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// Require lets t go on only where the host has /dev/kvm, and only if t is
// named in needs-kvm.txt.
func Require(t testing.TB) {
	t.Helper()
	_, file, _, _ := runtime.Caller(1)
	name := Qualified(file, t.Name())
	if _, ok := Listed()[name]; !ok {
		t.Fatalf("%s calls kvmtest.Require but is not in %s: a test that needs the kernel's KVM is listed there with why; one that does not uses kvmtest.StandInDevice and ProbeStandIn", name, ListFile)
	}
	if Present() {
		return
	}
	if why := os.Getenv("SWARMVM_NO_KVM"); why != "" {
		t.Skipf("%s, which this host cannot have: %s; %s%s", Marker, why, ListedAs, name)
	}
	t.Fatalf("%s and this host has none: run scripts/host-kvm.sh, which loads KVM or says why this host cannot have it (scripts/test.sh passes that on in SWARMVM_NO_KVM)", Marker)
}

// Qualified names a test as the list does: its package's folder in the
// repository, a space, and the test's full name (subtests included).
func Qualified(file, test string) string {
	dir := filepath.Dir(file)
	for d := dir; d != filepath.Dir(d); d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			rel, _ := filepath.Rel(d, dir)
			return rel + " " + test
		}
	}
	return dir + " " + test
}

// Listed reads needs-kvm.txt: each line a qualified test name, a colon, and
// why it needs the kernel's KVM; # starts a comment.
func Listed() map[string]string {
	out := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(list))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, why, _ := strings.Cut(line, ":")
		out[strings.TrimSpace(name)] = strings.TrimSpace(why)
	}
	return out
}

// StandInDevice stands in for /dev/kvm where a test needs a character
// device that opens read-write and is no KVM: /dev/zero.
const StandInDevice = "/dev/zero"

// ErrNotStandIn is ProbeStandIn's refusal of any other descriptor.
var ErrNotStandIn = errors.New("not the KVM stand-in (" + StandInDevice + ")")

// ProbeStandIn takes the place of kvmdev.Probe: it accepts StandInDevice
// and nothing else, so a test still sees a wrong descriptor refused.
func ProbeStandIn(f *os.File) error {
	var got, want unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &got); err != nil {
		return fmt.Errorf("%w: %v", ErrNotStandIn, err)
	}
	if err := unix.Stat(StandInDevice, &want); err != nil {
		return fmt.Errorf("%w: %v", ErrNotStandIn, err)
	}
	if got.Mode&unix.S_IFMT != unix.S_IFCHR || got.Rdev != want.Rdev {
		return ErrNotStandIn
	}
	return nil
}

// KVMNumbers are the character device numbers of /dev/kvm (misc, 232). A
// node made with them (mknod) is "/dev/kvm" to the device cgroup and to
// file modes, with no KVM behind it: enough to test what denies an open.
const KVMMajor, KVMMinor = 10, 232

// FakeNode makes a character device node with /dev/kvm's numbers at path,
// owned by uid:gid with mode perm.
func FakeNode(t testing.TB, path string, uid, gid int, perm uint32) {
	t.Helper()
	if err := unix.Mknod(path, unix.S_IFCHR|perm, int(unix.Mkdev(KVMMajor, KVMMinor))); err != nil {
		t.Fatalf("mknod %s: %v (the tests run as root)", path, err)
	}
	if err := os.Chown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, os.FileMode(perm)); err != nil {
		t.Fatal(err)
	}
}
