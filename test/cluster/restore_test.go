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
// backed up (full, then incremental) into a repository that only another
// node mounts (that node's own folder): each backup made beside the VM's
// disk and sent there over the transfer's mutual TLS. With its home down,
// swarmvm restore --node rebuilds it on the repository's node from the
// incremental's chain and makes that its home: the VM runs there with the
// mark its guest wrote before the backups. When the old home is back, its
// stale copy is not started: one QEMU runs, on the new home.
func TestRestoreOnAnotherNode(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	vm := uniq("loc-restore")
	mark := "mark-" + vm
	deploy(t, append(vmArgs(vm, local, "--constraint", "node.role==worker"), cmdline("swarmvm.mark="+mark)...)...)
	home := nodeNum(t, newestTask(t, vm).node)
	other := 5 - home
	waitFile(t, serialLog(storage(home), vm), "SWARMVM-GUEST-MARKED "+mark, 1, 3*time.Minute)

	repoHost := filepath.Join(storage(other), "backup-"+vm)
	if err := os.Mkdir(repoHost, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(repoHost, 0o1733)
	t.Cleanup(func() { os.RemoveAll(repoHost) })
	repo := local + "/backup-" + vm
	backup := func() (string, int) {
		return swarmvm(t, "backup", vm, "--repo", repo, "--repo-node", hostname(other))
	}
	for i, want := range []string{"full backup", "incremental backup"} {
		out, code := backup()
		for deadline := time.Now().Add(time.Minute); code != 0 && i == 0 && time.Now().Before(deadline); out, code = backup() {
			time.Sleep(2 * time.Second) // the control socket comes once the VM runs
		}
		if code != 0 || !strings.Contains(out, want) || !strings.Contains(out, "the backup is sent there") || !strings.Contains(out, "checked and kept backup") {
			t.Fatalf("backup %d: exit %d, want %q:\n%s", i+1, code, want, out)
		}
		t.Logf("backup %d:\n%s", i+1, out)
	}
	if des, _ := os.ReadDir(filepath.Join(storage(home), "images", "."+vm+".backup")); len(des) != 1 || des[0].Name() != ".lock" {
		t.Errorf("the staging folder beside the disk keeps %v (want its lock alone)", des)
	}
	if _, err := os.Stat(filepath.Join(storage(home), "backup-"+vm)); err == nil {
		t.Errorf("a repository folder appeared on the VM's node")
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
