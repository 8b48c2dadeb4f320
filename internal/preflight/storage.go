package preflight

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

func access(path string, mode uint32) error {
	return unix.Faccessat(unix.AT_FDCWD, path, mode, unix.AT_EACCESS)
}

// StorageRoot checks the folder VM storage lives in: it must be there (a
// bind mount from the node), with images/ and logs/ writable by the
// container user (or the root writable, to create them).
func StorageRoot(path string) Finding {
	const name, symptom = "storage", "VM storage unusable"
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fail(name, ClassStorage, symptom, path+" does not exist in this container",
			fmt.Sprintf("mount the node's %s into the service (a bind mount, same path)", path))
	case err != nil:
		return fail(name, ClassStorage, symptom, err.Error(), "check the mount of "+path)
	case !fi.IsDir():
		return fail(name, ClassStorage, symptom, path+" is not a folder", "mount a folder at "+path)
	}
	// The runner writes in images/ and logs/, and creates the three
	// folders when they are missing: only then must the root be writable.
	var need []string
	for _, d := range []string{"images", "isos", "logs"} {
		if _, err := os.Stat(filepath.Join(path, d)); errors.Is(err, os.ErrNotExist) {
			need = append(need, d+"/")
		}
	}
	mode, what := uint32(unix.X_OK), "enter"
	if len(need) > 0 {
		mode, what = unix.W_OK|unix.X_OK, "create "+strings.Join(need, ", ")+" in"
	}
	if err := access(path, mode); err != nil {
		return fail(name, ClassStorage, symptom,
			fmt.Sprintf("%s cannot %s %s (%s)", who(), what, path, owner(fi)),
			fmt.Sprintf("on the node: swarmvm node label prepares it for VMs in group %d (or chown -R %d:%d %s)", config.RunnerGID, os.Geteuid(), os.Getegid(), path))
	}
	for _, d := range []string{"images", "logs"} {
		if p := filepath.Join(path, d); !slices.Contains(need, d+"/") && access(p, unix.W_OK|unix.X_OK) != nil {
			detail := "unreadable"
			if dfi, err := os.Stat(p); err == nil {
				detail = owner(dfi)
			}
			return fail(name, ClassStorage, symptom,
				fmt.Sprintf("%s cannot write in %s (%s)", who(), p, detail),
				fmt.Sprintf("on the node: swarmvm node label prepares it (root:%d, mode 1770), for a service in group %d", config.RunnerGID, config.RunnerGID))
		}
	}
	return pass(name, ClassStorage, "%s usable (%s)", path, owner(fi))
}

// Disk checks the VM's disk image: present and readable and writable by the
// container user, or absent with DISK_SIZE set and a folder to create it in.
func Disk(path string, create bool) Finding {
	const name, symptom = "disk", "QEMU cannot access disk"
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		if !create {
			return fail(name, ClassStorage, symptom, "IMAGE_PATH "+path+" does not exist",
				"set DISK_SIZE (e.g. 20G) to create it, or copy a qcow2 image there")
		}
		// The runner creates missing folders, so the nearest existing one
		// must be writable.
		dir := filepath.Dir(path)
		for _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) && dir != "/"; _, err = os.Stat(dir) {
			dir = filepath.Dir(dir)
		}
		if err := access(dir, unix.W_OK|unix.X_OK); err != nil {
			detail := ""
			if dfi, serr := os.Stat(dir); serr == nil {
				detail = " (" + owner(dfi) + ")"
			}
			return fail(name, ClassStorage, symptom, fmt.Sprintf("%s cannot create %s: %v%s", who(), path, err, detail),
				fmt.Sprintf("on the node: chown %d:%d %s", os.Geteuid(), os.Getegid(), dir))
		}
		return pass(name, ClassStorage, "%s absent: will be created (DISK_SIZE)", path)
	}
	if errors.Is(err, os.ErrPermission) {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("%s cannot reach %s: %s", who(), path, blocked(path)),
			fmt.Sprintf("on the node: let uid %d search that folder (chmod o+x, or chown it)", os.Geteuid()))
	}
	if err != nil {
		return fail(name, ClassStorage, symptom, err.Error(), "check IMAGE_PATH and the storage mount")
	}
	if !fi.Mode().IsRegular() {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("IMAGE_PATH %s is not a regular file (%s)", path, fi.Mode()),
			"point IMAGE_PATH at a qcow2 file")
	}
	if f, bad := notMine(name, symptom, "IMAGE_PATH", path, fi); bad {
		return f
	}
	if err := access(path, unix.R_OK|unix.W_OK); err != nil {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("%s cannot read and write %s (%s)", who(), path, owner(fi)),
			fmt.Sprintf("on the node: chown %d:%d %s && chmod 0600 %s", os.Geteuid(), os.Getegid(), path, path))
	}
	return pass(name, ClassStorage, "%s readable and writable (%s)", path, owner(fi))
}

