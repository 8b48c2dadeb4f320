package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/procfs"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

// secureBootDisk puts the Secure Boot fixture's disk (scripts/
// secureboot-fixture.sh: Debian's Microsoft-signed shim, Debian's signed
// GRUB and kernel, the test guest's initramfs; or the same with shim's
// signatures removed) in the VM's storage as its disk.
func secureBootDisk(t *testing.T, v *vm, which string) {
	t.Helper()
	dir := os.Getenv("SWARMVM_SECUREBOOT")
	if dir == "" {
		dir = filepath.Join("..", "..", ".cache", "secureboot")
	}
	src := filepath.Join(dir, which+".qcow2")
	if _, err := os.Stat(src); err != nil {
		t.Fatalf("Secure Boot guest missing (make guest): %v", err)
	}
	os.MkdirAll(filepath.Join(v.store, "images"), 0o750)
	copyFile(t, src, filepath.Join(v.store, "images", v.name+".qcow2"))
	chownAll(t, v.store, runnerUID)
}

// secureEnv starts the fixture's disk under BOOT_MODE=uefi-secure. The
// disk comes from elsewhere with no NVRAM: OVMF_VARS_RESET makes the VM's
// own from the template, as the runner asks for such a disk.
func secureEnv() []string {
	return []string{"ACCEL=tcg", "BOOT_MODE=uefi-secure", "VM_MEMORY=512M", "OVMF_VARS_RESET=true"}
}

