package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/poll"
)

// MoveOptions say where a VM goes and how.
type MoveOptions struct {
	To           string // node ID or hostname
	DeleteSource bool   // remove the source copy instead of setting it aside
	Rate         int64  // bytes a second for the copy; 0: no limit
	Key          []byte // the move's key pair (PEM), made by the caller
	Wait         time.Duration
}

const movePort = "7070"

// Move is a cold migration of a VM on local storage: its runner powers it
// off through ACPI (the service scaled to 0), a receiver job on the target
// and a sender job on the home copy the disk and NVRAM over an overlay
// network of their own, under mutual TLS with a key made for this move,
// checksummed and checked with qemu-img; the sender holds QEMU's image lock
// meanwhile. Only then does one service update pin the VM to the target,
// make it the home and start it there; the source copy is set aside (or
// deleted when asked). Until that update the home is unchanged: a move cut
// short at any point leaves the VM startable on its source (it is started
// there again unless the move itself was killed), and the copy on the
// target does not count (the runner refuses to start off its home).
func (c *Client) Move(ctx context.Context, name string, o MoveOptions, out io.Writer) (err error) {
	v, err := c.vm(ctx, name)
	if err != nil {
		return err
	}
	rooms, err := c.Rooms(ctx)
	if err != nil {
		return err
	}
	from, to, err := moveEnds(rooms, v, name, o.To)
	if err != nil {
		return err
	}
	if gone, _ := c.RemoveJobs(ctx, name); len(gone) > 0 {
		fmt.Fprintf(out, "removed what an unfinished run left: %s\n", strings.Join(gone, ", "))
	}
	fmt.Fprintf(out, "%s: moving from %s to %s\n", name, from.Hostname, to.Hostname)
	if err := c.scale(ctx, name, 0); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			if serr := c.scale(context.Background(), name, 1); serr == nil {
				fmt.Fprintf(out, "%s: move failed; started again on its home %s\n", name, from.Hostname)
			}
		}
	}()
	if err := c.waitStopped(ctx, v.service.ID, o.Wait, out, name); err != nil {
		return err
	}
	if err := c.copyDisk(ctx, v, name, from, to, o, out); err != nil {
		return err
	}
	if err := c.rehome(ctx, name, to); err != nil {
		return err
	}
	fmt.Fprintf(out, "%s: home is now %s; starting it there\n", name, to.Hostname)
	c.setSourceAside(ctx, v, name, from, to, o.DeleteSource, out)
	return nil
}

// moveEnds checks and finds the VM's home and the target.
func moveEnds(rooms []NodeRoom, v rendered, name, target string) (from, to NodeRoom, err error) {
	if v.home == "" {
		return from, to, fmt.Errorf("%s is on shared storage: Swarm runs it on any node; there is nothing to move", name)
	}
	f, t := findRoom(rooms, v.home), findRoom(rooms, target)
	switch {
	case f == nil:
		return from, to, fmt.Errorf("%s's home %s is no longer in the swarm: its disk went with it", name, v.home)
	case t == nil:
		return from, to, fmt.Errorf("--to %s: not a node of this swarm (docker node ls)", target)
	case f.ID == t.ID:
		return from, to, fmt.Errorf("%s already lives on %s", name, t.Hostname)
	case !f.Ready:
		return from, to, fmt.Errorf("%s's home %s is down: its disk cannot be read until the node is back", name, f.Hostname)
	case !f.Active:
		return from, to, fmt.Errorf("%s's home %s is drained: Swarm runs no task there, so its disk cannot be read — make it active (docker node update --availability active %s; the VM starts there), move the VM, then drain the node", name, f.Hostname, f.Hostname)
	case t.state() != "":
		return from, to, fmt.Errorf("--to %s: the node is %s", t.Hostname, t.state())
	}
	return *f, *t, nil
}

func (c *Client) scale(ctx context.Context, name string, n uint64) error {
	s, err := c.service(ctx, name)
	if err != nil || s == nil {
		return fmt.Errorf("scale %s: %v", name, err)
	}
	spec := s.Spec
	spec.Mode.Replicated.Replicas = &n
	if _, err := c.api.ServiceUpdate(ctx, s.ID, client.ServiceUpdateOptions{Version: s.Version, Spec: spec}); err != nil {
		return fmt.Errorf("scale %s to %d: %w", name, n, err)
	}
	return nil
}

// waitStopped waits until no task of the service runs: the runner has
// powered the guest off (or forced it) within its stop grace period.
func (c *Client) waitStopped(ctx context.Context, serviceID string, wait time.Duration, out io.Writer, name string) error {
	return c.waitStoppedBut(ctx, serviceID, wait, out, name, func(swarm.Task) bool { return false })
}

