package runner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/migrate"
	"github.com/swarmvm/swarmvm/internal/status"
)

// A hand-off is a live migration on one node, from the VM's running task
// to the next one. Swarm replaces a task when its service is updated (a
// new runner image, a changed definition); with the update order
// start-first, the new task starts while the old one still runs. Its
// runner finds the VM's control socket answering on the node, starts QEMU
// waiting for an incoming migration (-incoming defer) over the same disk
// and NVRAM, makes a socket pair, gives one end to its QEMU and sends the
// other to the running runner (control op migrate), whose QEMU migrates
// the guest into it. Nothing listens on a port; both runners are the VM's
// uid. The disk is never open for writing in two QEMUs: the incoming QEMU
// opens it inactive and takes it over at the switch-over, when the source
// QEMU has stopped the guest and flushed the disk. The new task is healthy
// only once its QEMU runs the guest, so Swarm stops the old task only then;
// its runner quits its QEMU (paused after the migration) without touching
// the guest or the disk. A failed or cancelled migration leaves the guest
// running where it was, and the new task exits.
const (
	// handoffLimit is how long a hand-off may take before it is cancelled:
	// within the health check's start period (60 s) and its retries, after
	// which Swarm would count the new task unhealthy.
	handoffLimit = 75 * time.Second
	// handoffDowntime is the longest the guest may be paused at the
	// switch-over: QEMU's default target, set explicitly.
	handoffDowntime = 300 * time.Millisecond
	// handoffBandwidth: the migration runs on one node, over a socket
	// pair; QEMU's default bandwidth cap (128 MiB/s) would only slow it.
	handoffBandwidth = 8 << 30
	handoffPoll      = 100 * time.Millisecond
	handoffSay       = 5 * time.Second
	migrationFD      = "swarmvm-migration"
)

// handingOver says whether this start takes the running guest over from
// the VM's task before it on this node: its runner answers on the
// control socket. A VM with a TPM is not handed over (swtpm's state would
// have to move with it): it starts as before, after the other task ends.
func handingOver(cfg config.Config, log *slog.Logger) bool {
	path := control.Path(cfg.StorageDir, cfg.Name)
	// On local storage the socket is this node's: its runner is on this
	// node. A shared folder's socket may be another node's, whose runner a
	// unix socket cannot reach there (a migration's ticket says when one
	// hands its guest here).
	if cfg.StorageMode != config.StorageLocal || !control.Answers(path) {
		return false
	}
	if cfg.TPM {
		log.Warn("the VM runs in another task on this node; a VM with a TPM is not handed over, so this task starts it when that one has stopped", "control", path)
		return false
	}
	log.Info("the VM runs in another task on this node: this task takes its guest over by a live migration on the node, instead of booting it again", status.Key, status.HandoffBegan, "control", path)
	return true
}

// incomingTicket is the VM's migration ticket for this node, when another
// node's task sends its running guest here (migrate.Ticket).
func incomingTicket(cfg config.Config, log *slog.Logger) *migrate.Ticket {
	if cfg.NodeID == "" || cfg.StorageMode != config.StorageShared {
		return nil
	}
	t, ok := migrate.ReadTicket(cfg.StorageDir, cfg.Name, cfg.NodeID, time.Now())
	if !ok {
		return nil
	}
	log.Info("the VM runs on another node and is migrating here: this task takes its guest over instead of booting it", status.Key, status.HandoffBegan, "migration", t.ID, "until", t.Until.UTC().Format(time.RFC3339))
	return &t
}

// migrationStats is query-migrate's answer, what the hand-off reports of it.
type migrationStats struct {
	Status           string `json:"status"`
	TotalTime        int64  `json:"total-time"`
	Downtime         int64  `json:"downtime"`
	ExpectedDowntime int64  `json:"expected-downtime"`
	ErrorDesc        string `json:"error-desc"`
	RAM              struct {
		Transferred int64   `json:"transferred"`
		Remaining   int64   `json:"remaining"`
		Total       int64   `json:"total"`
		MBps        float64 `json:"mbps"`
	} `json:"ram"`
}

