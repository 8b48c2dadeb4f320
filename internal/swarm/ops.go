package swarm

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/status"
)

// Status is one VM as `swarmvm ps` shows it.
type Status struct {
	Name   string `json:"name"`
	Home   string `json:"home"`
	Node   string `json:"node"`
	State  string `json:"state"`
	Health string `json:"health"`
	Accel  string `json:"accel"`
	Error  string `json:"error,omitempty"`
	// Agent is what the guest agent last said (GUEST_AGENT=on): from the
	// health check on this node, else from the runner's log.
	Agent *status.Agent `json:"agent,omitempty"`
}

// List shows every swarmvm VM: where its newest task is, its state, the
// container's health (when it runs on this node) and whether the runner
// verified KVM.
func (c *Client) List(ctx context.Context) ([]Status, error) {
	res, err := c.api.ServiceList(ctx, client.ServiceListOptions{Filters: make(client.Filters).Add("label", LabelVM)})
	if err != nil {
		return nil, err
	}
	rooms, err := c.Rooms(ctx)
	if err != nil {
		return nil, err
	}
	var out []Status
	for _, s := range res.Items {
		if _, ok := readRendered(&s); !ok {
			continue // a job on a VM's disk, or a node probe
		}
		st := Status{Name: s.Spec.Name, Home: "shared", Node: "-", State: "no task", Health: "-", Accel: "-"}
		ts, err := c.tasks(ctx, s.ID)
		if err == nil && len(ts) > 0 {
			t := ts[0]
			st.Node, st.State, st.Error = c.nodeName(ctx, t.NodeID), string(t.Status.State), t.Status.Err
			var waiting string
			st.Accel, waiting, st.Agent = c.taskLog(ctx, t.ID)
			var agent *status.Agent
			if st.Health, agent = c.health(ctx, t); agent != nil {
				st.Agent = agent
			}
			if st.Health == "-" { // another node's: what Swarm and the log say
				st.Health = remoteHealth(t, waiting)
			}
			// A VM that is not running: why its last attempt ended, in
			// the runner's words.
			for i := range ts {
				if t.Status.State != swarm.TaskStateRunning && ts[i].Status.State == swarm.TaskStateFailed {
					st.Error = c.taskFailure(ctx, &ts[i]).String()
					break
				}
			}
		}
		if home := s.Spec.Labels[LabelHome]; home != "" {
			var why string
			st.Home, why = homeState(rooms, home)
			if why != "" && st.State != string(swarm.TaskStateRunning) {
				st.Error = strings.TrimSuffix(why+"; "+st.Error, "; ")
			}
		}
		out = append(out, st)
	}
	return out, nil
}

// HomeState says where a local VM lives and, when that node cannot run
// it now, why it stays down.
func (c *Client) HomeState(ctx context.Context, r Resolved) (string, error) {
	rooms, err := c.Rooms(ctx)
	if err != nil || r.Home == "" {
		return "", err
	}
	_, why := homeState(rooms, r.Home)
	return why, nil
}

// homeState shows a local VM's home and, when the home cannot run it now,
// why the VM stays down: it never starts on another node's empty disk.
func homeState(rooms []NodeRoom, home string) (show, why string) {
	n := findRoom(rooms, home)
	if n == nil {
		return home + " (gone)", "home node " + home + " left the swarm, and the disk with it"
	}
	s := n.state()
	switch {
	case s == "":
		return n.Hostname, ""
	case !n.Capable && n.Ready && n.Active:
		return n.Hostname + " (unlabelled)", fmt.Sprintf("home node %s is %s: swarmvm node label %s", n.Hostname, s, n.Hostname)
	case !n.Ready:
		return n.Hostname + " (down)", fmt.Sprintf("home node %s is down or cut off from the managers: the VM starts on no other node, since its disk is there; if the node is only cut off, its QEMU may run on there unseen, and Swarm takes the VM up again when the node is back (to run it elsewhere then: swarmvm move)", n.Hostname)
	}
	return n.Hostname + " (drained)", fmt.Sprintf("home node %s is drained: the VM stays down until it is active again (docker node update --availability active %s), since its disk is there (to run it elsewhere: make the node active, then swarmvm move, which copies the disk from it)", n.Hostname, n.Hostname)
}

// remoteHealth is the health of a task on another node, whose container
// ps cannot inspect: a task with a health check counts as running only
// once a check passed (Swarm waits for it), and a check that fails after
// ends the task; the runner's log says when it waits.
func remoteHealth(t swarm.Task, waiting string) string {
	switch {
	case waiting != "":
		return waiting
	case t.Status.State == swarm.TaskStateRunning:
		return "healthy"
	case t.Status.State == swarm.TaskStateStarting:
		return "starting"
	}
	return "-"
}

