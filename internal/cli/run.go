package cli

import (
	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/runner"
)

func (e *env) runCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the VM the environment describes (the container's entrypoint)",
		Long: `Run reads the VM's configuration from the environment (see the README's
variable table), checks the node, prepares the disk and firmware, starts QEMU
without privilege, verifies KVM over QMP and supervises the VM until it powers
off or the container is stopped. Exit codes: 0 powered off, 2 configuration,
3 KVM unavailable, 4 storage, 5 QEMU did not start, 6 QEMU crashed,
7 forced stop, 1 internal error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := config.FromEnv(e.getenv)
			log := newLogger(e.stderr, cfg.LogLevel)
			err := runner.Run(cmd.Context(), cfg, log)
			if err != nil {
				log.Error("exit", "code", runner.Code(err), "err", err)
				return &silentError{err}
			}
			log.Info("exit", "code", 0)
			return nil
		},
	}
}
