// Package snapshot keeps a VM's snapshots in its own qcow2 (internal
// snapshots), with a copy of its NVRAM and TPM state beside the disk in
// images/NAME.snapshots/S/. A snapshot is taken online through the runner
// (the guest frozen through its agent around it, as for a backup) or from
// the disk of a stopped VM; it is reverted with the VM stopped, after the
// disk's state at that moment is itself kept as a snapshot
// (before-revert-<time>) and its NVRAM and TPM state set aside: a revert
// loses nothing. It runs on the VM's node as the VM's uid (swarmvm
// snapshot here, in a Swarm job).
package snapshot

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
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

// Info is one snapshot as ls lists it.
type Info struct {
	Name  string    `json:"name"`
	Taken time.Time `json:"taken"`
	State []string  `json:"state,omitempty"` // the other files kept with it: nvram, tpm
}

// dir is where a snapshot's NVRAM and TPM state are kept.
func dir(cfg config.Config, name string) string {
	return filepath.Join(filepath.Dir(cfg.ImagePath), cfg.Name+".snapshots", name)
}

// ValidName: a snapshot's name is what a backup id may be.
func ValidName(s string) bool { return control.ValidID(s) }

// stateFiles are the VM's files a snapshot keeps beside the disk's.
func stateFiles(cfg config.Config) map[string]string {
	m := map[string]string{}
	if cfg.UEFI() {
		m["nvram"] = cfg.OVMFVars
	}
	if cfg.TPM {
		m["tpm"] = filepath.Join(cfg.TPMState, "tpm2-00.permall")
	}
	return m
}

// runnerAnswers says whether the VM's runner listens on this node.
func runnerAnswers(cfg config.Config) bool {
	return control.Answers(control.Path(cfg.StorageDir, cfg.Name))
}

// Create takes snapshot name: online through the runner when the VM runs
// here, else from its disk.
func Create(ctx context.Context, cfg config.Config, name string, freeze time.Duration, out io.Writer) error {
	if !ValidName(name) {
		return fmt.Errorf("snapshot name %q: use 1-40 letters, digits and '-'", name)
	}
	if have, err := List(ctx, cfg); err != nil {
		return err
	} else {
		for _, s := range have {
			if s.Name == name {
				return fmt.Errorf("%s already has a snapshot %s: name another, or remove it first", cfg.Name, name)
			}
		}
	}
	sd := dir(cfg, name)
	if err := os.MkdirAll(filepath.Dir(sd), 0o700); err != nil {
		return err
	}
	if err := os.Mkdir(sd, 0o700); err != nil {
		return fmt.Errorf("the snapshot's folder: %w", err)
	}
	if runnerAnswers(cfg) {
		r, err := control.Ask(ctx, control.Path(cfg.StorageDir, cfg.Name), control.Request{Op: control.OpSnapshot, ID: name, Freeze: freeze})
		if err != nil {
			os.RemoveAll(sd)
			return err
		}
		fmt.Fprintf(out, "snapshot %s of %s taken online, %s-consistent (%s)\n", name, cfg.Name, r.Consistency, r.Why)
	} else {
		if _, err := (qemu.Img{}).Run(ctx, "snapshot", "--image-opts", "-c", name, qcow2(cfg.ImagePath)); err != nil {
			os.RemoveAll(sd)
			return err
		}
		fmt.Fprintf(out, "snapshot %s of the stopped %s taken from its disk\n", name, cfg.Name)
	}
	for role, path := range stateFiles(cfg) {
		if err := copyFile(path, filepath.Join(sd, role)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("the snapshot's %s: %w", role, err)
		}
	}
	return nil
}

