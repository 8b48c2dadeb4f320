package status

import (
	"fmt"
	"strings"
)

// Exit codes of `swarmvm run`. Swarm's restart policy sees them; `deploy`
// and `ps` explain them.
const (
	ExitOK       = 0  // the guest powered off, or stopped cleanly through ACPI
	ExitInternal = 1  // a failure of swarmvm itself
	ExitConfig   = 2  // the environment is invalid
	ExitKVM      = 3  // KVM was required and is not available or not in use
	ExitStorage  = 4  // disk, firmware or storage folder unusable
	ExitStart    = 5  // QEMU did not start or did not answer QMP
	ExitCrashed  = 6  // QEMU ended on its own with an error or a signal
	ExitForced   = 7  // the guest ignored ACPI and QEMU was stopped by force
	ExitNet      = 8  // the VM's network could not be set up (TAP, bridge, device)
	ExitDiskBusy = 9  // the disk (or NVRAM) is in use by another QEMU
	ExitPanicked = 10 // the guest kernel panicked (reported through pvpanic)
	ExitTPM      = 11 // the VM's TPM (swtpm) ended or could not start; the VM was stopped
)

// ExitInfo says what an exit code means and whether starting the same task
// again could end differently.
type ExitInfo struct {
	Code    int
	Meaning string
	// Permanent: the cause is in the VM's definition or on its node, and a
	// restart of the task meets it again; it needs the operator.
	Permanent bool
}

// NodeBound: the cause is on the node the task ran on (its KVM, its
// storage), so it is permanent only for a VM that cannot start elsewhere.
func (e ExitInfo) NodeBound() bool { return e.Code == ExitKVM || e.Code == ExitStorage }

// ExitCodes lists every exit code of `swarmvm run`.
var ExitCodes = []ExitInfo{
	{ExitOK, "the guest powered off, or stopped cleanly through ACPI", false},
	{ExitInternal, "a failure of swarmvm itself", false},
	{ExitConfig, "the environment is invalid", true},
	{ExitKVM, "KVM was required and is not available or not in use", true},
	{ExitStorage, "disk, firmware or storage folder unusable", true},
	{ExitStart, "QEMU did not start or did not answer QMP", false},
	{ExitCrashed, "QEMU ended on its own with an error or a signal", false},
	{ExitForced, "the guest ignored ACPI and QEMU was stopped by force", false},
	{ExitNet, "the VM's network could not be set up (TAP, bridge, device)", false},
	{ExitDiskBusy, "the disk or NVRAM is in use by another QEMU", false},
	{ExitPanicked, "the guest kernel panicked (reported through pvpanic)", false},
	{ExitTPM, "the VM's TPM (swtpm) ended or could not start; the VM was stopped", false},
}

// Exit returns what code means; an unknown code gets a generic entry.
func Exit(code int) ExitInfo {
	for _, e := range ExitCodes {
		if e.Code == code {
			return e
		}
	}
	return ExitInfo{Code: code, Meaning: fmt.Sprintf("exit code %d (not swarmvm's: the container was killed, or its entrypoint is not swarmvm run)", code)}
}

// ExitTable is the list for help texts, one code per line.
func ExitTable() string {
	var b strings.Builder
	for _, e := range ExitCodes {
		fmt.Fprintf(&b, "  %2d  %s\n", e.Code, e.Meaning)
	}
	return b.String()
}
