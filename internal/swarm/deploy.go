package swarm

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/poll"
	"github.com/swarmvm/swarmvm/internal/status"
)

// DeployResult says what deploy did and found.
type DeployResult struct {
	ServiceID string
	Created   bool
	Dropped   []string // spec fields the daemon did not keep
	CapAdd    []string // capabilities the spec adds, which the audit expects
	Task      *swarm.Task
	Since     time.Time // the service's update, by the manager's clock
	// FirstCheck, when set, is when the first health check comes: the
	// daemon kept no start interval (API < 1.44), so the task counts as
	// running only then.
	FirstCheck time.Duration
	// HandOff: the update hands the running guest over to the new task
	// (only the runner's image changed).
	HandOff bool
}

// Deploy creates the VM's service, or updates it in place, then checks
// what the daemon kept of the spec.
func (c *Client) Deploy(ctx context.Context, r Resolved) (DeployResult, error) {
	spec := ServiceSpec(r)
	if err := c.secretIDs(ctx, spec.TaskTemplate.ContainerSpec.Secrets); err != nil {
		return DeployResult{}, err
	}
	existing, err := c.service(ctx, r.Name)
	if err != nil {
		return DeployResult{}, fmt.Errorf("service list: %w", err)
	}
	res := DeployResult{CapAdd: spec.TaskTemplate.ContainerSpec.CapabilityAdd}
	if existing == nil {
		out, err := c.api.ServiceCreate(ctx, client.ServiceCreateOptions{Spec: spec})
		if err != nil {
			return res, fmt.Errorf("service create %s: %w", r.Name, err)
		}
		res.ServiceID, res.Created = out.ID, true
	} else {
		if existing.Spec.Labels[LabelVM] != r.Name {
			return res, fmt.Errorf("service %s exists and is not a swarmvm VM (no %s label): refusing to replace it", r.Name, LabelVM)
		}
		if HandOff(r, existing.Spec, spec) {
			spec, res.HandOff = WithHandOff(spec), true
		}
		_, err := c.api.ServiceUpdate(ctx, existing.ID, client.ServiceUpdateOptions{Version: existing.Version, Spec: spec})
		if err != nil {
			return res, fmt.Errorf("service update %s: %w", r.Name, err)
		}
		res.ServiceID = existing.ID
	}
	got, err := c.api.ServiceInspect(ctx, res.ServiceID, client.ServiceInspectOptions{})
	if err != nil {
		return res, fmt.Errorf("service inspect %s: %w", r.Name, err)
	}
	res.Dropped = dropped(spec, got.Service.Spec)
	if h := got.Service.Spec.TaskTemplate.ContainerSpec; h != nil && h.Healthcheck != nil && h.Healthcheck.StartInterval == 0 {
		res.FirstCheck = h.Healthcheck.Interval
	}
	res.Since = got.Service.UpdatedAt
	return res, nil
}

// dropped lists the security-relevant fields that were asked for but are
// not in the stored spec: old daemons drop what their API version lacks,
// without a word.
func dropped(want, got swarm.ServiceSpec) []string {
	var out []string
	w, g := want.TaskTemplate.ContainerSpec, got.TaskTemplate.ContainerSpec
	if g == nil {
		return []string{"ContainerSpec"}
	}
	if w.Privileges != nil && w.Privileges.NoNewPrivileges && (g.Privileges == nil || !g.Privileges.NoNewPrivileges) {
		out = append(out, "Privileges.NoNewPrivileges")
	}
	if len(w.CapabilityDrop) > 0 && strings.Join(g.CapabilityDrop, ",") != strings.Join(w.CapabilityDrop, ",") {
		out = append(out, "CapabilityDrop")
	}
	if w.ReadOnly && !g.ReadOnly {
		out = append(out, "ReadOnly")
	}
	if w.User != g.User {
		out = append(out, "User")
	}
	if p := got.TaskTemplate.Placement; p == nil || p.MaxReplicas != want.TaskTemplate.Placement.MaxReplicas {
		out = append(out, "Placement.MaxReplicas")
	}
	return out
}

