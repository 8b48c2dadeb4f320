package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/poll"
)

// MigrateOptions say where a running VM goes and within what.
type MigrateOptions struct {
	To string // node ID or hostname
	// Deadline: the migration is cancelled (the VM stays where it runs)
	// when it has not finished within it.
	Deadline time.Duration
	// SameCPU: the nodes' CPUs are the same, so a guest that sees the
	// host's CPU (CPU_MODEL host or max under KVM) may move between them.
	SameCPU bool
	Key     []byte // the migration's key pair (PEM), made by the caller
	Wait    time.Duration
}

// MaxMigrateDeadline is the longest a migration may be given: the new
// task must be healthy within its health check's start period and retries.
const MaxMigrateDeadline = 75 * time.Second

// Migrate moves a running VM on shared storage to another node without
// stopping it. A job on the target writes the VM's ticket for that node
// (so the task Swarm starts there takes the guest over instead of booting
// it); a sender job on the VM's node and a receiver job on the target
// carry the migration stream between the two runners (mutual TLS, a key
// made for this migration, over an overlay network of their own); and one
// service update pins the VM to the target with update order start-first
// and rollback on failure. Swarm starts the new task beside the running
// one; it turns healthy only once its QEMU runs the guest, and only then
// does Swarm stop the old task. The pin and the order are then put back,
// which replaces no task (the new task's node still meets the
// constraints). A migration that fails leaves the VM running where it was.
func (c *Client) Migrate(ctx context.Context, name string, o MigrateOptions, out io.Writer) (err error) {
	v, err := c.vm(ctx, name)
	if err != nil {
		return err
	}
	if err := migratable(v, name, o); err != nil {
		return err
	}
	from, err := c.runningOn(ctx, v, name)
	if err != nil {
		return err
	}
	rooms, err := c.Rooms(ctx)
	if err != nil {
		return err
	}
	to, err := migrateTarget(rooms, v, name, from, o.To)
	if err != nil {
		return err
	}
	if gone, _ := c.RemoveJobs(ctx, name); len(gone) > 0 {
		fmt.Fprintf(out, "removed what an unfinished run left: %s\n", strings.Join(gone, ", "))
	}
	id := "m-" + jobID()
	until := time.Now().Add(o.Deadline + 30*time.Second) // the jobs' and the new task's start
	untilArg := until.UTC().Format(time.RFC3339Nano)
	fmt.Fprintf(out, "%s: migrating from %s to %s (live; cancelled if not done within %s)\n", name, c.nodeName(ctx, from), to.Hostname, o.Deadline)
	if v.env["NET_MODE"] == config.NetUser || v.env["NET_MODE"] == "" {
		fmt.Fprintf(out, "%s: user-mode networking: connections through published ports are reset by the move (the guest's own state is kept)\n", name)
	}
	if err := c.RunJob(ctx, Job{Kind: "migrate-ticket", VM: name, Node: to.ID, Image: v.image, User: v.user, Storage: v.storage, Env: v.envList,
		Args: []string{"migrate", "ticket", "--id", id, "--until", untilArg}}, prefixWriter{out, name + ": ticket: "}); err != nil {
		return fmt.Errorf("the migration's ticket on %s: %w", to.Hostname, err)
	}
	moved := make(chan error, 1)
	go func() {
		recv := pairSide{Node: to.ID, Args: []string{"migrate", "receive", "--listen", ":" + movePort, "--id", id, "--until", untilArg}}
		send := pairSide{Node: from, Args: []string{"migrate", "send", "--id", id, "--until", untilArg}}
		moved <- c.transfer(ctx, v, name, o.Key, recv, send, out)
	}()
	before := v.service.Spec
	defer func() {
		if rerr := c.unpin(context.Background(), name, before, from, to.ID); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()
	since, err := c.pin(ctx, name, id, from, to.ID)
	if err != nil {
		<-moved
		return err
	}
	if err := <-moved; err != nil {
		return fmt.Errorf("%s runs on where it was: %w", name, err)
	}
	wctx, cancel := context.WithTimeout(ctx, o.Wait)
	defer cancel()
	t, err := c.WaitRunning(wctx, v.service.ID, since, prefixWriter{out, name + ": "})
	if err != nil {
		return err
	}
	if t.NodeID != to.ID {
		return fmt.Errorf("%s's task runs on %s, not %s", name, c.nodeName(ctx, t.NodeID), to.Hostname)
	}
	// Swarm stops the task on the old node now; its runner quits the
	// paused QEMU there.
	err = poll.Until(wctx, time.Second, func(ctx context.Context) (bool, error) {
		ts, err := c.tasks(ctx, v.service.ID)
		return err == nil && !slices.ContainsFunc(ts, func(x swarm.Task) bool { return x.ID != t.ID && !terminal(x.Status.State) }), nil
	})
	if err != nil {
		return fmt.Errorf("%s runs on %s, but its task on %s has not ended: %w", name, to.Hostname, c.nodeName(ctx, from), err)
	}
	fmt.Fprintf(out, "%s: running on %s; its task on %s has ended\n", name, to.Hostname, c.nodeName(ctx, from))
	return nil
}

// migratable refuses what cannot migrate live, saying what to do instead.
func migratable(v rendered, name string, o MigrateOptions) error {
	model := v.env["CPU_MODEL"]
	kvm := v.env["ACCEL"] != config.AccelTCG
	switch {
	case v.home != "":
		return fmt.Errorf("%s is on local storage: its disk would have to be copied while it runs, which migrate does not do yet — swarmvm move %s --to NODE copies it with the VM stopped", name, name)
	case v.env["TPM"] == "on":
		return fmt.Errorf("%s has a TPM, whose state does not move with a migration yet: stop it and let Swarm start it elsewhere", name)
	case kvm && !o.SameCPU && (model == "" || model == "max" || strings.HasPrefix(model, "host")):
		return fmt.Errorf("%s's CPU model is %q: the guest sees the host's CPU, and on a host whose CPU differs it can crash — give it a named model (deploy --cpu-model, e.g. x86-64-v3) or, when the nodes' CPUs are the same, --same-cpu", name, cmpOr(model, "host"))
	case o.Deadline <= 0 || o.Deadline > MaxMigrateDeadline:
		return fmt.Errorf("--deadline %s: give at most %s (the new task must be healthy within its health check's start period)", o.Deadline, MaxMigrateDeadline)
	}
	return nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// runningOn is the node of the VM's running task.
func (c *Client) runningOn(ctx context.Context, v rendered, name string) (string, error) {
	ts, err := c.tasks(ctx, v.service.ID)
	if err != nil {
		return "", err
	}
	var running []swarm.Task
	for _, t := range ts {
		if t.DesiredState == swarm.TaskStateRunning && !terminal(t.Status.State) {
			running = append(running, t)
		}
	}
	switch {
	case len(running) == 0:
		return "", fmt.Errorf("%s is not running: there is nothing to migrate", name)
	case len(running) > 1 || running[0].Status.State != swarm.TaskStateRunning:
		return "", fmt.Errorf("%s is being started, updated or migrated (%d tasks): try again when it runs", name, len(running))
	}
	return running[0].NodeID, nil
}

// migrateTarget checks and finds the target node.
func migrateTarget(rooms []NodeRoom, v rendered, name, from, target string) (NodeRoom, error) {
	t := findRoom(rooms, target)
	reserve := int64(0)
	if r := v.service.Spec.TaskTemplate.Resources; r != nil && r.Reservations != nil {
		reserve = r.Reservations.MemoryBytes
	}
	switch {
	case t == nil:
		return NodeRoom{}, fmt.Errorf("--to %s: not a node of this swarm (docker node ls)", target)
	case t.ID == from:
		return NodeRoom{}, fmt.Errorf("%s already runs on %s", name, t.Hostname)
	case t.state() != "":
		return NodeRoom{}, fmt.Errorf("--to %s: the node is %s", t.Hostname, t.state())
	case t.TCGOnly && v.env["ACCEL"] != config.AccelTCG:
		return NodeRoom{}, fmt.Errorf("--to %s: the node has no KVM (labelled vm-accel=tcg) and %s runs on KVM", t.Hostname, name)
	case reserve > t.freeMemory():
		return NodeRoom{}, fmt.Errorf("--to %s: %d MiB of memory unreserved there, %s reserves %d MiB", t.Hostname, t.freeMemory()>>20, name, reserve>>20)
	}
	if p := v.service.Spec.TaskTemplate.Placement; p != nil {
		for _, c := range p.Constraints {
			// vm-capable and vm-accel were checked above
			if ok, err := t.matches(c); err == nil && !ok {
				return NodeRoom{}, fmt.Errorf("--to %s: the node does not meet %s's constraint %s", t.Hostname, name, c)
			}
		}
	}
	return *t, nil
}

// migrateLabel is the node label of a migration of the VM: both its
// nodes carry it while it runs.
func migrateLabel(name string) string { return "io.swarmvm.migrate." + name }

// pin lets the VM's service run on its two nodes only: both get a label
// of this migration, and the service a constraint on it. A constraint the
// running task's node did not meet would have Swarm shut that task down
// at once (its constraint enforcer), whatever the update order; with one
// task a node (max_replicas_per_node: 1) the new task goes to the target.
// The update is start-first with rollback on failure; pin returns the
// update's time.
func (c *Client) pin(ctx context.Context, name, id string, nodes ...string) (time.Time, error) {
	for _, n := range nodes {
		if err := c.nodeLabel(ctx, n, migrateLabel(name), id); err != nil {
			return time.Time{}, err
		}
	}
	s, err := c.service(ctx, name)
	if err != nil || s == nil {
		return time.Time{}, fmt.Errorf("service %s: %v", name, err)
	}
	spec := s.Spec
	if p := spec.TaskTemplate.Placement; p == nil || p.MaxReplicas != 1 {
		return time.Time{}, fmt.Errorf("service %s does not keep to one task a node (max_replicas_per_node: 1): deploy it again with this swarmvm", name)
	}
	spec.TaskTemplate.Placement.Constraints = append(slices.Clone(spec.TaskTemplate.Placement.Constraints), "node.labels."+migrateLabel(name)+"=="+id)
	spec.UpdateConfig = &swarm.UpdateConfig{Parallelism: 1, Order: swarm.UpdateOrderStartFirst, FailureAction: swarm.UpdateFailureActionRollback}
	// The running task's node meets the new constraints, so a change of
	// placement alone would replace no task: force the replacement.
	spec.TaskTemplate.ForceUpdate++
	if _, err := c.api.ServiceUpdate(ctx, s.ID, client.ServiceUpdateOptions{Version: s.Version, Spec: spec}); err != nil {
		return time.Time{}, fmt.Errorf("service update %s: %w", name, err)
	}
	got, err := c.api.ServiceInspect(ctx, s.ID, client.ServiceInspectOptions{})
	if err != nil {
		return time.Time{}, err
	}
	return got.Service.UpdatedAt, nil
}

// unpin puts back the constraints and update order the service had before
// the migration (an update of those alone replaces no task whose node
// meets them), then takes the migration's label off the nodes.
func (c *Client) unpin(ctx context.Context, name string, before swarm.ServiceSpec, nodes ...string) error {
	var errs []error
	if s, err := c.service(ctx, name); err != nil || s == nil {
		errs = append(errs, fmt.Errorf("service %s: %v", name, err))
	} else {
		spec := s.Spec
		spec.TaskTemplate.Placement.Constraints = before.TaskTemplate.Placement.Constraints
		spec.UpdateConfig = before.UpdateConfig
		if _, err := c.api.ServiceUpdate(ctx, s.ID, client.ServiceUpdateOptions{Version: s.Version, Spec: spec}); err != nil {
			errs = append(errs, fmt.Errorf("service update %s (the placement before the migration): %w", name, err))
		}
	}
	for _, n := range nodes {
		if err := c.nodeLabel(ctx, n, migrateLabel(name), ""); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// nodeLabel sets a node's label key to value, or removes it for "".
func (c *Client) nodeLabel(ctx context.Context, node, key, value string) error {
	n, err := c.api.NodeInspect(ctx, node, client.NodeInspectOptions{})
	if err != nil {
		return fmt.Errorf("node %s: %w", node, err)
	}
	spec := n.Node.Spec
	if spec.Labels == nil {
		spec.Labels = map[string]string{}
	}
	if value == "" {
		delete(spec.Labels, key)
	} else {
		spec.Labels[key] = value
	}
	if _, err := c.api.NodeUpdate(ctx, n.Node.ID, client.NodeUpdateOptions{Version: n.Node.Version, Spec: spec}); err != nil {
		return fmt.Errorf("node update %s (label %s): %w", n.Node.Description.Hostname, key, err)
	}
	return nil
}

// DrainOptions say how a node is emptied.
type DrainOptions struct {
	Deadline time.Duration // each migration's
	SameCPU  bool
	NewKey   func(vm string) ([]byte, error) // a migration's key pair
	Wait     time.Duration
}

// Drain empties a node for maintenance: each VM running there that can
// migrate is migrated, one at a time, to the node with the most unreserved
// memory that has room for it; then the node is set to drain, so that
// Swarm stops the rest as it would (a local VM waits for its home, a
// shared one starts elsewhere), and those are named with why.
func (c *Client) Drain(ctx context.Context, node string, o DrainOptions, out io.Writer) error {
	rooms, err := c.Rooms(ctx)
	if err != nil {
		return err
	}
	n := findRoom(rooms, node)
	if n == nil {
		return fmt.Errorf("%s: not a node of this swarm (docker node ls)", node)
	}
	svcs, err := c.api.ServiceList(ctx, client.ServiceListOptions{Filters: make(client.Filters).Add("label", LabelVM)})
	if err != nil {
		return fmt.Errorf("service list: %w", err)
	}
	var stayed []string
	for i := range svcs.Items {
		v, ok := readRendered(&svcs.Items[i])
		if !ok {
			continue
		}
		on, err := c.runningOn(ctx, v, v.name)
		if err != nil || on != n.ID {
			continue
		}
		mo := MigrateOptions{Deadline: o.Deadline, SameCPU: o.SameCPU, Wait: o.Wait}
		if err := migratable(v, v.name, mo); err != nil {
			stayed = append(stayed, fmt.Sprintf("%s (%v)", v.name, err))
			continue
		}
		to, err := roomFor(rooms, v, n.ID)
		if err != nil {
			stayed = append(stayed, fmt.Sprintf("%s (%v)", v.name, err))
			continue
		}
		if mo.Key, err = o.NewKey(v.name); err != nil {
			return err
		}
		mo.To = to.ID
		if err := c.Migrate(ctx, v.name, mo, out); err != nil {
			stayed = append(stayed, fmt.Sprintf("%s (the migration failed: %v)", v.name, err))
			continue
		}
		if rooms, err = c.Rooms(ctx); err != nil { // what the VM now reserves there
			return err
		}
	}
	if err := c.availability(ctx, n.ID, swarm.NodeAvailabilityDrain); err != nil {
		return err
	}
	fmt.Fprintf(out, "%s: drained\n", n.Hostname)
	for _, s := range stayed {
		fmt.Fprintf(out, "%s: stopped as Swarm stops it, not migrated: %s\n", n.Hostname, s)
	}
	return nil
}

// roomFor picks where a VM migrates to from a node: the other ready,
// active, vm-capable node (TCG-only ones only for TCG VMs) with room for
// its memory reservation and the most unreserved memory.
func roomFor(rooms []NodeRoom, v rendered, from string) (NodeRoom, error) {
	var best *NodeRoom
	for i := range rooms {
		r := &rooms[i]
		if r.ID == from {
			continue
		}
		if _, err := migrateTarget(rooms, v, v.name, from, r.ID); err != nil {
			continue
		}
		if best == nil || r.freeMemory() > best.freeMemory() {
			best = r
		}
	}
	if best == nil {
		return NodeRoom{}, errors.New("no other node has room for it")
	}
	return *best, nil
}

// availability sets a node's availability (active, pause, drain).
func (c *Client) availability(ctx context.Context, node string, a swarm.NodeAvailability) error {
	n, err := c.api.NodeInspect(ctx, node, client.NodeInspectOptions{})
	if err != nil {
		return fmt.Errorf("node %s: %w", node, err)
	}
	spec := n.Node.Spec
	spec.Availability = a
	if _, err := c.api.NodeUpdate(ctx, n.Node.ID, client.NodeUpdateOptions{Version: n.Node.Version, Spec: spec}); err != nil {
		return fmt.Errorf("node update %s (%s): %w", n.Node.Description.Hostname, a, err)
	}
	return nil
}
