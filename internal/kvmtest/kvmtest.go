// Package kvmtest decides whether a test that needs the host's /dev/kvm
// runs. Where the device exists, it does. Where it is missing, the test
// fails, unless the run was told why this host cannot have KVM at all:
// scripts/host-kvm.sh finds that out (no VT-x/AMD-V offered to the
// kernel) and scripts/test.sh passes its words in SWARMVM_NO_KVM. Then the
// test is skipped with those words, and scripts/test.sh lists every test
// skipped so, by name, at the end of the run; any other skip fails it.
package kvmtest

import (
	"os"
	"testing"
)

// Marker starts the message of every test skipped for want of KVM;
// scripts/test.sh looks for it.
const Marker = "needs /dev/kvm"

// Present reports whether /dev/kvm is a character device on this host.
func Present() bool {
	st, err := os.Stat("/dev/kvm")
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// Require lets t go on only where the host has /dev/kvm.
func Require(t testing.TB) {
	t.Helper()
	if Present() {
		return
	}
	if why := os.Getenv("SWARMVM_NO_KVM"); why != "" {
		t.Skipf("%s, which this host cannot have: %s", Marker, why)
	}
	t.Fatalf("%s and this host has none: run scripts/host-kvm.sh, which loads KVM or says why this host cannot have it (scripts/test.sh passes that on in SWARMVM_NO_KVM)", Marker)
}
