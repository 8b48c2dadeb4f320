package preflight

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/kvmdev"
)

const kvmSymptom = "KVM not available"

// KVMProbe proves that a descriptor is a working KVM device. nil means
// kvmdev.Probe, the only one a node uses; tests of the wiring around KVM
// pass a stand-in's (internal/kvmtest) on hosts that have no KVM.
type KVMProbe func(*os.File) error

func (p KVMProbe) probe(f *os.File) error {
	if p == nil {
		return kvmdev.Probe(f)
	}
	return p(f)
}

// OpenKVM opens the KVM device, proves it works (API version, a VM can be
// created) and returns it for QEMU. On failure the finding tells apart a
// device that is missing, one the device cgroup denies (the Swarm
// bind-mount case), one the file mode denies, and virtualisation that is
// disabled or taken by another hypervisor.
func OpenKVM(path string, probe KVMProbe) (*os.File, Finding) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, kvmOpenFailure(path, err, ThisMachine())
	}
	f := os.NewFile(uintptr(fd), path)
	if fi, err := f.Stat(); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		f.Close()
		return nil, fail("kvm device", ClassKVM, kvmSymptom, path+" is not a character device",
			"point KVM_DEVICE at the KVM device (/dev/kvm)")
	}
	return checked(f, "kvm device", "device "+path, probe)
}

// checked proves a KVM descriptor works, from whatever source: it closes
// the descriptor and fails when it does not.
func checked(f *os.File, name, source string, probe KVMProbe) (*os.File, Finding) {
	err := probe.probe(f)
	var create *kvmdev.CreateError
	switch {
	case errors.As(err, &create):
		f.Close()
		return nil, kvmCreateFailure(source, create.Errno)
	case err != nil:
		f.Close()
		return nil, fail(name, ClassKVM, kvmSymptom, fmt.Sprintf("%s: %v", source, err),
			"point KVM_DEVICE at the KVM device (/dev/kvm)")
	}
	return f, pass(name, ClassKVM, "%s: KVM API %d, test VM created", source, kvmdev.APIVersion)
}

func kvmOpenFailure(path string, err error, m Machine) Finding {
	const name = "kvm device"
	switch {
	case errors.Is(err, unix.ENOENT):
		return kvmMissing(path, m)
	case errors.Is(err, unix.EPERM):
		return fail(name, ClassKVM, kvmSymptom,
			path+" is present but the device cgroup denies opening it (Operation not permitted): a Swarm service cannot be given a device, so a bind mount is not enough",
			"start the broker on this node (swarmvm broker) and mount its socket folder into the service instead of /dev/kvm; with docker run, use --device /dev/kvm")
	case errors.Is(err, unix.EACCES):
		detail, group := "", "the kvm group's gid"
		if fi, serr := os.Stat(path); serr == nil {
			detail = " (" + owner(fi) + ")"
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Gid != 0 {
				group = fmt.Sprintf("gid %d", st.Gid)
			}
		}
		return fail(name, ClassKVM, kvmSymptom,
			fmt.Sprintf("%s may not open %s%s", who(), path, detail),
			fmt.Sprintf("start the broker on this node (swarmvm broker), or with docker run add the container user to the device's group (--group-add, %s)", group))
	case errors.Is(err, unix.ENXIO), errors.Is(err, unix.ENODEV):
		return fail(name, ClassKVM, kvmSymptom, path+" exists but no KVM module is loaded behind it",
			"on the host, load kvm_intel or kvm_amd and enable VT-x/AMD-V in the firmware")
	}
	return fail(name, ClassKVM, kvmSymptom, fmt.Sprintf("opening %s: %v", path, err),
		"check the device on the host (ls -l /dev/kvm) and run swarmvm doctor there")
}

// kvmMissing explains a missing device by where this runs and what the
// CPU offers: in a container the broker (or --device) brings KVM in, on a
// host the module makes the device, and on a CPU without VT-x/AMD-V no
// step on this machine can: the hypervisor below must pass it on, or the
// VMs run without KVM.
func kvmMissing(path string, m Machine) Finding {
	const name = "kvm device"
	cause := path + " is missing " + m.Where()
	if why, fix := m.NoVirt(); why != "" {
		if m.Container {
			fix += "; on a node with KVM, start the broker (swarmvm broker) and mount its socket folder, or pass --device /dev/kvm (docker run)"
		}
		return fail(name, ClassKVM, kvmSymptom, cause+"; "+why, fix)
	}
	if m.Container {
		return fail(name, ClassKVM, kvmSymptom, cause,
			"start the broker on this node (swarmvm broker) and mount its socket folder, or pass --device /dev/kvm (docker run)")
	}
	return fail(name, ClassKVM, kvmSymptom, cause+", though the CPU offers VT-x/AMD-V",
		"load kvm_intel or kvm_amd (modprobe), and enable VT-x/AMD-V in the firmware")
}

func kvmCreateFailure(path string, err error) Finding {
	const name = "kvm device"
	if errors.Is(err, unix.EBUSY) {
		return fail(name, ClassKVM, kvmSymptom, "VT-x/AMD-V is busy: another hypervisor on the host holds it (KVM_CREATE_VM: device or resource busy)",
			"stop the other hypervisor (VirtualBox, VMware) on this node, or schedule the VM elsewhere")
	}
	cause := fmt.Sprintf("%s opens but cannot create a VM (KVM_CREATE_VM: %v)", path, err)
	fix := "enable VT-x/AMD-V in the node's firmware (or nested virtualization on its hypervisor), or use ACCEL=tcg by name"
	if why, f := ThisMachine().NoVirt(); why != "" {
		cause, fix = cause+"; "+why, f
	}
	return fail(name, ClassKVM, kvmSymptom, cause, fix)
}
