// Package runner supervises one QEMU virtual machine as a container's
// entrypoint: validate the configuration, check the node, prepare the disk
// and firmware, start QEMU without privilege, verify KVM over QMP, wait, and
// stop it within a bounded budget. It is PID 1 in its container, so it also
// reaps every child. Each step is logged, so that `docker service logs`
// tells an operator what happened and why.
package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/migrate"
	"github.com/swarmvm/swarmvm/internal/status"
)

// HeapLimit is the runner's soft memory limit (GOMEMLIMIT sets another).
const HeapLimit = 48 << 20

// ExitError carries the exit code an error maps to.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string { return e.Err.Error() }
func (e *ExitError) Unwrap() error { return e.Err }

func exitf(code int, format string, args ...any) error {
	return &ExitError{Code: code, Err: fmt.Errorf(format, args...)}
}

// Code is the exit code for err: 0 for nil, the ExitError's code, else 1.
func Code(err error) int {
	var e *ExitError
	switch {
	case err == nil:
		return status.ExitOK
	case errors.As(err, &e):
		return e.Code
	}
	return status.ExitInternal
}

// Run runs the VM the configuration describes until it ends or ctx is
// cancelled (SIGTERM), then stops it. The error's Code is the process's
// exit code; a guest that powered off is a nil error.
func Run(ctx context.Context, cfg config.Config, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return &ExitError{Code: status.ExitConfig, Err: err}
	}
	if err := inheritNone(); err != nil {
		return exitf(status.ExitInternal, "descriptors: %w", err)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		// The runner is a few MiB; the limit makes the collector work
		// harder before it grows past this (a flood on its console port),
		// rather than the container's limit ending it and the VM with it.
		debug.SetMemoryLimit(HeapLimit)
	}
	log = log.With("vm", cfg.Name)
	// What is made is undone in reverse when the runner ends, within one
	// deadline: the stop's (vm.tailBy), or KillWait from an early end.
	var undo cleanups
	by := func() time.Time { return time.Now().Add(config.KillWait) }
	defer func() { undo.run(by()) }()
	var rec runs
	vm, err := run(ctx, cfg, log, &undo, &rec)
	// A guest handed over runs on in the next task, which records the
	// run's end and owns the disk.
	gone := vm != nil && vm.handedOver()
	if rec.Running && !gone {
		endRun(cfg, Code(err), log)
	}
	if vm != nil {
		tail := vm.tailBy()
		by = func() time.Time { return tail }
		if !gone {
			vm.checkAfterStop(tail.Add(-config.StopTail))
		}
	}
	return err
}

// run makes, starts and supervises the VM, registering in undo what it
// makes; it returns the VM once QEMU was started, and why the run ended.
// Once the storage is prepared, the start is counted in rec.
func run(ctx context.Context, cfg config.Config, log *slog.Logger, undo *cleanups, rec *runs) (*vm, error) {
	ph := newPhases(log)
	con, err := openConsole(cfg, log)
	if err != nil {
		return nil, err
	}
	undo.add(func(time.Time) { con.close() })
	met, err := openMetrics(cfg, log)
	if err != nil {
		return nil, err
	}
	undo.add(func(time.Time) { met.close() })
	kids := newChildren(log)
	handoff := handingOver(cfg, log)
	var ticket *migrate.Ticket
	if !handoff {
		ticket = incomingTicket(cfg, log)
	}
	handoff = handoff || ticket != nil
	p, err := prepare(ctx, cfg, log, ph, kids, handoff)
	if err != nil {
		return nil, err
	}
	undo.add(func(time.Time) { p.close() })
	if handoff {
		// The run goes on: this task records its end once it has the guest.
		*rec, _ = readRuns(runsPath(cfg))
		rec.Running = false
	} else {
		*rec = startRun(cfg, log)
	}
	if cfg.CloudInit != "" {
		if err := buildSeed(ctx, cfg, p, log); err != nil {
			return nil, err
		}
	}
	if con != nil {
		p.facts.console = true
		if err := con.attachSerial(p); err != nil {
			return nil, err
		}
	}
	ph.done("seed and console")
	if cfg.TPM {
		t, err := startTPM(cfg, p, log)
		if err != nil {
			return nil, err
		}
		undo.add(func(by time.Time) { t.stop(by, log) }) // it waits for a QEMU, which may not come
	}
	vm, err := start(cfg, p, log)
	if err != nil {
		return nil, err
	}
	vm.metrics, vm.runs, vm.ticket = met, *rec, ticket
	ph.done("exec QEMU")
	if err := vm.verify(ctx, ph); err != nil {
		if errors.Is(err, errCancelled) {
			return vm, vm.force(context.Background(), "stopped during start")
		}
		vm.force(context.Background(), "start failed")
		return vm, err
	}
	rec.Running = true
	if con != nil {
		undo.add(con.serve(vncSocket(cfg)))
		vm.console = con.srv
	}
	if p.facts.agent {
		vm.agent = watchAgent(agentSocket(cfg), cfg.RunDir, log)
	}
	ctl := openControl(vm)
	undo.add(func(time.Time) { ctl.close() })
	if scheduled(cfg) && ctl != nil {
		sctx, stop := context.WithCancel(ctx)
		go vm.scheduleBackups(sctx)
		vm.scheduleStop = stop
		undo.add(func(time.Time) { stop() })
	}
	if met != nil {
		undo.add(met.serve(vm))
	}
	return vm, vm.wait(ctx)
}
