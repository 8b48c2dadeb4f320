package swarm

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/poll"
	"github.com/swarmvm/swarmvm/internal/procfs"
	"github.com/swarmvm/swarmvm/internal/status"
)

// Check is one audited property of a running VM.
type Check struct {
	What string
	OK   bool
	Got  string
	Note string
}

func (c Check) String() string {
	mark := "ok   "
	if !c.OK {
		mark = "DRIFT"
	}
	s := fmt.Sprintf("%s %-22s %s", mark, c.What, c.Got)
	if c.Note != "" {
		s += "  (" + c.Note + ")"
	}
	return s
}

// ErrRemote is an audit of a task that runs on another node than the one
// whose engine the client talks to: only that engine can show its container
// and only that node its QEMU's /proc.
var ErrRemote = errors.New("the task runs on another node")

// Audit inspects the task's container and its QEMU process as they run,
// not as the spec asked: a daemon may have dropped what its API version
// does not know. The container must be on this node (the one the API talks
// to); elsewhere the audit says so.
func (c *Client) Audit(ctx context.Context, task *swarm.Task, wantCapAdd []string) ([]Check, error) {
	if task == nil || task.Status.ContainerStatus == nil || task.Status.ContainerStatus.ContainerID == "" {
		return nil, fmt.Errorf("the task has no container yet")
	}
	id := task.Status.ContainerStatus.ContainerID
	res, err := c.api.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if err != nil {
		return nil, fmt.Errorf("%w: container %s runs on node %s: audit it there (swarmvm audit, with DOCKER_HOST at that node's engine)", ErrRemote, shortID(id), c.nodeName(ctx, task.NodeID))
	}
	return c.auditContainer(res.Container, wantCapAdd), nil
}

// auditContainer checks one container as it runs, and its QEMU.
func (c *Client) auditContainer(ct container.InspectResponse, wantCapAdd []string) []Check {
	hc := ct.HostConfig
	checks := []Check{
		{What: "privileged", OK: !hc.Privileged, Got: strconv.FormatBool(hc.Privileged)},
		{What: "devices", OK: len(hc.Devices) == 0, Got: fmt.Sprint(len(hc.Devices))},
		{What: "cap_drop", OK: slices.Contains(hc.CapDrop, "ALL"), Got: strings.Join(hc.CapDrop, ",")},
		{What: "cap_add", OK: strings.Join(hc.CapAdd, ",") == strings.Join(wantCapAdd, ","), Got: "[" + strings.Join(hc.CapAdd, ",") + "]"},
		{What: "read_only_rootfs", OK: hc.ReadonlyRootfs, Got: strconv.FormatBool(hc.ReadonlyRootfs)},
		{What: "user", OK: nonRoot(ct.Config.User), Got: ct.Config.User},
	}
	nnp := Check{What: "no_new_privileges", OK: true, Got: "set"}
	if !hasNNP(hc.SecurityOpt) && len(wantCapAdd) > 0 {
		nnp.Got, nnp.Note = "not set", "net: tap needs file capabilities in the container; the runner sets no_new_privs on QEMU itself"
	} else if !hasNNP(hc.SecurityOpt) {
		nnp.Got = "not set"
		if c.atLeast("1.44") {
			nnp.OK, nnp.Note = false, "the daemon did not apply it"
		} else {
			nnp.Note = fmt.Sprintf("daemon API %s cannot carry it; the runner sets no_new_privs on QEMU itself", c.version)
		}
	}
	checks = append(checks, nnp)
	if ct.State != nil && ct.State.Pid > 0 {
		checks = append(checks, qemuChecks(ct.State.Pid)...)
	}
	return checks
}

// nonRoot: the user is a uid that is not 0, compared as a number ("00" is
// root too); a name other than root cannot be checked here and fails.
func nonRoot(user string) bool {
	u, _, _ := strings.Cut(user, ":")
	n, err := strconv.ParseUint(u, 10, 32)
	return err == nil && n != 0
}

func hasNNP(opts []string) bool {
	for _, o := range opts {
		if o == "no-new-privileges" || o == "no-new-privileges:true" || o == "no-new-privileges=true" {
			return true
		}
	}
	return false
}