// answer is the sending runner's reply to a migration.
type answer struct {
	r   control.Reply
	err error
}

// takeOver receives the guest into this runner's QEMU (started with
// -incoming defer), from the VM's running task on this node (a hand-off)
// or, with a ticket, from another node's. It returns once QEMU runs the
// guest, or with why it does not.
func (v *vm) takeOver(ctx context.Context) error {
	began := time.Now()
	until := began.Add(handoffLimit)
	if v.ticket != nil && v.ticket.Until.Before(until) {
		until = v.ticket.Until
	}
	actx, stop := context.WithDeadline(ctx, until.Add(qmpCall))
	defer stop()
	asked := make(chan answer, 1)
	var in, out *os.File
	if v.ticket != nil {
		// From another node: the receiving job brings the stream and, at
		// its end, the sender's word (migrate.Receive).
		var err error
		if in, err = v.awaitStream(actx, asked); err != nil {
			return err
		}
	} else {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return exitf(status.ExitStart, "hand-off: socket pair: %v", err)
		}
		in, out = os.NewFile(uintptr(fds[0]), "migration-in"), os.NewFile(uintptr(fds[1]), "migration-out")
		defer out.Close()
	}
	defer in.Close()
	qctx, cancel := context.WithTimeout(ctx, qmpCall)
	// late-block-activate: QEMU takes the disk (its image locks) only at
	// the cont below, once the sender has released its own.
	err := v.qmp.Execute(qctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{
		{"capability": "events", "state": true}, {"capability": "late-block-activate", "state": true}}}, nil)
	if err == nil {
		err = v.qmp.GetFD(qctx, migrationFD, in)
	}
	if err == nil {
		err = v.qmp.Execute(qctx, "migrate-incoming", map[string]any{"uri": "fd:" + migrationFD}, nil)
	}
	cancel()
	if err != nil {
		return startFailed(ctx, "hand-off: the incoming migration", err)
	}
	in.Close() // QEMU has its own
	if out != nil {
		id := fmt.Sprintf("handoff-%d", began.UnixNano())
		go func() {
			r, err := control.Ask(actx, control.Path(v.cfg.StorageDir, v.cfg.Name),
				control.Request{Op: control.OpMigrate, ID: id, Files: []string{control.FileMigration}, Until: until}, out)
			asked <- answer{r, err}
		}()
	}
	from := "the VM's task before, on this node (a hand-off)"
	if v.ticket != nil {
		from = "the VM's task on another node (migration " + v.ticket.ID + ")"
	}
	var reply *control.Reply
	completed := false
	for !completed || reply == nil {
		// The guest is here once both say so: QEMU (the stream ended) and
		// the sender (its QEMU let go of the disk).
		select {
		case a := <-asked:
			asked = nil
			if a.err != nil {
				return exitf(status.ExitStart, "hand-off: %s did not send the guest: %v — it runs on there; this task ends", from, a.err)
			}
			reply = &a.r
		case ev, ok := <-v.events:
			if !ok {
				return exitf(status.ExitStart, "hand-off: QMP closed: %v", v.qmp.Err())
			}
			if ev.Name != "MIGRATION" {
				continue
			}
			var m struct{ Status string }
			json.Unmarshal(ev.Data, &m)
			switch m.Status {
			case "completed":
				completed = true
			case "failed", "cancelled":
				return exitf(status.ExitStart, "hand-off: the incoming migration %s — the guest runs on in %s; this task ends", m.Status, from)
			}
		case <-v.exited:
			return exitf(status.ExitStart, "hand-off: QEMU exited while receiving the guest (%s): %s", v.exitDescription(), v.stderr)
		case <-ctx.Done():
			return errCancelled
		}
	}
	qctx, cancel = context.WithTimeout(ctx, qmpCall)
	err = v.qmp.Cont(qctx)
	cancel()
	if err != nil {
		return exitf(status.ExitStart, "hand-off: the guest arrived but could not be started here (cont: %v) — the VM's task before has let go of it; Swarm starts the VM again from its disk", err)
	}
	v.log.Info("took the running guest over from "+from, status.Key, status.HandoffDone,
		"downtime_ms", reply.Downtime.Milliseconds(), "migration_ms", reply.TotalTime.Milliseconds(), "transferred_mib", reply.Transferred>>20,
		"wall_ms", time.Since(began).Milliseconds())
	return nil
}

