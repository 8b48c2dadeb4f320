package runner

import (
	"os"
	"path/filepath"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

// facts is what preparing a VM found on the node and made for it, gathered
// before its QEMU spec is built: the guest's memory after the container's
// limit, whether the disk is still empty, the VM's uid, which of the
// optional parts were made (the cloud-init seed, the console's display,
// swtpm), and which descriptors QEMU is handed. buildSpec does the rest
// without I/O, so that the same configuration and facts give the same
// QEMU: on one node, or on the target of a migration.
type facts struct {
	memMiB      int64
	bootFromISO bool
	uid         int
	seed        bool // the cloud-init seed is on the run tmpfs
	console     bool // the web console serves QEMU's display
	tpm         bool // swtpm listens on its control socket
	agent       bool // the guest agent's socket is bound (GUEST_AGENT=on)
	incoming    bool // QEMU waits for the running guest of the VM's task before (handoff.go)
	fds         handed
}

// handed says which descriptors QEMU gets, in the order they are numbered
// from qemu.FirstFD: KVM, a TAP, vhost-net, the two monitors, the guest
// agent's socket, then the NVRAM's and the disk's (a read-write and a
// read-only one each).
type handed struct {
	kvm, tap, vhost, qmp, health, agent bool
	vars, disk                          int
}

// Where buildSpec puts the sockets and the seed, in the run folder.
func qmpSocket(cfg config.Config) string    { return filepath.Join(cfg.RunDir, "qmp.sock") }
func healthSocket(cfg config.Config) string { return filepath.Join(cfg.RunDir, "health.sock") }
func vncSocket(cfg config.Config) string    { return filepath.Join(cfg.RunDir, "vnc.sock") }
func tpmSocket(cfg config.Config) string    { return filepath.Join(cfg.RunDir, "swtpm.sock") }
func seedPath(cfg config.Config) string     { return filepath.Join(cfg.RunDir, "cidata.iso") }
func agentSocket(cfg config.Config) string  { return filepath.Join(cfg.RunDir, "qga.sock") }

// buildSpec is QEMU's spec for cfg given f: a pure function, the one place
// the spec is made.
func buildSpec(cfg config.Config, f facts) qemu.Spec {
	s := qemu.Spec{
		Name: cfg.Name, MAC: config.MAC(cfg.Name, f.uid), Accel: cfg.Accel, CPUModel: cfg.CPUModel, CPUs: cfg.CPUs, MemoryMiB: f.memMiB,
		Firmware: cfg.BootMode, OVMFCode: cfg.OVMFCode, OVMFVars: cfg.OVMFVars,
		Disk: cfg.ImagePath, DiskCache: cfg.DiskCache, ISO: cfg.ISOPath, BootFromISO: f.bootFromISO,
		Windows: cfg.GuestOS == config.GuestWindows, DriversISO: cfg.DriversISO,
		Kernel: cfg.KernelPath, Initrd: cfg.InitrdPath, Cmdline: cfg.KernelCmdline,
		QMPSocket: qmpSocket(cfg), HealthSocket: healthSocket(cfg),
		Incoming: f.incoming, Extra: cfg.QEMUArgs,
	}
	s.Net = config.NetBackend(cfg.NetMode)
	for _, port := range cfg.Ports {
		s.Forwards = append(s.Forwards, qemu.Forward{Proto: port.Proto, Host: port.Host, Guest: port.Guest})
	}
	if f.seed {
		s.Seed, s.SeedBus = seedPath(cfg), cfg.CloudInitBus
	}
	if f.console {
		s.VNCSocket = vncSocket(cfg)
	}
	if f.tpm {
		s.TPMSocket = tpmSocket(cfg)
	}
	if f.agent {
		s.AgentSocket = agentSocket(cfg)
	}
	next := qemu.FirstFD
	number := func(present bool) int {
		if !present {
			return 0
		}
		next++
		return next - 1
	}
	s.KVMFD, s.TAPFD, s.VhostFD = number(f.fds.kvm), number(f.fds.tap), number(f.fds.vhost)
	s.QMPFD, s.HealthFD, s.AgentFD = number(f.fds.qmp), number(f.fds.health), number(f.fds.agent)
	for i := 0; i < f.fds.vars; i++ {
		s.VarsFDs = append(s.VarsFDs, number(true))
	}
	for i := 0; i < f.fds.disk; i++ {
		s.DiskFDs = append(s.DiskFDs, number(true))
	}
	return s
}

// handed says which of h's descriptors there are.
func (h *Handles) handed() handed {
	return handed{kvm: h.KVM != nil, tap: h.TAP != nil, vhost: h.Vhost != nil, qmp: h.QMP != nil, health: h.Health != nil, agent: h.Agent != nil,
		vars: len(h.Vars), disk: len(h.Disk)}
}

// files lists h's descriptors in the order buildSpec numbers them.
func (h *Handles) files() []*os.File {
	var out []*os.File
	for _, f := range []*os.File{h.KVM, h.TAP, h.Vhost, h.QMP, h.Health, h.Agent} {
		if f != nil {
			out = append(out, f)
		}
	}
	out = append(out, h.Vars...)
	return append(out, h.Disk...)
}