func (c *Client) health(ctx context.Context, t swarm.Task) (string, *status.Agent) {
	if t.Status.ContainerStatus == nil || t.Status.ContainerStatus.ContainerID == "" {
		return "-", nil
	}
	res, err := c.api.ContainerInspect(ctx, t.Status.ContainerStatus.ContainerID, client.ContainerInspectOptions{})
	if err != nil || res.Container.State == nil || res.Container.State.Health == nil {
		return "-", nil // not on this node, or no health yet
	}
	h := res.Container.State.Health
	// The last check's output is the runner's status.Health: it says why
	// a task Swarm counts as healthy is waiting, and why one is not.
	if n := len(h.Log); n > 0 && h.Log[n-1] != nil {
		if st, ok := status.ParseHealth(h.Log[n-1].Output); ok {
			switch st.State {
			case status.StateFull:
				return "paused: storage full", st.Agent
			case status.StateDiskHeld:
				return "waiting: disk held by another QEMU", st.Agent
			}
			return string(h.Status), st.Agent
		}
	}
	return string(h.Status), nil
}

// Remove removes the VM's service. When its container runs on this node,
// it follows the runner's log until the container stops, so the operator
// sees the ACPI shutdown (or the forced stop) happen; the log lines are
// written to w.
func (c *Client) Remove(ctx context.Context, name string, w io.Writer) error {
	v, err := c.vm(ctx, name)
	if err != nil {
		return err
	}
	s := v.service
	var logs io.ReadCloser
	if ts, err := c.tasks(ctx, s.ID); err == nil && len(ts) > 0 && ts[0].Status.ContainerStatus != nil {
		id := ts[0].Status.ContainerStatus.ContainerID
		if rc, err := c.api.ContainerLogs(ctx, id, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true, Follow: true, Since: time.Now().Format(time.RFC3339)}); err == nil {
			logs = rc
		}
	}
	if _, err := c.api.ServiceRemove(ctx, s.ID, client.ServiceRemoveOptions{}); err != nil {
		if logs != nil {
			logs.Close()
		}
		return fmt.Errorf("service rm %s: %w", name, err)
	}
	c.PruneSecrets(ctx, name)
	if logs == nil {
		fmt.Fprintf(w, "service %s removed; its task runs on another node: see the runner's log there\n", name)
		return nil
	}
	defer logs.Close()
	return follow(logs, w)
}

// follow copies a container log stream line by line until it ends (the
// container stopped) or the context behind it ends.
func follow(rc io.Reader, w io.Writer) error {
	pr, pw := io.Pipe()
	go func() {
		_, err := stdcopy.StdCopy(pw, pw, rc)
		pw.CloseWithError(err)
	}()
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		fmt.Fprintln(w, strings.TrimRight(sc.Text(), "\r"))
	}
	return nil
}

// ConsoleTarget is where a VM's web console answers: the node its running
// task is on, that node's address, and the console's port (published in
// host mode, so on that node only).
type ConsoleTarget struct {
	Node, Addr string
	Port       int
	TLS        bool
}

// nodeAddr is a node's name and the address others reach it on.
func (c *Client) nodeAddr(ctx context.Context, id string) (name, addr string, err error) {
	n, err := c.api.NodeInspect(ctx, id, client.NodeInspectOptions{})
	if err != nil {
		return "", "", fmt.Errorf("node %s: %w", id, err)
	}
	name, addr = n.Node.Description.Hostname, n.Node.Status.Addr
	if addr == "" || addr == "0.0.0.0" {
		addr = name
	}
	return name, addr, nil
}

// Console finds the VM's console.
func (c *Client) Console(ctx context.Context, name string) (ConsoleTarget, error) {
	v, err := c.vm(ctx, name)
	if err != nil {
		return ConsoleTarget{}, err
	}
	s := v.service
	t := ConsoleTarget{Port: v.consolePort(), TLS: v.env["CONSOLE_TLS_CERT"] != ""}
	if t.Port == 0 {
		return t, fmt.Errorf("%s has no console: deploy it with --console-port (console_port: in a definition)", name)
	}
	ts, err := c.tasks(ctx, s.ID)
	if err != nil {
		return t, err
	}
	for _, task := range ts {
		if task.Status.State != swarm.TaskStateRunning {
			continue
		}
		t.Node, t.Addr, err = c.nodeAddr(ctx, task.NodeID)
		return t, err
	}
	return t, fmt.Errorf("%s has no running task: swarmvm ps says why", name)
}
