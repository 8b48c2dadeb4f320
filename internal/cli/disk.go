package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/swarm"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

func (e *env) diskCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "disk",
		Short: "A VM's disk on its node: import an image",
	}
	cmd.AddCommand(e.diskImportCmd(), e.nodeSide("import-here"), e.nodeSide("send"), e.nodeSide("receive"), e.nodeSide("set-aside"))
	return cmd
}

func (e *env) diskImportCmd() *cobra.Command {
	var def swarm.Definition
	var vm swarm.VM
	var url string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "import NAME [SOURCE]",
		Short: "Make a VM's disk from an image (qcow2, raw, vmdk, vhdx, vdi): a file on its home node, or --url",
		Long: `Import converts an image into the VM's disk on its home node (the node its
definition names, the one recorded for it, or one picked as deploy picks),
owned by the VM's own uid, mode 0600, checked with qemu-img; a UEFI VM also
gets its NVRAM from the template. It runs there as a Swarm job, as the VM's
uid: SOURCE is a path on that node, readable by the VM's uid or group 10001.
Images with a backing file or an external data file are refused, and an
existing disk is never replaced. Then swarmvm deploy the VM with the same
name: it runs where its disk is.`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if (len(args) == 2) == (url != "") {
				return &usageError{fmt.Errorf("give SOURCE (a file on the node) or --url, one of them")}
			}
			vm.Name = args[0]
			def.VMs = []swarm.VM{vm}
			rs, err := def.Resolve()
			if err != nil {
				return &usageError{err}
			}
			source := ""
			if len(args) == 2 {
				source = args[1]
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			return withSwarm(cmd, func(c *swarm.Client) error {
				return c.ImportDisk(ctx, rs[0], source, url, e.stdout)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&url, "url", "", "download the image from this URL on the node, instead of SOURCE")
	f.StringVar(&vm.Node, "node", "", "the VM's home node (when it has none yet; default: picked as deploy picks)")
	f.IntVar(&vm.UID, "uid", 0, "the VM's own uid, as in its definition (default: derived from the name)")
	f.StringVar(&vm.BootMode, "boot-mode", "", "uefi (default: the NVRAM is made too), uefi-secure or bios")
	f.StringVar(&def.Image, "image", "", "runner image (default "+swarm.DefaultImage+")")
	f.StringVar(&def.Storage, "storage", "", "VM storage folder on the nodes (default "+swarm.DefaultStorage+")")
	f.DurationVar(&timeout, "timeout", time.Hour, "give up after this long")
	return cmd
}

// jobSide is a hidden command that runs in a Swarm job on a node, as the
// VM's uid, with the VM's runner environment: run gets that
// configuration, checked.
func (e *env) jobSide(use, short string, run func(*cobra.Command, config.Config) error) *cobra.Command {
	return &cobra.Command{
		Use:    use,
		Short:  short,
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := config.FromEnv(e.getenv)
			if err := cfg.Validate(); err != nil {
				return &usageError{err}
			}
			return run(cmd, cfg)
		},
	}
}

// nodeSide is one of the disk commands that run inside a Swarm job on a
// node, as the VM's uid, with the VM's runner environment.
func (e *env) nodeSide(kind string) *cobra.Command {
	var source, url, key, peer, listen string
	var rate int64
	var remove bool
	cmd := e.jobSide(kind, "(runs in a Swarm job on a node) "+kind, func(cmd *cobra.Command, cfg config.Config) error {
		ctx := cmd.Context()
		switch kind {
		case "import-here":
			return vmdisk.Import(ctx, cfg, source, url, e.stdout)
		case "send":
			ctx, cancel := context.WithTimeout(ctx, 24*time.Hour)
			defer cancel()
			return vmdisk.Send(ctx, cfg, peer, key, rate, e.stdout)
		case "receive":
			ctx, cancel := context.WithTimeout(ctx, 24*time.Hour)
			defer cancel()
			return vmdisk.Receive(ctx, cfg, listen, key, e.stdout)
		}
		return vmdisk.SetAside(cfg, remove, time.Now(), e.stdout)
	})
	f := cmd.Flags()
	switch kind {
	case "import-here":
		f.StringVar(&source, "source", "", "image file")
		f.StringVar(&url, "url", "", "image URL")
	case "send":
		f.StringVar(&key, "key", "", "the move's key pair (PEM)")
		f.StringVar(&peer, "peer", "", "receiver host:port")
		f.Int64Var(&rate, "rate", 0, "bytes a second (0: no limit)")
	case "receive":
		f.StringVar(&key, "key", "", "the move's key pair (PEM)")
		f.StringVar(&listen, "listen", ":7070", "address to listen on")
	case "set-aside":
		f.BoolVar(&remove, "delete", false, "remove the files instead")
	}
	return cmd
}

func (e *env) moveCmd() *cobra.Command {
	var o swarm.MoveOptions
	var rate string
	cmd := &cobra.Command{
		Use:   "move NAME --to NODE",
		Short: "Cold-migrate a VM on local storage to another node: stop, copy disk and NVRAM, verify, re-pin, start",
		Long: `Move powers the VM off through ACPI, copies its disk and NVRAM from its home
node to NODE through Swarm (two short-lived tasks on an overlay network of
their own, mutual TLS with a key made for this move, SHA-256 checksums, and
qemu-img check of the copy), then makes NODE the VM's home and starts it
there. The copy on the old home is set aside (renamed with .moved-<time>)
unless --delete-source. A move that fails or is cut short leaves the VM on its
old home, where it is started again; run move again to retry.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.To == "" {
				return &usageError{fmt.Errorf("--to NODE is required")}
			}
			if rate != "" {
				n, err := config.ParseSize(rate, 1)
				if err != nil {
					return &usageError{fmt.Errorf("--max-rate: %w", err)}
				}
				o.Rate = n
			}
			key, err := vmdisk.NewMoveKey(args[0])
			if err != nil {
				return err
			}
			o.Key = key
			return withSwarm(cmd, func(c *swarm.Client) error {
				if err := c.Move(cmd.Context(), args[0], o, e.stdout); err != nil {
					return err
				}
				wctx, cancel := context.WithTimeout(cmd.Context(), o.Wait)
				defer cancel()
				if err := c.WaitVM(wctx, args[0], prefixed{e, args[0] + ": "}); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "%s: moved to %s and running\n", args[0], o.To)
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.To, "to", "", "the node to move the VM to (ID or hostname)")
	f.BoolVar(&o.DeleteSource, "delete-source", false, "delete the old home's copy instead of setting it aside")
	f.StringVar(&rate, "max-rate", "", "limit the copy to this many bytes a second, e.g. 50M")
	f.DurationVar(&o.Wait, "wait", 5*time.Minute, "wait this long for the VM to stop, and then to run on the new home")
	return cmd
}
