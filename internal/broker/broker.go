// Package broker is the host daemon that opens what a VM container may not:
// the KVM device, a TAP on a host bridge, vhost-net. It hands the
// descriptors to the runner over a unix socket (SCM_RIGHTS), so that the
// container holds no device node, no capability and no root.
//
// The broker is the one trust boundary and fails closed: a peer it does not
// know (SO_PEERCRED), a request that is late, malformed, oversized, of
// another version, or that carries descriptors, gets a refusal with the
// reason and one audit line, and nothing is opened for it. Every grant is
// audited too. A grant's connection is its lease: when it closes, the TAP
// made for it is removed.
package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/poll"
)

// Config is the broker's policy and limits.
type Config struct {
	Socket         string      // unix socket path
	SocketMode     os.FileMode // permission bits of the socket
	SocketGroup    int         // group of the socket; -1 keeps the broker's
	AllowUIDs      []int       // peers allowed by uid ...
	AllowGIDs      []int       // ... or by gid
	KVMDevice      string
	VhostNet       string
	Bridges        []string // bridges a TAP may be attached to: NAME, or NAME@UID or NAME@FIRST-LAST (ParseBridges)
	TAPPrefix      string
	MaxConns       int           // connections at once, leases included
	MaxPerPeer     int           // connections at once from one peer process
	MaxPerUID      int           // connections at once from one uid, whatever its processes
	RequestTimeout time.Duration // a peer must send its request within this
	// ChangedTAPWait is how long a uid waits for its next TAP after the
	// broker ended one of its leases for a changed TAP (MAC, owner,
	// persistence): ending leases costs the node, and leases are cheap.
	ChangedTAPWait time.Duration
	// ProbeKVM proves the device works before each grant; nil is
	// kvmdev.Probe. Tests of the runner's KVM path on hosts without KVM
	// set a stand-in's (internal/kvmtest); the command never does.
	ProbeKVM func(*os.File) error
}

// DefaultConfig is the broker's policy out of the box: the runner image's
// user and group may connect (every VM service runs in group 10001, each
// under its own uid), KVM is granted, no bridge is allowed until named.
func DefaultConfig() Config {
	return Config{
		Socket: config.DefaultBrokerSocket, SocketMode: 0o660, SocketGroup: config.RunnerGID,
		AllowUIDs: []int{config.RunnerUID}, AllowGIDs: []int{config.RunnerGID}, KVMDevice: "/dev/kvm", VhostNet: "/dev/vhost-net",
		TAPPrefix: "svm", MaxConns: 256, MaxPerPeer: 4, MaxPerUID: 32, RequestTimeout: 5 * time.Second, ChangedTAPWait: time.Minute,
	}
}

// refusalSlots are the connections beyond MaxConns the broker holds at
// once, only to turn them away.
const refusalSlots = 32

// Broker serves requests on a listener.
type Broker struct {
	cfg   Config
	audit *slog.Logger
	log   *slog.Logger
	net   network
	// openKVM opens the KVM device for a grant (a stand-in in the tests of
	// how peers are handled, which must run on hosts without KVM).
	openKVM func(path string) (*os.File, error)

	mu      sync.Mutex
	conns   int
	perPeer map[int]int
	perUID  map[int]int
	quiet   map[quietKey]quietState // refusals audited per uid, a few a second
	pidZero bool                    // warned that peers' pids are not visible
	// macOwner holds, for each MAC with a TAP lease, the uid leasing it and
	// how many such leases it has. A VM's MAC is bound to its uid
	// (config.MAC), so a uid that asks for another's VM name gets a MAC of
	// its own; this keeps a MAC to one uid at a time even so.
	macOwner map[string]macLease
	bridges  bridgePolicy
	watches  map[int]*tapWatch // leased TAPs by interface index
	// waits holds, for a uid whose lease the broker ended for a changed
	// TAP, until when it gets no TAP, and why.
	waits map[int]changedTAP
	wg    sync.WaitGroup
	held  atomic.Int64 // connections accepted and not yet let go
}

type macLease struct{ uid, n int }

// New makes a broker. audit receives one record per grant or refusal; log
// receives operational messages.
func New(cfg Config, audit, log *slog.Logger) *Broker {
	bridges, err := ParseBridges(cfg.Bridges)
	if err != nil {
		log.Error("bridges", "err", err)
		bridges = bridgePolicy{} // fail closed: no TAPs
	}
	return &Broker{bridges: bridges, watches: map[int]*tapWatch{}, waits: map[int]changedTAP{}, cfg: cfg, audit: audit, log: log, net: netlinkNetwork{prefix: cfg.TAPPrefix}, openKVM: kvmOpener(cfg.ProbeKVM), perPeer: map[int]int{}, perUID: map[int]int{}, quiet: map[quietKey]quietState{}, macOwner: map[string]macLease{}}
}

