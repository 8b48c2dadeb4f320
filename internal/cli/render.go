package cli

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) renderCmd() *cobra.Command {
	var vf vmFlags
	var out string
	cmd := &cobra.Command{
		Use:   "render",
		Short: "Write a stack file for docker stack deploy",
		Long: `Render writes a compose 3.9 stack file for the VMs: the same services that
swarmvm deploy creates, less what a stack file cannot carry (no_new_privileges,
which the runner sets on QEMU itself). The output is deterministic.

A VM on local storage (the default) needs its home node (--node, or node: in
the file): the stack pins it there. deploy picks and records a home itself.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rs, err := vf.resolve(cmd)
			if err != nil {
				return err
			}
			b, err := swarm.Stack(rs)
			if err != nil {
				return &usageError{err}
			}
			if out == "" || out == "-" {
				_, err = e.stdout.Write(b)
				return err
			}
			return os.WriteFile(out, b, 0o644)
		},
	}
	vf.add(cmd)
	cmd.Flags().StringVarP(&out, "output", "o", "-", "file to write (- for stdout)")
	return cmd
}
