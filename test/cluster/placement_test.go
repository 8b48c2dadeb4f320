package cluster

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The cluster is what the tests claim: three ready nodes, one manager on
// Debian trixie's engine and two workers on bookworm's, each with its own
// hostname, storage and broker; bringing it up again changes nothing.
func TestClusterShape(t *testing.T) {
	require(t)
	before := must(t, 1, "node", "ls", "--format", "{{.ID}} {{.Hostname}} {{.Status}} {{.ManagerStatus}}")
	cluster(t, "up")
	if err := placeGuest(); err != nil { // had up made a new cluster, the tests after this one still run
		t.Fatal(err)
	}
	after := must(t, 1, "node", "ls", "--format", "{{.ID}} {{.Hostname}} {{.Status}} {{.ManagerStatus}}")
	if before != after {
		t.Errorf("cluster.sh up on a running cluster changed it:\n%s\n---\n%s", before, after)
	}
	t.Logf("nodes:\n%s", after)
	for n := 1; n <= nodes; n++ {
		v := must(t, n, "version", "--format", "{{.Server.Version}} {{.Server.APIVersion}}")
		want := "20.10."
		if n == 1 {
			want = "26."
		}
		if !strings.HasPrefix(v, want) {
			t.Errorf("node %d runs engine %s, want %s*", n, v, want)
		}
		info := must(t, n, "info", "--format", "{{.Name}} {{.Swarm.LocalNodeState}} {{.Swarm.NodeAddr}}")
		contains(t, "node info", info, hostname(n)+" active 10.231.0.1")
		if _, err := os.Stat(filepath.Join("/run/swarmvm-cluster", "n"+string(rune('0'+n)), "broker", "broker.sock")); err != nil {
			t.Errorf("node %d has no broker socket: %v", n, err)
		}
		t.Logf("node %d: engine %s, %s", n, v, info)
	}
	if c := strings.Count(after, "Ready"); c != nodes {
		t.Errorf("%d nodes ready, want %d", c, nodes)
	}
	// Node-local storage: a file in one node's folder is not in another's.
	probe := filepath.Join(storage(2), "isos", "only-on-n2")
	os.WriteFile(probe, nil, 0o644)
	defer os.Remove(probe)
	if _, err := os.Stat(filepath.Join(storage(3), "isos", "only-on-n2")); err == nil {
		t.Error("node 3 sees node 2's storage")
	}
}

// Another node is probed from a job there, as a VM's task sees it (KVM
// from its broker, its storage, the runner image), not on the machine the
// CLI runs on (which it once reported as the named node's); it is labelled
// when the probe passes, and a folder the node lacks fails the probe,
// named.
func TestNodeProbeFromJob(t *testing.T) {
	require(t)
	label(t, 1, 2)
	t.Cleanup(func() { label(t, 1, 2, 3) })
	out, code := swarmvm(t, "node", "check", hostname(2), "--accel", "tcg")
	if code != 0 {
		t.Fatalf("node check %s: exit %d\n%s", hostname(2), code, out)
	}
	contains(t, "node check output", out, "probing node "+hostname(2)+" from a job there",
		hostname(2)+": ok    kvm broker", hostname(2)+": ok    storage", hostname(2)+": this node can run VMs")
	out, code = swarmvm(t, "node", "label", hostname(3), "--accel", "tcg")
	if code != 0 {
		t.Fatalf("node label %s (probed from a job): exit %d\n%s", hostname(3), code, out)
	}
	contains(t, "node label output", out, hostname(3)+": this node can run VMs", "node "+hostname(3)+" labelled vm-capable=true")
	out, code = swarmvm(t, "node", "check", hostname(2), "--accel", "tcg", "--storage", "/var/lib/swarmvm-nowhere")
	if code == 0 || !strings.Contains(out, "/var/lib/swarmvm-nowhere") {
		t.Errorf("node check with a storage folder the node lacks: exit %d\n%s", code, out)
	}
	if svcs := must(t, manager, "service", "ls", "--format", "{{.Name}}"); strings.Contains(svcs, "svm-probe-") {
		t.Errorf("a probe job was left behind:\n%s", svcs)
	}
}