// Serve accepts connections until ctx ends, then closes the listener and
// waits for requests in flight. Leases that are still open end with the
// broker's process; the descriptors they granted stay with their VMs.
func (b *Broker) Serve(ctx context.Context, l *net.UnixListener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	if err := b.watchTAPs(ctx); err != nil {
		return fmt.Errorf("watching links: %w", err)
	}
	// Connections held at once are bounded: the limit, plus a few slots for
	// turning away what is over it. Beyond that the broker stops accepting
	// and the kernel's listen backlog absorbs a flood, holding none of the
	// broker's descriptors.
	slots := make(chan struct{}, b.cfg.MaxConns+refusalSlots)
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		c, err := l.AcceptUnix()
		if err != nil {
			<-slots
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			b.log.Warn("accept", "err", err)
			poll.Sleep(ctx, 50*time.Millisecond) // a full descriptor table, say
			continue
		}
		b.wg.Add(1)
		b.held.Add(1)
		go func() {
			defer func() { b.held.Add(-1); <-slots; b.wg.Done() }()
			b.handle(ctx, c)
		}()
	}
}

// Conns is the number of connections the broker holds that were admitted:
// requests in flight and leases.
func (b *Broker) Conns() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conns
}

// Held is the number of connections the broker holds at once: admitted,
// and being turned away. Serve keeps it at most MaxConns + refusalSlots.
func (b *Broker) Held() int { return int(b.held.Load()) }

// Wait blocks until every connection handler has returned.
func (b *Broker) Wait() { b.wg.Wait() }

// handle runs one connection: admit, read the request, grant, hold the
// lease until the peer closes.
func (b *Broker) handle(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	peer, err := fdpass.Peer(c)
	if err != nil {
		b.refuse(c, peer, "", "peer credentials: "+err.Error(), auditBad)
		return
	}
	if reason := b.admit(peer); reason != "" {
		b.refuseOverLimit(c, peer, reason)
		return
	}
	defer b.release(peer)
	if !b.allowed(peer) {
		b.refuse(c, peer, "", fmt.Sprintf("peer uid %d gid %d is not allowed", peer.UID, peer.GID), auditPolicy)
		return
	}
	req, reason := b.readRequest(c)
	if reason != "" {
		b.refuse(c, peer, req.VM, reason, auditBad)
		return
	}
	g, err := b.grant(peer, req)
	if err != nil {
		b.refuse(c, peer, req.VM, err.Error(), auditPolicy)
		return
	}
	// Watched before the peer has the descriptor: whatever it does with
	// it is seen.
	if g.tapIndex != 0 {
		b.watch(g, peer.UID, func() { c.SetReadDeadline(time.Unix(1, 0)) })
		defer b.unwatch(g.tapIndex)
	}
	if err := b.send(c, g); err != nil {
		b.releaseGrant(g)
		b.record(peer, req.VM, g.what(), "error", "sending the grant: "+err.Error())
		return
	}
	b.quietly(peer, auditGrant, func(left string) { b.record(peer, req.VM, g.what(), "granted", g.summary()+left) })
	b.holdLease(ctx, c, peer, req.VM, g)
}

// admit counts a connection against the limits: in all, per uid (so that
// one tenant's processes cannot take every slot from the others), and per
// process. A peer whose pid the broker cannot see (pid 0: another pid
// namespace, a broker without --pid host) is held to its uid's limit only;
// counting all such peers as one process would fit four VMs on a node.
func (b *Broker) admit(peer fdpass.PeerCred) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if peer.PID == 0 && !b.pidZero {
		b.pidZero = true
		b.log.Warn("a peer's pid is not visible (pid 0: the broker runs in another pid namespace; run it with --pid host or as a systemd unit): per-process limits do not apply to such peers, per-uid limits do")
	}
	switch {
	case b.conns >= b.cfg.MaxConns:
		return fmt.Sprintf("too many connections (limit %d)", b.cfg.MaxConns)
	case b.perUID[peer.UID] >= b.cfg.MaxPerUID:
		return fmt.Sprintf("too many connections from uid %d (limit %d)", peer.UID, b.cfg.MaxPerUID)
	case peer.PID != 0 && b.perPeer[peer.PID] >= b.cfg.MaxPerPeer:
		return fmt.Sprintf("too many connections from pid %d (limit %d)", peer.PID, b.cfg.MaxPerPeer)
	}
	b.conns++
	b.perUID[peer.UID]++
	b.perPeer[peer.PID]++
	return ""
}

