package cli

import (
	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/tapdev"
)

// tapCreateCmd is run by the runner through the image's capability-carrying
// copy of swarmvm (NET_MODE=tap); not for operators.
func (e *env) tapCreateCmd() *cobra.Command {
	var tun, name, addr string
	var uid, gid int
	cmd := &cobra.Command{
		Use:    "tap-create",
		Short:  "Make a persistent TAP owned by a user (the runner's helper for NET_MODE=tap)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return tapdev.Create(tun, name, uid, gid, addr)
		},
	}
	f := cmd.Flags()
	f.StringVar(&tun, "tun", "/dev/net/tun", "TUN device")
	f.StringVar(&name, "name", "tap0", "TAP name")
	f.StringVar(&addr, "addr", "", "address for the TAP (CIDR)")
	f.IntVar(&uid, "uid", config.RunnerUID, "owner")
	f.IntVar(&gid, "gid", config.RunnerGID, "group")
	return cmd
}
