package runner

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/status"
)

// The steps of the stop budget (config.StopBudget: at most
// SHUTDOWN_TIMEOUT + 20 s, inside stop_grace_period = SHUTDOWN_TIMEOUT + 30 s).
const (
	pressEvery = config.PowerButtonEvery
	qmpCall    = config.QMPCallTimeout
	quitWait   = config.QuitWait
	killWait   = config.KillWait
)

// errCancelled reports a stop requested while QEMU was still starting.
var errCancelled = errors.New("stop requested during start")

// verify connects QMP within START_TIMEOUT and proves what the VM runs on:
// under ACCEL=kvm, query-kvm must say enabled and present, or the VM is
// stopped: there is no silent fallback to emulation.
func (v *vm) verify(ctx context.Context, ph *phases) error {
	sctx, cancel := context.WithTimeout(ctx, v.cfg.StartTimeout)
	defer cancel()
	c, err := v.connect(sctx)
	if err != nil {
		return err
	}
	ph.done("QMP connected")
	v.qmp = c
	v.events = c.Subscribe() // from the first moment: nothing QEMU says is lost
	v.log.Info("QMP connected", "socket", v.spec.QMPSocket, "qemu", c.Version().String())
	if v.cfg.Accel == config.AccelKVM {
		kvm, err := c.QueryKVM(sctx)
		if err != nil {
			return startFailed(ctx, "query-kvm", err)
		}
		if !kvm.Enabled || !kvm.Present {
			return exitf(status.ExitKVM, "KVM not in use: query-kvm says enabled=%v present=%v — check the node with swarmvm doctor; ACCEL=tcg runs without KVM when asked for by name", kvm.Enabled, kvm.Present)
		}
		ph.done("query-kvm")
		v.log.Info("KVM verified", status.Key, status.KVMVerified, "query_kvm", "enabled=true present=true", "qemu_fds", kvmFDs(v.pid))
	}
	if v.spec.Incoming {
		if err := v.takeOver(ctx); err != nil {
			return err
		}
		ph.done("hand-off")
	}
	st, err := c.QueryStatus(sctx)
	if err != nil {
		return startFailed(ctx, "query-status", err)
	}
	ph.done("query-status")
	v.initial = st.Status
	// The state file is in place before the line that says the VM runs:
	// whoever reads that line can ask the health check at once.
	record := state{PID: v.pid, Name: v.cfg.Name, Accel: v.cfg.Accel, HealthSocket: v.spec.HealthSocket, Started: time.Now().UTC()}
	if v.cfg.HealthAgent {
		record.AgentGrace = v.cfg.HealthAgentGrace
	}
	if err := writeState(v.state, record); err != nil {
		return exitf(status.ExitInternal, "state file: %w", err)
	}
	v.log.Info("VM running", status.Key, status.VMRunning, "status", st.Status, status.AttrAccel, v.cfg.Accel)
	return nil
}

// startFailed is a QMP question during the start that got no answer: a
// stop asked for meanwhile (ctx cancelled: SIGTERM) is that stop, not a
// failed start (it was exit 5, "start failed", when a service was removed
// while QEMU was starting).
func startFailed(ctx context.Context, what string, err error) error {
	if ctx.Err() == context.Canceled {
		return errCancelled
	}
	return exitf(status.ExitStart, "%s: %w", what, err)
}

