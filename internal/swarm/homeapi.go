package swarm

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/config"
)

// Rooms lists the swarm's nodes with what is reserved on each: by the tasks
// that run there (or are meant to), and by every local VM whose home it is,
// running or not, since its home is where it comes back.
func (c *Client) Rooms(ctx context.Context) ([]NodeRoom, error) {
	nodes, err := c.api.NodeList(ctx, client.NodeListOptions{})
	if err != nil {
		return nil, fmt.Errorf("node list: %w", err)
	}
	svcs, err := c.api.ServiceList(ctx, client.ServiceListOptions{})
	if err != nil {
		return nil, fmt.Errorf("service list: %w", err)
	}
	tasks, err := c.api.TaskList(ctx, client.TaskListOptions{Filters: make(client.Filters).Add("desired-state", "running")})
	if err != nil {
		return nil, fmt.Errorf("task list: %w", err)
	}
	rooms := map[string]*NodeRoom{}
	var out []NodeRoom
	for _, n := range nodes.Items {
		out = append(out, roomOf(n))
	}
	for i := range out {
		rooms[out[i].ID] = &out[i]
	}
	homed := map[string]bool{} // services counted at their home
	for _, s := range svcs.Items {
		if h := s.Spec.Labels[LabelHome]; h != "" {
			if n := findRoom(out, h); n != nil {
				n.reserve(s.Spec.TaskTemplate.Resources)
				homed[s.ID] = true
			}
		}
	}
	for _, t := range tasks.Items {
		if n := rooms[t.NodeID]; n != nil && !homed[t.ServiceID] {
			n.reserve(t.Spec.Resources)
		}
	}
	return out, nil
}

func roomOf(n swarm.Node) NodeRoom {
	return NodeRoom{
		ID: n.ID, Hostname: n.Description.Hostname, Role: string(n.Spec.Role), Labels: n.Spec.Labels,
		Ready: n.Status.State == swarm.NodeStateReady, Active: n.Spec.Availability == swarm.NodeAvailabilityActive,
		Capable:  n.Spec.Labels[NodeLabel] == "true",
		TCGOnly:  n.Spec.Labels[AccelLabel] == config.AccelTCG,
		NanoCPUs: n.Description.Resources.NanoCPUs, Memory: n.Description.Resources.MemoryBytes,
	}
}

func (n *NodeRoom) reserve(r *swarm.ResourceRequirements) {
	if r != nil && r.Reservations != nil {
		n.ReservedCPUs += r.Reservations.NanoCPUs
		n.ReservedMemory += r.Reservations.MemoryBytes
	}
}

// findRoom finds a node by ID or hostname.
func findRoom(rooms []NodeRoom, node string) *NodeRoom {
	for i := range rooms {
		if rooms[i].ID == node || strings.EqualFold(rooms[i].Hostname, node) {
			return &rooms[i]
		}
	}
	return nil
}

// homeRec is where a local VM's disk lives, as recorded in the swarm.
type homeRec struct {
	node, hostname, configID string
}

// homeRecord reads the VM's recorded home; nil when none is recorded.
func (c *Client) homeRecord(ctx context.Context, name string) (*homeRec, error) {
	res, err := c.api.ConfigList(ctx, client.ConfigListOptions{Filters: make(client.Filters).Add("name", homePrefix+name)})
	if err != nil {
		return nil, fmt.Errorf("config list: %w", err)
	}
	for _, cf := range res.Items {
		if cf.Spec.Name == homePrefix+name {
			return &homeRec{node: cf.Spec.Labels[LabelHome], hostname: cf.Spec.Labels[LabelHomeName], configID: cf.ID}, nil
		}
	}
	return nil, nil
}

// recordHome writes the VM's home: a config object created once, whose
// labels change when the VM moves (Swarm lets a config's labels change, and
// versions every change, so two writers cannot both win).
func (c *Client) recordHome(ctx context.Context, name string, n NodeRoom) error {
	labels := map[string]string{LabelVM: name, LabelHome: n.ID, LabelHomeName: n.Hostname}
	rec, err := c.homeRecord(ctx, name)
	if err != nil {
		return err
	}
	if rec == nil {
		_, err := c.api.ConfigCreate(ctx, client.ConfigCreateOptions{Spec: swarm.ConfigSpec{
			Annotations: swarm.Annotations{Name: homePrefix + name, Labels: labels},
			Data:        []byte("swarmvm: the home node of VM " + name + " is in this config's labels\n"),
		}})
		if err != nil {
			return fmt.Errorf("record the home of %s: %w", name, err)
		}
		return nil
	}
	if rec.node == n.ID && rec.hostname == n.Hostname {
		return nil
	}
	cur, err := c.api.ConfigInspect(ctx, rec.configID, client.ConfigInspectOptions{})
	if err != nil {
		return fmt.Errorf("record the home of %s: %w", name, err)
	}
	spec := cur.Config.Spec
	spec.Labels = labels
	if _, err := c.api.ConfigUpdate(ctx, rec.configID, client.ConfigUpdateOptions{Version: cur.Config.Version, Spec: spec}); err != nil {
		return fmt.Errorf("record the home of %s: %w", name, err)
	}
	return nil
}

// ErrHomeConflict is a definition naming a home other than the one that
// holds the VM's disk.
var ErrHomeConflict = errors.New("the VM's disk is on another node")

