package swarm

import (
	"fmt"
	"sort"
	"strings"

	"github.com/swarmvm/swarmvm/internal/config"
)

// A VM on node-local storage has a home: the node that holds its disk and
// NVRAM. The service is pinned there, the runner refuses to start anywhere
// else, and the home is recorded apart from the service (a Swarm config
// object, labelled), so that removing and deploying the VM again finds its
// disk rather than picking a new node and an empty disk.
const (
	LabelStorage  = "io.swarmvm.storage"
	LabelHome     = "io.swarmvm.home"
	LabelHomeName = "io.swarmvm.home.hostname"
	homePrefix    = "swarmvm-home-"
)

// NodeRoom is a node as home picking and resource fitting see it.
type NodeRoom struct {
	ID, Hostname, Role string
	Labels             map[string]string
	Ready, Active      bool
	Capable            bool // labelled vm-capable=true
	TCGOnly            bool // labelled vm-accel=tcg: no KVM there
	NanoCPUs, Memory   int64
	// Reserved by the tasks that run there, and by the local VMs whose
	// home it is, running or not.
	ReservedCPUs, ReservedMemory int64
}

func (n NodeRoom) freeCPUs() int64   { return n.NanoCPUs - n.ReservedCPUs }
func (n NodeRoom) freeMemory() int64 { return n.Memory - n.ReservedMemory }

// state says why a node cannot take a VM now, or "" when it can.
func (n NodeRoom) state() string {
	switch {
	case !n.Ready:
		return "down"
	case !n.Active:
		return "drained"
	case !n.Capable:
		return "not labelled " + NodeLabel + "=true"
	}
	return ""
}

// PickHome chooses the home of a new local VM: among the vm-capable nodes
// that are ready, active, match the VM's constraints and have room for its
// reservations and as many cores as it has vCPUs, the one with the most
// unreserved memory, then CPU, so that VMs spread. Deterministic: ties go
// to the hostname first in order.
func PickHome(nodes []NodeRoom, r Resolved) (NodeRoom, error) {
	var fit []NodeRoom
	var why []string
	for _, n := range nodes {
		reason, err := n.refuses(r)
		if err != nil {
			return NodeRoom{}, err
		}
		if reason != "" {
			why = append(why, n.Hostname+": "+reason)
			continue
		}
		fit = append(fit, n)
	}
	if len(fit) == 0 {
		if len(nodes) == 0 {
			why = []string{"the swarm has no nodes"}
		}
		return NodeRoom{}, fmt.Errorf("no node can be the home of %s (%s) — label a node that can run it (swarmvm node label), free room, or name one with node:", r.Name, strings.Join(why, "; "))
	}
	sort.SliceStable(fit, func(i, j int) bool {
		a, b := fit[i], fit[j]
		if a.freeMemory() != b.freeMemory() {
			return a.freeMemory() > b.freeMemory()
		}
		if a.freeCPUs() != b.freeCPUs() {
			return a.freeCPUs() > b.freeCPUs()
		}
		return a.Hostname < b.Hostname
	})
	return fit[0], nil
}

// refuses says why node n cannot take VM r, "" when it can.
func (n NodeRoom) refuses(r Resolved) (string, error) {
	if s := n.state(); s != "" {
		return s, nil
	}
	if n.TCGOnly && r.Accel == config.AccelKVM {
		return "labelled " + AccelLabel + "=" + config.AccelTCG + " (no KVM), and the VM asks for KVM", nil
	}
	for _, c := range r.Constraints {
		ok, err := n.matches(c)
		if err != nil {
			return "", err
		}
		if !ok {
			return "constraint " + c, nil
		}
	}
	switch {
	case n.NanoCPUs < int64(r.CPUs)*1e9:
		return fmt.Sprintf("%s CPUs, fewer than the VM's %d vCPUs", cpus(n.NanoCPUs), r.CPUs), nil
	case n.freeCPUs() < r.ReserveNanoCPUs:
		return fmt.Sprintf("%s CPUs unreserved, the VM reserves %s", cpus(n.freeCPUs()), cpus(r.ReserveNanoCPUs)), nil
	case n.freeMemory() < r.ReserveBytes:
		return fmt.Sprintf("%s unreserved, the VM reserves %s", bytesM(n.freeMemory()), bytesM(r.ReserveBytes)), nil
	}
	return "", nil
}

// matches evaluates one placement constraint the way Swarm does, for the
// fields a home can be picked by; others are refused rather than guessed.
func (n NodeRoom) matches(c string) (bool, error) {
	op := "=="
	k, v, ok := strings.Cut(c, "==")
	if !ok {
		op = "!="
		if k, v, ok = strings.Cut(c, "!="); !ok {
			return false, fmt.Errorf("constraint %q: not KEY==VALUE or KEY!=VALUE", c)
		}
	}
	k, v = strings.TrimSpace(k), strings.TrimSpace(v)
	var have string
	switch {
	case k == "node.id":
		have = n.ID
	case k == "node.hostname":
		have = n.Hostname
	case k == "node.role":
		have = n.Role
	case strings.HasPrefix(k, "node.labels."):
		have = n.Labels[strings.TrimPrefix(k, "node.labels.")]
	default:
		return false, fmt.Errorf("constraint %q: swarmvm picks a home by node.id, node.hostname, node.role or node.labels; name the home with node: instead", c)
	}
	eq := strings.EqualFold(have, v)
	return eq == (op == "=="), nil
}

// FitCPUs caps the VM's CPU limit (vCPUs + 1, for QEMU's own threads) to
// the cores of the nodes it may run on, since an engine refuses a limit
// above its node's CPUs; a VM may have as many vCPUs as a node has cores.
// A VM with more vCPUs than every eligible node has cores is refused,
// naming the largest. Nodes that cannot take VMs at all are not counted;
// with none, nothing changes (the task will wait for a node, with Swarm's
// reason).
func FitCPUs(r *Resolved, nodes []NodeRoom) error {
	var largest NodeRoom
	limit := r.LimitNanoCPUs
	seen := false
	for _, n := range nodes {
		if !n.Capable {
			continue
		}
		if n.NanoCPUs > largest.NanoCPUs {
			largest = n
		}
		if n.NanoCPUs < int64(r.CPUs)*1e9 {
			continue // Swarm will not place it there: the reservation does not fit
		}
		seen = true
		limit = min(limit, n.NanoCPUs)
	}
	if !seen && largest.Hostname != "" {
		return &FieldError{"cpus", fmt.Sprintf("%d vCPUs, but the largest vm-capable node (%s) has %s CPUs: give the VM at most that many", r.CPUs, largest.Hostname, cpus(largest.NanoCPUs))}
	}
	r.LimitNanoCPUs = limit
	r.ReserveNanoCPUs = min(r.ReserveNanoCPUs, limit)
	return nil
}
