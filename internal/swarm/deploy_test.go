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
		if got := permanent(status.Exit(c.code), c.env); got != c.want {
			t.Errorf("exit %d with %v: permanent %v, want %v", c.code, c.env, got, c.want)
		}
	}
}
