package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/console"
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
running container and its QEMU process.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rs, err := vf.resolve(cmd)
			if err != nil {
				return err
			}
			return withSwarm(cmd, func(c *swarm.Client) error {
				var errs []error
				for _, r := range rs {
					if err := e.deployOne(cmd.Context(), c, r, wait); err != nil {
						errs = append(errs, fmt.Errorf("%s: %w", r.Name, err))
					}
				}
				return errors.Join(errs...)
			})
		},
	}
	vf.add(cmd)
	cmd.Flags().DurationVar(&wait, "wait", 2*time.Minute, "wait this long for each task to run and audit it (0: do not wait)")
	return cmd
}

func (e *env) deployOne(ctx context.Context, c *swarm.Client, r swarm.Resolved, wait time.Duration) error {
	home, err := c.SettleHome(ctx, &r)
	if err != nil {
		return err
	}
	if home.ID != "" {
		fmt.Fprintf(e.stdout, "%s: home node %s (%s): local storage, the VM runs there only\n", r.Name, home.Hostname, home.ID)
	}
	var key []byte
	if r.ConsolePort != 0 {
		keys := console.Keys{Dir: e.consoleKeys()}
		k, made, err := keys.Ensure(r.Name)
		if err != nil {
			return fmt.Errorf("console key: %w", err)
		}
		if made {
			fmt.Fprintf(e.stdout, "%s: console key made in %s (swarmvm console signs its tickets with it)\n", r.Name, keys.Path(r.Name))
		}
		key, r.ConsoleSecret = k, console.SecretName(r.Name, k)
	}
	if err := c.EnsureSecrets(ctx, r, key); err != nil {
		return err
	}
	res, err := c.Deploy(ctx, r)
	if err != nil {
		return err
	}
	keep := []string{r.ConsoleSecret}
	for _, f := range r.Seed {
		keep = append(keep, f.Secret)
	}
	c.PruneSecrets(ctx, r.Name, keep...)
	verb := "updated"
	if res.Created {
		verb = "created"
	}
	fmt.Fprintf(e.stdout, "%s: service %s %s (Engine API %s)\n", r.Name, res.ServiceID[:12], verb, c.APIVersion())
	for _, f := range res.Dropped {
		fmt.Fprintf(e.stdout, "%s: WARNING: the daemon (API %s) dropped %s from the service spec\n", r.Name, c.APIVersion(), f)
	}
	if wait <= 0 {
		return nil
	}
	if res.FirstCheck > 0 {
		fmt.Fprintf(e.stdout, "%s: engine API %s keeps no health start interval (API 1.44 does): the task shows starting until its first health check, %s after the container starts\n", r.Name, c.APIVersion(), res.FirstCheck)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	task, err := c.WaitRunning(wctx, res.ServiceID, res.Since, prefixed{e, r.Name + ": "})
	if err != nil {
		if why, _ := c.HomeState(ctx, r); why != "" {
			return fmt.Errorf("%w — %s", err, why)
		}
		if task != nil && strings.Contains(task.Status.Err, "no suitable node") {
			return fmt.Errorf("%w — label a VM-capable node: swarmvm node label <node>", err)
		}
		return err
	}
	rep, err := c.Report(ctx, res.ServiceID, task, swarm.ServiceSpec(r).TaskTemplate.ContainerSpec.CapabilityAdd, time.Minute)
	remote := errors.Is(err, swarm.ErrRemote)
	if err != nil && !remote {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: running on node %s\n", r.Name, rep.Node)
	if remote {
		fmt.Fprintf(e.stdout, "%s: privilege audit: %v\n", r.Name, err)
	} else if err := e.printAudit(r.Name, rep); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: accelerator: %s\n", r.Name, rep.Accel)
	if r.Accel == config.AccelKVM && rep.Accel != swarm.AccelKVM {
		return fmt.Errorf("the runner did not report KVM verified: docker service logs %s", r.Name)
	}
	return nil
}

// printAudit prints a running task's privilege audit and fails on drift.
func (e *env) printAudit(name string, rep swarm.Report) error {
	fmt.Fprintf(e.stdout, "%s: privilege audit of the running task:\n", name)
	for _, ch := range rep.Checks {
		fmt.Fprintf(e.stdout, "  %s\n", ch)
	}
	if drift := rep.Drift(); len(drift) > 0 {
		return fmt.Errorf("%d audited properties drifted from the spec", len(drift))
	}
	return nil
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
						err = e.printAudit(name, rep)
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
	fmt.Fprint(p.e.stdout, p.prefix+string(b))
	return len(b), nil
}
