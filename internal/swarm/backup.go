package swarm

import (
	"context"
	"encoding/json"
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
	Repo   string        // the repository folder, at that path on the VM's node
	Full   bool          // full even where an incremental could be
	Freeze time.Duration // the guest's filesystems frozen at most this long; 0: none
	Node   string        // for a stopped VM on shared storage: the node to run on
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
	args := []string{"backup", "here", "--repo", o.Repo, "--node-name", hostname, "--freeze", o.Freeze.String()}
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
