package swarm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"time"

	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"
)

// BackupOptions say where a backup goes and how.
type BackupOptions struct {
	Repo      string        // the repository folder, at that path on the VM's node
	Full      bool          // full even where an incremental could be
	FullEvery int           // full when the newest backup's chain has this many
	Freeze    time.Duration // the guest's filesystems frozen at most this long; 0: none
	Node      string        // for a stopped VM on shared storage: the node to run on
	// RepoNode is the node that mounts the repository, when the VM's does
	// not: the backup is sent there over a transfer's mutual TLS.
	RepoNode string
	Key      []byte // that transfer's key pair (PEM), made by the caller
}

// EnvDefinition carries the VM's service spec to the backup job, for its
// manifest.
const EnvDefinition = "SWARMVM_BACKUP_DEFINITION"

// Backup backs a VM up into a repository on its node, through a job there
// as the VM's uid (swarmvm backup-here): where the VM runs, its runner
// takes the backup online; a stopped VM's disk is backed up on its home.
func (c *Client) Backup(ctx context.Context, name string, o BackupOptions, out io.Writer) error {
	v, err := c.vm(ctx, name)
	if err != nil {
		return err
	}
	if !filepath.IsAbs(o.Repo) {
		return fmt.Errorf("--repo %s: give an absolute path (the folder on the VM's node)", o.Repo)
	}
	node, how, err := c.backupNode(ctx, v, o.Node)
	if err != nil {
		return err
	}
	hostname := c.nodeName(ctx, node)
	fmt.Fprintf(out, "%s: backup on node %s (%s) into %s\n", name, hostname, how, o.Repo)
	def, err := json.Marshal(v.service.Spec)
	if err != nil {
		return err
	}
	args := []string{"backup", "here", "--node-name", hostname, "--freeze", o.Freeze.String(), "--full-every", fmt.Sprint(o.FullEvery)}
	if o.Full {
		args = append(args, "--full")
	}
	repo := []mount.Mount{{Type: mount.TypeBind, Source: o.Repo, Target: o.Repo}}
	if o.RepoNode != "" {
		n, err := c.api.NodeInspect(ctx, o.RepoNode, client.NodeInspectOptions{})
		if err != nil {
			return fmt.Errorf("--repo-node %s: %w", o.RepoNode, err)
		}
		if n.Node.ID != node {
			fmt.Fprintf(out, "%s: the repository is on node %s: the backup is sent there\n", name, n.Node.Description.Hostname)
			v.envList = append(append([]string{}, v.envList...), EnvDefinition+"="+string(def))
			recv := pairSide{Node: n.Node.ID, Args: []string{"backup", "here", "--repo", o.Repo, "--listen", ":" + movePort}, Mounts: repo, NoStorage: true}
			return c.transfer(ctx, v, name, o.Key, recv, pairSide{Node: node, Args: args}, out)
		}
	}
	j := Job{Kind: "backup", VM: name, Node: node, Image: v.image, User: v.user, Storage: v.storage,
		Env:    append(append([]string{}, v.envList...), EnvDefinition+"="+string(def)),
		Args:   append(args, "--repo", o.Repo),
		Mounts: repo}
	return c.RunJob(ctx, j, prefixWriter{out, name + ": "})
}

const runningOnline = "running there: online"

// backupNode is where a VM's backup runs: the node of its running task,
// else its home (local storage), else the node the operator names.
func (c *Client) backupNode(ctx context.Context, v rendered, named string) (id, how string, err error) {
	ts, err := c.tasks(ctx, v.service.ID)
	if err != nil {
		return "", "", err
	}
	for _, t := range ts {
		if t.Status.State == swarm.TaskStateRunning {
			return t.NodeID, runningOnline, nil
		}
	}
	switch {
	case v.home != "":
		return v.home, "stopped: from its disk on its home", nil
	case named != "":
		n, err := c.api.NodeInspect(ctx, named, client.NodeInspectOptions{})
		if err != nil {
			return "", "", fmt.Errorf("--node %s: %w", named, err)
		}
		return n.Node.ID, "stopped: from its disk on shared storage", nil
	}
	return "", "", fmt.Errorf("%s is stopped and on shared storage: give --node, a node that mounts the storage and the repository", v.name)
}

// RestoreOptions say which backup to restore and how.
type RestoreOptions struct {
	Repo    string
	ID      string
	Replace bool          // set the VM's files aside (stopping it first when it runs)
	Wait    time.Duration // for the VM to stop, and to run again
	// Node: a local VM is restored there and that node becomes its home
	// (its home lost, or to move it back in time and place at once); a
	// stopped VM on shared storage is restored from there.
	Node string
	// As restores the backup as that other VM, deployed first with its
	// own identity; the backup's VM need not exist any more.
	As string

	source string // the backup's VM, set by Restore
}

