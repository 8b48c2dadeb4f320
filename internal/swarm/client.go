package swarm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/status"
)

// Client talks to a Swarm manager's Engine API (DOCKER_HOST and friends),
// with the API version negotiated, never pinned.
type Client struct {
	api     *client.Client
	version string
}

// Connect makes a client from the environment and negotiates the version.
func Connect(ctx context.Context) (*Client, error) {
	api, err := client.New(client.FromEnv, client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	ping, err := api.Ping(ctx, client.PingOptions{NegotiateAPIVersion: true})
	if err != nil {
		api.Close()
		return nil, fmt.Errorf("docker engine: %w (is dockerd running, and DOCKER_HOST right?)", err)
	}
	return &Client{api: api, version: first(api.ClientVersion(), ping.APIVersion)}, nil
}

// Close releases the client.
func (c *Client) Close() error { return c.api.Close() }

// APIVersion is the negotiated Engine API version.
func (c *Client) APIVersion() string { return c.version }

// atLeast reports whether the negotiated API is at least v ("1.44").
func (c *Client) atLeast(v string) bool { return versionCmp(c.version, v) >= 0 }

func versionCmp(a, b string) int {
	var am, an, bm, bn int
	fmt.Sscanf(a, "%d.%d", &am, &an)
	fmt.Sscanf(b, "%d.%d", &bm, &bn)
	switch {
	case am != bm:
		return am - bm
	default:
		return an - bn
	}
}

// service finds a service by exact name; nil when there is none.
func (c *Client) service(ctx context.Context, name string) (*swarm.Service, error) {
	res, err := c.api.ServiceList(ctx, client.ServiceListOptions{Filters: make(client.Filters).Add("name", name)})
	if err != nil {
		return nil, err
	}
	for _, s := range res.Items {
		if s.Spec.Name == name {
			return &s, nil
		}
	}
	return nil, nil
}

// tasks lists a service's tasks, newest first.
func (c *Client) tasks(ctx context.Context, serviceID string) ([]swarm.Task, error) {
	res, err := c.api.TaskList(ctx, client.TaskListOptions{Filters: make(client.Filters).Add("service", serviceID)})
	if err != nil {
		return nil, err
	}
	ts := res.Items
	sort.Slice(ts, func(i, j int) bool { return ts[i].CreatedAt.After(ts[j].CreatedAt) })
	return ts, nil
}

// nodeName is a node's hostname, or its ID when it cannot be found.
func (c *Client) nodeName(ctx context.Context, id string) string {
	if id == "" {
		return "-"
	}
	n, err := c.api.NodeInspect(ctx, id, client.NodeInspectOptions{})
	if err != nil {
		return id
	}
	return n.Node.Description.Hostname
}

// serviceLog returns the service's log lines (all of them: the runner logs
// little, and its KVM line comes early).
func (c *Client) serviceLog(ctx context.Context, serviceID string) ([]string, error) {
	rc, err := c.api.ServiceLogs(ctx, serviceID, client.ServiceLogsOptions{ShowStdout: true, ShowStderr: true, Tail: "all"})
	if err != nil {
		return nil, err
	}
	return logLines(rc)
}

// logLines reads a multiplexed log stream to its end, in lines.
func logLines(rc io.ReadCloser) ([]string, error) { return logUntil(rc, 0, nil) }

// logUntil reads a multiplexed log stream in lines until last says a line
// is the last one wanted, max lines were read (0: no limit), or the
// stream ends; what follows is never read.
func logUntil(rc io.ReadCloser, max int, last func(string) bool) ([]string, error) {
	defer rc.Close()
	pr, pw := io.Pipe()
	defer pr.Close() // ends the copy when the reading stops early
	go func() {
		_, err := stdcopy.StdCopy(pw, pw, rc)
		pw.CloseWithError(err)
	}()
	var lines []string
	sc := bufio.NewScanner(pr)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if (last != nil && last(sc.Text())) || len(lines) == max {
			return lines, nil
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return lines, err
	}
	return lines, nil
}

// startLines bounds what is read of a task's log for its accelerator: the
// runner says "VM running" within its first few dozen lines.
const startLines = 400

// taskLog is what a task's log says of it, for a task whose container
// ps cannot inspect (it runs on another node): the accelerator, from the
// start of the log, read up to the runner's "VM running" line and no
// further (a VM that has run for months has a long log, and ps asks for
// every VM); and from its last lines, whether it waits. waiting is "" when
// it does not, or cannot be told.
func (c *Client) taskLog(ctx context.Context, taskID string) (accel, waiting string, agent *status.Agent) {
	accel = AccelUnverified
	if rc, err := c.api.TaskLogs(ctx, taskID, client.TaskLogsOptions{ShowStdout: true, ShowStderr: true}); err == nil {
		running := status.Key + "=" + status.VMRunning
		head, _ := logUntil(rc, startLines, func(l string) bool { return strings.Contains(l, running) })
		accel = accelVerdict(head)
		if _, ran := status.Find(head, status.VMRunning); !ran {
			if _, held := status.Find(head, status.StateDiskHeld); held {
				return accel, "waiting: disk held by another QEMU", nil
			}
		}
	}
	if rc, err := c.api.TaskLogs(ctx, taskID, client.TaskLogsOptions{ShowStdout: true, ShowStderr: true, Tail: "40"}); err == nil {
		tail, _ := logLines(rc)
		paused := false
		for _, l := range tail {
			switch p := status.Parse(l); p.Event {
			case status.StateFull:
				paused = true
			case status.Resumed, status.VMRunning:
				paused = false
			case status.AgentAnswered:
				agent = &status.Agent{State: status.AgentAnswering, OS: p.Attrs[status.AttrGuestOS]}
				if a := p.Attrs[status.AttrAddresses]; a != "" {
					agent.Addresses = strings.Split(a, ",")
				}
			case status.AgentLost:
				agent = &status.Agent{State: status.AgentSilent}
			}
		}
		if paused {
			return accel, "paused: storage full", agent
		}
	}
	return accel, "", agent
}

// accelVerdict says whether the runner's log states KVM verified by QEMU,
// or a VM running under TCG (which only ACCEL=tcg asks for).
func accelVerdict(lines []string) string {
	if _, ok := status.Find(lines, status.KVMVerified); ok {
		return AccelKVM
	}
	if l, ok := status.Find(lines, status.VMRunning); ok && l.Attrs[status.AttrAccel] == config.AccelTCG {
		return AccelTCG
	}
	return AccelUnverified
}

// What a runner's log says of its VM's accelerator (Report.Accel,
// Status.Accel): KVM that QEMU confirmed, TCG that was asked for by name,
// or neither yet.
const (
	AccelKVM        = "KVM, verified (QMP query-kvm)"
	AccelTCG        = "TCG, asked for by name (emulation: no KVM, slowly)"
	AccelUnverified = "KVM not verified"
)
