package preflight

import (
	"strings"
	"testing"
)

// A missing KVM device is explained by where the check runs and by what
// the CPU offers: in a container the broker brings KVM in; on a host the
// module makes the device; on a CPU without VT-x/AMD-V nothing on this
// machine can, and the finding says so, with TCG as the way to run anyway.
func TestKVMMissingExplained(t *testing.T) {
	cases := []struct {
		name       string
		m          Machine
		cause, fix []string
		not        string
	}{
		{"container, CPU with VT-x", Machine{Container: true, VirtFlags: true},
			[]string{"/dev/kvm is missing in this container"}, []string{"start the broker"}, "nested"},
		{"host, CPU with VT-x", Machine{VirtFlags: true},
			[]string{"/dev/kvm is missing on this host", "though the CPU offers VT-x/AMD-V"}, []string{"load kvm_intel or kvm_amd"}, "container"},
		{"host, a VM without nested virtualization", Machine{Hypervisor: true},
			[]string{"/dev/kvm is missing on this host", "this machine is itself a VM, and nested virtualization is off in the hypervisor below"},
			[]string{"enable nested virtualization", "--accel tcg", "slowly"}, "kvm_intel"},
		{"host, VT-x off in the firmware", Machine{},
			[]string{"virtualization is off in the firmware"}, []string{"enable VT-x/AMD-V in the firmware", "--accel tcg"}, "nested"},
		{"container on a VM without nested virtualization", Machine{Container: true, Hypervisor: true},
			[]string{"missing in this container", "nested virtualization is off"}, []string{"--accel tcg", "start the broker"}, "kvm_intel"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := kvmMissing("/dev/kvm", tc.m)
			for _, w := range tc.cause {
				if !strings.Contains(f.Cause, w) {
					t.Errorf("cause %q lacks %q", f.Cause, w)
				}
			}
			for _, w := range tc.fix {
				if !strings.Contains(f.Fix, w) {
					t.Errorf("fix %q lacks %q", f.Fix, w)
				}
			}
			if strings.Contains(f.Cause+f.Fix, tc.not) {
				t.Errorf("%q says %q, which does not apply here", f.Error(), tc.not)
			}
			if f.OK || f.Symptom != kvmSymptom {
				t.Errorf("finding %+v", f)
			}
		})
	}
}

func TestMachineFacts(t *testing.T) {
	for _, tc := range []struct {
		cpuinfo          string
		virt, hypervisor bool
	}{
		{"processor\t: 0\nflags\t\t: fpu vme de pse vmx hypervisor\n", true, true},
		{"flags\t\t: fpu svm\n", true, false},
		{"flags\t\t: fpu vme hypervisor lahf_lm\nflags\t\t: vmx\n", false, true}, // the first CPU's
		{"model name : x\n", false, false},
	} {
		if v, h := cpuFlags(tc.cpuinfo); v != tc.virt || h != tc.hypervisor {
			t.Errorf("cpuFlags(%q) = %v, %v", tc.cpuinfo, v, h)
		}
	}
	host := "26 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n27 26 0:5 / /dev rw - devtmpfs udev rw\n"
	container := "85 57 0:39 / / rw,relatime master:3 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X\n"
	if overlayRoot(host) || !overlayRoot(container) {
		t.Errorf("overlayRoot: host %v, container %v", overlayRoot(host), overlayRoot(container))
	}
	f := Machine{Hypervisor: true}.Finding()
	if !f.OK || !strings.Contains(f.Detail, "on the host (not a container)") || !strings.Contains(f.Detail, "nested virtualization is off") {
		t.Errorf("machine finding %+v", f)
	}
}