// List reads the disk's snapshots (with a shared lock: the VM may run).
func List(ctx context.Context, cfg config.Config) ([]Info, error) {
	b, err := (qemu.Img{}).Run(ctx, "info", "-U", "--output=json", "-f", "qcow2", cfg.ImagePath)
	if err != nil {
		return nil, err
	}
	var info struct {
		Snapshots []struct {
			Name    string `json:"name"`
			DateSec int64  `json:"date-sec"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal(b, &info); err != nil {
		return nil, err
	}
	var out []Info
	for _, s := range info.Snapshots {
		i := Info{Name: s.Name, Taken: time.Unix(s.DateSec, 0).UTC()}
		for role := range stateFiles(cfg) {
			if _, err := os.Stat(filepath.Join(dir(cfg, s.Name), role)); err == nil {
				i.State = append(i.State, role)
			}
		}
		out = append(out, i)
	}
	return out, nil
}

// Revert brings the stopped VM's disk, NVRAM and TPM state back to
// snapshot name. The disk's state before is kept as a snapshot, its NVRAM
// and TPM state set aside; the disk's dirty bitmaps are removed (QEMU
// reverts no disk that has them), so the next backup is full.
func Revert(ctx context.Context, cfg config.Config, name string, now time.Time, out io.Writer) error {
	if runnerAnswers(cfg) {
		return fmt.Errorf("%s runs on this node: a snapshot is reverted with the VM stopped (swarmvm snapshot revert stops it)", cfg.Name)
	}
	have, err := List(ctx, cfg)
	if err != nil {
		return err
	}
	found := false
	for _, s := range have {
		found = found || s.Name == name
	}
	if !found {
		return fmt.Errorf("%s has no snapshot %s (swarmvm snapshot ls)", cfg.Name, name)
	}
	img := qemu.Img{}
	keep := "before-revert-" + now.UTC().Format("20060102T150405Z")
	if _, err := img.Run(ctx, "snapshot", "--image-opts", "-c", keep, qcow2(cfg.ImagePath)); err != nil {
		return fmt.Errorf("keeping the disk's state before the revert: %w", err)
	}
	info, err := img.Info(ctx, cfg.ImagePath)
	if err != nil {
		return err
	}
	for _, b := range info.Specific.Data.Bitmaps {
		if err := img.Bitmap(ctx, cfg.ImagePath, "remove", b.Name); err != nil {
			return err
		}
	}
	if _, err := img.Run(ctx, "snapshot", "--image-opts", "-a", name, qcow2(cfg.ImagePath)); err != nil {
		return err
	}
	for role, path := range stateFiles(cfg) {
		saved := filepath.Join(dir(cfg, name), role)
		if _, err := os.Stat(saved); err != nil {
			continue
		}
		if _, err := os.Lstat(path); err == nil {
			aside, err := vmdisk.SetAsideFile(path, "reverted", now)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "set aside %s as %s\n", path, aside)
		}
		if err := copyFile(saved, path); err != nil {
			return fmt.Errorf("%s: %w", role, err)
		}
	}
	fmt.Fprintf(out, "%s reverted to snapshot %s; its state before is snapshot %s; the next backup is full\n", cfg.Name, name, keep)
	return nil
}

// Remove deletes snapshot name: online through the runner, else from the
// disk.
func Remove(ctx context.Context, cfg config.Config, name string, out io.Writer) error {
	if !ValidName(name) {
		return fmt.Errorf("snapshot name %q: use 1-40 letters, digits and '-'", name)
	}
	var err error
	if runnerAnswers(cfg) {
		_, err = control.Ask(ctx, control.Path(cfg.StorageDir, cfg.Name), control.Request{Op: control.OpSnapshotDelete, ID: name})
	} else {
		_, err = (qemu.Img{}).Run(ctx, "snapshot", "--image-opts", "-d", name, qcow2(cfg.ImagePath))
	}
	if err != nil {
		return err
	}
	os.RemoveAll(dir(cfg, name))
	fmt.Fprintf(out, "snapshot %s of %s removed\n", name, cfg.Name)
	return nil
}

// copyFile copies one of the VM's small files, never through a link and
// never over a file.
func copyFile(src, dst string) error {
	in, err := os.OpenFile(src, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, in)
	if serr := f.Sync(); err == nil {
		err = serr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// qcow2 names the disk for --image-opts: as a qcow2, never probed.
func qcow2(path string) string {
	return "driver=qcow2,file.driver=file,file.filename=" + strings.ReplaceAll(path, ",", ",,")
}

// NameNow is a snapshot's default name.
func NameNow(now time.Time) string {
	return "snap-" + strings.ToLower(now.UTC().Format("20060102T150405Z"))
}