// awaitStream serves the socket a migration from another node comes in
// on (migrate.InPath) for the receiving job (the VM's uid or root): its
// first request (migrate-in) brings the stream's descriptor, which it
// returns, for QEMU; its second (migrate-done) says how the sender's side
// ended, which goes to asked.
func (v *vm) awaitStream(ctx context.Context, asked chan<- answer) (*os.File, error) {
	path := migrate.InPath(v.cfg.StorageDir, v.cfg.Name)
	os.Remove(path)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, exitf(status.ExitStart, "migration: the socket for the receiving job: %v", err)
	}
	os.Chmod(path, 0o600)
	s := &controlServer{l: l, v: v, log: v.log}
	stop := context.AfterFunc(ctx, func() { l.Close() })
	end := func() {
		stop()
		l.Close()
		os.Remove(path)
	}
	// next takes the next request that is want, answered at once; others
	// (a probe that only connects, anything else) are refused and skipped.
	next := func(want string) (control.Request, *os.File, error) {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return control.Request{}, nil, err
			}
			req, named, files, err := s.read(c)
			if err == nil && req.Op != want {
				err = fmt.Errorf("op %s where %s was due", req.Op, want)
			}
			if err != nil {
				fdpass.Close(files)
				s.reply(c, control.Reply{Error: err.Error()})
				c.Close()
				continue
			}
			s.reply(c, control.Reply{OK: true})
			c.Close()
			return req, named[control.FileMigration], nil
		}
	}
	req, stream, err := next(control.OpMigrateIn)
	if err != nil {
		end()
		if ctx.Err() != nil {
			err = fmt.Errorf("no receiving job came (%w)", ctx.Err())
		}
		return nil, exitf(status.ExitStart, "migration: %v — the VM runs on where it was; this task ends", err)
	}
	v.log.Info("the receiving job brings the guest's stream", "migration", req.ID)
	go func() {
		defer end()
		req, _, err := next(control.OpMigrateDone)
		switch {
		case err != nil:
			asked <- answer{err: fmt.Errorf("the receiving job: %w", err)}
		case !req.Sent.OK:
			asked <- answer{err: errors.New(req.Sent.Error)}
		default:
			asked <- answer{r: control.Reply{Downtime: req.Sent.Downtime, TotalTime: req.Sent.TotalTime, Transferred: req.Sent.Transferred}}
		}
	}()
	return stream, nil
}