// waitStoppedBut is waitStopped, not waiting for the tasks ignore names
// (those of a node that is down: it reports nothing until it is back).
func (c *Client) waitStoppedBut(ctx context.Context, serviceID string, wait time.Duration, out io.Writer, name string, ignore func(swarm.Task) bool) error {
	fmt.Fprintf(out, "%s: stopping the VM (ACPI power button through its runner)\n", name)
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err := poll.Until(wctx, time.Second, func(ctx context.Context) (bool, error) {
		ts, err := c.tasks(ctx, serviceID)
		if err != nil {
			return false, err
		}
		return !slices.ContainsFunc(ts, func(t swarm.Task) bool { return !terminal(t.Status.State) && !ignore(t) }), nil
	})
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return fmt.Errorf("%s did not stop within %v", name, wait)
	}
	if err == nil {
		fmt.Fprintf(out, "%s: stopped\n", name)
	}
	return err
}

func terminal(s swarm.TaskState) bool {
	switch s {
	case swarm.TaskStateComplete, swarm.TaskStateShutdown, swarm.TaskStateFailed, swarm.TaskStateRejected, swarm.TaskStateOrphaned, swarm.TaskStateRemove:
		return true
	}
	return false
}

// copyDisk runs the receiver on the target and the sender on the home.
func (c *Client) copyDisk(ctx context.Context, v rendered, name string, from, to NodeRoom, o MoveOptions, out io.Writer) error {
	recv := pairSide{Node: to.ID, Args: []string{"disk", "receive", "--listen", ":" + movePort}}
	send := pairSide{Node: from.ID, Args: []string{"disk", "send", "--rate", fmt.Sprint(o.Rate)}}
	if err := c.transfer(ctx, v, name, o.Key, recv, send, out); err != nil {
		return fmt.Errorf("copy to %s: %w", to.Hostname, err)
	}
	return nil
}

// pairSide is one job of a transfer: where it runs, swarmvm's arguments
// (the key's and the peer's flags are added), and its own mounts.
type pairSide struct {
	Node      string
	Args      []string
	Mounts    []mount.Mount
	NoStorage bool // the VM's storage folder is not mounted (it may not exist on that node)
}

// transfer runs a receiver and a sender job (a move's, a backup's for a
// repository on another node) on an overlay network of their own and with
// a key pair made for this transfer only (a Swarm secret both get), and
// removes all three when done: the sender is given --peer, both --key.
func (c *Client) transfer(ctx context.Context, v rendered, name string, pem []byte, recv, send pairSide, out io.Writer) error {
	id := jobID()
	labels := map[string]string{LabelMove: name}
	sec, err := c.api.SecretCreate(ctx, client.SecretCreateOptions{Spec: swarm.SecretSpec{
		Annotations: swarm.Annotations{Name: "svm-move-" + id, Labels: labels}, Data: pem,
	}})
	if err != nil {
		return fmt.Errorf("transfer key: %w", err)
	}
	defer c.api.SecretRemove(context.Background(), sec.ID, client.SecretRemoveOptions{})
	net, err := c.api.NetworkCreate(ctx, "svm-move-"+id, client.NetworkCreateOptions{Driver: "overlay", Labels: labels})
	if err != nil {
		return fmt.Errorf("transfer network: %w", err)
	}
	defer c.api.NetworkRemove(context.Background(), net.ID, client.NetworkRemoveOptions{})
	key := &swarm.SecretReference{SecretID: sec.ID, SecretName: "svm-move-" + id,
		File: &swarm.SecretReferenceFileTarget{Name: "swarmvm-move.pem", UID: v.uid, GID: fmt.Sprint(RunnerGID), Mode: 0o400}}
	job := func(kind string, side pairSide, args ...string) Job {
		storage := v.storage
		if side.NoStorage {
			storage = ""
		}
		return Job{Kind: kind, VM: name, Node: side.Node, Image: v.image, User: v.user, Storage: storage, Mounts: side.Mounts,
			Env: v.envList, Args: append(append(side.Args, "--key", "/run/secrets/swarmvm-move.pem"), args...), Network: net.ID, Secret: key}
	}
	recvJob, err := c.StartJob(ctx, job("receive", recv))
	if err != nil {
		return err
	}
	defer c.removeService(recvJob)
	sendJob, err := c.StartJob(ctx, job("send", send, "--peer", recvJob+":"+movePort))
	if err != nil {
		return err
	}
	defer c.removeService(sendJob)
	// Whichever side fails first ends the wait for the other, which would
	// otherwise wait for a peer that never comes.
	jctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, 2)
	wait := func(job, what string) {
		err := c.WaitJob(jctx, job, prefixWriter{out, name + ": " + what + ": "})
		if err != nil {
			cancel()
		}
		errs <- err
	}
	go wait(recvJob, "receive")
	go wait(sendJob, "send")
	var failed []error
	for range 2 {
		if err := <-errs; err != nil && (!errors.Is(err, context.Canceled) || ctx.Err() != nil) {
			failed = append(failed, err)
		}
	}
	return errors.Join(failed...)
}