// A Linux guest that boots the way a Secure Boot machine boots (firmware →
// Microsoft-signed shim → Debian-signed GRUB → Debian-signed kernel) under
// BOOT_MODE=uefi-secure finds Secure Boot on, from the EFI variable; QEMU
// runs with SMM and the secure flash, and the VM's NVRAM has the keys.
func TestSecureBootGuest(t *testing.T) {
	v := newVM(t)
	secureBootDisk(t, v, "signed")
	v.run(nil, secureEnv()...)
	v.waitFor("the guest's Secure Boot line", 4*time.Minute, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-SECUREBOOT") })
	serial := v.serial()
	for _, want := range []string{"swarmvm: GRUB loaded", "EFI stub: UEFI Secure Boot is enabled", "secureboot: Secure boot enabled", "SWARMVM-GUEST-SECUREBOOT 1"} {
		if !strings.Contains(serial, want) {
			t.Errorf("serial console lacks %q", want)
		}
	}
	_, pid := v.qemuPID()
	argv, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.ReplaceAll(string(argv), "\x00", " ")
	for _, want := range []string{"q35,smm=on,pflash0=ovmf-code,pflash1=ovmf-vars", "driver=cfi.pflash01,property=secure,value=on", "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"} {
		if !strings.Contains(args, want) {
			t.Errorf("QEMU's argv lacks %q: %s", want, args)
		}
	}
	if keys, err := qemu.SecureBootKeys(filepath.Join(v.store, "images", v.name+".OVMF_VARS.fd")); !keys || err != nil {
		t.Errorf("the VM's NVRAM: Secure Boot keys %v, %v", keys, err)
	}
	if code, _ := v.stop(2 * time.Minute); code != 0 {
		t.Errorf("stop: exit %d", code)
	}
}

// The same disk with an unsigned bootloader: the firmware refuses it, and
// the runner's log says so and why.
func TestSecureBootRefusesUnsigned(t *testing.T) {
	v := newVM(t)
	secureBootDisk(t, v, "unsigned")
	v.run(nil, secureEnv()...)
	v.waitFor("the runner's word on the refusal", 4*time.Minute, func() bool {
		return strings.Contains(v.logs(), "firmware could not boot an entry")
	})
	logs := v.logs()
	for _, want := range []string{`reason="Access Denied"`, "Secure Boot refused the bootloader"} {
		if !strings.Contains(logs, want) {
			t.Errorf("runner log lacks %q", want)
		}
	}
	if s := v.serial(); !strings.Contains(s, "Access Denied") || strings.Contains(s, "GRUB loaded") || strings.Contains(s, "SWARMVM-GUEST-BOOTED") {
		t.Errorf("serial console: want the firmware's refusal and nothing booted:\n%s", s)
	}
}

// NVRAM made for plain uefi (no Secure Boot keys) is refused under
// uefi-secure before QEMU starts, naming the file and the fix, and left as
// it was.
func TestSecureBootRefusesPlainNVRAM(t *testing.T) {
	v := newVM(t)
	secureBootDisk(t, v, "signed")
	vars := filepath.Join(v.store, "images", v.name+".OVMF_VARS.fd")
	copyFile(t, "/usr/share/OVMF/OVMF_VARS_4M.fd", vars)
	chownAll(t, v.store, runnerUID)
	before := sha(t, vars)
	v.run(nil, "ACCEL=tcg", "BOOT_MODE=uefi-secure", "VM_MEMORY=512M")
	if code := v.waitExit(time.Minute); code != 2 {
		t.Fatalf("exit %d, want 2 (configuration)", code)
	}
	logs := v.logs()
	for _, want := range []string{"no Secure Boot keys enrolled", "OVMF_VARS_RESET=true", vars[len(v.store):]} {
		if !strings.Contains(logs, want) {
			t.Errorf("runner log lacks %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs, "starting QEMU") {
		t.Error("QEMU was started")
	}
	if sha(t, vars) != before {
		t.Error("the NVRAM file was changed")
	}
}

// waitSerialCount waits until the serial log holds want at least n times
// (the log spans restarts of the VM).
func waitSerialCount(v *vm, want string, n int, timeout time.Duration) {
	v.t.Helper()
	v.waitFor(fmt.Sprintf("%q (%d×)", want, n), timeout, func() bool { return strings.Count(v.serial(), want) >= n })
}

// TPM=on under uefi-secure, as Windows 11 wants it: the guest finds a TPM
// 2.0 and reads its PCRs; a value the guest writes into the TPM's NV
// storage is read back after a restart; swtpm runs as the VM's uid with no
// capability, no_new_privs and a seccomp filter of its own on top of
// Docker's; its state folder is 0700 and the VM's; killed, it takes the VM
// down with exit 11; TPM_RESET starts a new TPM and keeps the old state.
func TestTPMGuest(t *testing.T) {
	v := newVM(t)
	secureBootDisk(t, v, "signed")
	state := filepath.Join(v.store, "images", v.name+".tpm")
	restart := func(env ...string) {
		t.Helper()
		exec.Command("docker", "rm", "-f", v.name).Run()
		v.run(nil, append([]string{"ACCEL=tcg", "BOOT_MODE=uefi-secure", "VM_MEMORY=512M", "TPM=on"}, env...)...)
	}

	// First start of a disk from elsewhere: new NVRAM, new TPM.
	restart("OVMF_VARS_RESET=true", "TPM_RESET=true")
	waitSerialCount(v, "SWARMVM-GUEST-TPMNV-SET swarmvm-nv-test1", 1, 4*time.Minute)
	serial := v.serial()
	if !strings.Contains(serial, "SWARMVM-GUEST-SECUREBOOT 1") || !strings.Contains(serial, "SWARMVM-GUEST-TPM version=2") {
		t.Errorf("guest: want Secure Boot on and a TPM 2.0")
	}
	for _, pcr := range []string{"0", "7"} {
		prefix := "SWARMVM-GUEST-PCR sha256 " + pcr + " "
		i := strings.Index(serial, prefix)
		if i < 0 || len(serial) < i+len(prefix)+64 || strings.Trim(serial[i+len(prefix):i+len(prefix)+64], "0") == "" {
			t.Errorf("PCR %s not read, or all zero", pcr)
		}
	}
	runner, _ := v.qemuPID()
	swtpm := procfs.ChildNamed(runner, "swtpm")
	if swtpm == 0 {
		t.Fatal("no swtpm under the runner")
	}
	st, rst := status(t, swtpm), status(t, runner)
	t.Logf("swtpm pid %d: Uid %s CapEff %s CapPrm %s NoNewPrivs %s Seccomp %s filters %s (runner: %s)",
		swtpm, st["Uid"], st["CapEff"], st["CapPrm"], st["NoNewPrivs"], st["Seccomp"], st["Seccomp_filters"], rst["Seccomp_filters"])
	if st["Uid"] != fmt.Sprintf("%d\t%d\t%d\t%d", runnerUID, runnerUID, runnerUID, runnerUID) || st["CapEff"] != "0000000000000000" ||
		st["CapPrm"] != "0000000000000000" || st["NoNewPrivs"] != "1" || st["Seccomp"] != "2" || atoi(st["Seccomp_filters"]) <= atoi(rst["Seccomp_filters"]) {
		t.Errorf("swtpm is not the VM's uid without privilege under its own filter: %v", st)
	}
	var fs syscall.Stat_t
	if err := syscall.Stat(state, &fs); err != nil || fs.Mode&0o777 != 0o700 || int(fs.Uid) != runnerUID {
		t.Errorf("TPM state folder: mode %o uid %d, %v", fs.Mode&0o777, fs.Uid, err)
	}
	if code, _ := v.stop(2 * time.Minute); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}

	// Restarted: the NV value is still there.
	restart()
	waitSerialCount(v, "SWARMVM-GUEST-TPMNV swarmvm-nv-test1", 1, 4*time.Minute)

	// swtpm killed under the running VM: exit 11, the reason in the log.
	runner, _ = v.qemuPID()
	if swtpm = procfs.ChildNamed(runner, "swtpm"); swtpm == 0 {
		t.Fatal("no swtpm under the runner")
	}
	syscall.Kill(swtpm, syscall.SIGKILL)
	if code := v.waitExit(time.Minute); code != 11 {
		t.Fatalf("swtpm killed: exit %d, want 11", code)
	}
	if logs := v.logs(); !strings.Contains(logs, "swtpm ended while the VM ran; stopping the VM") || !strings.Contains(logs, "event=exit code=11") {
		t.Errorf("runner log does not say the TPM ended:\n%s", logs)
	}

	// TPM_RESET: a new TPM (the index is gone), the old state kept aside.
	restart("TPM_RESET=true")
	waitSerialCount(v, "SWARMVM-GUEST-TPMNV-SET swarmvm-nv-test1", 2, 4*time.Minute)
	aside, _ := filepath.Glob(state + ".*.bak")
	if len(aside) != 1 {
		t.Fatalf("old TPM state set aside: %v", aside)
	}
	if _, err := os.Stat(filepath.Join(aside[0], "tpm2-00.permall")); err != nil {
		t.Errorf("the old TPM state is not whole: %v", err)
	}
	if code, _ := v.stop(2 * time.Minute); code != 0 {
		t.Errorf("stop: exit %d", code)
	}
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// GUEST_OS=windows: QEMU starts the Windows device set (SATA disk on q35's
// AHCI, e1000e NIC, USB tablet, RTC in local time) with a drivers CD-ROM,
// and the guest boots on it. Under TCG without the Hyper-V enlightenments,
// which KVM provides (the argv golden test covers them).
func TestWindowsProfile(t *testing.T) {
	v := newVM(t)
	drivers := filepath.Join(v.store, "isos", "virtio-win.iso")
	os.MkdirAll(filepath.Dir(drivers), 0o755)
	if err := os.WriteFile(drivers, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	chownAll(t, v.store, runnerUID)
	v.run(nil, append(kernelEnv(""), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M",
		"GUEST_OS=windows", "DRIVERS_ISO=/var/lib/poc-qemu/isos/virtio-win.iso")...)
	v.waitFor("boot marker", 3*time.Minute, func() bool { return strings.Contains(v.serial(), marker) })
	_, pid := v.qemuPID()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.ReplaceAll(string(b), "\x00", " ")
	for _, want := range []string{"-device ide-hd,drive=disk0,bus=ide.0", "-device e1000e,netdev=net0", "-device usb-tablet,bus=usb.0",
		"-rtc base=localtime,driftfix=slew", "file=/var/lib/poc-qemu/isos/virtio-win.iso", "-device ide-cd,drive=cd1,bus=ide.1"} {
		if !strings.Contains(args, want) {
			t.Errorf("QEMU's argv lacks %q", want)
		}
	}
	if strings.Contains(args, "hv-") || strings.Contains(args, "virtio-blk-pci,drive=disk0") {
		t.Errorf("TCG with Hyper-V flags, or the disk on virtio: %s", args)
	}
	if code, _ := v.stop(time.Minute); code != 0 {
		t.Errorf("stop: exit %d", code)
	}
}

// doctor in the image covers the new parts: the Secure Boot firmware and
// its keys, swtpm, and the TPM state folder's owner and mode.
func TestDoctorSecureBootAndTPM(t *testing.T) {
	require(t)
	store := t.TempDir()
	os.MkdirAll(filepath.Join(store, "images", "w11.tpm"), 0o755)
	os.Chmod(filepath.Join(store, "images", "w11.tpm"), 0o755)
	chownAll(t, store, runnerUID)
	doctor := func() string {
		out, _ := exec.Command("docker", "run", "--rm", "--read-only", "--cap-drop", "ALL", "--user", fmt.Sprintf("%d:%d", runnerUID, runnerUID),
			"-v", store+":/var/lib/poc-qemu", "-e", "VM_NAME=w11", "-e", "ACCEL=tcg", "-e", "BOOT_MODE=uefi-secure", "-e", "TPM=on",
			"--entrypoint", "swarmvm", image, "doctor").CombinedOutput()
		return string(out)
	}
	out := doctor()
	contains(t, "doctor output", out, "ok    secure-boot", "OVMF_VARS_4M.ms.fd has Secure Boot keys",
		"ok    ovmf", "OVMF_CODE_4M.ms.fd", "FAIL  tpm", "has mode 0755", "chmod 700")
	os.Chmod(filepath.Join(store, "images", "w11.tpm"), 0o700)
	contains(t, "doctor output", doctor(), "ok    tpm", "/usr/bin/swtpm", "is this VM's (0700)")
}
