package cli

import (
	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/swarm"
)

// withSwarm runs f with a client of the Engine API that DOCKER_HOST names.
func withSwarm(cmd *cobra.Command, f func(*swarm.Client) error) error {
	c, err := swarm.Connect(cmd.Context())
	if err != nil {
		return err
	}
	defer c.Close()
	return f(c)
}
