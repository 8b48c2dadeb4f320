package config

import (
	"errors"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func TestDefaults(t *testing.T) {
	c := FromEnv(env("VM_NAME", "web-1"))
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	want := Config{
		Name: "web-1", StorageDir: "/var/lib/poc-qemu",
		ImagePath: "/var/lib/poc-qemu/images/web-1.qcow2", DiskCache: "none", BootMode: "uefi",
		OVMFCode: DefaultOVMFCode, OVMFVars: "/var/lib/poc-qemu/images/web-1.OVMF_VARS.fd",
		OVMFVarsTemplate: DefaultOVMFVarsTemplate, TPMState: "/var/lib/poc-qemu/images/web-1.tpm", SwtpmBinary: "swtpm", GuestAgent: true, HealthAgentGrace: 2 * time.Minute, GuestOS: "linux", Accel: "kvm", KVMDevice: "/dev/kvm", NetMode: "user", TAPName: "tap0", TAPAddr: "10.0.3.1/24",
		CPUModel: "host", CPUs: 1, ShutdownTimeout: 90 * time.Second, StartTimeout: 30 * time.Second,
		SerialLogMax: 16 << 20, QEMUBinary: "qemu-system-x86_64", RunDir: "/run/vm", LogLevel: "info",
		StorageMode: "local", ConsoleKeyFile: "/run/secrets/swarmvm-console", CloudInitDir: "/run/secrets", CloudInitBus: "virtio",
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", c, want)
	}
}

func TestEveryVariable(t *testing.T) {
	c := FromEnv(env(
		"VM_NAME", "db", "STORAGE_DIR", "/srv/vm", "IMAGE_PATH", "/srv/vm/images/x.qcow2",
		"DISK_SIZE", "20G", "DISK_CACHE", "writeback", "ISO_PATH", "/srv/vm/isos/d.iso",
		"BOOT_MODE", "BIOS", "OVMF_CODE", "/fw/c.fd", "OVMF_VARS", "/srv/vm/v.fd",
		"OVMF_VARS_TEMPLATE", "/fw/v.fd", "OVMF_VARS_RESET", "true", "ACCEL", "tcg",
		"KVM_DEVICE", "/dev/kvm2", "KVM_BROKER", "/run/b/broker.sock", "TUN_DEVICE", "/dev/net/tun", "CPU_MODEL", "qemu64",
		"VM_CPUS", "4", "VM_MEMORY", "2G", "KERNEL_PATH", "/k", "INITRD_PATH", "/i",
		"KERNEL_CMDLINE", "console=ttyS0", "SHUTDOWN_TIMEOUT", "2m", "START_TIMEOUT", "45",
		"SERIAL_LOG_MAX", "1M", "QEMU_ARGS", `-device virtio-rng-pci -smbios "type=1,serial=a b"`,
		"QEMU_BINARY", "/usr/bin/qemu", "RUN_DIR", "/run/x", "LOG_LEVEL", "debug",
		"CONSOLE_PORT", "8006", "CONSOLE_KEY_FILE", "/run/secrets/k",
		"CLOUD_INIT", "NoCloud", "CLOUD_INIT_DIR", "/run/ci", "CLOUD_INIT_SSH_KEYS", "ssh-ed25519 A a\n\nssh-rsa B b\n", "CLOUD_INIT_BUS", "cdrom",
	))
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	if c.Broker != "/run/b/broker.sock" {
		t.Errorf("KVM_BROKER: %q", c.Broker)
	}
	got := []any{c.StorageDir, c.ImagePath, c.DiskSize, c.DiskCache, c.ISOPath, c.BootMode, c.OVMFCode,
		c.OVMFVars, c.OVMFVarsTemplate, c.OVMFVarsReset, c.Accel, c.KVMDevice, c.TUNDevice, c.CPUModel,
		c.CPUs, c.MemoryMiB, c.KernelPath, c.InitrdPath, c.KernelCmdline, c.ShutdownTimeout,
		c.StartTimeout, c.SerialLogMax, c.QEMUArgs, c.QEMUBinary, c.RunDir, c.LogLevel, c.ConsolePort, c.ConsoleKeyFile,
		c.CloudInit, c.CloudInitDir, c.CloudInitSSHKeys, c.CloudInitBus}
	want := []any{"/srv/vm", "/srv/vm/images/x.qcow2", int64(20 << 30), "writeback", "/srv/vm/isos/d.iso",
		"bios", "/fw/c.fd", "/srv/vm/v.fd", "/fw/v.fd", true, "tcg", "/dev/kvm2", "/dev/net/tun", "qemu64",
		4, int64(2048), "/k", "/i", "console=ttyS0", 2 * time.Minute, 45 * time.Second, int64(1 << 20),
		[]string{"-device", "virtio-rng-pci", "-smbios", "type=1,serial=a b"}, "/usr/bin/qemu", "/run/x", "debug", 8006, "/run/secrets/k",
		"nocloud", "/run/ci", []string{"ssh-ed25519 A a", "ssh-rsa B b"}, "cdrom"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %v\nwant %v", got, want)
	}
}

func TestDerivedDefaults(t *testing.T) {
	c := FromEnv(env("VM_NAME", "a", "STORAGE_DIR", "/data", "ACCEL", "tcg"))
	if c.ImagePath != "/data/images/a.qcow2" || c.OVMFVars != "/data/images/a.OVMF_VARS.fd" || c.CPUModel != "max" {
		t.Errorf("derived: image %q vars %q cpu %q", c.ImagePath, c.OVMFVars, c.CPUModel)
	}
}

// BOOT_MODE=uefi-secure brings Debian's Secure Boot pair unless the
// firmware files are named; the VM's own NVRAM stays where it was.
func TestSecureBootDefaults(t *testing.T) {
	c := FromEnv(env("VM_NAME", "w11", "BOOT_MODE", "UEFI-Secure"))
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.BootMode != BootUEFISecure || !c.UEFI() || c.OVMFCode != DefaultOVMFSecureCode || c.OVMFVarsTemplate != DefaultOVMFSecureVarsTemplate ||
		c.OVMFVars != "/var/lib/poc-qemu/images/w11.OVMF_VARS.fd" {
		t.Errorf("uefi-secure: %q uefi=%v code %q template %q vars %q", c.BootMode, c.UEFI(), c.OVMFCode, c.OVMFVarsTemplate, c.OVMFVars)
	}
	c = FromEnv(env("VM_NAME", "w11", "BOOT_MODE", "uefi-secure", "OVMF_CODE", "/fw/c.fd", "OVMF_VARS_TEMPLATE", "/fw/v.fd"))
	if c.OVMFCode != "/fw/c.fd" || c.OVMFVarsTemplate != "/fw/v.fd" {
		t.Errorf("named firmware replaced: %q %q", c.OVMFCode, c.OVMFVarsTemplate)
	}
	if c := FromEnv(env("VM_NAME", "b", "BOOT_MODE", "bios")); c.UEFI() {
		t.Error("bios counted as UEFI")
	}
}

// GUEST_OS picks the profile; DRIVERS_ISO is a further read-only medium.
func TestGuestOS(t *testing.T) {
	c := FromEnv(env("VM_NAME", "w11", "GUEST_OS", "Windows", "DRIVERS_ISO", "/var/lib/poc-qemu/isos/virtio-win.iso"))
	if err := c.Validate(); err != nil || c.GuestOS != GuestWindows || c.DriversISO != "/var/lib/poc-qemu/isos/virtio-win.iso" {
		t.Errorf("windows: %q %q %v", c.GuestOS, c.DriversISO, err)
	}
	err := FromEnv(env("VM_NAME", "w11", "GUEST_OS", "beos", "DRIVERS_ISO", "/var/lib/poc-qemu/images/w11.qcow2")).Validate()
	for _, want := range []string{`GUEST_OS: "beos" is not one of linux, windows`, "DRIVERS_ISO: is the VM's disk"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("bad values: %v, want %q", err, want)
		}
	}
}