// Restore rebuilds a VM's disk, NVRAM, TPM state and cloud-init key from a
// backup on its node, through a job there as its uid (swarmvm restore
// here), never over a file: with Replace the VM is stopped (scaled to 0)
// and its files set aside; it is started again when it was running. A
// local VM restored on another node (Node) is made to live there.
func (c *Client) Restore(ctx context.Context, from string, o RestoreOptions, out io.Writer) error {
	name := from
	if o.As != "" {
		if o.As == from {
			return fmt.Errorf("--as %s: that is the backup's own VM; restore without --as", o.As)
		}
		name = o.As
	}
	v, err := c.vm(ctx, name)
	if err != nil {
		if o.As != "" {
			return fmt.Errorf("--as %s: %w — deploy it first, with its own identity (swarmvm deploy --name %s …: its uid, MAC, ports and keys), then restore into it with --replace", o.As, err, o.As)
		}
		return err
	}
	o.source = from
	if !filepath.IsAbs(o.Repo) {
		return fmt.Errorf("--repo %s: give an absolute path (the folder on the VM's node)", o.Repo)
	}
	if v.home != "" && o.Node != "" {
		rooms, err := c.Rooms(ctx)
		if err != nil {
			return err
		}
		if to := findRoom(rooms, o.Node); to == nil || to.ID != v.home {
			return c.restoreElsewhere(ctx, v, name, rooms, o, out)
		}
	}
	node, how, err := c.backupNode(ctx, v, o.Node)
	if err != nil {
		return err
	}
	running := how == runningOnline
	replicas := v.replicas()
	if running {
		if !o.Replace {
			return fmt.Errorf("%s runs on node %s, on its disk: restore never writes over it; give --replace (the VM is stopped and its files set aside)", name, c.nodeName(ctx, node))
		}
		if err := c.scale(ctx, name, 0); err != nil {
			return err
		}
		if err := c.waitStopped(ctx, v.service.ID, o.Wait, out, name); err != nil {
			return err
		}
	}
	fmt.Fprintf(out, "%s: restoring backup %s on node %s\n", name, o.ID, c.nodeName(ctx, node))
	jerr := c.RunJob(ctx, restoreJob(v, name, node, o), prefixWriter{out, name + ": "})
	if running {
		// Started again either way: a failed restore left its files in
		// place (or set aside, named in the output).
		if err := c.scale(context.Background(), name, replicas); err != nil {
			return errors.Join(jerr, err)
		}
	}
	return jerr
}

// restoreJob restores backup o.ID of VM o.source as the VM
// name on node, as its uid, the repository mounted read-only. Another
// VM's backup is restored as root: able to read that VM's folder in the
// repository (CAP_DAC_READ_SEARCH), to give the files to this VM's uid
// (CAP_CHOWN) and to set this VM's files aside (CAP_FOWNER); no other
// capability.
func restoreJob(v rendered, name, node string, o RestoreOptions) Job {
	args := []string{"restore", "here", "--repo", o.Repo, "--backup", o.ID}
	if o.Replace {
		args = append(args, "--replace")
	}
	j := Job{Kind: "restore", VM: name, Node: node, Image: v.image, User: v.user, Storage: v.storage, Env: v.envList, Args: args,
		Mounts: []mount.Mount{{Type: mount.TypeBind, Source: o.Repo, Target: o.Repo, ReadOnly: true}}}
	if o.source != name {
		j.Args = append(j.Args, "--from", o.source, "--owner", v.user)
		j.User, j.Caps = "0:0", []string{"CAP_DAC_READ_SEARCH", "CAP_CHOWN", "CAP_FOWNER"}
	}
	return j
}

// replicas is the service's replica count.
func (v rendered) replicas() uint64 {
	if r := v.service.Spec.Mode.Replicated; r != nil && r.Replicas != nil {
		return *r.Replicas
	}
	return 1
}