// SettleHome decides where a local VM lives, records it and pins r there
// (after refusing a VM whose storage mode changed, or whose uid or files
// another VM of the cluster has):
// the home of its service if it has one, else the recorded home (the VM was
// removed and is deployed again), else node: from the definition, else a
// node picked for room. node: naming another node than the one holding the
// disk is refused: moving a VM is swarmvm move. The CPU limit is then fitted
// to the home (or, for shared storage, to the nodes that may run the VM).
func (c *Client) SettleHome(ctx context.Context, r *Resolved) (NodeRoom, error) {
	home, err := c.PlanHome(ctx, r)
	if err != nil || r.StorageMode == config.StorageShared {
		return home, err
	}
	return home, c.recordHome(ctx, r.Name, home)
}

// PlanHome decides a local VM's home as SettleHome does, and pins r there,
// without recording it: for what must succeed on the home before the home
// counts (disk import records it only once the disk is there).
func (c *Client) PlanHome(ctx context.Context, r *Resolved) (NodeRoom, error) {
	rooms, err := c.Rooms(ctx)
	if err != nil {
		return NodeRoom{}, err
	}
	if err := c.sameStorageMode(ctx, *r); err != nil {
		return NodeRoom{}, err
	}
	if err := c.conflicts(ctx, *r); err != nil {
		return NodeRoom{}, err
	}
	if err := FitCPUs(r, rooms); err != nil || r.StorageMode == config.StorageShared {
		return NodeRoom{}, err
	}
	want := r.Home
	home, from, err := c.knownHome(ctx, r.Name, rooms)
	if err != nil {
		return NodeRoom{}, err
	}
	switch {
	case home != nil && want != "" && home.ID != want && !strings.EqualFold(home.Hostname, want):
		if from == fromRecord {
			// No service: move has nothing to move. The record is all.
			return NodeRoom{}, fmt.Errorf("%w: node: says %s, but the swarm records %s's home as %s (config %s%s), where its disk would be — if the disk is on %s, deploy without node: (or node: %s); if it is not (the record is stale, e.g. from a failed import), clear it: docker config rm %s%s",
				ErrHomeConflict, want, r.Name, home.Hostname, homePrefix, r.Name, home.Hostname, home.Hostname, homePrefix, r.Name)
		}
		return NodeRoom{}, fmt.Errorf("%w: node: says %s, but %s's home is %s, which holds its disk and NVRAM — move it: swarmvm move %s --to %s", ErrHomeConflict, want, r.Name, home.Hostname, r.Name, want)
	case home == nil && want != "":
		// The operator's choice stands even where the node cannot run the VM
		// yet (unlabelled, drained): the task waits there, with the reason.
		if home = findRoom(rooms, want); home == nil {
			return NodeRoom{}, &FieldError{"node", fmt.Sprintf("%q is not a node of this swarm (docker node ls)", want)}
		}
	case home == nil:
		picked, err := PickHome(rooms, *r)
		if err != nil {
			return NodeRoom{}, err
		}
		home = &picked
	}
	r.Home = home.ID
	return *home, FitCPUs(r, []NodeRoom{*home})
}

// Where a known home comes from.
const (
	fromService = "its service"
	fromTask    = "the node its task ran on"
	fromRecord  = "the swarm's record"
)

// knownHome is the node that holds a local VM's disk: its service's home,
// else (a service from before homes) where its task ran, else its
// recorded home. A home that has left the swarm is an error: the
// disk went with it, and starting the VM elsewhere would start it empty.
func (c *Client) knownHome(ctx context.Context, name string, rooms []NodeRoom) (*NodeRoom, string, error) {
	var node, from, how string
	s, err := c.service(ctx, name)
	if err != nil {
		return nil, "", fmt.Errorf("service list: %w", err)
	}
	switch {
	case s != nil && s.Spec.Labels[LabelHome] != "":
		node, from = s.Spec.Labels[LabelHome], fromService
	case s != nil:
		// A VM deployed before it had a home: its disk is where its task ran.
		if ts, err := c.tasks(ctx, s.ID); err == nil {
			for _, t := range ts {
				if t.NodeID != "" {
					node, from = t.NodeID, fromTask
					break
				}
			}
		}
	}
	how = from
	if node == "" {
		rec, err := c.homeRecord(ctx, name)
		if err != nil || rec == nil {
			return nil, "", err
		}
		node, from, how = rec.node, fromRecord, fmt.Sprintf("%s (config %s%s, hostname %s)", fromRecord, homePrefix, name, rec.hostname)
	}
	if n := findRoom(rooms, node); n != nil {
		return n, from, nil
	}
	return nil, from, fmt.Errorf("%w: %s's home is node %s (from %s), which is no longer in the swarm; its disk was there — rejoin the node, or bring the disk to another node (swarmvm disk import) and forget the old home: docker config rm %s%s",
		ErrHomeConflict, name, node, how, homePrefix, name)
}

// sameStorageMode refuses to change where an existing VM's disk lives by
// deploying it anew: the disk stays where it is, and the VM would start on
// an empty one elsewhere.
func (c *Client) sameStorageMode(ctx context.Context, r Resolved) error {
	s, err := c.service(ctx, r.Name)
	if err != nil {
		return fmt.Errorf("service list: %w", err)
	}
	was := ""
	if s != nil {
		was = s.Spec.Labels[LabelStorage]
	}
	if was == "" && r.StorageMode == config.StorageShared {
		if rec, err := c.homeRecord(ctx, r.Name); err != nil {
			return err
		} else if rec != nil {
			was = config.StorageLocal
		}
	}
	if was != "" && was != r.StorageMode {
		return &FieldError{"storage_mode", fmt.Sprintf("%s's disk is on %s storage, not %s: deploying cannot move it — copy its files to the other storage yourself, swarmvm rm it, docker config rm %s%s, then deploy it", r.Name, was, r.StorageMode, homePrefix, r.Name)}
	}
	return nil
}
