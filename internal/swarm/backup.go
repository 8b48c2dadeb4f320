package swarm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
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
	args := []string{"backup", "here", "--repo", o.Repo, "--node-name", hostname, "--freeze", o.Freeze.String(), "--full-every", fmt.Sprint(o.FullEvery)}
	if o.Full {
		args = append(args, "--full")
	}
	j := Job{Kind: "backup", VM: name, Node: node, Image: v.image, User: v.user, Storage: v.storage,
		Env:    append(append([]string{}, v.envList...), EnvDefinition+"="+string(def)),
		Args:   args,
		Mounts: []mount.Mount{{Type: mount.TypeBind, Source: o.Repo, Target: o.Repo}}}
	return c.RunJob(ctx, j, prefixWriter{out, name + ": "})
}

// backupNode is where a VM's backup runs: the node of its running task,
// else its home (local storage), else the node the operator names.
func (c *Client) backupNode(ctx context.Context, v rendered, named string) (id, how string, err error) {
	ts, err := c.tasks(ctx, v.service.ID)
	if err != nil {
		return "", "", err
	}
	for _, t := range ts {
		if t.Status.State == swarm.TaskStateRunning {
			return t.NodeID, "running there: online", nil
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
}

// Restore rebuilds a VM's disk, NVRAM, TPM state and cloud-init key from a
// backup on its node, through a job there as its uid (swarmvm restore
// here), never over a file: with Replace the VM is stopped (scaled to 0)
// and its files set aside; it is started again when it was running.
func (c *Client) Restore(ctx context.Context, name string, o RestoreOptions, out io.Writer) error {
	v, err := c.vm(ctx, name)
	if err != nil {
		return err
	}
	if !filepath.IsAbs(o.Repo) {
		return fmt.Errorf("--repo %s: give an absolute path (the folder on the VM's node)", o.Repo)
	}
	node, how, err := c.backupNode(ctx, v, "")
	if err != nil {
		return err
	}
	running := how == "running there: online"
	replicas := uint64(1)
	if r := v.service.Spec.Mode.Replicated; r != nil && r.Replicas != nil {
		replicas = *r.Replicas
	}
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
	args := []string{"restore", "here", "--repo", o.Repo, "--backup", o.ID}
	if o.Replace {
		args = append(args, "--replace")
	}
	j := Job{Kind: "restore", VM: name, Node: node, Image: v.image, User: v.user, Storage: v.storage, Env: v.envList, Args: args,
		Mounts: []mount.Mount{{Type: mount.TypeBind, Source: o.Repo, Target: o.Repo, ReadOnly: true}}}
	jerr := c.RunJob(ctx, j, prefixWriter{out, name + ": "})
	if running {
		// Started again either way: a failed restore left its files in
		// place (or set aside, named in the output).
		if err := c.scale(context.Background(), name, replicas); err != nil {
			return errors.Join(jerr, err)
		}
	}
	return jerr
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
	running := how == "running there: online"
	if op == "revert" && running {
		replicas := uint64(1)
		if r := v.service.Spec.Mode.Replicated; r != nil && r.Replicas != nil {
			replicas = *r.Replicas
		}
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