// connect opens the runner's QMP session. The socket was listening before
// QEMU started (the runner bound it and handed it over), so the connection
// is made at once and waits in the backlog until QEMU's main loop accepts it
// and greets: no polling. It ends early when QEMU exits (its listening
// socket goes with it) or the start budget runs out.
func (v *vm) connect(ctx context.Context) (*qmp.Client, error) {
	type dialed struct {
		c   *qmp.Client
		err error
	}
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan dialed, 1)
	go func() {
		c, err := qmp.Dial(dctx, v.spec.QMPSocket)
		ch <- dialed{c, err}
	}()
	var d dialed
	drained := false
	select {
	case d = <-ch:
		if d.err == nil {
			return d.c, nil
		}
		drained = true
		// A refused or reset connection: QEMU is ending; its exit says why.
		t := time.NewTimer(quitWait)
		defer t.Stop()
		select {
		case <-v.exited:
		case <-ctx.Done():
		case <-t.C:
			return nil, exitf(status.ExitStart, "QEMU's QMP socket %s failed: %v", v.spec.QMPSocket, d.err)
		}
	case <-v.exited:
	case <-ctx.Done():
	}
	cancel()
	if !drained {
		go func() { // the dial ends with dctx; a session it made is not used
			if d := <-ch; d.c != nil {
				d.c.Close()
			}
		}()
	}
	select {
	case <-v.exited:
		v.outputCopied()
		if strings.Contains(v.stderr.String(), `Failed to get "write" lock`) {
			return nil, exitf(status.ExitDiskBusy, "a disk or NVRAM file of this VM is in use by another QEMU (%s): two VMs may not share a disk or OVMF_VARS — stop the other VM, or give this one its own files", v.stderr)
		}
		return nil, exitf(status.ExitStart, "QEMU exited during start (%s): %s", v.exitDescription(), v.stderr)
	default:
	}
	if ctx.Err() == context.Canceled {
		return nil, errCancelled
	}
	return nil, exitf(status.ExitStart, "QEMU did not answer on %s within START_TIMEOUT %s", v.spec.QMPSocket, v.cfg.StartTimeout)
}

// wait supervises the running VM until it ends by itself or ctx is
// cancelled, then stops it.
func (v *vm) wait(ctx context.Context) error {
	events := v.events
	var leaseEnded <-chan struct{}
	if v.lease != nil {
		leaseEnded = v.lease.Ended()
	}
	handed := v.handed
	defer v.stopSpaceWait()
	// What happened before QMP connected was not seen as an event.
	switch v.initial {
	case "guest-panicked":
		return v.panicked(nil)
	case "io-error":
		v.pausedBefore(ctx)
	}
	for {
		var spaceTick <-chan time.Time
		if v.space != nil {
			spaceTick = v.space.tick.C
		}
		select {
		case <-spaceTick:
			v.checkSpace(ctx)
		case <-leaseEnded:
			leaseEnded = nil
			v.log.Warn("broker lease ended (the broker stopped or restarted); QEMU keeps its descriptors and the VM runs on")
		case <-v.exited:
			if v.handedOver() {
				v.outputCopied()
				v.cleanup()
				v.log.Info("QEMU ended after the guest was handed over to the VM's next task")
				return nil
			}
			return v.ended()
		case <-handed:
			handed = nil
			if v.scheduleStop != nil {
				v.scheduleStop()
			}
			if v.console != nil {
				// The VM's next task serves its consoles (the same key: a
				// ticket made for the VM works there).
				v.console.End("the VM moved to its next task: open its console again")
			}
		case <-v.tpmExited():
			return v.tpmEnded(context.Background())
		case ev, ok := <-events:
			if !ok {
				events = nil
				v.log.Warn("QMP connection closed", "err", v.qmp.Err())
				continue
			}
			v.noteDropped()
			if done, err := v.onEvent(ctx, ev); done {
				return err
			}
		case <-ctx.Done():
			v.stopBegan = time.Now()
			if v.handedOver() {
				// The guest runs in the next task: this QEMU, paused since
				// the switch-over, is quit; the guest is not asked to stop.
				return v.force(context.Background(), "the guest was handed over to the VM's next task")
			}
			return v.stop(context.Background(), "signal")
		}
	}
}

// tpmExited is closed when swtpm has ended; nil (never ready) without one.
func (v *vm) tpmExited() <-chan struct{} {
	if v.tpm == nil {
		return nil
	}
	return v.tpm.exited
}