// rehome makes the target the VM's home in one service update (label,
// runner's HOME_NODE, placement, one replica), then in the swarm's record.
func (c *Client) rehome(ctx context.Context, name string, to NodeRoom) error {
	v, err := c.vm(ctx, name)
	if err != nil {
		return fmt.Errorf("re-pin %s: %v", name, err)
	}
	s := v.service
	spec := s.Spec
	spec.Labels[LabelHome] = to.ID
	cs := spec.TaskTemplate.ContainerSpec
	cs.Labels[LabelHome] = to.ID
	cs.Env = v.withEnv("HOME_NODE", to.ID)
	var cons []string
	for _, k := range spec.TaskTemplate.Placement.Constraints {
		if !strings.HasPrefix(k, "node.id==") && !strings.HasPrefix(k, "node.hostname==") {
			cons = append(cons, k)
		}
	}
	spec.TaskTemplate.Placement.Constraints = append(cons, homeConstraint(to.ID))
	one := uint64(1)
	spec.Mode.Replicated.Replicas = &one
	if _, err := c.api.ServiceUpdate(ctx, s.ID, client.ServiceUpdateOptions{Version: s.Version, Spec: spec}); err != nil {
		return fmt.Errorf("re-pin %s to %s: %w", name, to.Hostname, err)
	}
	return c.recordHome(ctx, name, to)
}

// setSourceAside renames (or deletes) the copy on the old home, which the
// runner would now refuse anyway. A failure is reported, not fatal: the
// VM has moved.
func (c *Client) setSourceAside(ctx context.Context, v rendered, name string, from, to NodeRoom, remove bool, out io.Writer) {
	args := []string{"disk", "set-aside"}
	if remove {
		args = append(args, "--delete")
	}
	j := Job{Kind: "set-aside", VM: name, Node: from.ID, Image: v.image, User: v.user, Storage: v.storage,
		Env: v.withEnv("HOME_NODE", to.ID), Args: args}
	if err := c.RunJob(ctx, j, prefixWriter{out, name + ": source: "}); err != nil {
		fmt.Fprintf(out, "%s: WARNING: the old copy on %s was not set aside (%v); the runner will not use it, but remove it by hand when you are sure\n", name, from.Hostname, err)
	}
}

// prefixWriter writes each line with a prefix.
type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p prefixWriter) Write(b []byte) (int, error) {
	for _, l := range strings.SplitAfter(string(b), "\n") {
		if l != "" {
			fmt.Fprint(p.w, p.prefix+l)
		}
	}
	return len(b), nil
}

// ImportDisk makes a VM's disk (and NVRAM) on its home node from an image:
// source, a file on that node, or url. The VM need not be deployed yet; its
// home is settled as deploy settles it (recorded, node:, or picked), so the
// VM deployed afterwards runs where its disk is.
func (c *Client) ImportDisk(ctx context.Context, r Resolved, source, url string, out io.Writer) error {
	// The home is recorded only once the disk is there: an import that
	// fails leaves no home behind that would hold the VM to a node
	// without its disk.
	home, err := c.PlanHome(ctx, &r)
	if err == nil && r.StorageMode != config.StorageLocal {
		// Shared storage is the same folder on every node: any node that
		// can run the VM will do.
		rooms, rerr := c.Rooms(ctx)
		if rerr != nil {
			return rerr
		}
		home, err = PickHome(rooms, r)
	}
	if err != nil {
		return err
	}
	if !home.Ready || !home.Active {
		return fmt.Errorf("%s's home %s is %s: the import runs there, as a Swarm task — bring it back or make it active first", r.Name, home.Hostname, home.state())
	}
	fmt.Fprintf(out, "%s: importing on node %s\n", r.Name, home.Hostname)
	if gone, _ := c.RemoveJobs(ctx, r.Name); len(gone) > 0 {
		fmt.Fprintf(out, "removed what an unfinished run left: %s\n", strings.Join(gone, ", "))
	}
	j := Job{Kind: "import", VM: r.Name, Node: home.ID, Image: r.Image, User: fmt.Sprintf("%d:%d", r.UID, RunnerGID),
		Storage: r.Storage, Env: envList(r.RunnerEnv()), Args: []string{"disk", "import-here"}}
	if url != "" {
		j.Args = append(j.Args, "--url", url)
	} else {
		const target = "/run/swarmvm-import/source"
		j.Mounts = append(j.Mounts, mount.Mount{Type: mount.TypeBind, Source: source, Target: target, ReadOnly: true})
		j.Args = append(j.Args, "--source", target)
	}
	if err := c.RunJob(ctx, j, prefixWriter{out, r.Name + ": "}); err != nil {
		return err
	}
	if r.StorageMode != config.StorageLocal {
		return nil
	}
	if err := c.recordHome(ctx, r.Name, home); err != nil {
		return err
	}
	fmt.Fprintf(out, "%s: home recorded: %s, which holds its disk\n", r.Name, home.Hostname)
	return nil
}

// WaitVM waits for the VM's newest task to run, writing its progress.
func (c *Client) WaitVM(ctx context.Context, name string, progress io.Writer) error {
	s, err := c.service(ctx, name)
	if err != nil || s == nil {
		return fmt.Errorf("no VM named %s (%v)", name, err)
	}
	_, err = c.WaitRunning(ctx, s.ID, s.UpdatedAt, progress)
	return err
}