// WaitRunning waits for the service's newest task to run, writing each
// change of state (and Swarm's reason, such as "no suitable node") to
// progress. A task of this deployment (created at or after since, the
// service's update time by the manager's clock) that failed is shown with
// the runner's exit code and its last line; one that failed for a reason a
// restart meets again (status.ExitInfo.Permanent) ends the wait. It returns
// the running task, or the last task seen with an error.
func (c *Client) WaitRunning(ctx context.Context, serviceID string, since time.Time, progress io.Writer) (*swarm.Task, error) {
	last := ""
	explained := map[string]bool{}
	var task *swarm.Task
	err := poll.Until(ctx, 500*time.Millisecond, func(ctx context.Context) (bool, error) {
		ts, err := c.tasks(ctx, serviceID)
		if err != nil || len(ts) == 0 {
			return false, nil // asked again
		}
		task = &ts[0]
		line := fmt.Sprintf("task %s: %s", shortID(task.ID), task.Status.State)
		if task.Status.Err != "" {
			line += ": " + task.Status.Err
		} else if task.Status.Message != "" && task.Status.State != swarm.TaskStateRunning {
			line += " (" + task.Status.Message + ")"
		}
		if line != last {
			fmt.Fprintln(progress, line)
			last = line
		}
		if task.Status.State == swarm.TaskStateRunning {
			return true, nil
		}
		// An engine that refuses the container (a limit above its CPUs, a
		// missing bind source) refuses every retry the same way: waiting
		// longer only repeats it.
		if task.Status.State == swarm.TaskStateRejected {
			return false, fmt.Errorf("task rejected by node %s: %s", c.nodeName(ctx, task.NodeID), task.Status.Err)
		}
		for i := range ts {
			t := &ts[i]
			if t.Status.State != swarm.TaskStateFailed || t.CreatedAt.Before(since) || explained[t.ID] {
				continue
			}
			explained[t.ID] = true
			f := c.taskFailure(ctx, t)
			fmt.Fprintf(progress, "task %s: %s\n", shortID(t.ID), f)
			if f.Permanent {
				task = t
				return false, fmt.Errorf("the VM cannot start: %s — a restart meets the same cause: fix it, then deploy again", f)
			}
		}
		return false, nil
	})
	switch {
	case err == nil:
		return task, nil
	case err != ctx.Err(): // the check's own verdict
		return task, err
	case task != nil && task.Status.Err != "":
		return task, fmt.Errorf("task not running: %s", task.Status.Err)
	}
	return task, fmt.Errorf("task not running within the wait: %w", ctx.Err())
}

// Failure is why a task failed: the runner's exit code (0 when the task
// failed without one: its container never ran), what it means, and the
// runner's own reason from its event=exit line, else Swarm's.
type Failure struct {
	Code      int
	Meaning   string
	Reason    string
	Permanent bool
}

func (f Failure) String() string {
	s := "failed"
	if f.Code > 0 {
		s += fmt.Sprintf(": exit %d (%s)", f.Code, f.Meaning)
	}
	if f.Reason != "" {
		s += ": " + f.Reason
	}
	return s
}

