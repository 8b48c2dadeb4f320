package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

// Options say where a backup goes and how.
type Options struct {
	Repo string
	// Full asks for a full backup even where an incremental one could be;
	// FullEvery, for one when the newest backup's chain (itself, the
	// incrementals it builds on and their full one) has that many (0: no
	// limit). A chain is pruned whole, so fulls now and then let old
	// backups go.
	Full      bool
	FullEvery int
	// Freeze is how long the guest's filesystems may stay frozen around
	// the point (through its agent); 0 takes none.
	Freeze     time.Duration
	Node       string // the node's name, for the manifest
	Definition []byte // the VM's service spec
	// Now is the clock (time.Now when nil).
	Now func() time.Time
	// Img runs qemu-img (the runner, PID 1 of its container, runs its
	// children through its own reaper).
	Img qemu.Img
}

// DefaultFullEvery is how long a chain grows before a full backup, where
// the operator says nothing (a daily schedule: a full one a week).
const DefaultFullEvery = 7

// DefaultFreeze is a backup's hold on a frozen guest: the transaction
// that starts QEMU's job takes milliseconds; the guest is thawed at once
// after it, and at the latest when this ends.
const DefaultFreeze = 10 * time.Second

// Run backs the VM up into the repository, on the VM's node as its uid:
// online through the runner's control socket when the VM runs here, else
// from its disk (full: qemu-img convert, which the disk's lock refuses
// while a QEMU holds it). It returns the complete backup's manifest.
func Run(ctx context.Context, cfg config.Config, o Options, out io.Writer) (Manifest, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	dir, done, release, err := openForBackup(o.Repo, cfg.Name, out)
	if err != nil {
		return Manifest{}, err
	}
	defer release()
	newest, length := offerOf(done)
	parent, why := choose(newest, length, o)
	return take(ctx, cfg, o, dir, parent, why, len(done) > 0, out, nil)
}

// openForBackup opens (making it) the VM's folder in the repository,
// takes its lock, removes what cut backups left, and lists the complete
// ones; release lets the lock go.
func openForBackup(repo, vm string, out io.Writer) (dir string, done []Entry, release func(), err error) {
	if dir, err = vmDir(repo, vm, true); err != nil {
		return "", nil, nil, err
	}
	if release, err = lock(dir, vm); err != nil {
		return "", nil, nil, err
	}
	removePartials(dir, out)
	if done, err = list(dir); err != nil {
		release()
		return "", nil, nil, err
	}
	return dir, done, release, nil
}

// offerOf is what a new backup could build on: the newest complete backup
// and how many its chain has.
func offerOf(done []Entry) (newest string, length int) {
	if len(done) == 0 {
		return "", 0
	}
	newest = done[len(done)-1].ID
	if chain, err := Chain(done, newest); err == nil {
		length = len(chain)
	}
	return newest, length
}

// choose decides what a backup builds on: the newest backup, unless a
// full one is asked or its chain is long enough (why says which).
func choose(newest string, length int, o Options) (parent, why string) {
	if newest == "" || o.Full {
		return "", ""
	}
	if o.FullEvery > 0 && length >= o.FullEvery {
		return "", fmt.Sprintf("the newest backup's chain has %d backups (a full one every %d)", length, o.FullEvery)
	}
	return newest, ""
}

// take backs the VM up into dir/ID (written as dir/ID.partial), building
// on parent, then hands it to keep (nil: it stays there), and settles the
// runner's bitmap: committed once the backup is kept, else dropped.
func take(ctx context.Context, cfg config.Config, o Options, dir, parent, why string, hadAny bool, out io.Writer, keep func(Manifest, string) error) (Manifest, error) {
	m := Manifest{Version: ManifestVersion, VM: cfg.Name, ID: NewID(o.Now()), Node: o.Node, Definition: json.RawMessage(o.Definition)}
	work := filepath.Join(dir, m.ID+partial)
	if err := os.Mkdir(work, 0o700); err != nil {
		return Manifest{}, err
	}
	fmt.Fprintf(out, "backup %s of %s into %s\n", m.ID, cfg.Name, dir)
	online, err := backupDisk(ctx, cfg, o, &m, parent, work, out)
	if err != nil {
		os.RemoveAll(work)
		return Manifest{}, err
	}
	switch {
	case o.Full && hadAny:
		m.ModeReason = "asked for (--full)"
	case why != "" && m.Mode == "full":
		m.ModeReason = why
	}
	final := filepath.Join(dir, m.ID)
	err = finish(ctx, cfg, &m, work, final, o.Now)
	if err == nil && keep != nil {
		err = keep(m, final)
	}
	if online {
		op := control.OpCommit
		if err != nil {
			op = control.OpAbort
		}
		settle(cfg, op, m.ID, out)
	}
	if err != nil {
		os.RemoveAll(work)
		return Manifest{}, err
	}
	return m, nil
}

// removePartials removes what backups cut short left (the lock is held:
// none of them runs).
func removePartials(dir string, out io.Writer) {
	des, _ := os.ReadDir(dir)
	for _, de := range des {
		if strings.HasSuffix(de.Name(), partial) {
			os.RemoveAll(filepath.Join(dir, de.Name()))
			fmt.Fprintf(out, "removed %s, left by a backup that did not finish\n", de.Name())
		}
	}
}

