package cli

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/backup"
	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/swarm"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

func (e *env) backupCmd() *cobra.Command {
	var o swarm.BackupOptions
	cmd := &cobra.Command{
		Use:   "backup NAME --repo DIR",
		Short: "Back a VM up into a repository: online and incremental while it runs",
		Long: `Backup copies the VM's disk, NVRAM, TPM state and definition at one point in
time into DIR/NAME/ID on the VM's node (mount DIR on every node for NFS), in a
Swarm job there as the VM's uid. While the VM runs, its runner takes the
backup online: the guest's filesystems frozen through its agent for the moment
of the point when it has one (the backup says filesystem-consistent), else
crash-consistent. The first backup is full; the next ones hold only what
changed since the last, through a dirty bitmap in the VM's qcow2; a full one
again, saying why, when that bitmap is gone (QEMU killed, the VM restored or
moved). A stopped VM is backed up from its disk, in full. A backup cut short
is never listed; a second backup of a VM while one runs is refused.

The repository must be root's (or the VM's uid's) and let the VM's uid make
its own folder: install -d -m 1733 DIR, or make DIR/NAME owned by the VM's uid,
mode 0700.

A repository that only another node mounts: --repo-node NODE. The backup is
made beside the VM's disk (images/.NAME.backup, removed after) and sent to a
job on NODE over the channel a move uses (mutual TLS, a key made for this
backup), which checks every file's SHA-256 and keeps it; only then does the VM
count it as its last backup.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.Repo == "" {
				return &usageError{fmt.Errorf("--repo DIR is required")}
			}
			if o.RepoNode != "" {
				k, err := vmdisk.NewMoveKey(args[0])
				if err != nil {
					return err
				}
				o.Key = k
			}
			return withSwarm(cmd, func(c *swarm.Client) error {
				return c.Backup(cmd.Context(), args[0], o, e.stdout)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Repo, "repo", "", "the repository folder on the VM's node (absolute)")
	f.BoolVar(&o.Full, "full", false, "a full backup even where an incremental one could be")
	f.IntVar(&o.FullEvery, "full-every", backup.DefaultFullEvery, "a full backup when the newest backup's chain has this many (0: never by count); chains are pruned whole")
	f.DurationVar(&o.Freeze, "freeze", backup.DefaultFreeze, "freeze the guest's filesystems through its agent for at most this long around the point (0: do not)")
	f.StringVar(&o.Node, "node", "", "for a stopped VM on shared storage: the node to back it up on")
	f.StringVar(&o.RepoNode, "repo-node", "", "the node that mounts the repository, when the VM's node does not: the backup is sent there (mutual TLS, a key for this backup)")
	cmd.AddCommand(e.backupLsCmd(), e.backupVerifyCmd(), e.backupPruneCmd(), e.backupHereCmd(), e.backupExportCmd())
	return cmd
}

func (e *env) backupLsCmd() *cobra.Command {
	var repo string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ls NAME --repo DIR",
		Short: "List a VM's complete backups in a repository mounted here",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if repo == "" {
				return &usageError{fmt.Errorf("--repo DIR is required")}
			}
			list, err := backup.List(repo, args[0])
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(e.stdout)
				enc.SetIndent("", "  ")
				if list == nil {
					list = []backup.Entry{}
				}
				return enc.Encode(list)
			}
			w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tMODE\tPARENT\tCONSISTENCY\tPOINT\tUSED\tNODE")
			for _, b := range list {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", b.ID, b.Mode, or(b.Parent, "-"), b.Consistency,
					b.Point.Format(time.RFC3339), sizeOf(b.Used), b.Node)
			}
			return w.Flush()
		},
	}
	cmd.Flags().StringVar(&repo, "repo", "", "the repository folder")
	cmd.Flags().BoolVar(&asJSON, "json", false, "write the manifests as JSON")
	return cmd
}

// backupHereCmd is the job's side, on the VM's node as its uid.
func (e *env) backupHereCmd() *cobra.Command {
	var o backup.Options
	var listen, peer, key string
	cmd := &cobra.Command{
		Use:    "here",
		Short:  "(runs in a Swarm job on the VM's node) take the backup",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := config.FromEnv(e.getenv)
			if err := cfg.Validate(); err != nil {
				return &usageError{err}
			}
			o.Definition = []byte(e.getenv(swarm.EnvDefinition))
			var m backup.Manifest
			var err error
			switch {
			case listen != "":
				m, err = backup.Receive(cmd.Context(), cfg, o.Repo, listen, key, e.stdout)
			case peer != "":
				m, err = backup.Send(cmd.Context(), cfg, o, peer, key, e.stdout)
			default:
				m, err = backup.Run(cmd.Context(), cfg, o, e.stdout)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "backup %s complete: %s, %s-consistent, %d files\n", m.ID, m.Mode, m.Consistency, len(m.Files))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Repo, "repo", "", "the repository folder")
	f.BoolVar(&o.Full, "full", false, "full")
	f.IntVar(&o.FullEvery, "full-every", backup.DefaultFullEvery, "full when the chain has this many")
	f.DurationVar(&o.Freeze, "freeze", backup.DefaultFreeze, "freeze hold")
	f.StringVar(&o.Node, "node-name", "", "this node's name, for the manifest")
	f.StringVar(&listen, "listen", "", "the repository's side: take the backup from the sender on this address")
	f.StringVar(&peer, "peer", "", "the VM's side: send the backup to the repository's side at this address")
	f.StringVar(&key, "key", "", "the transfer's key pair (PEM)")
	return cmd
}

// sizeOf writes a byte count for a person: KiB, MiB or GiB, one decimal.
func sizeOf(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
}

func (e *env) restoreCmd() *cobra.Command {
	var o swarm.RestoreOptions
	cmd := &cobra.Command{
		Use:   "restore NAME --backup ID --repo DIR",
		Short: "Rebuild a VM's disk, NVRAM and TPM state from a backup, on its node",
		Long: `Restore checks the backup and the backups it builds on (their SHA-256
against the manifests), then writes the VM's disk, NVRAM, TPM state and
cloud-init key from them on the VM's node, in a Swarm job there as the VM's
uid. It never writes over a file: where the VM's files exist it refuses,
unless --replace, which stops the VM (the service scaled to 0), sets its
files aside (renamed .replaced-<time>) and starts it again after. The next
backup of a restored VM is full.

--node restores a VM on local storage on another node and makes that node its
home: for a VM whose home was lost, with the repository mounted there (NFS).
A running VM needs --replace (it is stopped, and its files on the old home
set aside once it lives on the new one); the old home's copy, when that node
is down, is left for you to remove when it is back (the runner never starts
a VM off its home).

--as NEW restores the backup as another VM, NEW, deployed first with its own
identity (swarmvm deploy --name NEW ...: its uid, MAC, ports and keys); NEW's
files are set aside with --replace, and NEW gets the backup's disk, NVRAM and
TPM state, but not its cloud-init key: a new instance-id. The source VM need
not exist any more. The job runs as root, able to read the source's folder
in the repository (CAP_DAC_READ_SEARCH) and to give the files to NEW's uid.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.Repo == "" || o.ID == "" {
				return &usageError{fmt.Errorf("--repo DIR and --backup ID are required")}
			}
			return withSwarm(cmd, func(c *swarm.Client) error {
				return c.Restore(cmd.Context(), args[0], o, e.stdout)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Repo, "repo", "", "the repository folder on the VM's node (absolute)")
	f.StringVar(&o.ID, "backup", "", "the backup's ID (swarmvm backup ls)")
	f.BoolVar(&o.Replace, "replace", false, "stop the VM and set its files aside for the restored ones")
	f.DurationVar(&o.Wait, "wait", 5*time.Minute, "wait this long for the VM to stop")
	f.StringVar(&o.Node, "node", "", "local storage: restore on this node and make it the VM's home; shared storage, stopped: the node to restore on")
	f.StringVar(&o.As, "as", "", "restore the backup as this other VM, deployed first (its own uid, MAC, ports, keys; --replace sets its disk aside); it gets a cloud-init instance-id of its own")
	cmd.AddCommand(e.restoreHereCmd())
	return cmd
}

// restoreHereCmd is the job's side, on the VM's node as its uid.
func (e *env) restoreHereCmd() *cobra.Command {
	var o backup.RestoreOptions
	var owner string
	cmd := &cobra.Command{
		Use:    "here",
		Short:  "(runs in a Swarm job on the VM's node) restore a backup",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := config.FromEnv(e.getenv)
			if err := cfg.Validate(); err != nil {
				return &usageError{err}
			}
			if owner != "" {
				var w backup.Owner
				if _, err := fmt.Sscanf(owner, "%d:%d", &w.UID, &w.GID); err != nil || w.UID <= 0 {
					return &usageError{fmt.Errorf("--owner %q: give the VM's uid:gid", owner)}
				}
				o.Owner = &w
			}
			return backup.Restore(cmd.Context(), cfg, o, e.stdout)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Repo, "repo", "", "the repository folder")
	f.StringVar(&o.ID, "backup", "", "the backup's ID")
	f.BoolVar(&o.Replace, "replace", false, "set the VM's files aside")
	f.StringVar(&o.From, "from", "", "the VM whose backup it is (restore --as)")
	f.StringVar(&owner, "owner", "", "uid:gid the files are for (as root, restore --as)")
	return cmd
}

func (e *env) backupVerifyCmd() *cobra.Command {
	var repo string
	cmd := &cobra.Command{
		Use:   "verify NAME --repo DIR",
		Short: "Re-read every backup of a VM: checksums, qemu-img check, chains",
		Long: `Verify re-reads every complete backup of the VM in a repository mounted here:
each file against the SHA-256 in its manifest, each disk with qemu-img check,
and each backup's chain down to a full one. It names every damaged backup and
file, and fails when there is one.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if repo == "" {
				return &usageError{fmt.Errorf("--repo DIR is required")}
			}
			problems, err := backup.Verify(cmd.Context(), repo, args[0], e.stdout)
			if err != nil {
				return err
			}
			if len(problems) > 0 {
				return fmt.Errorf("%d damaged backups of %s: the first, %s: %s", len(problems), args[0], problems[0].ID, problems[0].Error)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&repo, "repo", "", "the repository folder")
	return cmd
}

func (e *env) backupPruneCmd() *cobra.Command {
	var repo string
	var k backup.Keep
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "prune NAME --repo DIR --keep-last N [--keep-daily N] [--keep-weekly N]",
		Short: "Remove a VM's backups that no rule keeps",
		Long: `Prune keeps the newest --keep-last backups, and the newest backup of each of
the newest --keep-daily days and --keep-weekly ISO weeks that have one; the
newest backup is always kept, and so is every backup a kept one builds on.
The others are removed (each renamed first, so never listed half removed).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if repo == "" {
				return &usageError{fmt.Errorf("--repo DIR is required")}
			}
			if k.Last < 0 || k.Daily < 0 || k.Weekly < 0 || k.Last+k.Daily+k.Weekly == 0 {
				return &usageError{fmt.Errorf("give at least one of --keep-last, --keep-daily, --keep-weekly (numbers above 0)")}
			}
			_, err := backup.Prune(repo, args[0], k, dryRun, e.stdout)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&repo, "repo", "", "the repository folder")
	f.IntVar(&k.Last, "keep-last", 0, "keep the newest N backups")
	f.IntVar(&k.Daily, "keep-daily", 0, "keep the newest backup of each of the last N days with one")
	f.IntVar(&k.Weekly, "keep-weekly", 0, "keep the newest backup of each of the last N weeks with one")
	f.BoolVar(&dryRun, "dry-run", false, "say what would be removed, remove nothing")
	return cmd
}
