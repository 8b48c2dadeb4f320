package config

import "time"

// The stop budget: what a runner may take, after SIGTERM, to end its VM.
// The runner and the service definition's stop_grace_period both use it.
//
//   - ACPI: the power button is pressed at once and again every
//     PowerButtonEvery (a guest still booting misses a press), each press's
//     QMP call bounded by what is left, until SHUTDOWN_TIMEOUT ends;
//   - then QMP quit (its call bounded by QMPCallTimeout) and QuitWait for
//     QEMU to exit;
//   - then SIGKILL to QEMU's process group and KillWait for it to go;
//   - or, when QEMU exited cleanly and no SIGKILL was needed, qemu-img
//     check of the disk it closed, within StopCheck;
//   - and last, within what is left of KillWait and StopTail at the least,
//     the rest: the console closed, swtpm ended (SIGTERM, then SIGKILL).
//     Every step bounds its waits by the one deadline, so that whatever
//     hangs, the runner is done within StopBudget.
//
// Swarm kills the container StopMargin after that at the earliest.
const (
	PowerButtonEvery = 5 * time.Second
	QMPCallTimeout   = 5 * time.Second
	QuitWait         = 10 * time.Second
	KillWait         = 5 * time.Second
	StopTail         = 2 * time.Second
	StopCheck        = KillWait - StopTail
	StopMargin       = 10 * time.Second
)

// StopBudget is the longest a runner takes to stop its VM, from SIGTERM
// to its own exit, for a given SHUTDOWN_TIMEOUT.
func StopBudget(shutdown time.Duration) time.Duration {
	return shutdown + QMPCallTimeout + QuitWait + KillWait
}

// StopGracePeriod is the stop_grace_period a service needs so that Swarm
// never kills a runner within its budget.
func StopGracePeriod(shutdown time.Duration) time.Duration {
	return StopBudget(shutdown) + StopMargin
}
