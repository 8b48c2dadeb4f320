package cluster

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/status"
)

// noCopiesElsewhere fails when a VM's disk or NVRAM exists anywhere but
// on its home node.
func noCopiesElsewhere(t *testing.T, vm string, home int) {
	t.Helper()
	for where, fs := range vmFiles(vm) {
		if where != hostname(home) && len(fs) > 0 {
			t.Errorf("%s has files on %s, not its home %s: %v", vm, where, hostname(home), fs)
		}
	}
}

func nodeNum(t *testing.T, host string) int {
	t.Helper()
	for n := 1; n <= nodes; n++ {
		if hostname(n) == host {
			return n
		}
	}
	t.Fatalf("no node %q", host)
	return 0
}

// A VM on local storage follows its disk. Draining its home stops it
// through ACPI and starts it nowhere else (no disk or NVRAM appears on any
// other node; ps says why); making the node active again brings it back on
// its home with the data its guest wrote.
func TestLocalVMStaysWithItsDisk(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	vm := uniq("loc-drain")
	mark := "mark-" + vm
	out := deploy(t, append(vmArgs(vm, local, "--boot-mode", "uefi", "--constraint", "node.role==worker"), cmdline("swarmvm.mark="+mark)...)...)
	home := nodeNum(t, newestTask(t, vm).node)
	t.Logf("deploy:\n%s", out)
	log := serialLog(storage(home), vm)
	waitFile(t, log, "SWARMVM-GUEST-MARKED "+mark, 1, 3*time.Minute)
	noCopiesElsewhere(t, vm, home)

	must(t, manager, "node", "update", "--availability", "drain", hostname(home))
	t.Cleanup(func() { dk(t, manager, "node", "update", "--availability", "active", hostname(home)) })
	waitFile(t, log, "SWARMVM-GUEST-POWEROFF", 1, 2*time.Minute)
	waitNoQEMU(t, vm, 2*time.Minute)
	runner, _ := dk(t, manager, "service", "logs", "--raw", vm)
	contains(t, "runner log", runner, "guest powered off through ACPI")
	time.Sleep(20 * time.Second) // time enough for Swarm to start it elsewhere, were it allowed to
	if q := qemus(vm); len(q) > 0 {
		t.Errorf("QEMU of %s runs while its home is drained: %v", vm, q)
	}
	noCopiesElsewhere(t, vm, home)
	ps, _ := swarmvm(t, "ps")
	contains(t, "ps with the home drained", ps, hostname(home)+" (drained)", "home node "+hostname(home)+" is drained")
	t.Logf("ps, home drained:\n%s", ps)
	// Nothing runs on a drained node, a move's sender included: refused
	// up front rather than left waiting.
	out, code := swarmvm(t, "move", vm, "--to", hostname(5-home))
	if code == 0 || !strings.Contains(out, "is drained: Swarm runs no task there") {
		t.Errorf("move off a drained home: exit %d\n%s", code, out)
	}

	must(t, manager, "node", "update", "--availability", "active", hostname(home))
	waitTask(t, vm, "Running", hostname(home), 2*time.Minute)
	waitFile(t, log, "SWARMVM-GUEST-MARK "+mark, 1, 3*time.Minute)
	noCopiesElsewhere(t, vm, home)

	// Deploying it as a shared VM would start it on an empty disk: refused.
	out, code = swarmvm(t, append([]string{"deploy", "--wait", "10s"}, vmArgs(vm, shared, "--storage-mode", "shared")...)...)
	if code == 0 || !strings.Contains(out, "disk is on local storage, not shared") {
		t.Errorf("a local VM deployed as shared: exit %d\n%s", code, out)
	}
}

// A node lost: a local VM homed there stays down with the reason (never
// started elsewhere), and comes back with its data when the node does.
func TestLocalVMNodeLost(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	vm := uniq("loc-lost")
	mark := "mark-" + vm
	deploy(t, append(vmArgs(vm, local, "--constraint", "node.role==worker"), cmdline("swarmvm.mark="+mark)...)...)
	home := nodeNum(t, newestTask(t, vm).node)
	log := serialLog(storage(home), vm)
	waitFile(t, log, "SWARMVM-GUEST-MARKED "+mark, 1, 3*time.Minute)

	cluster(t, "kill", itoa(home))
	t.Cleanup(func() { restart(t, home) })
	waitNode(t, home, "Down", 2*time.Minute)
	time.Sleep(20 * time.Second)
	if q := qemus(vm); len(q) > 0 {
		t.Errorf("QEMU of %s runs while its home is down: %v", vm, q)
	}
	noCopiesElsewhere(t, vm, home)
	ps, _ := swarmvm(t, "ps")
	contains(t, "ps with the home down", ps, hostname(home)+" (down)", "home node "+hostname(home)+" is down")
	t.Logf("ps, home down:\n%s", ps)

	restart(t, home)
	waitTask(t, vm, "Running", hostname(home), 3*time.Minute)
	waitFile(t, log, "SWARMVM-GUEST-MARK "+mark, 1, 3*time.Minute)
}

// restart starts node n's engine again if it is not up, and waits for the
// swarm to see it ready.
func restart(t *testing.T, n int) {
	t.Helper()
	if _, err := dk(t, n, "version"); err != nil {
		cluster(t, "start", itoa(n))
	}
	waitNode(t, n, "Ready", 2*time.Minute)
}