// tailBy is when the runner's stop must be over: StopBudget after it was
// told to stop, or, for a VM that ended by itself, KillWait from now.
func (v *vm) tailBy() time.Time {
	if !v.stopBegan.IsZero() {
		return v.stopBegan.Add(config.StopBudget(v.cfg.ShutdownTimeout))
	}
	return time.Now().Add(config.KillWait)
}

// outputCopied waits for QEMU's serial and stderr copiers, within the
// stop's deadline: a process that kept QEMU's pipes open (QEMU spawns
// none; its sandbox forbids it) cannot hold the runner.
func (v *vm) outputCopied() {
	if !waitBy(v.outputDone, time.Now().Add(until(v.tailBy(), time.Second))) {
		v.log.Warn("QEMU's output pipes still open after it ended; not waiting for them")
	}
}

// ended classifies an exit the runner did not ask for.
func (v *vm) ended() error {
	v.outputCopied()
	v.cleanup()
	if v.status.Exited() && v.status.ExitStatus() == 0 {
		v.log.Info("guest powered off; QEMU exited 0")
		return nil
	}
	return exitf(status.ExitCrashed, "QEMU ended unexpectedly (%s): %s", v.exitDescription(), v.stderr)
}

// stop escalates: ACPI power button, then QMP quit, then SIGKILL to
// QEMU's process group, logging each step. The budget is its own, not the
// cancelled root context's.
func (v *vm) stop(ctx context.Context, reason string) error {
	defer v.cleanup()
	if v.qmp == nil {
		return v.force(ctx, reason)
	}
	if v.space != nil {
		// A paused guest cannot answer the power button.
		v.log.Warn("shutdown: the VM is paused on a full storage volume and cannot answer ACPI; quitting QEMU", "reason", reason)
		if err := v.force(ctx, "paused on a full storage volume"); err != nil {
			return err
		}
		return exitf(status.ExitForced, "forced stop: the VM was paused on a full storage volume; QEMU quit (%s)", v.exitDescription())
	}
	if exited, how := v.powerButton(ctx, reason); exited {
		return v.stopped(how)
	}
	v.log.Warn("shutdown: guest did not power off in time; forcing", "waited", v.cfg.ShutdownTimeout)
	if err := v.force(ctx, "guest ignored ACPI"); err != nil {
		return err
	}
	return exitf(status.ExitForced, "forced stop: guest did not power off within SHUTDOWN_TIMEOUT %s; QEMU quit (%s)", v.cfg.ShutdownTimeout, v.exitDescription())
}

// powerButton presses the ACPI power button at once and again every
// pressEvery, since a guest that is still booting (its kernel's ACPI or its
// power-key handler not up yet) misses a press, until QEMU exits or
// SHUTDOWN_TIMEOUT ends; every press's QMP call is bounded by the time left,
// so the whole wait is SHUTDOWN_TIMEOUT. Half way through, a guest whose
// agent answers is asked through it too (guest-shutdown): a guest that
// ignores the button (no acpid, Windows at its login screen) still powers
// off cleanly. It reports whether QEMU exited, and how the guest was asked.
func (v *vm) powerButton(ctx context.Context, reason string) (exited bool, how string) {
	wait, cancel := context.WithTimeout(ctx, v.cfg.ShutdownTimeout)
	defer cancel()
	tick := time.NewTicker(pressEvery)
	defer tick.Stop()
	agentAt := time.After(v.cfg.ShutdownTimeout / 2)
	how = "guest powered off through ACPI"
	v.agent.thawIfFrozen(wait, "the VM is stopping") // a frozen guest cannot shut down cleanly
	for press := 1; ; press++ {
		v.log.Info("shutdown: pressing the ACPI power button (system_powerdown)", "reason", reason, "press", press, "timeout", v.cfg.ShutdownTimeout)
		if err := v.call(wait, v.qmp.SystemPowerdown); err != nil && wait.Err() == nil {
			v.log.Warn("shutdown: system_powerdown failed", "press", press, "err", err)
		}
		for pressed := true; pressed; {
			select {
			case <-v.exited:
				return true, how
			case <-wait.Done():
				select {
				case <-v.exited:
					return true, how
				default:
					return false, how
				}
			case <-agentAt:
				agentAt = nil
				if v.askAgent(wait) {
					how = "guest powered off through its guest agent"
				}
			case <-tick.C:
				pressed = false
			}
		}
	}
}