// Placement: only labelled nodes get VMs; with none, a shared VM waits with
// Swarm's reason and a local one is refused before anything exists (no node
// can hold its disk); four local VMs spread over the labelled nodes; a VM
// with as many vCPUs as a node has cores runs (the CPU limit fits the
// node), and one with more than any node has is refused naming the largest.
func TestPlacement(t *testing.T) {
	require(t)
	label(t)
	t.Cleanup(func() { label(t, 1, 2, 3) })

	shared1 := uniq("pl-shared")
	removeAfter(t, shared1)
	out, code := swarmvm(t, append([]string{"deploy", "--wait", "10s"}, vmArgs(shared1, shared, "--storage-mode", "shared")...)...)
	if code == 0 || !strings.Contains(out, "no suitable node") || !strings.Contains(out, "swarmvm node label") {
		t.Fatalf("shared VM with no labelled node: exit %d\n%s", code, out)
	}
	ps, _ := swarmvm(t, "ps")
	contains(t, "ps", ps, shared1)
	t.Logf("no labelled node, shared VM:\n%s", ps)

	local1 := uniq("pl-local")
	out, code = swarmvm(t, append([]string{"deploy", "--wait", "10s"}, vmArgs(local1, local)...)...)
	if code == 0 || !strings.Contains(out, "no node can be the home of "+local1) || !strings.Contains(out, "not labelled vm-capable=true") {
		t.Fatalf("local VM with no labelled node: exit %d\n%s", code, out)
	}
	if s, _ := dk(t, manager, "service", "inspect", local1); !strings.Contains(s, "no such service") && !strings.Contains(s, "[]") {
		t.Errorf("a service was created for a VM that has no home:\n%s", s)
	}
	dk(t, manager, "service", "rm", shared1)

	// Nodes 2 and 3 labelled: four VMs, two on each, none on node 1.
	label(t, 2, 3)
	homes := map[string]int{}
	var vms []string
	for i := 0; i < 4; i++ {
		vm := uniq("pl-spread")
		vms = append(vms, vm)
		out := deploy(t, vmArgs(vm, local)...)
		contains(t, "deploy", out, "home node svmc-n")
		tk := newestTask(t, vm)
		homes[tk.node]++
		if !strings.HasPrefix(tk.state, "Running") {
			t.Errorf("%s: %+v", vm, tk)
		}
	}
	t.Logf("homes of four VMs: %v", homes)
	if homes[hostname(2)] != 2 || homes[hostname(3)] != 2 {
		t.Errorf("four VMs on two labelled nodes: %v, want two each", homes)
	}
	for _, vm := range vms {
		if f := psLine(t, vm); len(f) < 4 || f[1] != f[2] || f[3] != "running" {
			t.Errorf("ps line for %s: home, node, state: %v", vm, f)
		}
		dk(t, manager, "service", "rm", vm)
	}
	for _, vm := range vms {
		waitNoQEMU(t, vm, 3*time.Minute)
	}

	// As many vCPUs as the node has cores: the limit is the node's cores,
	// not vCPUs + 1, which the engine would reject.
	big := uniq("pl-cores")
	out = deploy(t, vmArgs(big, local, "--cpus", "2", "--node", hostname(2))...)
	limit := must(t, manager, "service", "inspect", "-f", "{{.Spec.TaskTemplate.Resources.Limits.NanoCPUs}} {{.Spec.TaskTemplate.Resources.Reservations.NanoCPUs}}", big)
	if limit != "2000000000 2000000000" {
		t.Errorf("2 vCPUs on a 2-core node: limit and reservation %s, want 2 CPUs each", limit)
	}
	contains(t, "deploy", out, "running on node svmc-n2")
	out, code = swarmvm(t, append([]string{"deploy", "--wait", "10s"}, vmArgs(uniq("pl-toobig"), local, "--cpus", "3")...)...)
	if code == 0 || !strings.Contains(out, "3 vCPUs, but the largest vm-capable node") {
		t.Errorf("3 vCPUs on 2-core nodes: exit %d\n%s", code, out)
	}

	// An engine that refuses the task ends deploy's wait with its reason
	// (here: the storage folder is missing on the node), where waiting
	// would only see the refusal repeated.
	rej := uniq("pl-rejected")
	removeAfter(t, rej)
	out, code = swarmvm(t, append([]string{"deploy", "--wait", "3m"}, vmArgs(rej, "/var/lib/no-such-folder", "--node", hostname(3))...)...)
	if code == 0 || !strings.Contains(out, "task rejected by node svmc-n3") || !strings.Contains(out, "bind source path does not exist") {
		t.Errorf("deploy of a task the engine rejects: exit %d\n%s", code, out)
	}
}
