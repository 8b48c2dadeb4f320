package config

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
)

// The image and the broker's unit spell the runner's user, its group and
// the broker's socket outside Go: they must say what the constants say.
func TestFilesOutsideGoAgree(t *testing.T) {
	for file, wants := range map[string][]string{
		"../../Dockerfile": {
			fmt.Sprintf("groupadd --gid %d swarmvm", RunnerGID),
			fmt.Sprintf("useradd --uid %d --gid %d ", RunnerUID, RunnerGID),
			fmt.Sprintf("USER %d:%d\n", RunnerUID, RunnerGID),
		},
		"../../deploy/systemd/swarmvm-broker.service": {
			fmt.Sprintf("--socket %s --socket-group %d --allow-uid %d --allow-gid %d\n", DefaultBrokerSocket, RunnerGID, RunnerUID, RunnerGID),
		},
	} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range wants {
			if !strings.Contains(string(b), w) {
				t.Errorf("%s lacks %q", file, w)
			}
		}
	}
}

func TestNameRules(t *testing.T) {
	for s, ok := range map[string]bool{"a": true, strings.Repeat("a", 63): true, strings.Repeat("a", 64): false, "-a": false, "a_b": false, "": false} {
		if ValidVMName(s) != ok {
			t.Errorf("ValidVMName(%q) = %v", s, !ok)
		}
	}
	for s, ok := range map[string]bool{"br0": true, "br_0.5-x": true, strings.Repeat("b", 15): true, strings.Repeat("b", 16): false, "-br0": false, ".br": false, "br 0": false, "": false} {
		if ValidIfName(s) != ok {
			t.Errorf("ValidIfName(%q) = %v", s, !ok)
		}
	}
}

// A VM's MAC is a stable function of its name and uid: on its name's
// default uid the one it always had (QEMU's 52:54:00 and a hash of the
// name), on any other uid one of 46 bits outside 52:54:00, unicast and
// locally administered, that differs between uids.
func TestMAC(t *testing.T) {
	def := DefaultUID("web-1")
	if got := MAC("web-1", def); got != "52:54:00:55:0b:4b" || got != MAC("web-1", def) {
		t.Errorf("MAC(web-1, its default uid) = %q, want the MAC it had before uids were bound (52:54:00:55:0b:4b)", got)
	}
	seen := map[string]bool{}
	for _, uid := range []int{0, 10001, 4242, def + 1} {
		m := MAC("web-1", uid)
		hw, err := net.ParseMAC(m)
		if err != nil || hw[0]&1 != 0 || hw[0]&2 == 0 || strings.HasPrefix(m, "52:54:00:") || seen[m] || m != MAC("web-1", uid) {
			t.Errorf("MAC(web-1, %d) = %q (%v): want a stable, unicast, locally administered MAC of its own outside 52:54:00", uid, m, err)
		}
		seen[m] = true
	}
	if MAC("web-1", def) == MAC("web-2", DefaultUID("web-2")) {
		t.Error("two VMs share a MAC")
	}
}