// askAgent asks the guest to power off through its agent, when it has one
// that answers; it reports whether the agent took the command.
func (v *vm) askAgent(ctx context.Context) bool {
	if v.agent == nil || !v.agent.answering() {
		return false
	}
	v.log.Info("shutdown: the guest has not answered the ACPI button; asking its guest agent (guest-shutdown)", "waited", (v.cfg.ShutdownTimeout / 2).String())
	if err := v.agent.shutdown(ctx); err != nil {
		v.log.Warn("shutdown: guest-shutdown through the agent failed", "err", err)
		return false
	}
	return true
}

// force ends QEMU without asking the guest: QMP quit (or SIGTERM without a
// QMP session), then SIGKILL to its process group. It returns nil once
// QEMU has exited, an status.ExitForced error if it had to be killed.
func (v *vm) force(ctx context.Context, reason string) error {
	defer v.cleanup()
	if v.qmp != nil {
		v.log.Warn("shutdown: QMP quit", "reason", reason)
		if err := v.call(ctx, v.qmp.Quit); err != nil && !errors.Is(err, qmp.ErrClosed) {
			v.log.Warn("shutdown: quit failed", "err", err)
		}
	} else {
		v.log.Warn("shutdown: no QMP session; SIGTERM to QEMU", "reason", reason)
		killPID(v.pid, unix.SIGTERM)
	}
	if v.waitExit(quitWait) {
		v.outputCopied()
		return nil
	}
	v.log.Error("shutdown: QEMU did not quit; SIGKILL", "pid", v.pid, "waited", quitWait)
	killGroup(v.pid, unix.SIGKILL)
	if !v.waitExit(killWait) {
		return exitf(status.ExitInternal, "QEMU (pid %d) survived SIGKILL for %s", v.pid, killWait)
	}
	v.outputCopied()
	return exitf(status.ExitForced, "forced stop: QEMU killed (%s)", v.exitDescription())
}

func (v *vm) stopped(how string) error {
	v.outputCopied()
	if v.status.Exited() && v.status.ExitStatus() == 0 {
		v.log.Info("shutdown: " + how + "; QEMU exited 0")
		return nil
	}
	return exitf(status.ExitCrashed, "QEMU ended during shutdown (%s): %s", v.exitDescription(), v.stderr)
}

func (v *vm) call(ctx context.Context, f func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(ctx, qmpCall)
	defer cancel()
	return f(cctx)
}

func (v *vm) waitExit(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-v.exited:
		return true
	case <-t.C:
		return false
	}
}

func (v *vm) cleanup() {
	v.agent.stop()
	v.agent = nil
	if v.qmp != nil {
		v.qmp.Close()
		v.qmp = nil
	}
	for _, f := range v.images {
		f.Close()
	}
	v.images = nil
	os.Remove(v.state)
	// The runner bound the monitors' sockets; QEMU does not remove them.
	os.Remove(v.spec.QMPSocket)
	os.Remove(v.spec.HealthSocket)
}

// kvmFDs summarises QEMU's KVM descriptors from /proc: the evidence that
// it runs on KVM through the descriptor it was handed.
func kvmFDs(pid int) string {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "unreadable: " + err.Error()
	}
	var vmFDs, vcpus int
	for _, e := range ents {
		t, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		switch {
		case t == "anon_inode:kvm-vm":
			vmFDs++
		case strings.HasPrefix(t, "anon_inode:kvm-vcpu:"):
			vcpus++
		}
	}
	return fmt.Sprintf("kvm-vm=%d kvm-vcpu=%d", vmFDs, vcpus)
}
