package cluster

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/test/heartbeat"
)

func ticks(serial string) []heartbeat.Tick { return heartbeat.Ticks(serial) }

// A running VM on shared storage migrates live to the other worker: the
// guest's heartbeat keeps its boot id and counts on, the mark it wrote to
// its disk before is not read again at a boot, the task runs on the target
// and the one on the source has ended (one QEMU), and the placement is as
// before (no pin left). Then that worker is drained with swarmvm node
// drain: the shared VM migrates back, live again; a local VM there cannot
// migrate, is named, and is stopped as Swarm stops it.
func TestSharedVMMigrates(t *testing.T) {
	require(t)
	label(t, 1, 2, 3)
	vm := uniq("sh-mig")
	mark := "mark-" + vm
	deploy(t, append(vmArgs(vm, shared, "--storage-mode", "shared", "--constraint", "node.role==worker"), cmdline("swarmvm.mark="+mark, "swarmvm.tick=1")...)...)
	log := serialLog(sharedStorage(), vm)
	serial := func() string { b, _ := os.ReadFile(log); return string(b) }
	waitFile(t, log, "SWARMVM-GUEST-MARKED "+mark, 1, 3*time.Minute)
	deadline := time.Now().Add(time.Minute)
	for len(ticks(serial())) < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("no heartbeat from the guest:\n%s", tail(serial(), 20))
		}
		time.Sleep(500 * time.Millisecond)
	}
	boot := ticks(serial())[0].Boot
	first := nodeNum(t, newestTask(t, vm).node)
	other := 5 - first // the other worker

	if out, code := swarmvm(t, "migrate", vm, "--to", hostname(first)); code == 0 || !strings.Contains(out, "already runs on") {
		t.Errorf("migrate to the node it runs on: exit %d\n%s", code, out)
	}
	began := time.Now()
	out, code := swarmvm(t, "migrate", vm, "--to", hostname(other))
	if code != 0 {
		t.Fatalf("migrate: exit %d\n%s", code, out)
	}
	t.Logf("migrate took %v:\n%s", time.Since(began).Round(100*time.Millisecond), out)
	contains(t, "migrate's output", out, "running on "+hostname(other), "has ended", "received: QEMU's figures: downtime")
	if tk := newestTask(t, vm); tk.node != hostname(other) || !strings.HasPrefix(tk.state, "Running") {
		t.Fatalf("the VM's task: %+v, want running on %s", tk, hostname(other))
	}
	waitNoQEMUBut(t, vm, 1, time.Minute)
	last := ticks(serial())
	deadline = time.Now().Add(time.Minute)
	for ts := ticks(serial()); ts[len(ts)-1].N <= last[len(last)-1].N+10; ts = ticks(serial()) {
		if time.Now().After(deadline) {
			t.Fatalf("the heartbeat stopped after the migration:\n%s", tail(serial(), 20))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err := heartbeat.Check(serial(), boot); err != nil {
		t.Fatal(err)
	}
	if s := serial(); strings.Count(s, "SWARMVM-GUEST-BOOTED") != 1 || strings.Contains(s, "SWARMVM-GUEST-MARK "+mark) {
		t.Errorf("the guest booted again:\n%s", tail(s, 30))
	}
	cons := must(t, manager, "service", "inspect", "-f", "{{json .Spec.TaskTemplate.Placement.Constraints}} {{.Spec.UpdateConfig.Order}}", vm)
	if strings.Contains(cons, "io.swarmvm.migrate") || !strings.Contains(cons, "stop-first") {
		t.Errorf("the service after the migration: %s, want its placement and order as before", cons)
	}
	if labels := must(t, manager, "node", "inspect", "-f", "{{json .Spec.Labels}}", hostname(other)); strings.Contains(labels, "io.swarmvm.migrate") {
		t.Errorf("the target's labels after the migration: %s", labels)
	}

	// node drain: the shared VM goes back to the first worker, live; the
	// local VM on the drained worker is named and stopped.
	loc := uniq("loc-drain")
	deploy(t, append(vmArgs(loc, local, "--node", hostname(other)), cmdline()...)...)
	t.Cleanup(func() { dk(t, manager, "node", "update", "--availability", "active", hostname(other)) })
	out, code = swarmvm(t, "node", "drain", hostname(other))
	if code != 0 {
		t.Fatalf("node drain: exit %d\n%s", code, out)
	}
	t.Logf("node drain:\n%s", out)
	contains(t, "node drain's output", out, "running on "+hostname(first), hostname(other)+": drained",
		"stopped as Swarm stops it, not migrated: "+loc+" ("+loc+" is on local storage")
	if tk := newestTask(t, vm); tk.node != hostname(first) || !strings.HasPrefix(tk.state, "Running") {
		t.Fatalf("the shared VM's task after the drain: %+v, want running on %s", tk, hostname(first))
	}
	if a := must(t, manager, "node", "inspect", "-f", "{{.Spec.Availability}}", hostname(other)); strings.TrimSpace(a) != "drain" {
		t.Errorf("%s's availability: %s", hostname(other), a)
	}
	waitNoQEMU(t, loc, 2*time.Minute)
	last = ticks(serial())
	deadline = time.Now().Add(time.Minute)
	for ts := ticks(serial()); ts[len(ts)-1].N <= last[len(last)-1].N+10; ts = ticks(serial()) {
		if time.Now().After(deadline) {
			t.Fatalf("the heartbeat stopped after the drain:\n%s", tail(serial(), 20))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if ts := ticks(serial()); ts[len(ts)-1].Boot != boot || strings.Count(serial(), "SWARMVM-GUEST-BOOTED") != 1 {
		t.Errorf("the shared VM rebooted in the drain: %+v", ts[len(ts)-1])
	}
}

// waitNoQEMUBut waits until the VM has exactly n QEMUs on this machine.
func waitNoQEMUBut(t testing.TB, vm string, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for len(qemus(vm)) != n {
		if time.Now().After(deadline) {
			t.Fatalf("QEMUs of %s: %v, want %d", vm, qemus(vm), n)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
