package cli

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/backup"
	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

func (e *env) backupExportCmd() *cobra.Command {
	var ttl, freeze time.Duration
	var pskFile, closeID string
	cmd := &cobra.Command{
		Use:   "export NAME [--ttl 1h] [--psk-file FILE] | export NAME --close ID",
		Short: "Open a read-only NBD export of a running VM's disk at one point in time, for other backup tools",
		Long: `Export serves the running VM's disk as it was at one moment, read-only over NBD
on its node's export port (deploy --export-port), with the dirty bitmap of its
newest swarmvm backup as the meta context qemu:dirty-bitmap:swarmvm-ID: the
extents changed since that backup. The guest runs on meanwhile; what it
overwrites is kept aside beside its disk until the export closes.

Nobody gets in without the ticket this command writes to --psk-file: a TLS
pre-shared key signed with the VM's console key (kept where swarmvm deploy
ran), valid until --ttl runs out. The export closes then, or with --close ID.
One backup, snapshot or export of a VM at a time.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if closeID != "" {
				return withSwarm(cmd, func(c *swarm.Client) error {
					_, err := c.Export(cmd.Context(), name, swarm.ExportOptions{ID: closeID, Close: true}, e.stdout)
					return err
				})
			}
			if ttl < time.Minute || ttl > control.MaxExport {
				return &usageError{fmt.Errorf("--ttl %v is outside 1m–%v", ttl, control.MaxExport)}
			}
			key, err := console.Keys{Dir: e.consoleKeys()}.Load(name)
			if err != nil {
				return err
			}
			if pskFile == "" {
				pskFile = name + ".psk"
			}
			if pskFile, err = filepath.Abs(pskFile); err != nil {
				return err
			}
			o := swarm.ExportOptions{ID: backup.NewID(time.Now()), Until: time.Now().Add(ttl).Truncate(time.Second), Freeze: freeze}
			user := console.ExportUser(name, o.ID, o.Until)
			if err := writePSK(pskFile, console.PSKLine(user, console.ExportKey(key, user))); err != nil {
				return err
			}
			return withSwarm(cmd, func(c *swarm.Client) error {
				t, err := c.Export(cmd.Context(), name, o, e.stdout)
				if err != nil {
					os.Remove(pskFile)
					return err
				}
				uri := fmt.Sprintf("nbds://%s@%s/%s?tls-psk-file=%s", user, net.JoinHostPort(t.Addr, strconv.Itoa(t.Port)), "disk0", pskFile)
				fmt.Fprintf(e.stdout, "%s: export %s on node %s, port %d, until %s; its ticket is %s\n", name, o.ID, t.Node, t.Port, o.Until.UTC().Format(time.RFC3339), pskFile)
				fmt.Fprintf(e.stdout, "%s\n", uri)
				fmt.Fprintf(e.stdout, "  nbdinfo --map=qemu:dirty-bitmap:swarmvm-ID '%s'\n  nbdcopy '%s' disk0.raw\n", uri, uri)
				fmt.Fprintf(e.stdout, "close it sooner: swarmvm backup export %s --close %s\n", name, o.ID)
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.DurationVar(&ttl, "ttl", time.Hour, "how long the export stays open")
	f.DurationVar(&freeze, "freeze", backup.DefaultFreeze, "freeze the guest's filesystems through its agent for at most this long around the point (0: do not)")
	f.StringVar(&pskFile, "psk-file", "", "where to write the ticket (default NAME.psk here), for nbdinfo's and nbdcopy's tls-psk-file")
	f.StringVar(&closeID, "close", "", "close the export with this id")
	cmd.AddCommand(e.backupExportHereCmd())
	return cmd
}

// writePSK writes a ticket readable by its owner alone.
func writePSK(path, line string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("--psk-file: %w", err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("--psk-file: %w", err)
	}
	if _, err := f.WriteString(line); err != nil {
		f.Close()
		return fmt.Errorf("--psk-file: %w", err)
	}
	return f.Close()
}

// backupExportHereCmd is the job's side, on the VM's node as its uid: it
// asks the runner.
func (e *env) backupExportHereCmd() *cobra.Command {
	var id, until string
	var freeze time.Duration
	var closeIt bool
	cmd := e.jobSide("here", "(runs in a Swarm job on the VM's node) ask the runner for the export", func(cmd *cobra.Command, cfg config.Config) error {
		req := control.Request{Op: control.OpExport, ID: id, Freeze: freeze}
		if closeIt {
			req.Op = control.OpExportClose
		} else {
			t, err := time.Parse(time.RFC3339, until)
			if err != nil {
				return &usageError{fmt.Errorf("--until %q: %v", until, err)}
			}
			req.Until = t
		}
		r, err := control.Ask(cmd.Context(), control.Path(cfg.StorageDir, cfg.Name), req)
		if err != nil {
			return err
		}
		if closeIt {
			fmt.Fprintf(e.stdout, "export %s closed\n", id)
			return nil
		}
		fmt.Fprintf(e.stdout, "export %s open: point %s, %s-consistent (%s), port %d in the task\n",
			id, r.Point.Format(time.RFC3339), r.Consistency, r.Why, r.Port)
		if len(r.Bitmaps) == 0 {
			fmt.Fprintln(e.stdout, "no dirty bitmap: this VM has no swarmvm backup whose bitmap it keeps (a backup makes one)")
		}
		for _, b := range r.Bitmaps {
			fmt.Fprintf(e.stdout, "meta context qemu:dirty-bitmap:%s: what changed since backup %s\n", b, strings.TrimPrefix(b, "swarmvm-"))
		}
		return nil
	})
	f := cmd.Flags()
	f.StringVar(&id, "id", "", "the export's id")
	f.StringVar(&until, "until", "", "when it closes (RFC 3339)")
	f.DurationVar(&freeze, "freeze", 0, "freeze hold")
	f.BoolVar(&closeIt, "close", false, "close it")
	return cmd
}
