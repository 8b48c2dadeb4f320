package backup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/qemu"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

// RestoreOptions say which backup to restore and whether the VM's files
// on the node may be set aside for it.
type RestoreOptions struct {
	Repo    string
	ID      string
	Replace bool
	Now     func() time.Time
	// From restores another VM's backup (its folder in the repository)
	// as this VM (restore --as): everything but its cloud-init key, so
	// that this VM keeps its own instance-id. Owner is whom the files are
	// made for when the restore runs as root (nil: this uid's own).
	From  string
	Owner *Owner
}

// Owner is a VM's uid and gid.
type Owner struct{ UID, GID int }

// Restore builds the VM's disk, NVRAM, TPM state and cloud-init key on
// this node from a backup: its chain (the full backup and the
// incrementals up to it) is checked against the manifests' checksums,
// then converted into a new qcow2 beside the VM's disk path; nothing is
// written over a file: an existing one is refused, or set aside with
// Replace (NAME.qcow2.replaced-<time>). The VM must not run here.
func Restore(ctx context.Context, cfg config.Config, o RestoreOptions, out io.Writer) error {
	if o.Now == nil {
		o.Now = time.Now
	}
	if runnerAnswers(cfg) {
		return fmt.Errorf("%s runs on this node (its runner answers on %s): stop it first (the service scaled to 0; swarmvm restore --replace does it)", cfg.Name, control.Path(cfg.StorageDir, cfg.Name))
	}
	from := cfg.Name
	if o.From != "" {
		from = o.From
	}
	dir, err := vmDir(o.Repo, from, false)
	if err != nil {
		return err
	}
	release, err := lock(dir, from)
	if err != nil {
		return err
	}
	defer release()
	entries, err := list(dir)
	if err != nil {
		return err
	}
	chain, err := Chain(entries, o.ID)
	if err != nil {
		return err
	}
	var disks []string
	for _, e := range chain {
		if err := checkFiles(e, DiskFile); err != nil {
			return err
		}
		disks = append(disks, filepath.Join(e.Dir, DiskFile))
	}
	last := chain[len(chain)-1]
	if err := checkFiles(last, ""); err != nil {
		return err
	}
	fmt.Fprintf(out, "restoring backup %s of %s (%s, point %s; a chain of %d) on this node as %s\n", last.ID, from, last.Mode, last.Point.Format(time.RFC3339), len(chain), cfg.Name)
	if o.Owner != nil && cfg.TPM {
		// Root without CAP_DAC_OVERRIDE may not write in the VM's own 0700
		// TPM folder: it is root's while the restore works in it, and the
		// VM's again after, whatever happens.
		if fi, err := os.Lstat(cfg.TPMState); err == nil && fi.IsDir() && ownerOf(fi) != os.Geteuid() {
			if err := os.Lchown(cfg.TPMState, os.Geteuid(), os.Getegid()); err != nil {
				return fmt.Errorf("the TPM folder %s: %w", cfg.TPMState, err)
			}
		}
		defer func() {
			if fi, err := os.Lstat(cfg.TPMState); err == nil && fi.IsDir() {
				o.own(cfg.TPMState)
			}
		}()
	}
	targets := map[string]string{"disk": cfg.ImagePath, "nvram": uefiVars(cfg), "tpm": tpmState(cfg), "seed-key": cfg.SeedKeyPath()}
	if from != cfg.Name {
		delete(targets, "seed-key") // a key of its own, made at its first start: its own instance-id
	}
	for _, f := range last.Files {
		dst := targets[f.Role]
		if dst == "" {
			continue
		}
		if _, err := os.Lstat(dst); err == nil {
			if !o.Replace {
				return fmt.Errorf("%s exists: restore never writes over a VM's file; give --replace to set it aside (renamed .replaced-<time>)", dst)
			}
			aside, err := vmdisk.SetAsideFile(dst, "replaced", o.Now())
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "set aside %s as %s\n", dst, aside)
		}
	}
	img := qemu.Img{}
	next := 0.0
	if err := img.ConvertChain(ctx, disks, cfg.ImagePath, func(p float64) {
		if p >= next {
			fmt.Fprintf(out, "restoring the disk: %3.0f%%\n", p)
			next = p - float64(int(p)%10) + 10
		}
	}); err != nil {
		return fmt.Errorf("the disk: %w", err)
	}
	if res, err := img.Check(ctx, cfg.ImagePath); err != nil || res.Corruptions+res.CheckErrors > 0 {
		return fmt.Errorf("the restored disk %s failed qemu-img check (%v, %+v): it is left for inspection; remove it before restoring again", cfg.ImagePath, err, res)
	}
	if err := o.own(cfg.ImagePath); err != nil {
		return err
	}
	for _, f := range last.Files {
		dst := targets[f.Role]
		if dst == "" || f.Role == "disk" {
			continue
		}
		if f.Role == "tpm" {
			if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
				return err
			}
		}
		if err := copyFile(filepath.Join(last.Dir, f.Name), dst); err != nil {
			return fmt.Errorf("%s: %w", f.Role, err)
		}
		if err := syncFile(dst); err != nil {
			return err
		}
		if err := o.own(dst); err != nil {
			return err
		}
		if f.Role == "tpm" {
			if err := o.own(filepath.Dir(dst)); err != nil {
				return err
			}
		}
	}
	fmt.Fprintf(out, "restored %s from backup %s: %s (checked clean), and %d more files; the next backup is full (the restored disk has no dirty bitmap)\n", cfg.Name, last.ID, cfg.ImagePath, len(last.Files)-1)
	if from != cfg.Name {
		fmt.Fprintf(out, "%s is a copy of %s with its own identity: its uid and MAC, and a cloud-init key of its own at its first start (a new instance-id)\n", cfg.Name, from)
	}
	return nil
}

// own gives a restored file (or the TPM's folder) to the VM it is for,
// mode 0600 (0700 for a folder), when the restore runs as root for
// another VM's backup; never through a link.
func (o RestoreOptions) own(path string) error {
	if o.Owner == nil {
		return nil
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	mode := os.FileMode(0o600)
	switch {
	case fi.IsDir():
		mode = 0o700
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%s is not a regular file (%s): refused", path, fi.Mode().Type())
	}
	if err := os.Lchown(path, o.Owner.UID, o.Owner.GID); err != nil {
		return fmt.Errorf("giving %s to uid %d: %w", path, o.Owner.UID, err)
	}
	return os.Chmod(path, mode)
}

// runnerAnswers says whether the VM's runner listens on this node.
func runnerAnswers(cfg config.Config) bool {
	return control.Answers(control.Path(cfg.StorageDir, cfg.Name))
}

// checkFiles checks a backup's files against its manifest (size and
// SHA-256): only the one named, or all when name is "".
func checkFiles(e Entry, name string) error {
	for _, f := range e.Files {
		if name != "" && f.Name != name {
			continue
		}
		size, sum, err := checksum(filepath.Join(e.Dir, f.Name))
		switch {
		case errors.Is(err, os.ErrNotExist):
			return fmt.Errorf("backup %s: %s is missing", e.ID, f.Name)
		case err != nil:
			return fmt.Errorf("backup %s: %s: %w", e.ID, f.Name, err)
		case size != f.Size || sum != f.SHA256:
			return fmt.Errorf("backup %s: %s does not match its manifest (%d bytes, sha256 %.12s…; the manifest says %d bytes, %.12s…): the backup is damaged", e.ID, f.Name, size, sum, f.Size, f.SHA256)
		}
	}
	return nil
}