func (b *Broker) release(peer fdpass.PeerCred) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.conns--
	if b.perPeer[peer.PID]--; b.perPeer[peer.PID] <= 0 {
		delete(b.perPeer, peer.PID)
	}
	if b.perUID[peer.UID]--; b.perUID[peer.UID] <= 0 {
		delete(b.perUID, peer.UID)
	}
}

func (b *Broker) allowed(p fdpass.PeerCred) bool {
	return slices.Contains(b.cfg.AllowUIDs, p.UID) || slices.Contains(b.cfg.AllowGIDs, p.GID)
}

// readRequest reads the one request within the deadline. Descriptors sent
// to the broker are closed on arrival and refused.
func (b *Broker) readRequest(c *net.UnixConn) (fdpass.Request, string) {
	c.SetReadDeadline(time.Now().Add(b.cfg.RequestTimeout))
	defer c.SetReadDeadline(time.Time{})
	msg, _, err := fdpass.Recv(c, 0)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fdpass.Request{}, fmt.Sprintf("no request within %s", b.cfg.RequestTimeout)
	case errors.Is(err, fdpass.ErrUnexpected), errors.Is(err, fdpass.ErrCtrunc):
		return fdpass.Request{}, "descriptors sent to the broker (closed unread)"
	case errors.Is(err, fdpass.ErrTooLarge):
		return fdpass.Request{}, fmt.Sprintf("request larger than %d bytes", fdpass.MaxMessage)
	case err != nil:
		return fdpass.Request{}, "reading the request: " + err.Error()
	}
	req, err := fdpass.DecodeRequest(msg)
	if err != nil {
		return req, err.Error()
	}
	return req, ""
}

func (b *Broker) send(c *net.UnixConn, g *grant) error {
	defer g.closeFiles()
	resp := fdpass.Response{Version: fdpass.Version, OK: true, FDs: g.names, TAP: g.tap, Notes: g.notes}
	msg, err := fdpass.Encode(resp)
	if err != nil {
		return err
	}
	c.SetWriteDeadline(time.Now().Add(b.cfg.RequestTimeout))
	defer c.SetWriteDeadline(time.Time{})
	return fdpass.Send(c, msg, g.files...)
}

func (b *Broker) refuse(c *net.UnixConn, peer fdpass.PeerCred, vm, reason string, class auditClass) {
	b.recordRefusal(peer, vm, reason, class)
	msg, err := fdpass.Encode(fdpass.Response{Version: fdpass.Version, Error: reason})
	if err != nil {
		return
	}
	c.SetWriteDeadline(time.Now().Add(time.Second))
	if fdpass.Send(c, msg) != nil {
		return
	}
	// A socket closed with unread data resets the connection, and the peer
	// would lose the reason; so wait briefly for its request (or its close)
	// and drop it, closing any descriptors it carried.
	c.SetReadDeadline(time.Now().Add(time.Second))
	fdpass.Recv(c, 0)
}

// refuseOverLimit turns away a connection over a limit quickly: a short
// wait for its request, so that a well-behaved peer reads the reason rather
// than a reset, but too short for a flood to pile up descriptors; and at
// most one audit line per peer process a second, with the count of those
// left out.
func (b *Broker) refuseOverLimit(c *net.UnixConn, peer fdpass.PeerCred, reason string) {
	if msg, err := fdpass.Encode(fdpass.Response{Version: fdpass.Version, Error: reason}); err == nil {
		c.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
		if fdpass.Send(c, msg) == nil {
			c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			fdpass.Recv(c, 0)
		}
	}
	b.recordRefusal(peer, "", reason, auditOverLimit)
}

// The audit lines one uid makes are bounded, each class on its own, so
// that a flood of one kind keeps no line of another out: a flood of bad
// requests writes a few lines a second, a flood of connections over a
// limit one; refusals by policy (a peer, bridge or TAP not allowed) and
// grants with their leases' ends have budgets of their own. Each line after
// some were left out says how many.
type auditClass int

const (
	auditBad       auditClass = iota // malformed, oversized, late, with descriptors
	auditOverLimit                   // connections over a limit
	auditPolicy                      // what the policy does not allow
	auditGrant                       // grants and the ends of their leases
)

// Lines a second per uid: refusals and grants, and refusals over a limit.
const (
	refusalsPerSecond = 20
	overLimitPerSec   = 1
)

var auditBudget = map[auditClass]int{auditBad: refusalsPerSecond, auditOverLimit: overLimitPerSec, auditPolicy: refusalsPerSecond, auditGrant: refusalsPerSecond}

