package preflight

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
)

var versionRE = regexp.MustCompile(`version (\d+)\.(\d+)\.(\d+)`)

// QEMUFacts is where the image records, at build time, what QEMU's
// --version says, under a first line naming the binary with its size and
// modification time: "PATH SIZE MTIME". Starting QEMU only to ask its
// version cost a tenth of a second at every VM start.
var QEMUFacts = "/usr/share/swarmvm/qemu-version"

// qemuVersion is what path --version says: from QEMUFacts while it
// describes this very binary (same path, size and time), else asked.
func qemuVersion(ctx context.Context, path string) (string, error) {
	if b, err := os.ReadFile(QEMUFacts); err == nil {
		head, version, _ := strings.Cut(string(b), "\n")
		if fi, err := os.Stat(path); err == nil && head == fmt.Sprintf("%s %d %d", path, fi.Size(), fi.ModTime().Unix()) {
			return version, nil
		}
	}
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	return string(out), err
}

// QEMU checks the emulator: present, and new enough to take the KVM device
// as a descriptor (the kvm accelerator's "device" property, QEMU 8.2),
// which is how the runner hands it KVM whether it came from the broker or
// from a device node.
func QEMU(ctx context.Context, binary string, kvm bool) Finding {
	const name, symptom = "qemu", "QEMU cannot start"
	path, err := exec.LookPath(binary)
	if err != nil {
		return fail(name, ClassQEMU, symptom, fmt.Sprintf("%s not found: %v", binary, err),
			"use the swarmvm runner image, or set QEMU_BINARY to qemu-system-x86_64's path")
	}
	out, err := qemuVersion(ctx, path)
	if err != nil {
		return fail(name, ClassQEMU, symptom, fmt.Sprintf("%s --version: %v", path, err), "reinstall qemu-system-x86")
	}
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return fail(name, ClassQEMU, symptom, fmt.Sprintf("cannot read a version from %s --version", path), "reinstall qemu-system-x86")
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	if kvm && (major < 8 || major == 8 && minor < 2) {
		return fail(name, ClassQEMU, symptom,
			fmt.Sprintf("QEMU %s.%s.%s lacks -accel kvm,device= (added in 8.2), so it cannot take KVM as a descriptor", m[1], m[2], m[3]),
			"use the swarmvm runner image (Debian trixie, QEMU 10)")
	}
	return pass(name, ClassQEMU, "%s, QEMU %s.%s.%s", path, m[1], m[2], m[3])
}
