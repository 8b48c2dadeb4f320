package cluster

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A node lost for good, and its local VM's data not with it: the VM was
// backed up (full, then incremental) into a repository every node mounts
// (the shared folder, as NFS would be). With its home down, swarmvm restore
// --node rebuilds it on another node from the incremental's chain and makes
// that its home: the VM runs there with the mark its guest wrote before the
// backups. When the old home is back, its stale copy is not started: one
// QEMU runs, on the new home.
func TestRestoreOnAnotherNode(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	vm := uniq("loc-restore")
	mark := "mark-" + vm
	deploy(t, append(vmArgs(vm, local, "--constraint", "node.role==worker"), cmdline("swarmvm.mark="+mark)...)...)
	home := nodeNum(t, newestTask(t, vm).node)
	other := 5 - home
	waitFile(t, serialLog(storage(home), vm), "SWARMVM-GUEST-MARKED "+mark, 1, 3*time.Minute)

	repoHost := filepath.Join(sharedStorage(), "backup-"+vm)
	if err := os.Mkdir(repoHost, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(repoHost, 0o1733)
	t.Cleanup(func() { os.RemoveAll(repoHost) })
	repo := shared + "/backup-" + vm
	for i, want := range []string{"full backup", "incremental backup"} {
		out, code := swarmvm(t, "backup", vm, "--repo", repo)
		for deadline := time.Now().Add(time.Minute); code != 0 && i == 0 && time.Now().Before(deadline); out, code = swarmvm(t, "backup", vm, "--repo", repo) {
			time.Sleep(2 * time.Second) // the control socket comes once the VM runs
		}
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("backup %d: exit %d, want %q:\n%s", i+1, code, want, out)
		}
	}
	out, code := swarmvm(t, "backup", "ls", vm, "--repo", repoHost, "--json")
	var list []struct{ ID, Mode string }
	if err := json.Unmarshal([]byte(out), &list); code != 0 || err != nil || len(list) != 2 || list[1].Mode != "incremental" {
		t.Fatalf("backup ls: exit %d, %v:\n%s", code, err, out)
	}

	cluster(t, "kill", itoa(home))
	t.Cleanup(func() { restart(t, home) })
	waitNode(t, home, "Down", 2*time.Minute)
	out, code = swarmvm(t, "restore", vm, "--backup", list[1].ID, "--repo", repo, "--node", hostname(other))
	t.Logf("restore --node %s:\n%s", hostname(other), out)
	if code != 0 {
		t.Fatalf("restore --node: exit %d", code)
	}
	contains(t, "restore output", out, "restoring backup "+list[1].ID+" on node "+hostname(other)+", its new home",
		"home is now "+hostname(other), "its old copy on "+hostname(home)+" (down) stays there")
	waitTask(t, vm, "Running", hostname(other), 3*time.Minute)
	waitFile(t, serialLog(storage(other), vm), "SWARMVM-GUEST-MARK "+mark, 1, 3*time.Minute)
	ps, _ := swarmvm(t, "ps")
	t.Logf("ps:\n%s", ps)

	restart(t, home)
	time.Sleep(20 * time.Second) // time enough for the old home to start its copy, were it allowed to
	if q := qemus(vm); len(q) != 1 {
		t.Errorf("QEMUs of %s with the old home back: %v, want one", vm, q)
	}
	if task := newestTask(t, vm); task.node != hostname(other) || !strings.HasPrefix(task.state, "Running") {
		t.Errorf("newest task %+v, want Running on %s", task, hostname(other))
	}
}
