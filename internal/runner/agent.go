package runner

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/swarmvm/swarmvm/internal/qga"
	"github.com/swarmvm/swarmvm/internal/status"
)

// GUEST_AGENT=on: QEMU joins the guest's virtio-serial port
// org.qemu.guest_agent.0 to RUN_DIR/qga.sock, which the runner bound and
// handed over. The runner is the agent's one client: it asks the agent
// every agentPoll what the guest runs and its addresses, writes that to
// RUN_DIR/agent.json for the health check, and logs it when it changes;
// the stop asks it to power the guest off when the ACPI button went
// unanswered. Whatever the agent says is the guest's: bounded in size and
// time (internal/qga), so a hostile or stalled agent costs a timeout and a
// log line.
const (
	agentPoll = 10 * time.Second
	agentCall = 5 * time.Second // a connect with its sync, or one command
	// agentQuiet: a VM whose agent has not answered this long after the
	// start gets one line saying so.
	agentQuiet = 3 * time.Minute
	// maxAddresses bounds what is kept and shown of a guest's addresses.
	maxAddresses = 8
)

// guestAgent is the runner's connection to the guest agent and what it
// last learnt from it.
type guestAgent struct {
	path, file string
	log        *slog.Logger
	every      time.Duration // agentPoll

	mu sync.Mutex // one command at a time on the channel
	c  *qga.Client

	seenMu sync.Mutex
	seen   status.Agent // as last written to file
	ever   bool         // it answered once (the watch's own)
	cancel context.CancelFunc
	done   chan struct{}
}

func agentFile(runDir string) string { return runDir + "/agent.json" }

// watchAgent starts asking the agent; stop ends it.
func watchAgent(path, runDir string, log *slog.Logger) *guestAgent {
	return watchAgentEvery(path, runDir, log, agentPoll)
}

// watchAgentEvery is watchAgent, asking every so often.
func watchAgentEvery(path, runDir string, log *slog.Logger, every time.Duration) *guestAgent {
	ctx, cancel := context.WithCancel(context.Background())
	a := &guestAgent{path: path, file: agentFile(runDir), log: log, every: every, cancel: cancel, done: make(chan struct{}),
		seen: status.Agent{State: status.AgentSilent}}
	a.write(a.seen)
	go a.watch(ctx)
	return a
}

func (a *guestAgent) watch(ctx context.Context) {
	defer close(a.done)
	began := time.Now()
	quietSaid := false
	t := time.NewTicker(a.every)
	defer t.Stop()
	for {
		a.poll(ctx)
		if !a.ever && !quietSaid && time.Since(began) > agentQuiet {
			quietSaid = true
			a.log.Info("no guest agent has answered yet: install qemu-guest-agent in the guest for its addresses in ps and a shutdown that does not depend on ACPI, or set GUEST_AGENT=off", "waited", agentQuiet.String())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// poll asks the agent for the guest's OS (once per connection) and
// addresses, and records the change.
func (a *guestAgent) poll(ctx context.Context) {
	now := status.Agent{State: status.AgentSilent}
	before := a.last()
	err := a.do(ctx, func(ctx context.Context, c *qga.Client, fresh bool) error {
		now.OS = before.OS
		if fresh || now.OS == "" {
			o, err := c.OSInfo(ctx)
			if err != nil {
				var qe *qga.Error
				if !errors.As(err, &qe) { // an agent without the command is still an agent
					return err
				}
			}
			now.OS = clip(o.String(), 128)
		}
		ifs, err := c.Interfaces(ctx)
		if err != nil {
			var qe *qga.Error
			if !errors.As(err, &qe) {
				return err
			}
		}
		for _, addr := range qga.Addresses(ifs, maxAddresses) {
			now.Addresses = append(now.Addresses, clip(addr, 64))
		}
		now.State = status.AgentAnswering
		return nil
	})
	if ctx.Err() != nil {
		return
	}
	switch {
	case err == nil && (before.State != now.State || before.OS != now.OS || !slices.Equal(before.Addresses, now.Addresses)):
		a.ever = true
		a.log.Info("guest agent answered", status.Key, status.AgentAnswered, status.AttrGuestOS, now.OS, status.AttrAddresses, strings.Join(now.Addresses, ","))
	case err != nil && before.State == status.AgentAnswering:
		a.log.Warn("guest agent stopped answering", status.Key, status.AgentLost, "err", err)
	case err != nil:
		a.log.Debug("guest agent not answering", "err", err)
		return
	default:
		return
	}
	a.write(now)
}

// do runs f on a connection to the agent, made (and synchronised) when
// there is none; f learns whether it was just made. Any error closes the
// connection: the next call starts with a fresh sync.
func (a *guestAgent) do(ctx context.Context, f func(context.Context, *qga.Client, bool) error) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	fresh := false
	if a.c == nil {
		cctx, cancel := context.WithTimeout(ctx, agentCall)
		c, err := qga.Dial(cctx, a.path)
		cancel()
		if err != nil {
			return err
		}
		a.c, fresh = c, true
	}
	cctx, cancel := context.WithTimeout(ctx, agentCall)
	defer cancel()
	if err := f(cctx, a.c, fresh); err != nil {
		a.c.Close()
		a.c = nil
		return err
	}
	return nil
}

// last is what the agent said at the last poll.
func (a *guestAgent) last() status.Agent {
	a.seenMu.Lock()
	defer a.seenMu.Unlock()
	return a.seen
}

// answering says whether the agent answered the last poll.
func (a *guestAgent) answering() bool { return a.last().State == status.AgentAnswering }

// shutdown asks the guest, through its agent, to power off.
func (a *guestAgent) shutdown(ctx context.Context) error {
	return a.do(ctx, func(ctx context.Context, c *qga.Client, _ bool) error { return c.Shutdown(ctx) })
}

// write records what the agent said, for the health check.
func (a *guestAgent) write(s status.Agent) {
	a.seenMu.Lock()
	a.seen = s
	a.seenMu.Unlock()
	b, _ := json.Marshal(s)
	tmp := a.file + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err == nil {
		os.Rename(tmp, a.file)
	}
}

// stop ends the watch and the connection, and removes the file.
func (a *guestAgent) stop() {
	if a == nil {
		return
	}
	a.cancel()
	<-a.done
	a.mu.Lock()
	if a.c != nil {
		a.c.Close()
		a.c = nil
	}
	a.mu.Unlock()
	os.Remove(a.file)
	os.Remove(a.path) // the runner bound it; QEMU does not remove it
}

// readAgent is what agent.json in runDir says; nil without one.
func readAgent(runDir string) *status.Agent {
	b, err := os.ReadFile(agentFile(runDir))
	if err != nil {
		return nil
	}
	var s status.Agent
	if json.Unmarshal(b, &s) != nil || s.State == "" {
		return nil
	}
	return &s
}

// clip bounds a string the guest gave, and keeps it to one printable line.
func clip(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		s = s[:n]
	}
	return strings.ToValidUTF8(s, "")
}
