package cli

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/runner"
)

func (e *env) healthCmd() *cobra.Command {
	var timeout time.Duration
	var liveness bool
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
			runDir := config.FromEnv(e.getenv).RunDir
			msg, err := runner.Health(ctx, runDir)
			if why := restartCannotHelp(err); liveness && why != "" {
				fmt.Fprintf(e.stdout, "unhealthy: %v (check passes under --liveness: a restart cannot %s)\n", err, why)
				return nil
			}
			if err != nil {
				fmt.Fprintf(e.stdout, "unhealthy: %v\n", err)
				return &silentError{err}
			}
			fmt.Fprintf(e.stdout, "healthy: %s\n", msg)
			return nil
		},
	}
	cmd.Flags().BoolVar(&liveness, "liveness", false, "pass while the VM waits, paused, for space on a full storage volume, or for a disk another QEMU holds (shared storage)")
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "give up after this long")
	return cmd
}

// restartCannotHelp says what a restart could not do for a VM that waits on
// something outside it, or "" for every other state.
func restartCannotHelp(err error) string {
	switch {
	case errors.Is(err, runner.ErrStorageFull):
		return "free space"
	case errors.Is(err, runner.ErrDiskHeld):
		return "free the disk"
	}
	return ""
}
