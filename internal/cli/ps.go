package cli

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/status"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) psCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List the VMs: home node (local storage), node, task state, health, accelerator, the guest's OS and addresses",
		Long: `ps lists the VMs with where they run and how they are. GUEST and ADDRESSES
are what the guest agent (qemu-guest-agent in the guest; GUEST_AGENT=on, the
default) last said: "-" for a guest without one, "no agent" while its agent
does not answer.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withSwarm(cmd, func(c *swarm.Client) error {
				vms, err := c.List(cmd.Context())
				if err != nil {
					return err
				}
				if asJSON {
					enc := json.NewEncoder(e.stdout)
					enc.SetIndent("", "  ")
					return enc.Encode(append([]swarm.Status{}, vms...))
				}
				tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tHOME\tNODE\tSTATE\tHEALTH\tACCEL\tGUEST\tADDRESSES\tERROR")
				for _, v := range vms {
					guest, addrs := guestColumns(v.Agent)
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, v.Home, v.Node, v.State, v.Health, v.Accel, guest, addrs, v.Error)
				}
				return tw.Flush()
			})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "write the list as JSON: name, home, node, state, health, accel, error, agent (state, os, addresses)")
	return cmd
}

// guestColumns are ps's GUEST and ADDRESSES for what the agent said.
func guestColumns(a *status.Agent) (guest, addrs string) {
	switch {
	case a == nil:
		return "-", "-"
	case a.State != status.AgentAnswering:
		return "no agent", "-"
	}
	return or(a.OS, "-"), or(strings.Join(a.Addresses, ","), "-")
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