type quietKey struct {
	uid   int
	class auditClass
}

type quietState struct {
	since      time.Time // the start of the current second's window
	logged     int
	suppressed int
}

// quietly calls write, with the note of how many lines were left out
// before it, unless the uid has had this class's lines for this second.
func (b *Broker) quietly(peer fdpass.PeerCred, class auditClass, write func(left string)) {
	key := quietKey{peer.UID, class}
	b.mu.Lock()
	now := time.Now()
	q := b.quiet[key]
	if now.Sub(q.since) >= time.Second {
		q.since, q.logged = now, 0
	}
	if q.logged >= auditBudget[class] {
		q.suppressed++
		b.quiet[key] = q
		b.mu.Unlock()
		return
	}
	q.logged++
	left := q.suppressed
	q.suppressed = 0
	b.quiet[key] = q
	if len(b.quiet) > 1024 { // forget old peers
		for k, old := range b.quiet {
			if now.Sub(old.since) > time.Minute {
				delete(b.quiet, k)
			}
		}
	}
	b.mu.Unlock()
	note := ""
	if left > 0 {
		what := map[auditClass]string{auditBad: "refusals", auditOverLimit: "refusals", auditPolicy: "refusals", auditGrant: "grants and lease ends"}[class]
		note = fmt.Sprintf(" (and %d more %s of uid %d before this, not logged one by one)", left, what, peer.UID)
	}
	write(note)
}

// recordRefusal audits a refusal within its class's budget.
func (b *Broker) recordRefusal(peer fdpass.PeerCred, vm, reason string, class auditClass) {
	b.quietly(peer, class, func(left string) { b.record(peer, vm, "", "refused", capped(reason, 512)+left) })
}

// holdLease waits for the peer to close the connection (or the broker to
// stop), then removes the TAP the grant made.
func (b *Broker) holdLease(ctx context.Context, c *net.UnixConn, peer fdpass.PeerCred, vm string, g *grant) {
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	var last time.Time
	for {
		msg, _, err := fdpass.Recv(c, 0) // descriptors a lease-holder sends are closed
		if err == nil {
			last = b.answerLease(c, g, msg, last)
			continue
		}
		if errors.Is(err, fdpass.ErrUnexpected) || errors.Is(err, fdpass.ErrCtrunc) || errors.Is(err, fdpass.ErrTooLarge) {
			continue
		}
		break
	}
	if ctx.Err() != nil {
		b.record(peer, vm, g.what(), "kept", "broker stopping; the VM keeps its descriptors")
		return
	}
	b.releaseGrant(g)
	summary := g.releaseSummary()
	if why := b.endedBy(g.tapIndex); why != "" {
		summary = why + "; " + summary
	}
	b.quietly(peer, auditGrant, func(left string) { b.record(peer, vm, g.what(), "lease-ended", summary+left) })
}

// leaseAnswerEvery spaces a lease's answers: a holder asking in a loop
// gets four a second, from its own connection's goroutine.
const leaseAnswerEvery = 250 * time.Millisecond

// answerLease answers a lease-holder's question (the counters of the TAP
// its lease made) no sooner than leaseAnswerEvery after the last answer,
// and returns when it answered. Nothing it asks is audited: it can only
// read its own lease.
func (b *Broker) answerLease(c *net.UnixConn, g *grant, msg []byte, last time.Time) time.Time {
	time.Sleep(time.Until(last.Add(leaseAnswerEvery)))
	var reply fdpass.LeaseReply
	if _, err := fdpass.DecodeLeaseRequest(msg); err != nil {
		reply.Error = err.Error()
	} else if st, err := tapStats(g.tapIndex); err != nil {
		reply.Error = err.Error()
	} else {
		reply.TAP = st
	}
	reply.Version = fdpass.Version
	if out, err := fdpass.Encode(reply); err == nil {
		fdpass.Send(c, out)
	}
	return time.Now()
}

// record writes one audit line. What a client sent (its VM name, a bridge
// name inside a reason) is capped, so that a line stays a line; the JSON
// handler escapes it.
func (b *Broker) record(peer fdpass.PeerCred, vm, what, result, detail string) {
	b.audit.Info("broker", "peer_uid", peer.UID, "peer_gid", peer.GID, "peer_pid", peer.PID,
		"vm", capped(vm, 64), "what", what, "result", result, "detail", capped(detail, 1024))
}

func capped(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return fmt.Sprintf("%s… (%d bytes)", strings.ToValidUTF8(s[:n], ""), len(s))
}
