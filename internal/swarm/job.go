package swarm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"
	"github.com/swarmvm/swarmvm/internal/poll"
)

// Work on a VM's disk happens where the disk is, through Swarm itself: a
// job (a service that runs once) on one node, in the runner image, as the
// VM's own uid in its group, with the storage folder, no capability, a
// read-only root and no_new_privs, like the VM. The operator needs no login
// on the node.
const (
	LabelJob  = "io.swarmvm.job"
	LabelMove = "io.swarmvm.move"
)

// Job is one such task.
type Job struct {
	Kind    string // what it does: import, send, receive, set-aside
	VM      string
	Node    string // the node ID it runs on
	Image   string
	User    string // uid:gid, the VM's
	Storage string
	Env     []string
	Args    []string // swarmvm's arguments
	Mounts  []mount.Mount
	Network string // an overlay network's ID, or ""
	Secret  *swarm.SecretReference
	Caps    []string // capabilities added back (all are dropped)
}

func jobID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (j Job) spec(name string) swarm.ServiceSpec {
	one := uint64(1)
	labels := map[string]string{LabelVM: j.VM, LabelJob: j.Kind}
	cs := &swarm.ContainerSpec{
		Image: j.Image, Labels: labels, Command: []string{"swarmvm"}, Args: j.Args, Env: j.Env, User: j.User,
		ReadOnly: true, CapabilityDrop: []string{"ALL"}, CapabilityAdd: j.Caps, Privileges: &swarm.Privileges{NoNewPrivileges: true},
		// The image's health check is the VM's; a job has no VM.
		Healthcheck: &container.HealthConfig{Test: []string{"NONE"}},
		Mounts:      j.Mounts,
	}
	if j.Storage != "" { // a job on a node without VM storage: the repository's side of a backup
		cs.Mounts = append([]mount.Mount{{Type: mount.TypeBind, Source: j.Storage, Target: j.Storage}}, j.Mounts...)
	}
	if j.Secret != nil {
		cs.Secrets = []*swarm.SecretReference{j.Secret}
	}
	s := swarm.ServiceSpec{
		Annotations: swarm.Annotations{Name: name, Labels: labels},
		TaskTemplate: swarm.TaskSpec{
			ContainerSpec: cs,
			RestartPolicy: &swarm.RestartPolicy{Condition: swarm.RestartPolicyConditionNone},
			Placement:     &swarm.Placement{Constraints: []string{"node.id==" + j.Node}},
		},
		Mode: swarm.ServiceMode{ReplicatedJob: &swarm.ReplicatedJob{MaxConcurrent: &one, TotalCompletions: &one}},
		// Found by name, at its task's own address: no virtual IP (which
		// needs IPVS on the node).
		EndpointSpec: &swarm.EndpointSpec{Mode: swarm.ResolutionModeDNSRR},
	}
	if j.Network != "" {
		s.TaskTemplate.Networks = []swarm.NetworkAttachmentConfig{{Target: j.Network}}
	}
	return s
}

// StartJob creates the job's service and returns its name.
func (c *Client) StartJob(ctx context.Context, j Job) (string, error) {
	name := fmt.Sprintf("svm-%s-%s", j.Kind, jobID())
	if _, err := c.api.ServiceCreate(ctx, client.ServiceCreateOptions{Spec: j.spec(name)}); err != nil {
		return "", fmt.Errorf("%s job on node %s: %w", j.Kind, j.Node, err)
	}
	return name, nil
}

// WaitJob waits for the job to finish, copying its log lines to progress
// as they come (each prefixed), and returns an error with the task's own
// reason unless it completed.
func (c *Client) WaitJob(ctx context.Context, name string, progress io.Writer) error {
	s, err := c.service(ctx, name)
	if err != nil || s == nil {
		return fmt.Errorf("job %s: not found (%v)", name, err)
	}
	printed, waiting := 0, ""
	flush := func() {
		lines, _ := c.serviceLog(ctx, s.ID)
		for _, l := range lines[min(printed, len(lines)):] {
			fmt.Fprintf(progress, "%s\n", l)
		}
		printed = max(printed, len(lines))
	}
	err = poll.Until(ctx, time.Second, func(ctx context.Context) (bool, error) {
		defer flush()
		ts, err := c.tasks(ctx, s.ID)
		if err != nil || len(ts) == 0 {
			return false, nil // asked again
		}
		st := ts[0].Status
		switch st.State {
		case swarm.TaskStateComplete:
			return true, nil
		case swarm.TaskStateFailed, swarm.TaskStateRejected, swarm.TaskStateShutdown, swarm.TaskStateOrphaned:
			return false, fmt.Errorf("job %s %s on node %s: %s", name, st.State, c.nodeName(ctx, ts[0].NodeID), first(st.Err, st.Message))
		case swarm.TaskStatePending:
			// Say once why it waits (a node without room, or gone).
			if st.Err != "" && st.Err != waiting {
				fmt.Fprintf(progress, "job %s waits: %s\n", name, st.Err)
				waiting = st.Err
			}
		}
		return false, nil
	})
	if err != nil && err == ctx.Err() {
		return fmt.Errorf("job %s: %w", name, err)
	}
	return err
}

// RunJob starts a job, waits for it and removes it.
func (c *Client) RunJob(ctx context.Context, j Job, progress io.Writer) error {
	name, err := c.StartJob(ctx, j)
	if err != nil {
		return err
	}
	defer c.removeService(name)
	return c.WaitJob(ctx, name, progress)
}

// removeService removes a service whatever the caller's context has come
// to: cleaning up must not be cut short by the cancellation that caused it.
func (c *Client) removeService(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c.api.ServiceRemove(ctx, name, client.ServiceRemoveOptions{})
}

// RemoveJobs removes the jobs, and the secrets and networks of moves, left
// for a VM by an earlier run that did not finish (killed, or its node lost).
func (c *Client) RemoveJobs(ctx context.Context, vm string) ([]string, error) {
	var gone []string
	svcs, err := c.api.ServiceList(ctx, client.ServiceListOptions{Filters: make(client.Filters).Add("label", LabelJob).Add("label", LabelVM+"="+vm)})
	if err != nil {
		return nil, err
	}
	for _, s := range svcs.Items {
		if _, err := c.api.ServiceRemove(ctx, s.ID, client.ServiceRemoveOptions{}); err == nil {
			gone = append(gone, "service "+s.Spec.Name)
		}
	}
	moveFilter := make(client.Filters).Add("label", LabelMove+"="+vm)
	if secrets, err := c.api.SecretList(ctx, client.SecretListOptions{Filters: moveFilter}); err == nil {
		for _, s := range secrets.Items {
			if _, err := c.api.SecretRemove(ctx, s.ID, client.SecretRemoveOptions{}); err == nil {
				gone = append(gone, "secret "+s.Spec.Name)
			}
		}
	}
	if nets, err := c.api.NetworkList(ctx, client.NetworkListOptions{Filters: moveFilter}); err == nil {
		for _, n := range nets.Items {
			if _, err := c.api.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{}); err == nil {
				gone = append(gone, "network "+n.Name)
			}
		}
	}
	return gone, nil
}
