// Package vmdisk does what happens to one VM's disk and NVRAM on a node,
// in short-lived Swarm tasks that run there as the VM's own uid: import an
// image (converted, checked, installed without replacing anything), send
// and receive the files for a move (mutual TLS with a key only the two tasks
// hold, checksums, QEMU's image lock held while reading), and set a copy
// aside once the VM's home is elsewhere. Nothing here overwrites or deletes
// a disk that counts as the VM: the home node's copy.
package vmdisk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/preflight"
)

// onHome fails unless this node is the VM's home: only there does its copy
// count.
func onHome(cfg config.Config) error {
	if cfg.HomeNode == "" {
		return errors.New("HOME_NODE is not set: the task does not know the VM's home")
	}
	if f := preflight.Home(cfg.HomeNode, cfg.NodeID, cfg.NodeHostname); !f.OK {
		return f
	}
	return nil
}

// offHome fails on the VM's home: a copy arriving there, or one set aside
// there, would be the one that counts.
func offHome(cfg config.Config) error {
	if cfg.HomeNode == "" {
		return errors.New("HOME_NODE is not set: the task does not know the VM's home")
	}
	if preflight.Home(cfg.HomeNode, cfg.NodeID, cfg.NodeHostname).OK {
		return fmt.Errorf("this node (%s) is the VM's home: its disk there is the one that counts and is left alone", cfg.NodeHostname)
	}
	return nil
}

// vmFile is one of the VM's files and its role in a move.
type vmFile struct{ role, path string }

// roles of a move's files; the receiver names each file itself.
const (
	roleDisk  = "disk"
	roleNVRAM = "nvram"
	roleTPM   = "tpm"
	roleKey   = "cloud-init-key"
)

// tpmFile is the file swtpm keeps a TPM 2.0's permanent state in, inside
// TPM_STATE.
const tpmFile = "tpm2-00.permall"

// vmFiles are the VM's files on this node, as the runner names them: the
// disk, the NVRAM for UEFI, the TPM's state with TPM=on, and the key of
// its cloud-init instance-id (there once it had a seed; without it, the
// guest would get a new instance-id on the VM's new home).
func vmFiles(cfg config.Config) []vmFile {
	fs := []vmFile{{roleDisk, cfg.ImagePath}}
	if cfg.UEFI() {
		fs = append(fs, vmFile{roleNVRAM, cfg.OVMFVars})
	}
	if cfg.TPM {
		fs = append(fs, vmFile{roleTPM, filepath.Join(cfg.TPMState, tpmFile)})
	}
	return append(fs, vmFile{roleKey, cfg.SeedKeyPath()})
}

func files(cfg config.Config) []string {
	var out []string
	for _, f := range vmFiles(cfg) {
		out = append(out, f.path)
	}
	return out
}

// SetAside renames the VM's files on this node, which is no longer its
// home, out of the runner's way (suffix .moved-<time>), or removes them
// when remove is set. Files that are not there are skipped.
func SetAside(cfg config.Config, remove bool, now time.Time, log io.Writer) error {
	if err := offHome(cfg); err != nil {
		return err
	}
	for _, f := range files(cfg) {
		if _, err := os.Lstat(f); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if remove {
			if err := os.Remove(f); err != nil {
				return err
			}
			fmt.Fprintf(log, "removed %s\n", f)
			continue
		}
		aside, err := SetAsideFile(f, "moved", now)
		if err != nil {
			return err
		}
		fmt.Fprintf(log, "set aside %s as %s\n", f, aside)
	}
	return nil
}

// SetAsideFile renames f to f.<why>-<time>, never over another file.
func SetAsideFile(f, why string, now time.Time) (string, error) {
	aside := fmt.Sprintf("%s.%s-%s", f, why, now.UTC().Format("20060102T150405Z"))
	if err := os.Link(f, aside); err != nil {
		return "", fmt.Errorf("set aside %s: %w", f, err)
	}
	if err := os.Remove(f); err != nil {
		return "", fmt.Errorf("set aside %s: %w", f, err)
	}
	// A stamp describes the file under its old name: a start checks anew.
	os.Remove(config.CheckedStamp(f))
	return aside, nil
}
