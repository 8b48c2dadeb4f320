// Package arch enforces the project's layering: imports between swarmvm's
// packages point downward only, and config stays on the standard library.
package arch

import (
	"encoding/json"
	"os/exec"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/swarmvm/swarmvm/"

// allowed lists, for each package, the project packages it may import.
var allowed = map[string][]string{
	"cmd/swarmvm":          {"internal/cli"},
	"internal/cli":         {"internal/backup", "internal/broker", "internal/config", "internal/console", "internal/control", "internal/deploy", "internal/migrate", "internal/nodecheck", "internal/preflight", "internal/runner", "internal/snapshot", "internal/status", "internal/swarm", "internal/tapdev", "internal/vmdisk"},
	"internal/swarm":       {"internal/config", "internal/nodecheck", "internal/poll", "internal/preflight", "internal/procfs", "internal/status"},
	"internal/nodecheck":   {"internal/config", "internal/fdpass", "internal/preflight"},
	"internal/broker":      {"internal/config", "internal/fdpass", "internal/kvmdev", "internal/poll"},
	"internal/fdpass":      {"internal/config"}, // the VM and interface name grammars
	"internal/control":     {"internal/fdpass"},
	"internal/backup":      {"internal/config", "internal/control", "internal/qemu", "internal/vmdisk"},
	"internal/snapshot":    {"internal/config", "internal/control", "internal/qemu", "internal/vmdisk"},
	"internal/migrate":     {"internal/config", "internal/control", "internal/vmdisk"},
	"internal/runner":      {"internal/backup", "internal/cloudinit", "internal/config", "internal/console", "internal/control", "internal/fdpass", "internal/migrate", "internal/poll", "internal/preflight", "internal/procfs", "internal/qemu", "internal/qga", "internal/qmp", "internal/status"},
	"internal/deploy":      {"internal/config", "internal/console", "internal/swarm"},
	"internal/cloudinit":   nil,
	"internal/console":     nil,
	"internal/kvmtest":     nil, // imported by tests only
	"internal/kvmdev":      nil,
	"internal/preflight":   {"internal/config", "internal/fdpass", "internal/kvmdev", "internal/qemu", "internal/tapdev"},
	"internal/tapdev":      nil,
	"internal/vmdisk":      {"internal/config", "internal/poll", "internal/preflight", "internal/qemu"},
	"internal/qemu":        nil,
	"internal/qmp":         nil,
	"internal/qga":         nil,
	"internal/status":      nil,
	"internal/qmp/qmptest": nil,
	"internal/config":      nil,
	"internal/poll":        nil,
	"internal/procfs":      nil,
	"test/e2e":             {"internal/qmp", "internal/status"}, // the contract, read from the outside; QMP for the bare-QEMU floor

	"test/deploy":      nil,
	"test/arch":        nil,
	"test/cluster":     {"internal/status"},
	"test/scripts":     nil,
	"test/outlive":     {"internal/procfs"},
	"test/heartbeat":   nil,
	"test/guestbench":  nil, // runs in the test guest
	"test/guestwriter": nil, // runs in the test guest
}

func TestImportsPointDownward(t *testing.T) {
	out, err := exec.Command("go", "list", "-json", "../../...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	seen := 0
	for dec.More() {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		rel := strings.TrimPrefix(p.ImportPath, module)
		ok, known := allowed[rel]
		if !known {
			t.Errorf("package %s is not in the layering table: add it with the imports it may use", rel)
			continue
		}
		seen++
		for _, imp := range p.Imports {
			if !strings.HasPrefix(imp, module) {
				if rel == "internal/config" && strings.Contains(strings.SplitN(imp, "/", 2)[0], ".") {
					t.Errorf("internal/config imports %s: it must stay on the standard library", imp)
				}
				continue
			}
			dep := strings.TrimPrefix(imp, module)
			i := sort.SearchStrings(ok, dep)
			if i == len(ok) || ok[i] != dep {
				t.Errorf("%s imports %s, which the layering does not allow", rel, dep)
			}
		}
	}
	if seen < 8 {
		t.Fatalf("checked only %d packages", seen)
	}
}
