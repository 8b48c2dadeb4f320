package swarm

import (
	"strings"
	"testing"
)

func rooms() []NodeRoom {
	g := int64(1 << 30)
	return []NodeRoom{
		{ID: "id1", Hostname: "n1", Role: "manager", Ready: true, Active: true, Capable: true, NanoCPUs: 2e9, Memory: 8 * g, ReservedMemory: 2 * g},
		{ID: "id2", Hostname: "n2", Role: "worker", Ready: true, Active: true, Capable: true, NanoCPUs: 2e9, Memory: 8 * g, Labels: map[string]string{"ssd": "true"}},
		{ID: "id3", Hostname: "n3", Role: "worker", Ready: true, Active: true, Capable: true, NanoCPUs: 4e9, Memory: 8 * g, ReservedMemory: 1 * g},
		{ID: "id4", Hostname: "n4", Role: "worker", Ready: true, Active: true, Capable: false, NanoCPUs: 64e9, Memory: 512 * g},
	}
}

func resolved(t *testing.T, yml string) Resolved {
	t.Helper()
	d, err := Load([]byte(yml))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	return rs[0]
}

// Homes go to labelled nodes with the most unreserved memory, then CPU;
// constraints and the VM's size rule nodes out; with none left the error
// names each node's reason.
func TestPickHome(t *testing.T) {
	cases := []struct {
		name, yml, want, err string
		edit                 func([]NodeRoom)
	}{
		{"most free memory", "vms: [{name: a}]", "n2", "", nil},
		{"tie on memory: more free CPU", "vms: [{name: a}]", "n3", "", func(ns []NodeRoom) { ns[1].ReservedMemory = 1 << 30 }},
		{"constraint", "vms: [{name: a, constraints: [node.hostname!=n2]}]", "n3", "", nil},
		{"label constraint", "vms: [{name: a, constraints: [node.labels.ssd==true]}]", "n2", "", nil},
		{"vCPUs need cores", "vms: [{name: a, cpus: 4}]", "n3", "", nil},
		{"drained and down are out", "vms: [{name: a}]", "n1", "", func(ns []NodeRoom) { ns[1].Active = false; ns[2].Ready = false }},
		{"nothing fits", "vms: [{name: a, memory: 7G}]", "", "n1: 6144M unreserved, the VM reserves 7424M; n2: 6144M unreserved, the VM reserves 7424M; n3: 7168M unreserved", func(ns []NodeRoom) { ns[1].ReservedMemory = 2 << 30 }},
		{"no labelled node", "vms: [{name: a}]", "", "n4: not labelled vm-capable=true", func(ns []NodeRoom) {
			for i := range ns[:3] {
				ns[i].Capable = false
			}
		}},
		{"unknown constraint key", "vms: [{name: a, constraints: [engine.labels.x==y]}]", "", "name the home with node: instead", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ns := rooms()
			if c.edit != nil {
				c.edit(ns)
			}
			got, err := PickHome(ns, resolved(t, c.yml))
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err %v, want %q", err, c.err)
				}
				return
			}
			if err != nil || got.Hostname != c.want {
				t.Fatalf("picked %q (%v), want %q", got.Hostname, err, c.want)
			}
		})
	}
}

// Four VMs picked one after the other, each reserving on its home, spread
// over the three labelled nodes.
func TestPickHomeSpreads(t *testing.T) {
	ns := rooms()
	ns[0].ReservedMemory, ns[2].ReservedMemory = 0, 0
	r := resolved(t, "vms: [{name: a, memory: 1G}]")
	count := map[string]int{}
	for i := 0; i < 4; i++ {
		n, err := PickHome(ns, r)
		if err != nil {
			t.Fatal(err)
		}
		count[n.Hostname]++
		findRoom(ns, n.ID).ReservedMemory += r.ReserveBytes
	}
	if len(count) != 3 || count["n4"] != 0 {
		t.Errorf("homes %v, want all three labelled nodes", count)
	}
}

// The CPU limit (vCPUs + 1) is capped to the cores of the nodes the VM may
// run on; more vCPUs than any labelled node has cores is refused, naming
// the largest.
func TestFitCPUs(t *testing.T) {
	r := resolved(t, "vms: [{name: a, cpus: 2}]")
	if r.LimitNanoCPUs != 3e9 {
		t.Fatalf("limit before fitting %d", r.LimitNanoCPUs)
	}
	if err := FitCPUs(&r, rooms()[:2]); err != nil || r.LimitNanoCPUs != 2e9 || r.ReserveNanoCPUs != 2e9 {
		t.Errorf("2 vCPUs on 2-core nodes: limit %d reserve %d err %v", r.LimitNanoCPUs, r.ReserveNanoCPUs, err)
	}
	r = resolved(t, "vms: [{name: a, cpus: 1}]")
	if err := FitCPUs(&r, rooms()); err != nil || r.LimitNanoCPUs != 2e9 {
		t.Errorf("1 vCPU: limit %d err %v", r.LimitNanoCPUs, err)
	}
	r = resolved(t, "vms: [{name: a, cpus: 3}]")
	if err := FitCPUs(&r, rooms()); err != nil || r.LimitNanoCPUs != 4e9 {
		t.Errorf("3 vCPUs fit only n3 (4 cores): limit %d err %v", r.LimitNanoCPUs, err)
	}
	r = resolved(t, "vms: [{name: a, cpus: 8}]")
	err := FitCPUs(&r, rooms())
	if err == nil || !strings.Contains(err.Error(), "largest vm-capable node (n3) has 4 CPUs") {
		t.Errorf("8 vCPUs: %v", err)
	}
	r = resolved(t, "vms: [{name: a, cpus: 2}]")
	if err := FitCPUs(&r, nil); err != nil || r.LimitNanoCPUs != 3e9 {
		t.Errorf("no nodes known: limit %d err %v", r.LimitNanoCPUs, err)
	}
}

