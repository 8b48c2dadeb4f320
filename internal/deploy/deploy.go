// Package deploy runs a deployment of VMs on a Swarm: for each VM its
// home, its secrets and its service, then the wait for its task and the
// audit of what runs. The definitions and their rendering stay pure
// (internal/swarm); this is the one path that acts on them, which the CLI
// calls.
//
// The services are made one after another, each VM's home picked with
// the earlier ones already placed; then every VM is waited for and
// audited at once, each one's report kept apart from the others'.
package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

// Options are a deployment's settings.
type Options struct {
	// Wait is how long each VM's task may take to run before it is
	// audited; 0 deploys without waiting.
	Wait time.Duration
	// KVMWait is how long, once the task runs, the runner may take to log
	// its KVM verdict.
	KVMWait time.Duration
	// ConsoleKeys is the folder of the console keys deploy makes for VMs
	// with a console (swarmvm console signs its tickets with them).
	ConsoleKeys string
}

// Run deploys the VMs. Each VM's lines go to out prefixed with its name:
// those of making its service at once; those of its wait and audit as one
// block when it is done (as they come, when there is one VM). The error
// joins each failed VM's, named.
func Run(ctx context.Context, c *swarm.Client, rs []swarm.Resolved, o Options, out io.Writer) error {
	reports := make([]*report, len(rs))
	var made sync.WaitGroup
	shared := &lockedWriter{w: out}
	for i, r := range rs {
		rep := &report{name: r.Name, out: shared, live: len(rs) == 1}
		reports[i] = rep
		res, err := create(ctx, c, &r, o, rep) // r settled: its home, its CPUs
		if err != nil {
			rep.err = err
			continue
		}
		if o.Wait <= 0 {
			continue
		}
		made.Go(func() {
			rep.err = settle(ctx, c, r, res, o, rep)
			rep.flush()
		})
	}
	made.Wait()
	var errs []error
	for _, rep := range reports {
		if rep.err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", rep.name, rep.err))
		}
	}
	return errors.Join(errs...)
}

// create settles the VM's home (into r), makes its console key and
// secrets, and creates or updates its service.
func create(ctx context.Context, c *swarm.Client, r *swarm.Resolved, o Options, rep *report) (swarm.DeployResult, error) {
	rep.now = true
	defer func() { rep.now = false }()
	home, err := c.SettleHome(ctx, r)
	if err != nil {
		return swarm.DeployResult{}, err
	}
	if home.ID != "" {
		rep.printf("home node %s (%s): local storage, the VM runs there only", home.Hostname, home.ID)
	}
	if r.StorageMode == config.StorageShared {
		if only := soleManager(ctx, c); only != "" {
			rep.printf("note: this swarm has one manager, %s: while it is lost, Swarm restarts no VM anywhere (it needs its managers' quorum), and a shared VM running on it stays down until it is back — --constraint node.role==worker keeps VMs off it; three managers keep the swarm deciding with one lost", only)
		}
	}
	var key []byte
	if r.Keyed() {
		keys := console.Keys{Dir: o.ConsoleKeys}
		k, made, err := keys.Ensure(r.Name)
		if err != nil {
			return swarm.DeployResult{}, fmt.Errorf("console key: %w", err)
		}
		if made {
			rep.printf("console key made in %s (swarmvm console signs its tickets with it)", keys.Path(r.Name))
		}
		key, r.ConsoleSecret = k, console.SecretName(r.Name, k)
	}
	if err := c.EnsureSecrets(ctx, *r, key); err != nil {
		return swarm.DeployResult{}, err
	}
	res, err := c.Deploy(ctx, *r)
	if err != nil {
		return res, err
	}
	keep := []string{r.ConsoleSecret}
	for _, f := range r.Seed {
		keep = append(keep, f.Secret)
	}
	c.PruneSecrets(ctx, r.Name, keep...)
	verb := "updated"
	if res.Created {
		verb = "created"
	}
	rep.printf("service %s %s (Engine API %s)", res.ServiceID[:12], verb, c.APIVersion())
	if res.HandOff {
		rep.printf("only the runner's image changed: the running guest is handed over to the new task, live (start-first)")
	}
	for _, f := range res.Dropped {
		rep.printf("WARNING: the daemon (API %s) dropped %s from the service spec", c.APIVersion(), f)
	}
	return res, nil
}