// GUEST_AGENT is on unless set off.
func TestGuestAgentVariable(t *testing.T) {
	for v, want := range map[string]bool{"": true, "on": true, "OFF": false} {
		if c := FromEnv(env("VM_NAME", "a", "GUEST_AGENT", v)); c.Validate() != nil || c.GuestAgent != want {
			t.Errorf("GUEST_AGENT=%q: %v, want %v", v, c.GuestAgent, want)
		}
	}
	err := FromEnv(env("VM_NAME", "a", "GUEST_AGENT", "yes")).Validate()
	if err == nil || !strings.Contains(err.Error(), `GUEST_AGENT: "yes" is not on or off`) || !strings.Contains(err.Error(), "unset for on") {
		t.Errorf("GUEST_AGENT=yes: %v", err)
	}
	if c := FromEnv(env("VM_NAME", "a", "HEALTH", "Agent", "HEALTH_AGENT_GRACE", "30s")); c.Validate() != nil || !c.HealthAgent || c.HealthAgentGrace != 30*time.Second {
		t.Errorf("HEALTH=Agent: %v %v", c.HealthAgent, c.HealthAgentGrace)
	}
	for _, bad := range [][]string{{"HEALTH", "guest"}, {"HEALTH", "agent", "GUEST_AGENT", "off"}, {"HEALTH", "agent", "HEALTH_AGENT_GRACE", "soon"}} {
		if err := FromEnv(env(append([]string{"VM_NAME", "a"}, bad...)...)).Validate(); err == nil || !strings.Contains(err.Error(), "HEALTH") {
			t.Errorf("%v: %v, want a refusal naming HEALTH…", bad, err)
		}
	}
}