// ReadOnly checks a file QEMU only reads: ISO, kernel, initrd, firmware.
func ReadOnly(name, variable, path string) Finding {
	symptom := "QEMU cannot read " + variable
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fail(name, ClassStorage, symptom, variable+" "+path+" does not exist", "copy the file there or fix "+variable)
	case err != nil:
		return fail(name, ClassStorage, symptom, err.Error(), "fix "+variable)
	case fi.IsDir():
		return fail(name, ClassStorage, symptom, variable+" "+path+" is a folder", "point "+variable+" at a file")
	}
	if err := access(path, unix.R_OK); err != nil {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("%s cannot read %s (%s)", who(), path, owner(fi)),
			fmt.Sprintf("on the node: chmod a+r %s", path))
	}
	return pass(name, ClassStorage, "%s readable", path)
}

// OVMF checks the firmware: code and template readable and a matching pair,
// and an existing vars file of the template's size, writable. A mismatch
// would start the VM with NVRAM the firmware cannot use.
func OVMF(code, template, vars string, reset bool) Finding {
	const name, symptom = "ovmf", "UEFI firmware unusable"
	for _, f := range []Finding{ReadOnly(name, "OVMF_CODE", code), ReadOnly(name, "OVMF_VARS_TEMPLATE", template)} {
		if !f.OK {
			f.Symptom = symptom
			return f
		}
	}
	want, err := qemu.CheckPair(code, template)
	if err != nil {
		return fail(name, ClassStorage, symptom, err.Error(),
			"use OVMF_CODE and OVMF_VARS_TEMPLATE of one build, e.g. OVMF_CODE_4M.fd with OVMF_VARS_4M.fd")
	}
	fi, err := os.Stat(vars)
	if errors.Is(err, os.ErrNotExist) {
		return pass(name, ClassStorage, "%s + %s match; %s will be created from the template", code, template, vars)
	}
	if err != nil {
		return fail(name, ClassStorage, symptom, err.Error(), "check OVMF_VARS")
	}
	if fi.Size() != want && !reset {
		return fail(name, ClassStorage, symptom,
			fmt.Sprintf("OVMF_VARS %s is %d bytes but OVMF_VARS_TEMPLATE is %d: it belongs to another firmware build", vars, fi.Size(), want),
			"point OVMF_VARS at this VM's own vars for this firmware, or set OVMF_VARS_RESET=true once to set it aside and start from the template")
	}
	if f, bad := notMine(name, symptom, "OVMF_VARS", vars, fi); bad {
		return f
	}
	if err := access(vars, unix.R_OK|unix.W_OK); err != nil {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("%s cannot read and write %s (%s)", who(), vars, owner(fi)),
			fmt.Sprintf("on the node: chown %d:%d %s", os.Geteuid(), os.Getegid(), vars))
	}
	if reset {
		return pass(name, ClassStorage, "%s will be set aside and recreated (OVMF_VARS_RESET)", vars)
	}
	return pass(name, ClassStorage, "%s + %s match; %s is this VM's NVRAM", code, template, vars)
}

// blocked names the first folder on the way to path that the process may
// not search.
func blocked(path string) string {
	dir := "/"
	for _, seg := range splitPath(filepath.Dir(path)) {
		dir = filepath.Join(dir, seg)
		if err := access(dir, unix.X_OK); err != nil {
			if fi, serr := os.Stat(dir); serr == nil {
				return fmt.Sprintf("folder %s may not be entered (%s)", dir, owner(fi))
			}
			return fmt.Sprintf("folder %s may not be entered", dir)
		}
	}
	return "permission denied"
}

