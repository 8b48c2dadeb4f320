package config

import (
	"fmt"
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