// qemuChecks reads QEMU's /proc status on this node: the child of the
// container's PID 1 named qemu-system-*; and swtpm's the same way, when the
// VM has a TPM.
func qemuChecks(initPID int) []Check {
	pid := procfs.ChildNamed(initPID, "qemu-system")
	if pid == 0 {
		return []Check{{What: "qemu process", OK: false, Got: "not found", Note: "QEMU is not running under the runner"}}
	}
	checks := unprivileged("qemu", pid)
	if tpm := procfs.ChildNamed(initPID, "swtpm"); tpm != 0 {
		checks = append(checks, unprivileged("swtpm", tpm)...)
	}
	return checks
}

// unprivileged checks a process of the VM from /proc: not root, no
// capability, no_new_privs, a seccomp filter.
func unprivileged(name string, pid int) []Check {
	st, _ := procfs.ReadStatus(pid) // nil when gone: every check fails
	uid := strings.Fields(st["Uid"])
	checks := []Check{
		{What: name + " uid", OK: len(uid) == 4 && !slices.Contains(uid, "0"), Got: strings.Join(uid, " ")},
		{What: name + " CapEff", OK: st["CapEff"] == "0000000000000000", Got: st["CapEff"]},
		{What: name + " CapBnd", OK: st["CapBnd"] == "0000000000000000", Got: st["CapBnd"]},
		{What: name + " NoNewPrivs", OK: st["NoNewPrivs"] == "1", Got: st["NoNewPrivs"]},
		{What: name + " Seccomp", OK: st["Seccomp"] == "2", Got: st["Seccomp"], Note: "filters " + st["Seccomp_filters"]},
	}
	for i := range checks {
		checks[i].Note = strings.TrimSpace(fmt.Sprintf("pid %d %s", pid, checks[i].Note))
	}
	return checks
}

// Report is a running VM's audit: where it runs, its checks, and the
// runner's own word on KVM.
type Report struct {
	Node    string
	Checks  []Check
	Accel   string
	KVMLine string
}

// Drift lists the checks that failed.
func (r Report) Drift() []Check {
	var out []Check
	for _, c := range r.Checks {
		if !c.OK {
			out = append(out, c)
		}
	}
	return out
}

// AuditHere audits the running container of the VM named name on the node
// whose engine the client talks to: a worker's engine will do, since it
// asks nothing of the managers. The runner's KVM verdict comes from the
// container's own log.
func (c *Client) AuditHere(ctx context.Context, name string) (Report, error) {
	cs, err := c.api.ContainerList(ctx, client.ContainerListOptions{Filters: make(client.Filters).Add("label", LabelVM+"="+name)})
	if err != nil {
		return Report{}, err
	}
	if len(cs.Items) == 0 {
		return Report{}, fmt.Errorf("no running container of VM %s on this node: swarmvm ps (with DOCKER_HOST at a manager) shows where it runs", name)
	}
	res, err := c.api.ContainerInspect(ctx, cs.Items[0].ID, client.ContainerInspectOptions{})
	if err != nil {
		return Report{}, err
	}
	ct := res.Container
	capAdd := config.NetCapAdd(cmp.Or(envMap(ct.Config.Env)["NET_MODE"], config.NetUser)) // as the spec asks
	_, host, _ := c.Self(ctx)
	rep := Report{Node: host, Accel: AccelUnverified, Checks: c.auditContainer(ct, capAdd)}
	if rc, err := c.api.ContainerLogs(ctx, ct.ID, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true}); err == nil {
		lines, _ := logLines(rc)
		rep.Accel = accelVerdict(lines)
	}
	return rep, nil
}

// Report audits the running task and waits (up to kvmWait) for the runner
// to log its KVM verdict.
func (c *Client) Report(ctx context.Context, serviceID string, task *swarm.Task, wantCapAdd []string, kvmWait time.Duration) (Report, error) {
	rep := Report{Node: c.nodeName(ctx, task.NodeID), Accel: AccelUnverified}
	wctx, cancel := context.WithTimeout(ctx, kvmWait)
	defer cancel()
	// Unverified when the wait ends first: the report says so.
	poll.Until(wctx, time.Second, func(ctx context.Context) (bool, error) {
		lines, err := c.serviceLog(ctx, serviceID)
		if err == nil {
			rep.Accel = accelVerdict(lines)
			for _, l := range lines {
				if e := status.Parse(l).Event; e == status.KVMVerified || e == status.VMRunning {
					rep.KVMLine = l
				}
			}
		}
		return rep.Accel != AccelUnverified, nil
	})
	checks, err := c.Audit(ctx, task, wantCapAdd)
	rep.Checks = checks
	return rep, err
}