func TestHomeState(t *testing.T) {
	ns := rooms()
	ns[1].Active = false
	ns[2].Ready = false
	for _, c := range []struct{ home, show, why string }{
		{"id1", "n1", ""},
		{"id2", "n2 (drained)", "home node n2 is drained: the VM stays down"},
		{"n3", "n3 (down)", "home node n3 is down"},
		{"idX", "idX (gone)", "left the swarm"},
	} {
		show, why := homeState(ns, c.home)
		if show != c.show || (c.why == "") != (why == "") || !strings.Contains(why, c.why) {
			t.Errorf("%s: %q %q", c.home, show, why)
		}
	}
}

// A local VM is pinned to its home by ID (or hostname, as node: gives it),
// and its runner learns the home and where it runs.
func TestHomePin(t *testing.T) {
	r := resolved(t, "vms: [{name: a}]")
	r.Home = "abcdefghijklmnopqrstuvwxy"
	s := ServiceSpec(r)
	cs := s.TaskTemplate.ContainerSpec
	want := []string{"HOME_NODE=abcdefghijklmnopqrstuvwxy", "NODE_ID={{.Node.ID}}", "NODE_HOSTNAME={{.Node.Hostname}}", "STORAGE_MODE=local"}
	for _, w := range want {
		if !strings.Contains(strings.Join(cs.Env, " "), w) {
			t.Errorf("env lacks %s: %v", w, cs.Env)
		}
	}
	if c := strings.Join(s.TaskTemplate.Placement.Constraints, " "); c != "node.labels.vm-capable==true node.id==abcdefghijklmnopqrstuvwxy node.labels.vm-accel!=tcg" {
		t.Errorf("constraints %v", c)
	}
	if s.Labels[LabelHome] != r.Home || s.Labels[LabelStorage] != "local" {
		t.Errorf("labels %v", s.Labels)
	}
	sh := resolved(t, "vms: [{name: b, storage_mode: shared, storage: /srv/shared}]")
	ss := ServiceSpec(sh)
	if c := strings.Join(ss.TaskTemplate.Placement.Constraints, " "); c != "node.labels.vm-capable==true node.labels.vm-accel!=tcg" {
		t.Errorf("shared VM pinned: %v", c)
	}
	if e := strings.Join(ss.TaskTemplate.ContainerSpec.Env, " "); strings.Contains(e, "HOME_NODE") || !strings.Contains(e, "STORAGE_DIR=/srv/shared") {
		t.Errorf("shared env %s", e)
	}
}

// A node labelled for TCG only (no KVM there) takes the VMs that ask for
// TCG, and no other: by Swarm's constraint, and when a home is picked.
func TestTCGOnlyNodes(t *testing.T) {
	kvm := resolved(t, "vms: [{name: a}]")
	tcg := resolved(t, "vms: [{name: b, accel: tcg}]")
	if c := strings.Join(ServiceSpec(tcg).TaskTemplate.Placement.Constraints, " "); strings.Contains(c, AccelLabel) {
		t.Errorf("a TCG VM kept off TCG-only nodes: %s", c)
	}
	nodes := []NodeRoom{
		{ID: "n1", Hostname: "tcg-node", Ready: true, Active: true, Capable: true, TCGOnly: true, NanoCPUs: 8e9, Memory: 64 << 30},
		{ID: "n2", Hostname: "kvm-node", Ready: true, Active: true, Capable: true, NanoCPUs: 2e9, Memory: 4 << 30},
	}
	if n, err := PickHome(nodes, kvm); err != nil || n.Hostname != "kvm-node" {
		t.Errorf("home of a KVM VM: %v, %v; want kvm-node, not the roomier TCG-only node", n.Hostname, err)
	}
	if n, err := PickHome(nodes, tcg); err != nil || n.Hostname != "tcg-node" {
		t.Errorf("home of a TCG VM: %v, %v; want the roomier tcg-node", n.Hostname, err)
	}
	if _, err := PickHome(nodes[:1], kvm); err == nil || !strings.Contains(err.Error(), "vm-accel=tcg (no KVM)") {
		t.Errorf("a KVM VM with only a TCG node: %v", err)
	}
}
