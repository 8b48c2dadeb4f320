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
	// maxAddresses bounds what is kept and shown of a guest's addresses,
	// maxFilesystems of its filesystems.
	maxAddresses   = 8
	maxFilesystems = 32
	// agentThawTries is how often a thaw is tried before giving up.
	agentThawTries = 3
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
	seen   status.Agent     // as last written to file
	fs     []qga.Filesystem // the guest's filesystems with a size, as last polled
	ever   bool             // it answered once (the watch's own)
	ctx    context.Context  // ends with stop
	cancel context.CancelFunc
	done   chan struct{}
	bg     sync.WaitGroup // commands sent beside the watch (setClock)

	frozenMu sync.Mutex
	frozen   *time.Timer // set while the guest's filesystems are frozen: thaws at the hard deadline
}

func agentFile(runDir string) string { return runDir + "/agent.json" }

// watchAgent starts asking the agent; stop ends it.
func watchAgent(path, runDir string, log *slog.Logger) *guestAgent {
	return watchAgentEvery(path, runDir, log, agentPoll)
}

// watchAgentEvery is watchAgent, asking every so often.
func watchAgentEvery(path, runDir string, log *slog.Logger, every time.Duration) *guestAgent {
	ctx, cancel := context.WithCancel(context.Background())
	a := &guestAgent{path: path, file: agentFile(runDir), log: log, every: every, ctx: ctx, cancel: cancel, done: make(chan struct{}),
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
		fs, err := c.Filesystems(ctx)
		if err != nil {
			var qe *qga.Error
			if !errors.As(err, &qe) {
				return err
			}
		}
		a.setFilesystems(fs)
		return nil
	})
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		a.setFilesystems(nil) // nothing stale in the metrics
	}
	now.Since, now.Answered = before.Since, a.ever || err == nil
	if now.State != before.State {
		now.Since = time.Now().UTC()
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

// setFilesystems keeps the guest's filesystems that report a size, at
// most maxFilesystems, their names clipped.
func (a *guestAgent) setFilesystems(fs []qga.Filesystem) {
	var keep []qga.Filesystem
	for _, f := range fs {
		if f.TotalBytes == nil || f.UsedBytes == nil || len(keep) == maxFilesystems {
			continue
		}
		f.Mountpoint, f.Type = clip(f.Mountpoint, 128), clip(f.Type, 32)
		keep = append(keep, f)
	}
	a.seenMu.Lock()
	a.fs = keep
	a.seenMu.Unlock()
}

// filesystems are the guest's filesystems as last polled.
func (a *guestAgent) filesystems() []qga.Filesystem {
	a.seenMu.Lock()
	defer a.seenMu.Unlock()
	return a.fs
}

// answering says whether the agent answered the last poll.
func (a *guestAgent) answering() bool { return a.last().State == status.AgentAnswering }

// shutdown asks the guest, through its agent, to power off.
func (a *guestAgent) shutdown(ctx context.Context) error {
	return a.do(ctx, func(ctx context.Context, c *qga.Client, _ bool) error { return c.Shutdown(ctx) })
}

// setClock sets the guest's clock to the host's through the agent, in the
// background: after a pause the guest's clock is behind by as long as the
// pause lasted. A guest whose agent does not answer is left alone.
func (a *guestAgent) setClock(why string) {
	if a == nil || !a.answering() {
		return
	}
	a.bg.Go(func() {
		err := a.do(a.ctx, func(ctx context.Context, c *qga.Client, _ bool) error { return c.SetTime(ctx, time.Now()) })
		switch {
		case a.ctx.Err() != nil:
		case err != nil:
			a.log.Warn("the guest's clock was not set through its agent", "after", why, "err", err)
		default:
			a.log.Info("the guest's clock set through its agent", "after", why)
		}
	})
}

// freeze freezes the guest's filesystems (guest-fsfreeze-freeze), for at
// most hold: the guest is thawed when thaw is called, at the latest when
// hold ends, and when the runner's watch stops; a freeze that fails is
// thawed at once (the agent may have frozen some filesystems before its
// error). It returns how many filesystems were frozen. A runner that
// crashes takes QEMU with it (it is the container's PID 1): no guest
// outlives its runner frozen.
func (a *guestAgent) freeze(ctx context.Context, hold time.Duration) (thaw func() error, n int, err error) {
	a.frozenMu.Lock()
	busy := a.frozen != nil
	a.frozenMu.Unlock()
	if busy {
		return nil, 0, errors.New("the guest's filesystems are frozen already")
	}
	err = a.do(ctx, func(ctx context.Context, c *qga.Client, _ bool) error {
		var err error
		n, err = c.Freeze(ctx)
		return err
	})
	if err != nil {
		a.thawNow(context.Background(), agentThawTries, "the freeze failed")
		return nil, 0, err
	}
	a.frozenMu.Lock()
	a.frozen = time.AfterFunc(hold, func() { a.thawNow(context.Background(), agentThawTries, "its hard deadline "+hold.String()+" passed") })
	a.frozenMu.Unlock()
	a.log.Info("the guest's filesystems frozen through its agent", "filesystems", n, "thaw_by", hold.String())
	return func() error { return a.thawNow(context.Background(), agentThawTries, "") }, n, nil
}

// thawNow thaws the guest's filesystems, trying up to tries times within
// ctx, each within agentCall: a guest left frozen stalls every write its
// applications make.
func (a *guestAgent) thawNow(ctx context.Context, tries int, why string) error {
	a.frozenMu.Lock()
	if a.frozen != nil {
		a.frozen.Stop()
		a.frozen = nil
	}
	a.frozenMu.Unlock()
	var err error
	for try := 1; try <= tries && ctx.Err() == nil; try++ {
		tctx, cancel := context.WithTimeout(ctx, agentCall)
		var n int
		err = a.do(tctx, func(ctx context.Context, c *qga.Client, _ bool) error {
			var err error
			n, err = c.Thaw(ctx)
			return err
		})
		cancel()
		if err == nil {
			if why == "" {
				a.log.Info("the guest's filesystems thawed", "filesystems", n)
			} else {
				a.log.Warn("the guest's filesystems thawed: "+why, "filesystems", n)
			}
			return nil
		}
	}
	a.log.Error("the guest's filesystems could not be thawed through its agent; the guest may stall on its writes", "why", why, "err", err)
	return err
}

// thawIfFrozen thaws a guest still frozen, once, within ctx (the VM or
// the runner stops: a frozen guest cannot shut down cleanly).
func (a *guestAgent) thawIfFrozen(ctx context.Context, why string) {
	if a == nil {
		return
	}
	a.frozenMu.Lock()
	frozen := a.frozen != nil
	a.frozenMu.Unlock()
	if frozen {
		a.thawNow(ctx, 1, why)
	}
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
	ctx, cancel := context.WithTimeout(context.Background(), agentCall)
	a.thawIfFrozen(ctx, "the runner stops")
	cancel()
	a.cancel()
	<-a.done
	a.bg.Wait()
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
