package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/runner"
	"github.com/swarmvm/swarmvm/internal/status"
)

func (e *env) healthCmd() *cobra.Command {
	var timeout time.Duration
	var liveness, asJSON bool
	cmd := &cobra.Command{
		Use:   "health",
		Short: "Exit 0 if the VM is healthy (the image's HEALTHCHECK)",
		Long: `Health is healthy when QEMU is alive, its QMP monitor answers, the VM's run
state is "running" and, under ACCEL=kvm, KVM is enabled. It prints one line
saying why, either way.

With --liveness (the Swarm service's health check) a VM paused because its
storage volume is full is still reported unhealthy, with the reason, but the
check passes: restarting the task cannot free space and would throw away the
paused guest, and the runner resumes the VM by itself when space returns. So
does a runner on shared storage waiting for another QEMU (the VM's earlier
task, on a node cut off from the managers) to let go of the disk.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			h := runner.Report(ctx, config.FromEnv(e.getenv).RunDir)
			pass := h.Healthy || liveness && h.Waiting
			switch {
			case asJSON:
				b, _ := json.Marshal(h)
				fmt.Fprintf(e.stdout, "%s\n", b)
			case h.Healthy:
				fmt.Fprintf(e.stdout, "healthy: %s%s\n", h.Reason, agentNote(h.Agent))
			case pass:
				fmt.Fprintf(e.stdout, "unhealthy: %s (check passes under --liveness: a restart cannot %s)\n", h.Reason, map[string]string{status.StateFull: "free space", status.StateDiskHeld: "free the disk"}[h.State])
			default:
				fmt.Fprintf(e.stdout, "unhealthy: %s\n", h.Reason)
			}
			if !pass {
				return &silentError{errors.New(h.Reason)}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "write the status contract as one JSON object: healthy, state ("+strings.Join([]string{status.StateRunning, status.StateStarting, status.StateFull, status.StateDiskHeld, status.StatePanicked, status.StateDown}, ", ")+"), accel, reason, waiting, agent (the guest agent's state, OS and addresses) (the service's health check uses it; swarmvm ps reads it)")
	cmd.Flags().BoolVar(&liveness, "liveness", false, "pass while the VM waits, paused, for space on a full storage volume, or for a disk another QEMU holds (shared storage)")
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "give up after this long")
	return cmd
}

// agentNote is what the guest agent said, for the health line.
func agentNote(a *status.Agent) string {
	switch {
	case a == nil:
		return ""
	case a.State != status.AgentAnswering:
		return "; guest agent " + a.State
	}
	return fmt.Sprintf("; guest agent answering: %s, addresses %s", or(a.OS, "OS unknown"), or(strings.Join(a.Addresses, " "), "none"))
}

// or is s, or else when s is empty.
func or(s, otherwise string) string {
	if s == "" {
		return otherwise
	}
	return s
}
