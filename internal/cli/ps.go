package cli

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) psCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "ps",
		Short: "List the VMs: home node (local storage), node, task state, health, accelerator",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withSwarm(cmd, func(c *swarm.Client) error {
				vms, err := c.List(cmd.Context())
				if err != nil {
					return err
				}
				tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tHOME\tNODE\tSTATE\tHEALTH\tACCEL\tERROR")
				for _, v := range vms {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, v.Home, v.Node, v.State, v.Health, v.Accel, v.Error)
				}
				return tw.Flush()
			})
		},
	}
}

func (e *env) rmCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove VMs' services; follow each runner's shutdown when it runs here",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSwarm(cmd, func(c *swarm.Client) error {
				for _, name := range args {
					fmt.Fprintf(e.stdout, "%s: removing\n", name)
					if err := c.Remove(cmd.Context(), name, prefixed{e, name + ": "}); err != nil {
						return err
					}
					fmt.Fprintf(e.stdout, "%s: removed\n", name)
				}
				return nil
			})
		},
	}
}