func waitNode(t *testing.T, n int, status string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if s, _ := dk(t, manager, "node", "inspect", "-f", "{{.Status.State}}", hostname(n)); strings.EqualFold(s, status) {
			return
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("node %d not %s within %v", n, status, timeout)
}

func itoa(n int) string { return string(rune('0' + n)) }

// A VM on shared storage moves freely, and only one QEMU ever writes its
// disk: with its node cut off from the managers (still running the old
// QEMU), the replacement task elsewhere cannot open the disk and waits;
// when the node is back its old task stops, the replacement takes over with
// the guest's data, exactly one QEMU runs, and the disk checks clean. With
// its node lost whole, the VM restarts on another node with its data.
func TestSharedVMCutOffNode(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	vm := uniq("sh-cut")
	mark := "mark-" + vm
	out := deploy(t, append(vmArgs(vm, shared, "--storage-mode", "shared", "--constraint", "node.role==worker"), cmdline("swarmvm.mark="+mark)...)...)
	if managers := must(t, manager, "node", "ls", "--filter", "role=manager", "-q"); len(strings.Fields(managers)) == 1 {
		contains(t, "deploy of a shared VM on a swarm of one manager", out, "note: this swarm has one manager, "+hostname(manager))
	}
	log := serialLog(sharedStorage(), vm)
	waitFile(t, log, "SWARMVM-GUEST-MARKED "+mark, 1, 3*time.Minute)
	first := nodeNum(t, newestTask(t, vm).node)
	old := qemus(vm)
	if len(old) != 1 {
		t.Fatalf("QEMUs of %s: %v", vm, old)
	}

	cluster(t, "cut", itoa(first))
	t.Cleanup(func() { cluster(t, "heal", itoa(first)) })
	waitNode(t, first, "Down", 2*time.Minute)
	other := 5 - first // the other worker: the VM is kept off the manager
	waitTask(t, vm, "Running", hostname(other), 3*time.Minute)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		logs, _ := dk(t, manager, "service", "logs", "--raw", vm)
		if strings.Contains(logs, "waiting for it to stop") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replacement on %s did not wait for the disk:\n%s", hostname(other), tail(logs, 30))
		}
		time.Sleep(time.Second)
	}
	// Its health check says why and passes (--liveness): Swarm keeps the
	// task instead of restarting it until its attempts run out.
	deadline = time.Now().Add(time.Minute)
	for {
		id, _ := dk(t, other, "ps", "-q", "--filter", "label=io.swarmvm.vm="+vm)
		h, _ := dk(t, other, "inspect", "-f", "{{json .State.Health}}", id)
		var health struct {
			Status string
			Log    []struct{ Output string }
		}
		json.Unmarshal([]byte(h), &health)
		if n := len(health.Log); health.Status == "healthy" && n > 0 {
			last := health.Log[n-1].Output
			if st, ok := status.ParseHealth(last); ok && st.State == status.StateDiskHeld && !st.Healthy && st.Waiting {
				t.Logf("the waiting task's health: %s", last)
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("health of the waiting task: %q", h)
		}
		time.Sleep(2 * time.Second)
	}
	// ps, at the manager, shows the replacement on the worker as it is:
	// waiting for the disk (it showed "running", health "-": only the
	// engine that runs a container can inspect its health).
	ps, code := swarmvm(t, "ps")
	if code != 0 {
		t.Fatalf("ps: exit %d\n%s", code, ps)
	}
	if line := lineWith(ps, vm); !strings.Contains(line, "waiting: disk held by another QEMU") || !strings.Contains(line, hostname(other)) {
		t.Errorf("ps at the manager shows the waiting replacement as:\n%s\n(all of ps:\n%s)", line, ps)
	}
	if q := qemus(vm); len(q) != 1 || q[0] != old[0] {
		t.Fatalf("while cut off: QEMUs %v, want only the old one %v", q, old)
	}
	t.Logf("node %d cut off: its QEMU %d runs on, the replacement on node %d waits for the disk", first, old[0], other)

	cluster(t, "heal", itoa(first))
	waitFile(t, log, "SWARMVM-GUEST-MARK "+mark, 1, 4*time.Minute)
	time.Sleep(5 * time.Second)
	q := qemus(vm)
	if len(q) != 1 || q[0] == old[0] {
		t.Errorf("after the node came back: QEMUs %v (old %v), want exactly one new one", q, old)
	}
	t.Logf("after healing: one QEMU (%v), on %s", q, newestTask(t, vm).node)

	// Its node lost whole (engine, QEMU and all): the lock goes with the
	// QEMU, and Swarm restarts the VM on the other worker with its data.
	now := nodeNum(t, newestTask(t, vm).node)
	cluster(t, "kill", itoa(now))
	t.Cleanup(func() { restart(t, now) })
	waitTask(t, vm, "Running", hostname(5-now), 3*time.Minute)
	waitFile(t, log, "SWARMVM-GUEST-MARK "+mark, 2, 4*time.Minute)
	if q := qemus(vm); len(q) != 1 {
		t.Errorf("after losing node %d: QEMUs %v, want one", now, q)
	}
	t.Logf("node %d lost: the VM runs on node %d with its data", now, 5-now)
	restart(t, now)
	dk(t, manager, "service", "rm", vm)
	waitNoQEMU(t, vm, 2*time.Minute)
	qemuImgCheck(t, filepath.Join(sharedStorage(), "images", vm+".qcow2"))
}

// lineWith is the first line of text that holds s.
func lineWith(text, s string) string {
	for l := range strings.Lines(text) {
		if strings.Contains(l, s) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}
