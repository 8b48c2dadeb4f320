package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/runner"
)

func (e *env) healthCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "health",
		Short: "Exit 0 if the VM is healthy (the image's HEALTHCHECK)",
		Long: `Health is healthy when QEMU is alive, its QMP monitor answers, the VM's run
state is "running" and, under ACCEL=kvm, KVM is enabled. It prints one line
saying why, either way.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			runDir := config.FromEnv(e.getenv).RunDir
			msg, err := runner.Health(ctx, runDir)
			if err != nil {
				fmt.Fprintf(e.stdout, "unhealthy: %v\n", err)
				return &silentError{err}
			}
			fmt.Fprintf(e.stdout, "healthy: %s\n", msg)
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "give up after this long")
	return cmd
}
