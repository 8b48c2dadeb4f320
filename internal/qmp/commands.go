package qmp

import (
	"context"
	"encoding/json"
)

// KVMStatus is the reply to query-kvm.
type KVMStatus struct {
	Enabled bool `json:"enabled"`
	Present bool `json:"present"`
}

// QueryKVM asks whether KVM is present and in use.
func (c *Client) QueryKVM(ctx context.Context) (KVMStatus, error) {
	var s KVMStatus
	err := c.Execute(ctx, "query-kvm", nil, &s)
	return s, err
}

// Status is the reply to query-status.
type Status struct {
	Running bool   `json:"running"`
	Status  string `json:"status"`
}

// QueryStatus reports the VM's run state ("running", "paused",
// "io-error", "shutdown", ...).
func (c *Client) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := c.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// SystemPowerdown presses the ACPI power button; the guest decides.
func (c *Client) SystemPowerdown(ctx context.Context) error {
	return c.Execute(ctx, "system_powerdown", nil, nil)
}

// Quit makes QEMU exit at once, without asking the guest.
func (c *Client) Quit(ctx context.Context) error {
	return c.Execute(ctx, "quit", nil, nil)
}

// Cont resumes a paused VM. QEMU retries the I/O requests that paused it.
func (c *Client) Cont(ctx context.Context) error {
	return c.Execute(ctx, "cont", nil, nil)
}

// Block is one entry of the reply to query-block: a drive and the state of
// its I/O ("ok", "failed" or "nospace"; empty for drives that do not
// track it).
type Block struct {
	Device   string `json:"device"`
	IOStatus string `json:"io-status"`
}

// QueryBlock lists the VM's drives.
func (c *Client) QueryBlock(ctx context.Context) ([]Block, error) {
	var b []Block
	err := c.Execute(ctx, "query-block", nil, &b)
	return b, err
}

// BlockIOError is the data of a BLOCK_IO_ERROR event.
type BlockIOError struct {
	Device    string `json:"device"`
	Operation string `json:"operation"` // "read" or "write"
	Action    string `json:"action"`    // "stop", "report" or "ignore"
	NoSpace   bool   `json:"nospace"`
	Reason    string `json:"reason"`
}

// GuestPanicked is the data of a GUEST_PANICKED event.
type GuestPanicked struct {
	Action string          `json:"action"` // "pause", "poweroff" or "run"
	Info   json.RawMessage `json:"info,omitempty"`
}

// CPU is one vCPU of query-cpus-fast: its index and the host thread that
// runs it.
type CPU struct {
	Index    int `json:"cpu-index"`
	ThreadID int `json:"thread-id"`
}

// QueryCPUsFast lists the vCPUs without interrupting them.
func (c *Client) QueryCPUsFast(ctx context.Context) ([]CPU, error) {
	var out []CPU
	return out, c.Execute(ctx, "query-cpus-fast", nil, &out)
}

// BlockStats is one drive's I/O counters in query-blockstats.
type BlockStats struct {
	Device string `json:"device"` // the drive's id ("" for a -blockdev node)
	QDev   string `json:"qdev"`   // the device's id or path
	Node   string `json:"node-name"`
	Stats  struct {
		RdBytes   uint64 `json:"rd_bytes"`
		WrBytes   uint64 `json:"wr_bytes"`
		RdOps     uint64 `json:"rd_operations"`
		WrOps     uint64 `json:"wr_operations"`
		FlushOps  uint64 `json:"flush_operations"`
		RdTimeNS  uint64 `json:"rd_total_time_ns"`
		WrTimeNS  uint64 `json:"wr_total_time_ns"`
		FlushTime uint64 `json:"flush_total_time_ns"`
	} `json:"stats"`
}

// QueryBlockstats reads every drive's counters.
func (c *Client) QueryBlockstats(ctx context.Context) ([]BlockStats, error) {
	var out []BlockStats
	return out, c.Execute(ctx, "query-blockstats", nil, &out)
}
