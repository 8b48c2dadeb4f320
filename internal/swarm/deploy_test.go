package swarm

import (
	"testing"

	"github.com/swarmvm/swarmvm/internal/status"
)

// A failed task reads as the runner put it, or as Swarm did when its
// container never ran.
func TestFailureText(t *testing.T) {
	for _, tc := range []struct {
		f    Failure
		want string
	}{
		{Failure{Code: 4, Meaning: "storage", Reason: "IMAGE_PATH x belongs to uid 5", Permanent: true}, "failed: exit 4 (storage): IMAGE_PATH x belongs to uid 5"},
		{Failure{Reason: "No such image: swarmvm/runner:dev"}, "failed: No such image: swarmvm/runner:dev"},
	} {
		if got := tc.f.String(); got != tc.want {
			t.Errorf("%q, want %q", got, tc.want)
		}
	}
}

// deploy stops waiting on a failure a restart meets again: a bad
// configuration anywhere; KVM or storage missing on the node only for a VM
// pinned to its home (local storage), not for one on shared storage, which
// Swarm may start on another node.
func TestPermanentFailure(t *testing.T) {
	local, shared := []string{"VM_NAME=a", "STORAGE_MODE=local"}, []string{"VM_NAME=a", "STORAGE_MODE=shared"}
	for _, c := range []struct {
		code int
		env  []string
		want bool
	}{
		{status.ExitConfig, local, true}, {status.ExitConfig, shared, true},
		{status.ExitKVM, local, true}, {status.ExitKVM, shared, false},
		{status.ExitStorage, local, true}, {status.ExitStorage, shared, false},
		{status.ExitCrashed, local, false}, {status.ExitTPM, shared, false},
	} {
		if got := permanent(status.Exit(c.code), envMap(c.env)); got != c.want {
			t.Errorf("exit %d with %v: permanent %v, want %v", c.code, c.env, got, c.want)
		}
	}
}

// Two VMs' files are compared as the paths they are, not as written: a
// disk spelt with ./ or // is the other VM's disk still. (Before, the
// cross-VM check compared text, and images/./victim.qcow2 passed.)
func TestFilesOfCompareCleaned(t *testing.T) {
	victim := filesOf(map[string]string{"VM_NAME": "victim"})
	for _, spelt := range []string{"/var/lib/poc-qemu/images/./victim.qcow2", "/var/lib/poc-qemu//images/victim.qcow2", "/var/lib/poc-qemu/images/victim.qcow2/."} {
		other := filesOf(map[string]string{"VM_NAME": "squatter", "IMAGE_PATH": spelt})
		if other[0] != victim[0] {
			t.Errorf("IMAGE_PATH %s reads as %s, not the victim's %s", spelt, other[0], victim[0])
		}
	}
	withTPM := filesOf(map[string]string{"VM_NAME": "a", "TPM": "on", "TPM_STATE": "/var/lib/poc-qemu/images/./b.tpm"})
	if len(withTPM) != 3 || withTPM[2] != "/var/lib/poc-qemu/images/b.tpm" {
		t.Errorf("a VM's TPM state is not among its files, cleaned: %v", withTPM)
	}
}
