package qemu

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

func base() Spec {
	return Spec{
		Name: "web-1", MAC: "52:54:00:55:0b:4b", Accel: "kvm", KVMFD: 3, CPUModel: "host", CPUs: 2, MemoryMiB: 2048,
		Firmware: "uefi", OVMFCode: "/usr/share/OVMF/OVMF_CODE_4M.fd",
		OVMFVars: "/var/lib/poc-qemu/images/web-1.OVMF_VARS.fd",
		Disk:     "/var/lib/poc-qemu/images/web-1.qcow2", DiskCache: "none",
		VarsFDs: []int{6, 7}, DiskFDs: []int{8, 9},
		QMPSocket: "/run/vm/qmp.sock", HealthSocket: "/run/vm/health.sock",
	}
}

func TestArgvGolden(t *testing.T) {
	cases := map[string]func(*Spec){
		"uefi-disk": func(*Spec) {},
		"uefi-disk-iso": func(s *Spec) {
			s.ISO, s.BootFromISO = "/var/lib/poc-qemu/isos/debian,13.iso", true
		},
		"bios": func(s *Spec) {
			s.Firmware, s.DiskCache, s.VarsFDs = "bios", "writeback", nil
			s.Extra = []string{"-device", "virtio-rng-pci"}
		},
		"direct-kernel": func(s *Spec) {
			s.Kernel, s.Initrd, s.Cmdline = "/var/lib/poc-qemu/boot/vmlinuz", "/var/lib/poc-qemu/boot/initrd.img", "console=ttyS0 quiet"
		},
		"bridge-tap": func(s *Spec) {
			s.Net, s.TAPFD, s.VhostFD = "tap", 4, 5
		},
		"user-ports": func(s *Spec) {
			s.Forwards = []Forward{{"tcp", 22, 22}, {"tcp", 8080, 80}, {"udp", 53, 53}}
		},
		"net-none": func(s *Spec) {
			s.Net = "none"
		},
		"tcg": func(s *Spec) {
			s.Accel, s.CPUModel, s.KVMFD = "tcg", "max", 0
		},
		"cloud-init": func(s *Spec) {
			s.Seed, s.SeedBus = "/run/vm/cidata.iso", "virtio"
		},
		"cloud-init-cdrom": func(s *Spec) {
			s.Seed, s.SeedBus = "/run/vm/cidata.iso", "cdrom"
		},
		"console": func(s *Spec) {
			s.VNCSocket = "/run/vm/vnc,1.sock"
		},
		"uefi-secure": func(s *Spec) {
			s.Firmware, s.OVMFCode = "uefi-secure", "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"
		},
		"windows": func(s *Spec) {
			s.Firmware, s.OVMFCode, s.TPMSocket = "uefi-secure", "/usr/share/OVMF/OVMF_CODE_4M.ms.fd", "/run/vm/swtpm.sock"
			s.Windows, s.ISO, s.BootFromISO, s.DriversISO = true, "/var/lib/poc-qemu/isos/Win11.iso", true, "/var/lib/poc-qemu/isos/virtio-win.iso"
			s.VNCSocket = "/run/vm/vnc.sock"
		},
		"windows-tcg": func(s *Spec) {
			s.Windows, s.Accel, s.CPUModel, s.KVMFD = true, "tcg", "max", 0
		},
		"guest-agent": func(s *Spec) {
			s.AgentSocket, s.AgentFD = "/run/vm/qga.sock", 10
		},
		"uefi-secure-tpm": func(s *Spec) {
			s.Firmware, s.OVMFCode, s.TPMSocket = "uefi-secure", "/usr/share/OVMF/OVMF_CODE_4M.ms.fd", "/run/vm/swtpm.sock"
		},
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			s := base()
			mod(&s)
			got := strings.Join(Argv(s), "\n") + "\n"
			path := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./internal/qemu -update)", err)
			}
			if got != string(want) {
				t.Errorf("argv differs from %s:\n--- got\n%s--- want\n%s", path, got, want)
			}
		})
	}
}

// Every mode keeps the invariants: sandbox on, image locking on, QMP owned,
// no device path for KVM (only the fdset), no default devices.
func TestArgvInvariants(t *testing.T) {
	for _, accel := range []string{"kvm", "tcg"} {
		s := base()
		s.Accel = accel
		argv := strings.Join(Argv(s), " ")
		for _, want := range []string{"-sandbox " + Sandbox, "-nodefaults", "-no-user-config", "mode=control"} {
			if !strings.Contains(argv, want) {
				t.Errorf("%s: argv lacks %q", accel, want)
			}
		}
		for _, bad := range []string{"locking=off", "/dev/kvm", "-enable-kvm", "share-rw"} {
			if strings.Contains(argv, bad) {
				t.Errorf("%s: argv contains %q", accel, bad)
			}
		}
		if accel == "tcg" && strings.Contains(argv, "opaque=kvm") {
			t.Errorf("tcg: argv hands QEMU a KVM descriptor")
		}
		// The VM's own files only through the descriptors the runner checked.
		for _, path := range []string{s.Disk, s.OVMFVars} {
			if strings.Contains(argv, path) {
				t.Errorf("%s: argv names %s instead of its fdset", accel, path)
			}
		}
	}
}

// Monitors handed over as listening descriptors are named by number, not
// by path; without one, QEMU creates the socket at the path.
func TestMonitorsByDescriptor(t *testing.T) {
	s := Spec{Name: "vm", MAC: "52:54:00:12:34:56", Accel: "tcg", CPUModel: "max", CPUs: 1, MemoryMiB: 256, Firmware: "bios", Net: "none",
		QMPSocket: "/run/vm/qmp.sock", HealthSocket: "/run/vm/health.sock"}
	a := strings.Join(Argv(s), " ")
	if !strings.Contains(a, "socket,id=qmp,path=/run/vm/qmp.sock,server=on,wait=off") || !strings.Contains(a, "socket,id=qmp-health,path=/run/vm/health.sock,server=on,wait=off") {
		t.Errorf("by path: %s", a)
	}
	s.QMPFD, s.HealthFD = 7, 8
	a = strings.Join(Argv(s), " ")
	if !strings.Contains(a, "socket,id=qmp,fd=7,server=on,wait=off") || !strings.Contains(a, "socket,id=qmp-health,fd=8,server=on,wait=off") || strings.Contains(a, "qmp.sock") {
		t.Errorf("by descriptor: %s", a)
	}
}

// A QEMU that takes a running guest over waits for it (-incoming defer,
// no listening address: the runner hands it the stream's descriptor) and
// stays paused until the runner starts it; everything else is the same
// QEMU as a start's, which a migration needs.
func TestIncoming(t *testing.T) {
	s := base()
	plain := Argv(s)
	s.Incoming = true
	in := Argv(s)
	if got := strings.Join(in[len(plain):], " "); len(in) != len(plain)+3 || got != "-incoming defer -S" || !slices.Equal(in[:len(plain)], plain) {
		t.Errorf("incoming adds %q to a start's argv, want exactly -incoming defer -S", in[len(plain):])
	}
}
