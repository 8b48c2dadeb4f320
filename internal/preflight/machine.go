package preflight

import (
	"os"
	"strings"
)

// Machine is what a process can tell of where it runs: whether in a
// container, and what the CPU offers its kernel.
type Machine struct {
	Container  bool // a container engine's marker file, on an overlay root
	VirtFlags  bool // the CPU offers VT-x or AMD-V (a vmx or svm flag)
	Hypervisor bool // the CPU says it is a virtual one: this machine is a VM
}

// ThisMachine reads the machine this process runs on.
func ThisMachine() Machine {
	m := Machine{VirtFlags: true} // unreadable cpuinfo: assume nothing is missing
	marked := false
	for _, f := range []string{"/.dockerenv", "/run/.containerenv"} {
		if _, err := os.Stat(f); err == nil {
			marked = true
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		m.Container = marked && overlayRoot(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		m.VirtFlags, m.Hypervisor = cpuFlags(string(b))
	}
	return m
}

// overlayRoot reports whether / is an overlay, as a container's root is
// (the engine's image layers). A marker file alone is not enough: some
// hosts are made from container images and keep theirs.
func overlayRoot(mountinfo string) bool {
	for _, line := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || f[4] != "/" {
			continue
		}
		for i, x := range f {
			if x == "-" && i+1 < len(f) {
				return strings.Contains(f[i+1], "overlay")
			}
		}
	}
	return false
}

// cpuFlags reads the first CPU's flags: VT-x/AMD-V, and "hypervisor".
func cpuFlags(cpuinfo string) (virt, hypervisor bool) {
	for _, line := range strings.Split(cpuinfo, "\n") {
		if !strings.HasPrefix(line, "flags") {
			continue
		}
		for _, f := range strings.Fields(line) {
			virt = virt || f == "vmx" || f == "svm"
			hypervisor = hypervisor || f == "hypervisor"
		}
		break
	}
	return virt, hypervisor
}

// Where says where the process runs, as findings put it.
func (m Machine) Where() string {
	if m.Container {
		return "in this container"
	}
	return "on this host"
}

// NoVirt says why a CPU without VT-x/AMD-V has no KVM to give, and what
// to do; "" when the CPU offers it.
func (m Machine) NoVirt() (cause, fix string) {
	if m.VirtFlags {
		return "", ""
	}
	if m.Hypervisor {
		cause = "the CPU offers no VT-x/AMD-V (no vmx or svm flag): this machine is itself a VM, and nested virtualization is off in the hypervisor below"
		fix = "enable nested virtualization for this VM in the hypervisor below"
	} else {
		cause = "the CPU offers no VT-x/AMD-V (no vmx or svm flag): virtualization is off in the firmware"
		fix = "enable VT-x/AMD-V in the firmware"
	}
	return cause, fix + ", or run VMs without KVM, slowly: --accel tcg (swarmvm deploy; ACCEL=tcg for the runner; swarmvm node label --accel tcg for such a node)"
}

// Finding reports where this runs and what its CPU offers; it always
// passes: doctor and node check print it first.
func (m Machine) Finding() Finding {
	where := "on the host (not a container)"
	if m.Container {
		where = "in a container"
	}
	cpu := "the CPU offers VT-x/AMD-V"
	if cause, _ := m.NoVirt(); cause != "" {
		cpu = cause
	}
	return pass("machine", ClassKVM, "%s; %s", where, cpu)
}