func splitPath(p string) []string {
	var out []string
	for _, s := range strings.Split(p, "/") {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}

// notMine refuses a disk or NVRAM file owned by another uid: each VM's are
// its own. Such a file was made by another VM under this name (perhaps a
// link to a file it controls), or before VMs had their own uids.
func notMine(name, symptom, variable, path string, fi os.FileInfo) (Finding, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || int(st.Uid) == os.Geteuid() {
		return Finding{}, false
	}
	return fail(name, ClassStorage, symptom,
		fmt.Sprintf("%s %s belongs to uid %d, not to this VM's uid %d: another VM's file, or one made before each VM had a uid of its own", variable, path, st.Uid, os.Geteuid()),
		fmt.Sprintf("if it is this VM's, on the node: chown %d:%d %s (a disk or NVRAM is never shared between VMs)", os.Geteuid(), os.Getegid(), path)), true
}

// Home checks that a VM on node-local storage runs on its home node, the one
// that holds its disk and NVRAM. Anywhere else the runner would start the VM
// on an empty disk (or a stale copy) and fork it: two disks under one name.
// An empty home means no home to check (shared storage, or outside Swarm).
func Home(home, nodeID, hostname string) Finding {
	const name, symptom = "home node", "VM storage is on another node"
	here := nodeID
	if hostname != "" {
		here = fmt.Sprintf("%s (%s)", hostname, nodeID)
	}
	if home == "" || home == nodeID || strings.EqualFold(home, hostname) {
		if home == "" {
			return pass(name, ClassStorage, "no home node (shared storage, or not under Swarm)")
		}
		return pass(name, ClassStorage, "this node %s is the VM's home", here)
	}
	return fail(name, ClassStorage, symptom,
		fmt.Sprintf("this node %s is not the VM's home node %s, which holds its disk and NVRAM; swarmvm never starts a VM on an empty or stale disk elsewhere", here, home),
		"bring the home node back (docker node update --availability active "+home+"), or move the VM there from here: swarmvm move <vm> --to <node>")
}

// SecureBoot checks, for BOOT_MODE=uefi-secure, that the NVRAM the VM
// boots with has Secure Boot's keys (PK, KEK, db) enrolled: the template a
// new one is made from, and this VM's own when it exists and is kept. A
// vars file made from the plain firmware's template would boot the Secure
// Boot build in setup mode, Secure Boot off, without a word.
func SecureBoot(template, vars string, reset bool) Finding {
	const name, symptom = "secure-boot", "Secure Boot would be off"
	keys, err := qemu.SecureBootKeys(template)
	if err != nil {
		return fail(name, ClassConfig, symptom, "OVMF_VARS_TEMPLATE: "+err.Error(), "set OVMF_VARS_TEMPLATE to "+config.DefaultOVMFSecureVarsTemplate+" or leave it unset")
	}
	if !keys {
		return fail(name, ClassConfig, symptom, fmt.Sprintf("OVMF_VARS_TEMPLATE %s has no Secure Boot keys enrolled (no PK, KEK or db)", template),
			"set OVMF_VARS_TEMPLATE to "+config.DefaultOVMFSecureVarsTemplate+" (Microsoft's keys) or leave it unset")
	}
	if _, err := os.Stat(vars); errors.Is(err, os.ErrNotExist) || reset {
		return pass(name, ClassConfig, "%s has Secure Boot keys; this VM's NVRAM will be made from it", template)
	}
	keys, err = qemu.SecureBootKeys(vars)
	if err != nil {
		return fail(name, ClassConfig, symptom, "OVMF_VARS: "+err.Error(), "restore this VM's vars file, or set OVMF_VARS_RESET=true once to set it aside and start from the template")
	}
	if !keys {
		return fail(name, ClassConfig, symptom,
			fmt.Sprintf("OVMF_VARS %s has no Secure Boot keys enrolled: it was made from the plain firmware's template (BOOT_MODE=uefi)", vars),
			"keep BOOT_MODE=uefi for this VM, or set OVMF_VARS_RESET=true once: the file is set aside and a new one made from "+template+" (its boot entries and firmware settings start afresh)")
	}
	return pass(name, ClassConfig, "%s has Secure Boot keys (PK, KEK, db)", vars)
}

// TPM checks, for TPM=on, that swtpm is there and that the TPM's state
// folder, when it exists, is this VM's alone (a folder, its uid, 0700).
func TPM(swtpm, state string, reset bool) Finding {
	const name, symptom = "tpm", "the VM's TPM cannot start"
	bin, err := exec.LookPath(swtpm)
	if err != nil {
		return fail(name, ClassStorage, symptom, "SWTPM_BINARY: "+err.Error(), "use the swarmvm image (it has Debian's swtpm), or set SWTPM_BINARY")
	}
	fi, err := os.Lstat(state)
	if errors.Is(err, os.ErrNotExist) {
		return pass(name, ClassStorage, "%s; TPM_STATE %s will be created (0700)", bin, state)
	}
	if err != nil {
		return fail(name, ClassStorage, symptom, err.Error(), "check TPM_STATE")
	}
	if reset {
		return pass(name, ClassStorage, "%s; TPM_STATE %s will be set aside and a new TPM made (TPM_RESET)", bin, state)
	}
	if !fi.IsDir() {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("TPM_STATE %s is not a folder (%s)", state, fi.Mode().Type()), "move it away: the TPM's state is a folder of this VM's own")
	}
	if f, bad := notMine(name, symptom, "TPM_STATE", state, fi); bad {
		return f
	}
	if fi.Mode().Perm() != 0o700 {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("TPM_STATE %s has mode %04o: the TPM's secrets must be this VM's alone", state, fi.Mode().Perm()),
			"on the node: chmod 700 "+state)
	}
	return pass(name, ClassStorage, "%s; TPM_STATE %s is this VM's (0700)", bin, state)
}
