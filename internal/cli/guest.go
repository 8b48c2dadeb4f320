package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/control"
)

// guestCmd asks a VM's runner on this node, through its control socket,
// to freeze or thaw the guest's filesystems: for a snapshot of the storage
// volume taken below the VM (LVM, ZFS, a SAN), consistent as a backup's.
func (e *env) guestCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "guest",
		Short: "Freeze or thaw a VM's filesystems through its guest agent, on the VM's node",
	}
	var storage string
	var hold time.Duration
	ask := func(cmd *cobra.Command, vm string, req control.Request) (control.Reply, error) {
		ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
		defer cancel()
		req.ID = "cli"
		return control.Ask(ctx, control.Path(storage, vm), req)
	}
	freeze := &cobra.Command{
		Use:   "freeze NAME --hold 30s",
		Short: "Freeze the guest's filesystems for at most --hold (thawed then, whatever happens)",
		Long: `Freeze asks the VM's runner on this node (run it there, as root or the VM's
uid) to freeze the guest's filesystems through its agent (guest-fsfreeze-freeze):
the guest's writes wait until the thaw, which comes from swarmvm guest thaw, at
the latest when --hold ends (at most 5m), and when the VM stops.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := ask(cmd, args[0], control.Request{Op: control.OpFreeze, Freeze: hold})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "%s: %d filesystems frozen; thawed by swarmvm guest thaw %s, at the latest at %s\n", args[0], r.Filesystems, args[0], time.Now().Add(hold).UTC().Format(time.RFC3339))
			return nil
		},
	}
	freeze.Flags().DurationVar(&hold, "hold", 30*time.Second, "thaw after this long at the latest")
	thaw := &cobra.Command{
		Use:   "thaw NAME",
		Short: "Thaw the guest's filesystems",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := ask(cmd, args[0], control.Request{Op: control.OpThaw}); err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "%s: thawed\n", args[0])
			return nil
		},
	}
	for _, c := range []*cobra.Command{freeze, thaw} {
		c.Flags().StringVar(&storage, "storage", "/var/lib/poc-qemu", "the VM's storage folder on this node")
	}
	cmd.AddCommand(freeze, thaw)
	return cmd
}