// soleManager is the hostname of the swarm's only manager, or "" when it
// has more (or they cannot be listed).
func soleManager(ctx context.Context, c *swarm.Client) string {
	rooms, err := c.Rooms(ctx)
	if err != nil {
		return ""
	}
	var managers []string
	for _, n := range rooms {
		if n.Role == "manager" {
			managers = append(managers, n.Hostname)
		}
	}
	if len(managers) != 1 {
		return ""
	}
	return managers[0]
}

// settle waits for the VM's task to run, then audits it: its privileges
// as the node shows them, and the runner's word on the accelerator.
func settle(ctx context.Context, c *swarm.Client, r swarm.Resolved, res swarm.DeployResult, o Options, rep *report) error {
	if res.FirstCheck > 0 {
		rep.printf("engine API %s keeps no health start interval (API 1.44 does): the task shows starting until its first health check, %s after the container starts", c.APIVersion(), res.FirstCheck)
	}
	wctx, cancel := context.WithTimeout(ctx, o.Wait)
	defer cancel()
	task, err := c.WaitRunning(wctx, res.ServiceID, res.Since, rep)
	if err != nil {
		if why, _ := c.HomeState(ctx, r); why != "" {
			return fmt.Errorf("%w — %s", err, why)
		}
		if task != nil && strings.Contains(task.Status.Err, "no suitable node") {
			return fmt.Errorf("%w — label a VM-capable node: swarmvm node label <node>", err)
		}
		return err
	}
	audit, err := c.Report(ctx, res.ServiceID, task, res.CapAdd, o.KVMWait)
	remote := errors.Is(err, swarm.ErrRemote)
	if err != nil && !remote {
		return err
	}
	rep.printf("running on node %s", audit.Node)
	if remote {
		rep.printf("privilege audit: %v", err)
	} else if err := PrintAudit(rep, audit); err != nil {
		return err
	}
	rep.printf("accelerator: %s", audit.Accel)
	if r.Accel == config.AccelKVM && audit.Accel != swarm.AccelKVM {
		return fmt.Errorf("the runner did not report KVM verified: docker service logs %s", r.Name)
	}
	return nil
}

// PrintAudit writes a running task's privilege audit to w and fails on
// drift.
func PrintAudit(w io.Writer, rep swarm.Report) error {
	fmt.Fprintln(w, "privilege audit of the running task:")
	for _, ch := range rep.Checks {
		fmt.Fprintf(w, "  %s\n", ch)
	}
	if drift := rep.Drift(); len(drift) > 0 {
		return fmt.Errorf("%d audited properties drifted from the spec", len(drift))
	}
	return nil
}

// report is one VM's lines: written through at once (now, or live for a
// VM deployed alone), else kept until flush, so that VMs waited for
// together do not interleave their lines.
type report struct {
	name      string
	out       *lockedWriter // shared by the VMs' reports
	live, now bool
	buf       bytes.Buffer
	err       error
	mu        sync.Mutex
}

// lockedWriter writes each block whole, whoever else writes.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func (r *report) printf(format string, args ...any) {
	fmt.Fprintf(r, format+"\n", args...)
}

// Write takes whole lines (what WaitRunning and printf write) and
// prefixes each with the VM's name.
func (r *report) Write(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var p bytes.Buffer
	for line := range strings.Lines(string(b)) {
		p.WriteString(r.name + ": " + line)
	}
	if r.live || r.now {
		_, err := r.out.Write(p.Bytes())
		return len(b), err
	}
	r.buf.Write(p.Bytes())
	return len(b), nil
}

// flush writes what was kept, as one block.
func (r *report) flush() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.out.Write(r.buf.Bytes())
	r.buf.Reset()
}
