package cluster

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/procfs"
)

// A Swarm in the middle of a rolling upgrade: the manager on engine 26
// (API 1.45) keeps no-new-privileges in the spec and its own node applies
// it, which deploy's audit shows; a worker on 20.10 runs the same spec
// without it (its API cannot carry it), which an audit on that node shows,
// while QEMU has no_new_privs either way (the runner sets it).
func TestMixedEngines(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	on26, on20 := uniq("eng-26"), uniq("eng-20")
	out := deploy(t, vmArgs(on26, local, "--node", hostname(1))...)
	t.Logf("deploy onto the 26.x manager:\n%s", out)
	contains(t, "deploy on engine 26", out, "Engine API 1.45", "no_new_privileges      set", "qemu NoNewPrivs        1")
	if strings.Contains(out, "dropped") || strings.Contains(out, "DRIFT") {
		t.Errorf("engine 26 dropped or drifted:\n%s", out)
	}
	out = deploy(t, vmArgs(on20, local, "--node", hostname(2))...)
	contains(t, "deploy onto a 20.10 worker", out, "running on node svmc-n2", "audit it there")
	audit, code := swarmvmOn(t, 2, "audit", on20)
	t.Logf("audit on the 20.10 worker:\n%s", audit)
	if code != 0 {
		t.Fatalf("audit on node 2: exit %d", code)
	}
	contains(t, "audit on engine 20.10", audit, "Engine API 1.41", "no_new_privileges      not set", "API 1.41 cannot carry it", "qemu NoNewPrivs        1")
	// Definitions deployed apart do not see each other: deploy checks the
	// cluster. A VM with another VM's uid, or its disk, is refused.
	third := uniq("eng-third")
	uid := strconv.Itoa(uidOf(t, on26))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--uid", uid}, "uid: " + uid + " is VM " + on26 + "'s uid"},
		{[]string{"--env", "IMAGE_PATH=" + local + "/images/" + on26 + ".qcow2"}, "is VM " + on26 + "'s file too"},
	} {
		out, code := swarmvm(t, append([]string{"deploy", "--wait", "10s"}, vmArgs(third, local, append([]string{"--node", hostname(3)}, c.args...)...)...)...)
		if code == 0 || !strings.Contains(out, c.want) {
			t.Errorf("deploy %v: exit %d\n%s", c.args, code, out)
		}
	}
	if s, _ := dk(t, manager, "service", "ls", "-q", "--filter", "name="+third); s != "" {
		t.Errorf("a refused VM got a service")
		removeAfter(t, third)
	}

	for _, vm := range []string{on26, on20} {
		q := qemus(vm)
		if len(q) != 1 {
			t.Fatalf("QEMUs of %s: %v", vm, q)
		}
		st, err := procfs.ReadStatus(q[0])
		if err != nil {
			t.Fatal(err)
		}
		if st["NoNewPrivs"] != "1" || st["CapEff"] != "0000000000000000" || st["Seccomp"] != "2" || strings.HasPrefix(st["Uid"], "0") {
			t.Errorf("%s QEMU %d: %v", vm, q[0], st)
		}
	}
}

// Three managers, the leader lost (its whole node killed): the other two
// keep quorum, and deploy, ps and rm work through one of them. The node
// rejoins when its engine starts again; the workers are demoted after.
func TestThreeManagersOneLost(t *testing.T) {
	require(t)
	out := cluster(t, "up", "--managers", "3")
	t.Logf("three managers:\n%s", out)
	if c := strings.Count(out, "Leader") + strings.Count(out, "Reachable"); c != 3 {
		t.Fatalf("%d managers reachable, want 3", c)
	}
	t.Cleanup(func() {
		restart(t, 1)
		manager = 1
		// Nodes 2 and 3 are demoted one at a time, followers first, each
		// asked again until it takes: demoting the leader moves leadership,
		// and a request in flight then fails with "node lost leader status"
		// (seen on a busy machine).
		deadline := time.Now().Add(3 * time.Minute)
		for {
			out, _ := dk(t, 1, "node", "ls", "--filter", "role=manager", "--format", "{{.Hostname}} {{.ManagerStatus}}")
			all, _ := dk(t, 1, "node", "ls", "--format", "{{.Status}}")
			if out == hostname(1)+" Leader" && strings.Count(all, "Ready") == nodes {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("managers after demoting nodes 2 and 3: %s", out)
			}
			next := ""
			for _, l := range strings.Split(out, "\n") {
				f := strings.Fields(l)
				if len(f) == 0 || f[0] == hostname(1) {
					continue
				}
				if next == "" || len(f) < 2 || f[1] != "Leader" {
					next = f[0]
				}
			}
			if next != "" {
				if o, err := dk(t, 1, "node", "demote", next); err != nil {
					t.Logf("demote %s: %v %s (asked again)", next, err, o)
				}
			}
			time.Sleep(2 * time.Second)
		}
	})
	label(t, 1, 2, 3)
	cluster(t, "kill", "1")
	manager = 2
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, err := dk(t, 2, "node", "ls", "--format", "{{.Hostname}} {{.Status}} {{.ManagerStatus}}")
		if err == nil && strings.Contains(out, "Leader") && strings.Contains(out, hostname(1)+" Down") {
			t.Logf("after losing node 1:\n%s", out)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new leader with node 1 down: %v\n%s", err, out)
		}
		time.Sleep(time.Second)
	}
	vm := uniq("mgr")
	out = deploy(t, vmArgs(vm, local, "--node", hostname(3))...)
	contains(t, "deploy through node 2", out, "running on node svmc-n3")
	if f := psLine(t, vm); len(f) < 4 || f[3] != "running" {
		t.Errorf("ps through node 2: %v", f)
	}
	out, code := swarmvm(t, "rm", vm)
	if code != 0 {
		t.Fatalf("rm through node 2: %d\n%s", code, out)
	}
	waitNoQEMU(t, vm, 2*time.Minute)
	if s, _ := dk(t, 2, "service", "ls", "-q", "--filter", "name="+vm); s != "" {
		t.Errorf("service %s still there after rm", vm)
	}
}
