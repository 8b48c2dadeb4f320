package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