// taskFailure reads a failed task's exit code from Swarm and the reason
// from the runner's log (the task's log, through the managers).
func (c *Client) taskFailure(ctx context.Context, t *swarm.Task) Failure {
	var f Failure
	if t.Status.ContainerStatus != nil && t.Status.ContainerStatus.ExitCode > 0 {
		info := status.Exit(t.Status.ContainerStatus.ExitCode)
		var env map[string]string
		if cs := t.Spec.ContainerSpec; cs != nil {
			env = envMap(cs.Env)
		}
		f = Failure{Code: info.Code, Meaning: info.Meaning, Permanent: permanent(info, env)}
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if rc, err := c.api.TaskLogs(lctx, t.ID, client.TaskLogsOptions{ShowStdout: true, ShowStderr: true, Tail: "50"}); err == nil {
		lines, _ := logLines(rc)
		if l, ok := status.Find(lines, status.Exited); ok {
			f.Reason = l.Attrs[status.AttrErr]
		}
	}
	if f.Reason == "" {
		f.Reason = t.Status.Err
	}
	return f
}

// permanent: a failure a restart meets again. A cause on the node (KVM,
// storage) is one only for a VM on node-local storage, which Swarm starts
// on its home again; a VM on shared storage may start on another node.
func permanent(info status.ExitInfo, env map[string]string) bool {
	if info.NodeBound() && env["STORAGE_MODE"] == config.StorageShared {
		return false
	}
	return info.Permanent
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// conflicts refuses a VM that would share a uid, a disk or an NVRAM file
// with another swarmvm VM of the cluster: one definition checks its own
// VMs, but definitions deployed apart (or by other people) do not see each
// other, and a shared uid opens the other VM's files.
func (c *Client) conflicts(ctx context.Context, r Resolved) error {
	res, err := c.api.ServiceList(ctx, client.ServiceListOptions{Filters: make(client.Filters).Add("label", LabelVM)})
	if err != nil {
		return fmt.Errorf("service list: %w", err)
	}
	mine := filesOf(r.Env)
	uid := fmt.Sprint(r.UID)
	for i := range res.Items {
		v, ok := readRendered(&res.Items[i])
		other := v.name
		if !ok || other == r.Name {
			continue
		}
		if v.uid == uid {
			return &FieldError{"uid", fmt.Sprintf("%s is VM %s's uid: VMs with one uid can open each other's disks; give %s its own", uid, other, r.Name)}
		}
		for _, f := range filesOf(v.env) {
			for _, m := range mine {
				if f == m {
					return &FieldError{"env", fmt.Sprintf("%s is VM %s's file too: two VMs may not share a disk or NVRAM", f, other)}
				}
			}
		}
	}
	return nil
}

// filesOf are the disk, NVRAM and TPM state paths a runner environment
// resolves to, cleaned: images/./victim.qcow2 is images/victim.qcow2, and
// was taken for another file when compared as written.
func filesOf(env map[string]string) []string {
	cfg := config.FromEnv(func(k string) string { return env[k] })
	out := []string{filepath.Clean(cfg.ImagePath), filepath.Clean(cfg.OVMFVars)}
	if cfg.TPM {
		out = append(out, filepath.Clean(cfg.TPMState))
	}
	return out
}

// LabelSecret marks the Swarm secrets deploy makes for a VM (its console
// key, its cloud-init files), with what each holds.
const LabelSecret = "io.swarmvm.secret"

// EnsureSecrets makes the VM's console and cloud-init secrets that do not
// exist yet (their names follow their content). key is the console key,
// nil without a console; r.Seed must have been loaded.
func (c *Client) EnsureSecrets(ctx context.Context, r Resolved, key []byte) error {
	want := map[string][]byte{}
	kinds := map[string]string{}
	if r.Keyed() {
		want[r.ConsoleSecret], kinds[r.ConsoleSecret] = key, "console"
	}
	for _, f := range r.Seed {
		if !f.Existing { // the operator's own: secretIDs finds it, or says it is missing
			want[f.Secret], kinds[f.Secret] = f.Data, f.Kind
		}
	}
	for name, data := range want {
		list, err := c.api.SecretList(ctx, client.SecretListOptions{Filters: make(client.Filters).Add("name", name)})
		if err != nil {
			return fmt.Errorf("secret list: %w", err)
		}
		exists := false
		for _, s := range list.Items {
			exists = exists || s.Spec.Name == name
		}
		if exists {
			continue
		}
		_, err = c.api.SecretCreate(ctx, client.SecretCreateOptions{Spec: swarm.SecretSpec{
			Annotations: swarm.Annotations{Name: name, Labels: map[string]string{LabelVM: r.Name, LabelSecret: kinds[name]}},
			Data:        data,
		}})
		if err != nil {
			return fmt.Errorf("secret create %s: %w", name, err)
		}
	}
	return nil
}

// PruneSecrets removes the VM's secrets that deploy made, but those named
// in keep; one still in use by a task is left for a later deploy or rm.
func (c *Client) PruneSecrets(ctx context.Context, vm string, keep ...string) {
	list, err := c.api.SecretList(ctx, client.SecretListOptions{Filters: make(client.Filters).Add("label", LabelVM+"="+vm).Add("label", LabelSecret)})
	if err != nil {
		return
	}
	for _, s := range list.Items {
		if !slices.Contains(keep, s.Spec.Name) {
			c.api.SecretRemove(ctx, s.ID, client.SecretRemoveOptions{})
		}
	}
}

// secretIDs fills in the IDs of secrets the spec names: the Engine API
// takes secrets by ID.
func (c *Client) secretIDs(ctx context.Context, refs []*swarm.SecretReference) error {
	for _, ref := range refs {
		list, err := c.api.SecretList(ctx, client.SecretListOptions{Filters: make(client.Filters).Add("name", ref.SecretName)})
		if err != nil {
			return fmt.Errorf("secret list: %w", err)
		}
		for _, s := range list.Items {
			if s.Spec.Name == ref.SecretName {
				ref.SecretID = s.ID
			}
		}
		if ref.SecretID == "" {
			return fmt.Errorf("no Swarm secret %s", ref.SecretName)
		}
	}
	return nil
}
