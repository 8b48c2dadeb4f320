package config

import (
	"strings"
)

// pathMax is PATH_MAX less the terminating NUL.
const pathMax = 4095

// checkPaths refuses paths that could not mean what an operator expects:
// relative ones, ".." segments, NULs and over-long ones. Whether a path
// exists, and what it is, is preflight's question, not config's.
func (c *Config) checkPaths() {
	paths := []struct {
		name, val string
		required  bool
	}{
		{"STORAGE_DIR", c.StorageDir, true},
		{"IMAGE_PATH", c.ImagePath, true},
		{"ISO_PATH", c.ISOPath, false},
		{"DRIVERS_ISO", c.DriversISO, false},
		{"OVMF_CODE", c.OVMFCode, c.UEFI()},
		{"OVMF_VARS", c.OVMFVars, c.UEFI()},
		{"OVMF_VARS_TEMPLATE", c.OVMFVarsTemplate, c.UEFI()},
		{"KVM_DEVICE", c.KVMDevice, c.Accel == AccelKVM},
		{"KVM_BROKER", c.Broker, false},
		{"TUN_DEVICE", c.TUNDevice, false},
		{"KERNEL_PATH", c.KernelPath, false},
		{"INITRD_PATH", c.InitrdPath, false},
		{"RUN_DIR", c.RunDir, true},
		{"TPM_STATE", c.TPMState, c.TPM},
	}
	for _, p := range paths {
		if p.name == "KVM_BROKER" && p.val == BrokerOff {
			continue
		}
		if p.val == "" {
			if p.required {
				c.problem(p.name, "is empty", "set an absolute path")
			}
			continue
		}
		if cause := badPath(p.val); cause != "" {
			c.problem(p.name, "%q %s", "use an absolute path without '..' segments", p.val, cause)
		}
	}
	if len(c.Broker) > 107 {
		c.problem("KVM_BROKER", "%q is longer than a unix socket path may be (107 bytes)", "mount the broker's folder at /run/swarmvm", c.Broker)
	}
	// The socket paths under RUN_DIR must fit sun_path (108 bytes).
	if len(c.RunDir) > 80 {
		c.problem("RUN_DIR", "%q is longer than 80 bytes, too long for the QMP socket paths under it", "use a short path such as /run/vm", c.RunDir)
	}
	if c.UEFI() {
		if c.OVMFVars != "" && (c.OVMFVars == c.OVMFVarsTemplate || c.OVMFVars == c.OVMFCode) {
			c.problem("OVMF_VARS", "%q is the shared template or firmware, not a per-VM file", "point OVMF_VARS at a file of this VM's own (the default is $STORAGE_DIR/images/$VM_NAME.OVMF_VARS.fd)", c.OVMFVars)
		}
	}
	if c.DriversISO != "" && (c.DriversISO == c.ImagePath || c.DriversISO == c.OVMFVars) {
		c.problem("DRIVERS_ISO", "is the VM's disk or NVRAM", "point DRIVERS_ISO at the drivers' ISO image (e.g. virtio-win.iso under isos/)")
	}
	if c.ISOPath != "" && c.ISOPath == c.ImagePath {
		c.problem("ISO_PATH", "is the same file as IMAGE_PATH", "point ISO_PATH at the install medium and IMAGE_PATH at the disk")
	}
	if c.OVMFVars != "" && c.OVMFVars == c.ImagePath {
		c.problem("OVMF_VARS", "is the same file as IMAGE_PATH", "give the NVRAM file a name of its own")
	}
	if strings.ContainsAny(c.QEMUBinary, "\x00\n ") || c.QEMUBinary == "" {
		c.problem("QEMU_BINARY", "%q is not a program name or path", "leave it unset for qemu-system-x86_64", c.QEMUBinary)
	}
}

// badPath says what is wrong with p, or "" when nothing is.
func badPath(p string) string {
	switch {
	case strings.ContainsAny(p, "\x00\n"):
		return "contains a NUL or newline"
	case len(p) > pathMax:
		return "is longer than PATH_MAX"
	case !strings.HasPrefix(p, "/"):
		return "is not absolute"
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == ".." {
			return "has a '..' segment"
		}
	}
	return ""
}

// CheckedStamp is the file beside a disk image that says a clean
// qemu-img check found the image in its present state (the runner writes
// it after a clean stop). It goes with the image when the image is set
// aside; it is never carried to another node.
func CheckedStamp(image string) string { return image + ".checked" }

// SeedKeyPath is the file beside the disk holding the VM's own key for its
// cloud-init instance-id (CLOUD_INIT): made by the runner, carried by a
// move with the disk.
func (c Config) SeedKeyPath() string { return c.ImagePath + ".cloud-init-key" }