// TPM is on or off; its state folder defaults beside the disk.
func TestTPMVariables(t *testing.T) {
	c := FromEnv(env("VM_NAME", "w11", "TPM", "On", "TPM_RESET", "true", "SWTPM_BINARY", "/usr/bin/swtpm"))
	if err := c.Validate(); err != nil || !c.TPM || !c.TPMReset || c.TPMState != "/var/lib/poc-qemu/images/w11.tpm" || c.SwtpmBinary != "/usr/bin/swtpm" {
		t.Errorf("TPM=On: %+v %v", c, err)
	}
	err := FromEnv(env("VM_NAME", "w11", "TPM", "yes", "TPM_RESET", "maybe", "TPM_STATE", "rel/tpm")).Validate()
	for _, want := range []string{`TPM: "yes" is not on or off`, "TPM_RESET", "TPM_STATE"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("bad TPM variables: %v, want %q", err, want)
		}
	}
}

func TestBadValues(t *testing.T) {
	cases := []struct {
		name string
		env  []string
		vars []string // each problem's variable, in order
	}{
		{"missing name", nil, []string{"VM_NAME"}},
		{"name with slash", []string{"VM_NAME", "a/b"}, []string{"VM_NAME"}},
		{"name with dots", []string{"VM_NAME", ".."}, []string{"VM_NAME"}},
		{"name too long", []string{"VM_NAME", strings.Repeat("a", 65)}, []string{"VM_NAME"}},
		{"name leading dash", []string{"VM_NAME", "-x"}, []string{"VM_NAME"}},
		{"cpus zero", []string{"VM_NAME", "a", "VM_CPUS", "0"}, []string{"VM_CPUS"}},
		{"console port zero", []string{"VM_NAME", "a", "CONSOLE_PORT", "0"}, []string{"CONSOLE_PORT"}},
		{"console port word", []string{"VM_NAME", "a", "CONSOLE_PORT", "web"}, []string{"CONSOLE_PORT"}},
		{"cloud-init kind", []string{"VM_NAME", "a", "CLOUD_INIT", "configdrive"}, []string{"CLOUD_INIT"}},
		{"cloud-init bus", []string{"VM_NAME", "a", "CLOUD_INIT_BUS", "scsi"}, []string{"CLOUD_INIT_BUS"}},
		{"backup every without repo", []string{"VM_NAME", "a", "BACKUP_EVERY", "24h"}, []string{"BACKUP_EVERY"}},
		{"backup every too short", []string{"VM_NAME", "a", "BACKUP_REPO", "/srv/b", "BACKUP_EVERY", "30s"}, []string{"BACKUP_EVERY"}},
		{"backup every word", []string{"VM_NAME", "a", "BACKUP_REPO", "/srv/b", "BACKUP_EVERY", "daily"}, []string{"BACKUP_EVERY"}},
		{"backup at 25:00", []string{"VM_NAME", "a", "BACKUP_REPO", "/srv/b", "BACKUP_EVERY", "24h", "BACKUP_AT", "25:00"}, []string{"BACKUP_AT"}},
		{"backup at 2:5", []string{"VM_NAME", "a", "BACKUP_REPO", "/srv/b", "BACKUP_EVERY", "24h", "BACKUP_AT", "2:5"}, []string{"BACKUP_AT"}},
		{"backup at without every", []string{"VM_NAME", "a", "BACKUP_AT", "02:00"}, []string{"BACKUP_AT"}},
		{"export port not a port", []string{"VM_NAME", "a", "EXPORT_PORT", "nbd"}, []string{"EXPORT_PORT"}},
		{"export port is the console's", []string{"VM_NAME", "a", "CONSOLE_PORT", "8006", "EXPORT_PORT", "8006"}, []string{"EXPORT_PORT"}},
		{"backup keep zero", []string{"VM_NAME", "a", "BACKUP_KEEP_LAST", "0"}, []string{"BACKUP_KEEP_LAST"}},
		{"backup repo relative", []string{"VM_NAME", "a", "BACKUP_REPO", "srv/b"}, []string{"BACKUP_REPO"}},
		{"backup schedule", []string{"VM_NAME", "a", "BACKUP_REPO", "/srv/b", "BACKUP_EVERY", "1m", "BACKUP_AT", "02:00", "BACKUP_KEEP_DAILY", "7"}, nil},
		{"cpus negative", []string{"VM_NAME", "a", "VM_CPUS", "-2"}, []string{"VM_CPUS"}},
		{"cpus huge", []string{"VM_NAME", "a", "VM_CPUS", "100000"}, []string{"VM_CPUS"}},
		{"cpus garbage", []string{"VM_NAME", "a", "VM_CPUS", "two"}, []string{"VM_CPUS"}},
		{"memory garbage unit", []string{"VM_NAME", "a", "VM_MEMORY", "2X"}, []string{"VM_MEMORY"}},
		{"memory negative", []string{"VM_NAME", "a", "VM_MEMORY", "-1G"}, []string{"VM_MEMORY"}},
		{"memory zero", []string{"VM_NAME", "a", "VM_MEMORY", "0"}, nil},
		{"memory tiny", []string{"VM_NAME", "a", "VM_MEMORY", "1M"}, []string{"VM_MEMORY"}},
		{"memory huge", []string{"VM_NAME", "a", "VM_MEMORY", "99999999999T"}, []string{"VM_MEMORY"}},
		{"memory fraction of MiB", []string{"VM_NAME", "a", "VM_MEMORY", "1000K"}, []string{"VM_MEMORY"}},
		{"disk garbage", []string{"VM_NAME", "a", "DISK_SIZE", "big"}, []string{"DISK_SIZE"}},
		{"disk too small", []string{"VM_NAME", "a", "DISK_SIZE", "10"}, []string{"DISK_SIZE"}},
		{"disk huge", []string{"VM_NAME", "a", "DISK_SIZE", "100T"}, []string{"DISK_SIZE"}},
		{"accel unknown", []string{"VM_NAME", "a", "ACCEL", "hvf"}, []string{"ACCEL"}},
		{"boot unknown", []string{"VM_NAME", "a", "BOOT_MODE", "efi"}, []string{"BOOT_MODE"}},
		{"cache unknown", []string{"VM_NAME", "a", "DISK_CACHE", "directsync"}, []string{"DISK_CACHE"}},
		{"host cpu under tcg", []string{"VM_NAME", "a", "ACCEL", "tcg", "CPU_MODEL", "host"}, []string{"CPU_MODEL"}},
		{"relative image", []string{"VM_NAME", "a", "IMAGE_PATH", "images/a.qcow2"}, []string{"IMAGE_PATH"}},
		{"dotdot iso", []string{"VM_NAME", "a", "ISO_PATH", "/var/lib/poc-qemu/isos/../../etc/shadow"}, []string{"ISO_PATH"}},
		{"long path", []string{"VM_NAME", "a", "KERNEL_PATH", "/" + strings.Repeat("k", 5000)}, []string{"KERNEL_PATH"}},
		{"NUL in path", []string{"VM_NAME", "a", "IMAGE_PATH", "/var/lib/poc-qemu/images/a\x00.qcow2"}, []string{"IMAGE_PATH"}},
		{"newline in path", []string{"VM_NAME", "a", "ISO_PATH", "/var/lib/poc-qemu/isos/a\n.iso"}, []string{"ISO_PATH"}},
		{"NUL in binary", []string{"VM_NAME", "a", "QEMU_BINARY", "/usr/bin/qemu\x00x"}, []string{"QEMU_BINARY"}},
		{"NUL in cmdline", []string{"VM_NAME", "a", "KERNEL_PATH", "/k", "KERNEL_CMDLINE", "quiet\x00init=/bin/sh"}, []string{"KERNEL_CMDLINE"}},
		{"relative broker", []string{"VM_NAME", "a", "KVM_BROKER", "broker.sock"}, []string{"KVM_BROKER"}},
		{"broker off", []string{"VM_NAME", "a", "KVM_BROKER", "off"}, nil},
		{"long broker", []string{"VM_NAME", "a", "KVM_BROKER", "/" + strings.Repeat("b", 120)}, []string{"KVM_BROKER"}},
		{"vars is template", []string{"VM_NAME", "a", "OVMF_VARS", DefaultOVMFVarsTemplate}, []string{"OVMF_VARS"}},
		{"iso is image", []string{"VM_NAME", "a", "IMAGE_PATH", "/x", "ISO_PATH", "/x"}, []string{"ISO_PATH"}},
		{"shutdown zero", []string{"VM_NAME", "a", "SHUTDOWN_TIMEOUT", "0"}, []string{"SHUTDOWN_TIMEOUT"}},
		{"shutdown negative", []string{"VM_NAME", "a", "SHUTDOWN_TIMEOUT", "-5s"}, []string{"SHUTDOWN_TIMEOUT"}},
		{"shutdown garbage", []string{"VM_NAME", "a", "SHUTDOWN_TIMEOUT", "soon"}, []string{"SHUTDOWN_TIMEOUT"}},
		{"shutdown huge", []string{"VM_NAME", "a", "SHUTDOWN_TIMEOUT", "48h"}, []string{"SHUTDOWN_TIMEOUT"}},
		{"start garbage", []string{"VM_NAME", "a", "START_TIMEOUT", "5 min"}, []string{"START_TIMEOUT"}},
		{"serial log tiny", []string{"VM_NAME", "a", "SERIAL_LOG_MAX", "1K"}, []string{"SERIAL_LOG_MAX"}},
		{"reset garbage", []string{"VM_NAME", "a", "OVMF_VARS_RESET", "please"}, []string{"OVMF_VARS_RESET"}},
		{"initrd alone", []string{"VM_NAME", "a", "INITRD_PATH", "/i"}, []string{"INITRD_PATH"}},
		{"cmdline alone", []string{"VM_NAME", "a", "KERNEL_CMDLINE", "quiet"}, []string{"KERNEL_CMDLINE"}},
		{"log level", []string{"VM_NAME", "a", "LOG_LEVEL", "loud"}, []string{"LOG_LEVEL"}},
		{"run dir long", []string{"VM_NAME", "a", "RUN_DIR", "/" + strings.Repeat("r", 90)}, []string{"RUN_DIR"}},
		{"args sandbox", []string{"VM_NAME", "a", "QEMU_ARGS", "-sandbox off"}, []string{"QEMU_ARGS"}},
		{"args accel", []string{"VM_NAME", "a", "QEMU_ARGS", "--accel tcg"}, []string{"QEMU_ARGS"}},
		{"args qmp", []string{"VM_NAME", "a", "QEMU_ARGS", "-qmp tcp:0:4444"}, []string{"QEMU_ARGS"}},
		{"args pflash", []string{"VM_NAME", "a", "QEMU_ARGS", "-drive if=pflash,file=/x"}, []string{"QEMU_ARGS"}},
		{"args locking", []string{"VM_NAME", "a", "QEMU_ARGS", "-drive file=/x,file.locking=off"}, []string{"QEMU_ARGS"}},
		{"args quote", []string{"VM_NAME", "a", "QEMU_ARGS", `-smbios "type=1`}, []string{"QEMU_ARGS"}},
		// Spellings a deny-list let through (the hostile review of #11).
		{"args blockdev json", []string{"VM_NAME", "a", "QEMU_ARGS", `-blockdev '{"driver":"file","filename":"/x","locking":"off"}'`}, []string{"QEMU_ARGS"}},
		{"args share-rw yes", []string{"VM_NAME", "a", "QEMU_ARGS", "-drive file=/x,share-rw=yes"}, []string{"QEMU_ARGS"}},
		{"args global share-rw", []string{"VM_NAME", "a", "QEMU_ARGS", "-global virtio-blk-pci.share-rw=true"}, []string{"QEMU_ARGS"}},
		{"args debugcon", []string{"VM_NAME", "a", "QEMU_ARGS", "-debugcon file:/var/lib/poc-qemu/images/a.qcow2"}, []string{"QEMU_ARGS"}},
		{"args gdb", []string{"VM_NAME", "a", "QEMU_ARGS", "-gdb tcp::1234"}, []string{"QEMU_ARGS"}},
		{"args device drive", []string{"VM_NAME", "a", "QEMU_ARGS", "-device virtio-blk-pci,drive=d"}, []string{"QEMU_ARGS"}},
		{"args device backend", []string{"VM_NAME", "a", "QEMU_ARGS", "-device virtio-rng-pci,rng=r"}, []string{"QEMU_ARGS"}},
		{"args fw_cfg file", []string{"VM_NAME", "a", "QEMU_ARGS", "-fw_cfg name=opt/x,file=/etc/shadow"}, []string{"QEMU_ARGS"}},
		{"args object file", []string{"VM_NAME", "a", "QEMU_ARGS", "-object rng-random,id=r,filename=/dev/urandom"}, []string{"QEMU_ARGS"}},
		{"args bare word", []string{"VM_NAME", "a", "QEMU_ARGS", "virtio-rng-pci"}, []string{"QEMU_ARGS"}},
		// Read as QEMU reads them: the last of a repeated key wins, ",," is
		// a comma, a bare key is key=on. Each passed the check before, and
		// the first gave a guest /etc/passwd through an IPMI BMC's FRU data.
		{"args driver twice", []string{"VM_NAME", "a", "QEMU_ARGS", "-device virtio-rng-pci,driver=isa-ipmi-kcs,bmc=b"}, []string{"QEMU_ARGS"}},
		{"args qom-type twice", []string{"VM_NAME", "a", "QEMU_ARGS", "-object rng-builtin,qom-type=rng-random,id=r,filename=/etc/passwd"}, []string{"QEMU_ARGS"}},
		{"args driver= first", []string{"VM_NAME", "a", "QEMU_ARGS", "-device driver=ipmi-bmc-sim,id=b,frudatafile=/etc/passwd"}, []string{"QEMU_ARGS"}},
		{"args key twice", []string{"VM_NAME", "a", "QEMU_ARGS", "-fw_cfg name=opt/x,string=y,string=z"}, []string{"QEMU_ARGS"}},
		{"args comma escape", []string{"VM_NAME", "a", "QEMU_ARGS", "-device usb-tablet,,chardev=c"}, []string{"QEMU_ARGS"}},
		{"args device filename", []string{"VM_NAME", "a", "QEMU_ARGS", "-device usb-tablet,filename=/etc/shadow"}, []string{"QEMU_ARGS"}},
		{"args device dir", []string{"VM_NAME", "a", "QEMU_ARGS", "-device usb-tablet,dir=/etc"}, []string{"QEMU_ARGS"}},
		{"args object json", []string{"VM_NAME", "a", "QEMU_ARGS", `-object '{"qom-type":"rng-random","id":"r","filename":"/etc/passwd"}'`}, []string{"QEMU_ARGS"}},
		{"args smbios path", []string{"VM_NAME", "a", "QEMU_ARGS", "-smbios type=11,path=/etc/shadow"}, []string{"QEMU_ARGS"}},
		{"args allowed", []string{"VM_NAME", "a", "QEMU_ARGS", "-device usb-tablet -rtc base=localtime -no-reboot -smbios type=1,serial=x -fw_cfg name=opt/x,string=y -boot menu=on -object rng-builtin,id=r0"}, nil},
		{"args allowed, QEMU's spellings", []string{"VM_NAME", "a", "QEMU_ARGS", "-device virtio-rng-pci,id=rng0,max-bytes=1024 -smbios type=1,serial=a,,b -boot c -fw_cfg opt/x,string=y"}, nil},
		{"ports ok", []string{"VM_NAME", "a", "PORTS", "22, 8080:80,53/udp,53/tcp"}, nil},
		{"storage mode", []string{"VM_NAME", "a", "STORAGE_MODE", "nfs"}, []string{"STORAGE_MODE"}},
		{"home with node", []string{"VM_NAME", "a", "HOME_NODE", "n1", "NODE_ID", "abc"}, nil},
		{"home without node", []string{"VM_NAME", "a", "HOME_NODE", "n1"}, []string{"HOME_NODE"}},
		{"home on shared", []string{"VM_NAME", "a", "HOME_NODE", "n1", "NODE_ID", "x", "STORAGE_MODE", "shared"}, []string{"HOME_NODE"}},
		{"template unexpanded", []string{"VM_NAME", "a", "HOME_NODE", "n1", "NODE_ID", "{{.Node.ID}}"}, []string{"NODE_ID"}},
		{"port zero", []string{"VM_NAME", "a", "PORTS", "0"}, []string{"PORTS"}},
		{"port too big", []string{"VM_NAME", "a", "PORTS", "70000:80"}, []string{"PORTS"}},
		{"port duplicate", []string{"VM_NAME", "a", "PORTS", "8080:80,8080:81"}, []string{"PORTS"}},
		{"port protocol", []string{"VM_NAME", "a", "PORTS", "22/sctp"}, []string{"PORTS"}},
		{"port garbage", []string{"VM_NAME", "a", "PORTS", "ssh"}, []string{"PORTS"}},
		{"ports in bridge mode", []string{"VM_NAME", "a", "NET_MODE", "bridge", "NET_BRIDGE", "br0", "PORTS", "22"}, []string{"PORTS"}},
		{"bridge without name", []string{"VM_NAME", "a", "NET_MODE", "bridge"}, []string{"NET_BRIDGE"}},
		{"bridge name too long", []string{"VM_NAME", "a", "NET_MODE", "bridge", "NET_BRIDGE", "a-very-long-bridge-name"}, []string{"NET_BRIDGE"}},
		{"tap without tun", []string{"VM_NAME", "a", "NET_MODE", "tap"}, []string{"TUN_DEVICE"}},
		{"tap ok", []string{"VM_NAME", "a", "NET_MODE", "tap", "TUN_DEVICE", "/dev/net/tun"}, nil},
		{"tap bad addr", []string{"VM_NAME", "a", "NET_MODE", "tap", "TUN_DEVICE", "/dev/net/tun", "TAP_ADDR", "10.0.3.1"}, []string{"TAP_ADDR"}},
		{"net mode unknown", []string{"VM_NAME", "a", "NET_MODE", "macvtap"}, []string{"NET_MODE"}},
		{"several at once", []string{"VM_NAME", "a/b", "VM_CPUS", "0", "ACCEL", "x"}, []string{"VM_NAME", "ACCEL", "VM_CPUS"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := FromEnv(env(tc.env...)).Validate()
			var got []string
			for _, e := range unjoin(err) {
				var ce *Error
				if !errors.As(e, &ce) {
					t.Fatalf("problem %v is not a *config.Error", e)
				}
				if !strings.Contains(e.Error(), ce.Var+": ") || ce.Fix == "" {
					t.Errorf("problem %q does not name its variable and fix", e)
				}
				got = append(got, ce.Var)
			}
			if !reflect.DeepEqual(got, tc.vars) {
				t.Errorf("problems for %v: got %v, want %v (error: %v)", tc.env, got, tc.vars, err)
			}
		})
	}
}

