package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/migrate"
	"github.com/swarmvm/swarmvm/internal/swarm"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

func (e *env) migrateCmd() *cobra.Command {
	o := swarm.MigrateOptions{Deadline: 60 * time.Second, Wait: 5 * time.Minute}
	cmd := &cobra.Command{
		Use:   "migrate NAME --to NODE",
		Short: "Live-migrate a running VM on shared storage to another node: the guest keeps running",
		Long: `Migrate moves a running VM to NODE without stopping it: its memory and
device state go over a channel made for this migration (two short-lived
Swarm tasks on an overlay network of their own, mutual TLS with a key made
for it; neither QEMU listens on a port), and one service update (start-first)
starts the VM's new task on NODE, which turns healthy only once it runs the
guest; Swarm then stops the old task. The guest is paused for the switch-over
only (QEMU's measured downtime is printed). A migration that fails or does
not finish within --deadline leaves the VM running where it was.

The VM must be on shared storage (a local VM's disk would have to be copied
while it runs: use move, which stops it), without a TPM, and either on a
named CPU model or between nodes with the same CPU (--same-cpu). In user-mode
networking, connections through published ports are reset by the move.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.To == "" {
				return &usageError{fmt.Errorf("--to NODE is required")}
			}
			key, err := vmdisk.NewMoveKey(args[0])
			if err != nil {
				return err
			}
			o.Key = key
			return withSwarm(cmd, func(c *swarm.Client) error {
				return c.Migrate(cmd.Context(), args[0], o, e.stdout)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.To, "to", "", "the node to migrate the VM to (ID or hostname)")
	f.DurationVar(&o.Deadline, "deadline", o.Deadline, fmt.Sprintf("cancel the migration, leaving the VM where it runs, when it has not finished within this (at most %s)", swarm.MaxMigrateDeadline))
	f.BoolVar(&o.SameCPU, "same-cpu", false, "the nodes' CPUs are the same: a VM whose CPU model is the host's may move")
	f.DurationVar(&o.Wait, "wait", o.Wait, "wait this long for the VM's task to run on NODE")
	cmd.AddCommand(e.migrateSide("ticket"), e.migrateSide("send"), e.migrateSide("receive"))
	return cmd
}

// migrateSide is one of the migration's parts that run in a Swarm job on
// a node, as the VM's uid, with the VM's runner environment.
func (e *env) migrateSide(kind string) *cobra.Command {
	var key, peer, listen, id, until string
	cmd := e.jobSide(kind, "(runs in a Swarm job on a node) "+kind, func(cmd *cobra.Command, cfg config.Config) error {
		end, err := time.Parse(time.RFC3339Nano, until)
		if err != nil {
			return &usageError{fmt.Errorf("--until: %w", err)}
		}
		ctx, cancel := context.WithDeadline(cmd.Context(), end.Add(time.Minute))
		defer cancel()
		switch kind {
		case "ticket":
			if err := migrate.WriteTicket(cfg, migrate.Ticket{ID: id, Node: cfg.NodeID, Until: end}); err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "the VM's next task on this node takes its guest over until %s\n", end.UTC().Format(time.RFC3339))
			return nil
		case "send":
			return migrate.Send(ctx, cfg, peer, key, id, end, e.stdout)
		}
		return migrate.Receive(ctx, cfg, listen, key, id, end, e.stdout)
	})
	f := cmd.Flags()
	f.StringVar(&id, "id", "", "the migration's id")
	f.StringVar(&until, "until", "", "the migration's end (RFC 3339)")
	switch kind {
	case "send":
		f.StringVar(&key, "key", "", "the migration's key pair (PEM)")
		f.StringVar(&peer, "peer", "", "receiver host:port")
	case "receive":
		f.StringVar(&key, "key", "", "the migration's key pair (PEM)")
		f.StringVar(&listen, "listen", ":7070", "address to listen on")
	}
	return cmd
}

func (e *env) nodeDrainCmd() *cobra.Command {
	o := swarm.DrainOptions{Deadline: 60 * time.Second, Wait: 5 * time.Minute, NewKey: vmdisk.NewMoveKey}
	cmd := &cobra.Command{
		Use:   "drain NODE",
		Short: "Empty a node for maintenance: migrate its running VMs away live, then set it to drain",
		Long: `Drain migrates each VM running on NODE that can migrate live (shared storage,
no TPM, a named CPU model or --same-cpu; see migrate) to the node with the most
unreserved memory that has room for it, one at a time, then sets NODE's
availability to drain: Swarm stops the VMs left, as it would (a local VM waits
for its home to be active again; a shared one starts elsewhere), and drain
names them with why they were not migrated.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSwarm(cmd, func(c *swarm.Client) error {
				return c.Drain(cmd.Context(), args[0], o, e.stdout)
			})
		},
	}
	f := cmd.Flags()
	f.DurationVar(&o.Deadline, "deadline", o.Deadline, "each migration's deadline (see migrate)")
	f.BoolVar(&o.SameCPU, "same-cpu", false, "the nodes' CPUs are the same (see migrate)")
	f.DurationVar(&o.Wait, "wait", o.Wait, "wait this long for each VM's task to run on its new node")
	return cmd
}
