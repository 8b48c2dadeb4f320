package cli

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/deploy"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) deployCmd() *cobra.Command {
	var vf vmFlags
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "deploy",
		Short: "Create or update the VMs' services through the Engine API, then audit the running tasks",
		Long: `Deploy creates each VM's service (or updates it in place) on the Swarm that
DOCKER_HOST points at, with the API version negotiated. It also sets what a
stack file cannot (no_new_privileges, where the daemon's API has it), reports
any field the daemon dropped, waits for the task to run, and audits the
running container and its QEMU process. The services of a definition are
made one after another (each VM's home picked with the earlier ones
placed); their tasks are waited for and audited all at once, each VM's
report printed as one block when it is done.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rs, err := vf.resolve(cmd)
			if err != nil {
				return err
			}
			return withSwarm(cmd, func(c *swarm.Client) error {
				return deploy.Run(cmd.Context(), c, rs, deploy.Options{Wait: wait, KVMWait: time.Minute, ConsoleKeys: e.consoleKeys()}, e.stdout)
			})
		},
	}
	vf.add(cmd)
	cmd.Flags().DurationVar(&wait, "wait", 2*time.Minute, "wait this long for each task to run and audit it, the VMs all at once (0: do not wait)")
	return cmd
}

func (e *env) auditCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "audit NAME...",
		Short: "Audit the running VMs' tasks on this node: container privileges and QEMU's /proc status",
		Long: `Audit inspects each VM's running container and its QEMU process as they
are, not as the spec asked: privileged, devices, capabilities, read-only root,
user, no-new-privileges, and QEMU's uid, CapEff, CapBnd, NoNewPrivs and
Seccomp from /proc. Only the node that runs the task can show them: point
DOCKER_HOST at that node's engine, a worker's will do (deploy audits tasks on
its own node).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSwarm(cmd, func(c *swarm.Client) error {
				var errs []error
				for _, name := range args {
					rep, err := c.AuditHere(cmd.Context(), name)
					if err == nil {
						fmt.Fprintf(e.stdout, "%s: running on node %s (Engine API %s)\n", name, rep.Node, c.APIVersion())
						fmt.Fprintf(e.stdout, "%s: accelerator: %s\n", name, rep.Accel)
						err = deploy.PrintAudit(prefixed{e, name + ": "}, rep)
					}
					if err != nil {
						errs = append(errs, fmt.Errorf("%s: %w", name, err))
					}
				}
				return errors.Join(errs...)
			})
		},
	}
}

type prefixed struct {
	e      *env
	prefix string
}

func (p prefixed) Write(b []byte) (int, error) {
	for line := range strings.Lines(string(b)) {
		fmt.Fprint(p.e.stdout, p.prefix+line)
	}
	return len(b), nil
}
