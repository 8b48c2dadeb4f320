package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/nodecheck"
	"github.com/swarmvm/swarmvm/internal/preflight"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) nodeCmd() *cobra.Command {
	var o swarm.ProbeOptions
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Probe a node for VMs (this one, or another from a job there), and set or clear its vm-capable label",
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&o.KVMDevice, "kvm-device", "/dev/kvm", "KVM device to probe")
	pf.StringVar(&o.BrokerDir, "broker-dir", swarm.DefaultBrokerDir, "the broker's socket folder")
	pf.StringVar(&o.Storage, "storage", swarm.DefaultStorage, "VM storage folder")
	pf.StringVar(&o.SharedStorage, "shared-storage", "", "the folder of storage_mode shared VMs, to probe too: it must carry QEMU's image locks to every node (NFSv4)")
	pf.StringVar(&o.Image, "image", swarm.DefaultImage, "runner image that must be present")
	pf.StringVar(&o.Accel, "accel", config.AccelKVM, "kvm, or tcg for a node without KVM: labelled "+swarm.AccelLabel+"=tcg, it runs only the VMs that ask for TCG")
	cmd.AddCommand(e.nodeCheckCmd(&o), e.nodeProbeHereCmd(&o), e.nodeLabelCmd(&o), e.nodeUnlabelCmd(), e.nodeDrainCmd())
	return cmd
}

func (e *env) nodeCheckCmd(o *swarm.ProbeOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "check [NODE]",
		Short: "Probe this node (KVM device, broker, storage, runner image), or NODE from a short job there",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkAccel(o.Accel); err != nil {
				return err
			}
			return withSwarm(cmd, func(c *swarm.Client) error {
				other, err := otherNode(cmd, c, args)
				switch {
				case err != nil:
					return err
				case other != "":
					return e.probeOther(cmd, c, other, *o)
				}
				return e.printProbe(c.Probe(cmd.Context(), *o))
			})
		},
	}
}

func (e *env) nodeProbeHereCmd(o *swarm.ProbeOptions) *cobra.Command {
	return &cobra.Command{
		Use:    "probe-here",
		Short:  "(runs in a Swarm job on a node) probe the node as a VM's task sees it",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return e.printProbe(nodecheck.ProbeInTask(cmd.Context(), o.Options))
		},
	}
}

func (e *env) nodeLabelCmd(o *swarm.ProbeOptions) *cobra.Command {
	var force bool
	label := &cobra.Command{
		Use:   "label [NODE]",
		Short: "Probe the node (this one, or NODE from a short job there), then set vm-capable=true on it",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkAccel(o.Accel); err != nil {
				return err
			}
			return withSwarm(cmd, func(c *swarm.Client) error { return e.label(cmd, c, *o, args, force) })
		},
	}
	label.Flags().BoolVar(&force, "force", false, "label even when the probe fails (another node: without its probe job)")
	return label
}

func (e *env) nodeUnlabelCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "unlabel [NODE]",
		Short: "Clear vm-capable on a node (NODE defaults to this one); its VMs become pending when updated",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSwarm(cmd, func(c *swarm.Client) error {
				node, err := nodeArg(cmd, c, args)
				if err != nil {
					return err
				}
				host, err := c.Label(cmd.Context(), node, false, false)
				if err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "node %s: %s label removed\n", host, swarm.NodeLabel)
				return nil
			})
		},
	}
}

// label probes NODE (this node by default, here; another from a job
// there) and labels it; a node failing the probe only with force.
func (e *env) label(cmd *cobra.Command, c *swarm.Client, o swarm.ProbeOptions, args []string, force bool) error {
	ctx := cmd.Context()
	tcg := o.Accel == config.AccelTCG
	node, err := nodeArg(cmd, c, args)
	if err != nil {
		return err
	}
	self, err := c.IsSelf(ctx, node)
	if err != nil {
		return err
	}
	switch {
	case !self && force:
		fmt.Fprintf(e.stdout, "node %s: not probed (--force)\n", node)
	case !self:
		if err := e.probeOther(cmd, c, node, o); err != nil {
			return fmt.Errorf("%w: not labelling %s (--force labels anyway)", err, node)
		}
	case self:
		did, err := nodecheck.PrepareStorage(o.Storage)
		for _, d := range did {
			fmt.Fprintf(e.stdout, "storage: %s\n", d)
		}
		if err != nil {
			fmt.Fprintf(e.stdout, "storage: cannot prepare %s: %v\n", o.Storage, err)
		}
		if err := e.printProbe(c.Probe(ctx, o)); err != nil && !force {
			return fmt.Errorf("%w: not labelling %s (--force labels anyway)", err, node)
		}
	}
	host, err := c.Label(ctx, node, true, tcg)
	if err != nil {
		return err
	}
	if tcg {
		fmt.Fprintf(e.stdout, "node %s labelled %s=true and %s=tcg: it runs only the VMs that ask for TCG (--accel tcg)\n", host, swarm.NodeLabel, swarm.AccelLabel)
		return nil
	}
	fmt.Fprintf(e.stdout, "node %s labelled %s=true\n", host, swarm.NodeLabel)
	return nil
}

// otherNode is the node to probe from a job there: NODE when it names a
// node other than this one, or the engine's own node when the engine is
// another machine's (DOCKER_HOST over TCP or SSH); else "" (probe here).
func otherNode(cmd *cobra.Command, c *swarm.Client, args []string) (string, error) {
	if len(args) == 0 && c.Local() {
		return "", nil
	}
	node, err := nodeArg(cmd, c, args)
	if err != nil {
		return "", err
	}
	self, err := c.IsSelf(cmd.Context(), node)
	if err != nil || self {
		return "", err
	}
	return node, nil
}

// probeOther probes another node from a job there and prints what it
// found, each line named with the node.
func (e *env) probeOther(cmd *cobra.Command, c *swarm.Client, node string, o swarm.ProbeOptions) error {
	fmt.Fprintf(e.stdout, "probing node %s from a job there (as a VM's task sees it)\n", node)
	if err := c.ProbeNode(cmd.Context(), node, o, prefixed{e, node + ": "}); err != nil {
		return fmt.Errorf("node probe of %s failed: %w", node, err)
	}
	return nil
}

func checkAccel(accel string) error {
	if accel != config.AccelKVM && accel != config.AccelTCG {
		return &usageError{fmt.Errorf("--accel %q: a node is probed for kvm or for tcg", accel)}
	}
	return nil
}

func nodeArg(cmd *cobra.Command, c *swarm.Client, args []string) (string, error) {
	if len(args) == 1 {
		return args[0], nil
	}
	id, _, err := c.Self(cmd.Context())
	return id, err
}

func (e *env) printProbe(fs []preflight.Finding) error {
	if e.printFindings(fs) > 0 {
		return &silentError{errors.New("node probe failed")}
	}
	fmt.Fprintln(e.stdout, "this node can run VMs")
	return nil
}
