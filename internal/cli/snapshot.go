package cli

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/snapshot"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) snapshotCmd() *cobra.Command {
	var name string
	var freeze, wait time.Duration
	run := func(cmd *cobra.Command, vm, op string, args ...string) error {
		return withSwarm(cmd, func(c *swarm.Client) error {
			return c.Snapshot(cmd.Context(), vm, op, args, wait, e.stdout)
		})
	}
	cmd := &cobra.Command{
		Use:   "snapshot NAME [--name S]",
		Short: "Snapshot a VM's disk, NVRAM and TPM state in its own qcow2",
		Long: `Snapshot takes an internal snapshot of the VM's disk, on its node, with a copy
of its NVRAM and TPM state: online while it runs (the guest's filesystems
frozen through its agent around it when it has one), else from its disk.
snapshot ls lists them; snapshot revert stops the VM, keeps the disk's state
at that moment as a snapshot of its own (before-revert-<time>) and its NVRAM
and TPM state set aside, brings everything back to the snapshot and starts
the VM again; snapshot rm removes one. A reverted VM's next backup is full.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if name == "" {
				name = snapshot.NameNow(time.Now())
			}
			return run(cmd, args[0], "create", name, "--freeze", freeze.String())
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the snapshot's name (default snap-<time>)")
	cmd.Flags().DurationVar(&freeze, "freeze", 10*time.Second, "freeze the guest's filesystems through its agent for at most this long around it (0: do not)")
	ls := &cobra.Command{Use: "ls NAME", Short: "List a VM's snapshots", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return run(cmd, args[0], "ls") }}
	revert := &cobra.Command{Use: "revert NAME S", Short: "Bring a VM back to a snapshot (it is stopped and started again)", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error { return run(cmd, args[0], "revert", args[1]) }}
	revert.Flags().DurationVar(&wait, "wait", 5*time.Minute, "wait this long for the VM to stop")
	rm := &cobra.Command{Use: "rm NAME S", Short: "Remove a snapshot", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error { return run(cmd, args[0], "rm", args[1]) }}
	cmd.AddCommand(ls, revert, rm, e.snapshotHereCmd())
	return cmd
}

// snapshotHereCmd is the job's side, on the VM's node as its uid.
func (e *env) snapshotHereCmd() *cobra.Command {
	var freeze time.Duration
	var asJSON bool
	cmd := &cobra.Command{
		Use:    "here create|ls|revert|rm [S]",
		Short:  "(runs in a Swarm job on the VM's node) a snapshot operation",
		Hidden: true,
		Args:   cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg := config.FromEnv(e.getenv)
			if err := cfg.Validate(); err != nil {
				return &usageError{err}
			}
			ctx := cmd.Context()
			arg := func() (string, error) {
				if len(args) < 2 {
					return "", &usageError{fmt.Errorf("%s needs a snapshot's name", args[0])}
				}
				return args[1], nil
			}
			switch args[0] {
			case "ls":
				list, err := snapshot.List(ctx, cfg)
				if err != nil {
					return err
				}
				if asJSON {
					return json.NewEncoder(e.stdout).Encode(list)
				}
				w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "SNAPSHOT\tTAKEN\tWITH")
				for _, s := range list {
					fmt.Fprintf(w, "%s\t%s\t%v\n", s.Name, s.Taken.Format(time.RFC3339), s.State)
				}
				return w.Flush()
			case "create", "revert", "rm":
				s, err := arg()
				if err != nil {
					return err
				}
				switch args[0] {
				case "create":
					return snapshot.Create(ctx, cfg, s, freeze, e.stdout)
				case "revert":
					return snapshot.Revert(ctx, cfg, s, time.Now(), e.stdout)
				}
				return snapshot.Remove(ctx, cfg, s, e.stdout)
			}
			return &usageError{fmt.Errorf("%q: create, ls, revert or rm", args[0])}
		},
	}
	cmd.Flags().DurationVar(&freeze, "freeze", 10*time.Second, "freeze hold")
	cmd.Flags().BoolVar(&asJSON, "json", false, "ls as JSON")
	return cmd
}