// backupDisk writes the disk's backup into work/disk0.qcow2, online when
// the VM's runner answers on this node, and fills in m.
func backupDisk(ctx context.Context, cfg config.Config, o Options, m *Manifest, parent, work string, out io.Writer) (online bool, err error) {
	target := filepath.Join(work, DiskFile)
	sock := control.Path(cfg.StorageDir, cfg.Name)
	if _, err := os.Lstat(sock); err == nil {
		f, err := os.OpenFile(target, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return false, err
		}
		defer f.Close()
		r, err := control.Ask(ctx, sock, control.Request{Op: control.OpBackup, ID: m.ID, Parent: parent, Files: []string{control.FileDisk}, Freeze: o.Freeze}, f)
		var refused *control.RefusedError
		switch {
		case err == nil:
			m.Online, m.Mode, m.ModeReason, m.Consistency, m.ConsistencyWhy = true, r.Mode, r.ModeReason, r.Consistency, r.Why
			m.Point, m.Bitmap, m.DiskSize = r.Point, r.Bitmap, r.DiskSize
			if r.Mode == control.Incremental {
				m.Parent = parent
				if err := o.Img.SetBacking(ctx, target, filepath.Join("..", parent, DiskFile)); err != nil {
					return true, err
				}
			}
			fmt.Fprintf(out, "%s backup (%s), %s-consistent (%s), point %s, copied in %s\n", m.Mode, m.ModeReason, m.Consistency, m.ConsistencyWhy, m.Point.Format(time.RFC3339), r.Took)
			return true, nil
		case errors.As(err, &refused):
			return false, fmt.Errorf("the VM's runner: %s", refused.Reason)
		case !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT):
			return false, err
		}
		os.Remove(target) // no runner behind the socket: the VM is stopped
	}
	return false, offline(ctx, o.Img, cfg, m, target, out)
}

// offline backs up a stopped VM's disk whole, then restarts its dirty
// bitmaps at this point, so that the next online backup can be
// incremental.
func offline(ctx context.Context, img qemu.Img, cfg config.Config, m *Manifest, target string, out io.Writer) error {
	info, err := img.Info(ctx, cfg.ImagePath)
	if err != nil {
		return fmt.Errorf("the VM's disk: %w", err)
	}
	m.Point = time.Now().UTC()
	if err := img.Convert(ctx, cfg.ImagePath, "qcow2", target, nil); err != nil {
		if strings.Contains(err.Error(), "lock") {
			return fmt.Errorf("the VM's disk %s is in use by a QEMU, but its runner does not answer on %s: start the backup where the VM runs (swarmvm backup finds its node), or wait for its start to finish: %w",
				cfg.ImagePath, control.Path(cfg.StorageDir, cfg.Name), err)
		}
		return err
	}
	m.Mode, m.ModeReason = "full", "the VM is stopped: a backup of a stopped VM is full"
	m.Consistency, m.ConsistencyWhy = "stopped", "the VM was not running"
	m.DiskSize = info.VirtualSize
	m.Bitmap = control.BitmapName(m.ID)
	for _, b := range info.Specific.Data.Bitmaps {
		if strings.HasPrefix(b.Name, "swarmvm-") {
			if err := img.Bitmap(ctx, cfg.ImagePath, "remove", b.Name); err != nil {
				return err
			}
		}
	}
	if err := img.Bitmap(ctx, cfg.ImagePath, "add", m.Bitmap); err != nil {
		return fmt.Errorf("the dirty bitmap for the next backup: %w", err)
	}
	fmt.Fprintf(out, "full backup of the stopped VM's disk (%d bytes virtual)\n", info.VirtualSize)
	return nil
}

// finish adds the VM's other files, checksums everything, writes the
// manifest and gives the folder its final name: only then is the backup
// complete.
func finish(ctx context.Context, cfg config.Config, m *Manifest, work, final string, now func() time.Time) error {
	files := []File{{Name: DiskFile, Role: "disk"}}
	for _, f := range []struct{ role, path string }{
		{"nvram", uefiVars(cfg)},
		{"tpm", tpmState(cfg)},
		{"seed-key", cfg.SeedKeyPath()},
	} {
		if f.path == "" {
			continue
		}
		name := f.role + filepath.Ext(f.path)
		if err := copyFile(f.path, filepath.Join(work, name)); errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return fmt.Errorf("%s %s: %w", f.role, f.path, err)
		}
		files = append(files, File{Name: name, Role: f.role})
	}
	for i := range files {
		p := filepath.Join(work, files[i].Name)
		if err := syncFile(p); err != nil {
			return err
		}
		size, sum, err := checksum(p)
		if err != nil {
			return err
		}
		files[i].Size, files[i].SHA256 = size, sum
	}
	m.Files = files
	m.Finished = now().UTC()
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	mp := filepath.Join(work, manifestName)
	if err := os.WriteFile(mp, b, 0o600); err != nil {
		return err
	}
	if err := syncFile(mp); err != nil {
		return err
	}
	if err := syncDir(work); err != nil {
		return err
	}
	if err := os.Rename(work, final); err != nil {
		return err
	}
	return syncDir(filepath.Dir(final))
}

func uefiVars(cfg config.Config) string {
	if cfg.UEFI() {
		return cfg.OVMFVars
	}
	return ""
}

// tpmFile is swtpm's state file in the VM's TPM folder.
const tpmFile = "tpm2-00.permall"

func tpmState(cfg config.Config) string {
	if cfg.TPM {
		return filepath.Join(cfg.TPMState, tpmFile)
	}
	return ""
}

// copyFile copies one of the VM's small files (never through a link).
func copyFile(src, dst string) error {
	in, err := os.OpenFile(src, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// settle tells the runner whether the backup is in the repository: its
// bitmap becomes the base (commit), or is dropped (abort). A runner that
// does not hear it keeps both bitmaps, and the next backup is still
// right: it starts from the last complete one's.
func settle(cfg config.Config, op, id string, out io.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := control.Ask(ctx, control.Path(cfg.StorageDir, cfg.Name), control.Request{Op: op, ID: id}); err != nil {
		fmt.Fprintf(out, "the runner did not take the %s of backup %s (%v): the next backup starts from the last complete one\n", op, id, err)
	}
}
