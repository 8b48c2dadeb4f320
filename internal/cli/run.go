package cli

import (
	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/runner"
	"github.com/swarmvm/swarmvm/internal/status"
)

func (e *env) runCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the VM the environment describes (the container's entrypoint)",
		Long: `Run reads the VM's configuration from the environment (the variables
are in docs/reference.md), checks the node, prepares the disk and firmware,
starts QEMU without privilege, verifies KVM over QMP and supervises the VM
until it powers off or the container is stopped. Its last log line (event=exit) gives the
exit code and the reason. Exit codes:

` + status.ExitTable(),
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := config.FromEnv(e.getenv)
			log := newLogger(e.stderr, cfg.LogLevel)
			err := runner.Run(cmd.Context(), cfg, log)
			if err != nil {
				log.Error("exit", status.Key, status.Exited, status.AttrCode, runner.Code(err), status.AttrErr, err)
				return &silentError{err}
			}
			log.Info("exit", status.Key, status.Exited, status.AttrCode, 0)
			return nil
		},
	}
}