// restoreElsewhere restores a local VM on another node and makes that its
// home, as a move would: the VM stopped first (it must be, with Replace,
// when it runs), the backup restored there, then one service update pins
// it there (and starts it, unless it was scaled to 0); its files on the
// old home are set aside when that node is up, else left for the operator
// (the runner never starts a VM off its home). A restore that fails leaves
// the home as it was.
func (c *Client) restoreElsewhere(ctx context.Context, v rendered, name string, rooms []NodeRoom, o RestoreOptions, out io.Writer) error {
	to, from := findRoom(rooms, o.Node), findRoom(rooms, v.home)
	switch {
	case to == nil:
		return fmt.Errorf("--node %s: not a node of this swarm (docker node ls)", o.Node)
	case to.state() != "":
		return fmt.Errorf("--node %s: the node is %s", to.Hostname, to.state())
	}
	ts, err := c.tasks(ctx, v.service.ID)
	if err != nil {
		return err
	}
	// A task on a node that is down is as the node last said: its QEMU is
	// gone with the node, or cut off with it and stopped by Swarm when it
	// is back (the service then lives elsewhere).
	down := func(t swarm.Task) bool {
		n := findRoom(rooms, t.NodeID)
		return n == nil || !n.Ready
	}
	replicas := v.replicas()
	for _, t := range ts {
		if t.Status.State == swarm.TaskStateRunning && !down(t) && !o.Replace {
			return fmt.Errorf("%s runs on node %s: restoring it on %s stops it and sets its files there aside; give --replace", name, c.nodeName(ctx, t.NodeID), to.Hostname)
		}
	}
	// Stopped for the restore, so that its old home, back meanwhile, does
	// not start it from the old disk.
	if err := c.scale(ctx, name, 0); err != nil {
		return err
	}
	if err := c.waitStoppedBut(ctx, v.service.ID, o.Wait, out, name, down); err != nil {
		return err
	}
	fmt.Fprintf(out, "%s: restoring backup %s on node %s, its new home\n", name, o.ID, to.Hostname)
	if err := c.RunJob(ctx, restoreJob(v, name, to.ID, o), prefixWriter{out, name + ": "}); err != nil {
		if serr := c.scale(context.Background(), name, replicas); serr != nil {
			return errors.Join(err, serr)
		}
		return fmt.Errorf("%w (the VM's home is unchanged)", err)
	}
	if err := c.rehome(ctx, name, *to); err != nil {
		return err
	}
	if replicas == 0 {
		if err := c.scale(ctx, name, 0); err != nil {
			return err
		}
	}
	fmt.Fprintf(out, "%s: home is now %s\n", name, to.Hostname)
	switch {
	case from != nil && from.Ready:
		c.setSourceAside(ctx, v, name, *from, *to, false, out)
	case from != nil:
		fmt.Fprintf(out, "%s: its old copy on %s (%s) stays there; the runner will not start it off the VM's home: remove it when the node is back\n", name, from.Hostname, from.state())
	}
	return nil
}

// Snapshot runs a snapshot operation (create, ls, revert, rm; swarmvm
// snapshot here) in a job on the VM's node as its uid. A revert stops a
// running VM first (the service scaled to 0) and starts it again after.
func (c *Client) Snapshot(ctx context.Context, name, op string, args []string, wait time.Duration, out io.Writer) error {
	v, err := c.vm(ctx, name)
	if err != nil {
		return err
	}
	node, how, err := c.backupNode(ctx, v, "")
	if err != nil {
		return err
	}
	running := how == runningOnline
	if op == "revert" && running {
		replicas := v.replicas()
		if err := c.scale(ctx, name, 0); err != nil {
			return err
		}
		defer func() {
			if serr := c.scale(context.Background(), name, replicas); serr != nil {
				fmt.Fprintf(out, "%s: starting it again: %v\n", name, serr)
			}
		}()
		if err := c.waitStopped(ctx, v.service.ID, wait, out, name); err != nil {
			return err
		}
	}
	j := Job{Kind: "snapshot", VM: name, Node: node, Image: v.image, User: v.user, Storage: v.storage, Env: v.envList,
		Args: append([]string{"snapshot", "here", op}, args...)}
	return c.RunJob(ctx, j, prefixWriter{out, name + ": "})
}

// ExportOptions open or close a VM's pull-mode export.
type ExportOptions struct {
	ID     string
	Until  time.Time
	Freeze time.Duration
	Close  bool // close export ID instead
}

// ExportTarget is where an export is served.
type ExportTarget struct {
	Node, Addr string
	Port       int
}

// Export opens (or closes) a pull-mode export of a running VM's disk
// through a job on its node (swarmvm backup export here), and says where
// it is served.
func (c *Client) Export(ctx context.Context, name string, o ExportOptions, out io.Writer) (ExportTarget, error) {
	v, err := c.vm(ctx, name)
	if err != nil {
		return ExportTarget{}, err
	}
	var t ExportTarget
	if t.Port, _ = strconv.Atoi(v.env["EXPORT_PORT"]); t.Port == 0 {
		return t, fmt.Errorf("%s serves no exports: deploy it with --export-port (export_port: in a definition)", name)
	}
	node, how, err := c.backupNode(ctx, v, "")
	if err != nil {
		return t, err
	}
	if how != runningOnline {
		return t, fmt.Errorf("%s is stopped: an export is of a running VM's disk (a stopped one's is a file: swarmvm backup)", name)
	}
	if t.Node, t.Addr, err = c.nodeAddr(ctx, node); err != nil {
		return t, err
	}
	args := []string{"backup", "export", "here", "--id", o.ID}
	if o.Close {
		args = append(args, "--close")
	} else {
		args = append(args, "--until", o.Until.UTC().Format(time.RFC3339), "--freeze", o.Freeze.String())
	}
	j := Job{Kind: "export", VM: name, Node: node, Image: v.image, User: v.user, Storage: v.storage, Env: v.envList, Args: args}
	return t, c.RunJob(ctx, j, prefixWriter{out, name + ": "})
}