func unjoin(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

func TestParseSize(t *testing.T) {
	cases := map[string]int64{"2048": 2048 << 20, "2G": 2 << 30, "2g": 2 << 30, "2GiB": 2 << 30, "2GB": 2 << 30,
		"512M": 512 << 20, "1T": 1 << 40, "4096K": 4 << 20, "1048576B": 1 << 20}
	for in, want := range cases {
		got, err := ParseSize(in, mib)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "1.5G", "-1G", "1Q", "99999999999999999999", "0x10"} {
		if _, err := ParseSize(in, mib); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

func TestGuestMemory(t *testing.T) {
	cases := []struct {
		name   string
		mem    string
		accel  string
		limit  int64
		want   int64
		errVar string
	}{
		{"no limit no value", "", "kvm", 0, DefaultMemoryMiB, ""},
		{"derived from limit", "", "kvm", 2 << 30, 2048 - OverheadMiBKVM, ""},
		{"derived under tcg", "", "tcg", 2 << 30, 2048 - OverheadMiBTCG, ""},
		{"explicit fits", "1G", "kvm", 2 << 30, 1024, ""},
		{"explicit exactly fits", "1792", "kvm", 2 << 30, 1792, ""},
		{"explicit too big", "2G", "kvm", 2 << 30, 0, "VM_MEMORY"},
		{"limit too small", "", "kvm", 256 << 20, 0, "VM_MEMORY"},
		{"explicit without limit", "8G", "kvm", 0, 8192, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := FromEnv(env("VM_NAME", "a", "VM_MEMORY", tc.mem, "ACCEL", tc.accel))
			got, err := c.GuestMemoryMiB(tc.limit)
			var ce *Error
			if tc.errVar != "" {
				if !errors.As(err, &ce) || ce.Var != tc.errVar || ce.Fix == "" {
					t.Fatalf("want an error naming %s, got %v", tc.errVar, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestParsePorts(t *testing.T) {
	got, err := ParsePorts("22, 8080:80 ,53/udp,53/tcp")
	want := []Port{{22, 22, "tcp"}, {8080, 80, "tcp"}, {53, 53, "udp"}, {53, 53, "tcp"}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("ParsePorts = %v, %v", got, err)
	}
	_, err = ParsePorts("0,22,22,99999,1/icmp")
	for _, w := range []string{`"0"`, "given twice", "99999", "icmp"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error %v lacks %s", err, w)
		}
	}
}

func TestSplitArgs(t *testing.T) {
	got, err := splitArgs(` -device  'a b' "c \"d\" \\" e''f `)
	want := []string{"-device", "a b", `c "d" \`, "ef"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("splitArgs = %q, %v; want %q", got, err, want)
	}
}

// Every variable in the package's table is in Variables, and FromEnv reads
// each one of them.
func TestVariablesListed(t *testing.T) {
	read := map[string]bool{}
	FromEnv(func(k string) string { read[k] = true; return "" })
	for _, v := range Variables {
		if !read[v] {
			t.Errorf("%s is listed but FromEnv never reads it", v)
		}
		delete(read, v)
	}
	for v := range read {
		t.Errorf("FromEnv reads %s, which Variables does not list", v)
	}
}

// The two tables of the runner's variables, this package's doc and
// docs/reference.md, list exactly the variables FromEnv reads, and say what
// the code says of the name's length (the reference said 64; the rule is 63).
func TestVariableTablesAgree(t *testing.T) {
	src, err := os.ReadFile("config.go")
	if err != nil {
		t.Fatal(err)
	}
	ref, err := os.ReadFile("../../docs/reference.md")
	if err != nil {
		t.Fatal(err)
	}
	docRow := regexp.MustCompile("(?m)^// \\| ([A-Z][A-Z0-9_]+) +\\|(.*)$")
	refRow := regexp.MustCompile("(?m)^\\| `([A-Z][A-Z0-9_]+)` \\|(.*)$")
	for name, table := range map[string]map[string]string{"config.go's doc": rows(docRow, string(src)), "docs/reference.md": rows(refRow, string(ref))} {
		for _, v := range Variables {
			if _, ok := table[v]; !ok {
				t.Errorf("%s lacks %s", name, v)
			}
		}
		for v := range table {
			if !slices.Contains(Variables, v) {
				t.Errorf("%s lists %s, which the runner does not read", name, v)
			}
		}
		if !strings.Contains(table["VM_NAME"], "at most 63") {
			t.Errorf("%s: VM_NAME %q, want the rule's length, at most 63", name, table["VM_NAME"])
		}
	}
}

func rows(re *regexp.Regexp, s string) map[string]string {
	out := map[string]string{}
	for _, m := range re.FindAllStringSubmatch(s, -1) {
		out[m[1]] = m[2]
	}
	return out
}
