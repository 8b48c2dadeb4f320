package cli

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) renderCmd() *cobra.Command {
	var vf vmFlags
	var out string
	var nodeCPUs float64
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
			if nodeCPUs > 0 {
				node := []swarm.NodeRoom{{Hostname: "--node-cpus", Capable: true, NanoCPUs: int64(nodeCPUs * 1e9)}}
				for i := range rs {
					if err := swarm.FitCPUs(&rs[i], node); err != nil {
						return &usageError{fmt.Errorf("%s: %w", rs[i].Name, err)}
					}
				}
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
	cmd.Flags().Float64Var(&nodeCPUs, "node-cpus", 0, "CPUs of the smallest node the VMs may run on: caps each CPU limit (vCPUs + 1) to it, as an engine refuses more (deploy finds it from the swarm)")
	return cmd
}
