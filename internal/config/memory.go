package config

import "fmt"

// QEMU's own memory beside guest RAM: device models, the I/O threads, the
// TCG translation cache under emulation (bounded by qemu.TCGCacheMiB). These
// are allowances, not measurements.
const (
	OverheadMiBKVM = 256
	OverheadMiBTCG = 384
)

// OverheadMiB is what QEMU needs beside guest RAM for this accelerator.
func (c Config) OverheadMiB() int64 { return Overhead(c.Accel) }

// Overhead is what QEMU needs beside guest RAM under accel: the runner sizes
// guest RAM with it, a definition the container's memory limit.
func Overhead(accel string) int64 {
	if accel == AccelTCG {
		return OverheadMiBTCG
	}
	return OverheadMiBKVM
}

// GuestMemoryMiB decides guest RAM given the container's memory limit in
// bytes (0 when there is none). An explicit VM_MEMORY must fit under the
// limit with QEMU's overhead; without one, guest RAM is the limit less the
// overhead. Asking for more than fits is refused rather than left for the
// kernel's OOM killer to settle.
func (c Config) GuestMemoryMiB(limit int64) (int64, error) {
	over := c.OverheadMiB()
	limitMiB := limit / mib
	if c.MemoryMiB > 0 {
		if limit > 0 && c.MemoryMiB+over > limitMiB {
			return 0, &Error{Var: "VM_MEMORY", Cause: fmt.Sprintf("%s plus QEMU's %dM overhead does not fit the container's %s memory limit", FormatMiB(c.MemoryMiB), over, FormatMiB(limitMiB)),
				Fix: fmt.Sprintf("lower VM_MEMORY to at most %s, or raise the service's memory limit to at least %s", FormatMiB(max(limitMiB-over, 0)), FormatMiB(c.MemoryMiB+over))}
		}
		return c.MemoryMiB, nil
	}
	if limit <= 0 {
		return DefaultMemoryMiB, nil
	}
	guest := limitMiB - over
	if guest < 64 {
		return 0, &Error{Var: "VM_MEMORY", Cause: fmt.Sprintf("the container's %s memory limit leaves %dM for the guest after QEMU's %dM overhead", FormatMiB(limitMiB), guest, over),
			Fix: fmt.Sprintf("raise the service's memory limit to at least %s", FormatMiB(64+over))}
	}
	return guest, nil
}
