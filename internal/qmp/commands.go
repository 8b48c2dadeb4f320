package qmp

import "context"

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
