package swarm

import "testing"

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