// migrate sends the running guest into f, a socket whose other end the
// VM's next task's QEMU reads (a hand-off), and returns QEMU's figures
// once the next QEMU has it; this QEMU is then paused for good, and the
// runner quits it when Swarm stops this task. It is cancelled at
// req.Until, or when the asker goes away: the guest then runs on here.
func (s *controlServer) migrate(ctx context.Context, req control.Request, f *os.File) (control.Reply, error) {
	v := s.v
	if v.cfg.TPM {
		return control.Reply{}, errors.New("a VM with a TPM is not handed over (its TPM's state would have to move with it): stop this task first")
	}
	log := s.log.With("migration", req.ID)
	began := time.Now()
	qctx, cancel := context.WithTimeout(ctx, qmpCall)
	err := v.qmp.Execute(qctx, "migrate-set-parameters", map[string]any{"downtime-limit": handoffDowntime.Milliseconds(), "max-bandwidth": int64(handoffBandwidth)}, nil)
	if err == nil {
		err = v.qmp.GetFD(qctx, migrationFD, f)
	}
	if err == nil {
		err = v.qmp.Execute(qctx, "migrate", map[string]any{"uri": "fd:" + migrationFD}, nil)
	}
	cancel()
	if err != nil {
		return control.Reply{}, fmt.Errorf("starting the migration: %w", err)
	}
	log.Info("handing the guest over to the VM's next task on this node (a live migration)", status.Key, status.HandoffBegan)
	dctx, stop := context.WithDeadline(ctx, req.Until)
	defer stop()
	tick := time.NewTicker(handoffPoll)
	defer tick.Stop()
	said := time.Now()
	for {
		var m migrationStats
		qctx, cancel := context.WithTimeout(context.Background(), qmpCall)
		err := v.qmp.Execute(qctx, "query-migrate", map[string]any{}, &m)
		cancel()
		if err != nil {
			return control.Reply{}, fmt.Errorf("query-migrate: %w", err)
		}
		switch m.Status {
		case "completed":
			r := control.Reply{Downtime: time.Duration(m.Downtime) * time.Millisecond, TotalTime: time.Duration(m.TotalTime) * time.Millisecond, Transferred: m.RAM.Transferred}
			log.Info("guest handed over: it runs in the VM's next task; this QEMU stays paused until Swarm stops this task", status.Key, status.HandoffDone,
				"downtime_ms", m.Downtime, "migration_ms", m.TotalTime, "transferred_mib", m.RAM.Transferred>>20)
			v.releaseImageLocks(log)
			v.handOver()
			return r, nil
		case "failed", "cancelled":
			log.Warn("the hand-off failed; the guest runs on here", status.Key, status.HandoffFailed, status.AttrErr, m.ErrorDesc, "status", m.Status)
			return control.Reply{}, fmt.Errorf("the migration %s: %s", m.Status, m.ErrorDesc)
		}
		if time.Since(said) >= handoffSay {
			said = time.Now()
			log.Info("handing over", "status", m.Status, "ram_remaining_mib", m.RAM.Remaining>>20, "mbps", m.RAM.MBps, "expected_downtime_ms", m.ExpectedDowntime)
		}
		select {
		case <-tick.C:
		case <-dctx.Done():
			why := "its deadline passed"
			if ctx.Err() != nil {
				why = "the next task went away"
			}
			qctx, cancel := context.WithTimeout(context.Background(), qmpCall)
			v.qmp.Execute(qctx, "migrate_cancel", map[string]any{}, nil)
			cancel()
			log.Warn("the hand-off was cancelled; the guest runs on here", status.Key, status.HandoffFailed, status.AttrWhy, why, "took", time.Since(began).Round(time.Millisecond).String())
			return control.Reply{}, fmt.Errorf("the migration was cancelled: %s", why)
		}
	}
}

// releaseImageLocks drops the image locks this QEMU still holds, once it
// has inactivated its disk and NVRAM at the switch-over. QEMU locks an
// image with open file description (OFD) locks, and when it gives up the
// image it closes its own descriptor, trusting that to release them; but
// it opened the image through an fdset, whose descriptors (and the
// runner's copies) share the description, which keeps the locks. The next
// task's QEMU could then not take the disk. The locks belong to the
// description, so the runner's copy releases them all.
func (v *vm) releaseImageLocks(log *slog.Logger) {
	for _, f := range v.images {
		lk := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: 0, Len: 0}
		if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
			log.Warn("an image lock of this QEMU could not be released; the next task may not take the disk", "file", f.Name(), "err", err)
		}
	}
}

// handOver marks the guest as gone to the next task: the runner takes no
// more requests and, when told to stop, quits its QEMU (paused since the
// switch-over) instead of shutting the guest down.
func (v *vm) handOver() {
	v.handedMu.Lock()
	defer v.handedMu.Unlock()
	select {
	case <-v.handed:
	default:
		close(v.handed)
	}
}

// handedOver says whether the guest went to the next task.
func (v *vm) handedOver() bool {
	select {
	case <-v.handed:
		return true
	default:
		return false
	}
}
