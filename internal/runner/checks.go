package runner

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/preflight"
	"github.com/swarmvm/swarmvm/internal/status"
)

// kvmProbe proves a KVM descriptor works before QEMU gets it; nil is
// kvmdev.Probe. Only this package's tests set it, in the runner they start
// (the test binary), to a stand-in's: the runner's whole KVM branch then
// runs on hosts that have no KVM.
var kvmProbe preflight.KVMProbe

// Handles are the descriptors QEMU is handed (KVM, a TAP, vhost-net) and
// the broker leases behind them, which stay open while the VM runs.
type Handles struct {
	KVM, TAP, Vhost    *os.File
	KVMLease, NetLease *fdpass.Lease
	// The VM's own disk and NVRAM, opened and checked by the runner, each
	// read-only and read-write (QEMU opens them through fdsets).
	Disk, Vars []*os.File
	// The QMP sockets and the guest agent's, listening, bound by the
	// runner (listenUnix).
	QMP, Health, Agent *os.File
}

// Close gives back every descriptor and ends the leases.
func (h *Handles) Close() {
	h.closeFiles()
	for _, l := range []*fdpass.Lease{h.KVMLease, h.NetLease} {
		if l != nil {
			l.Close()
		}
	}
}

// closeFiles closes the runner's copies once QEMU has its own.
func (h *Handles) closeFiles() {
	for _, f := range []**os.File{&h.KVM, &h.TAP, &h.Vhost, &h.QMP, &h.Health, &h.Agent} {
		if *f != nil {
			(*f).Close()
			*f = nil
		}
	}
	for _, f := range append(h.Disk, h.Vars...) {
		f.Close()
	}
	h.Disk, h.Vars = nil, nil
}

// Preflight runs every check for cfg, in a fixed order, and returns the
// findings. Under ACCEL=kvm, when KVM passes, it also returns the KVM
// descriptor (and lease), which the caller must close or hand to QEMU.
func Preflight(ctx context.Context, cfg config.Config, brokerAttempts int) ([]preflight.Finding, Handles) {
	var h Handles
	// First: on a node that is not its home, nothing else matters.
	findings := []preflight.Finding{preflight.Home(cfg.HomeNode, cfg.NodeID, cfg.NodeHostname)}
	if cfg.Accel == config.AccelKVM {
		var f preflight.Finding
		h.KVM, h.KVMLease, f = kvmSource(ctx, cfg, brokerAttempts)
		findings = append(findings, f)
	}
	if cfg.NetMode == config.NetBridge {
		var f preflight.Finding
		h.TAP, h.Vhost, h.NetLease, f = preflight.BrokerTAP(ctx, brokerSocket(cfg), cfg.Name, cfg.NetBridge, brokerAttempts)
		findings = append(findings, f)
	}
	if cfg.NetMode == config.NetUser {
		findings = append(findings, preflight.Ports(forwardPorts(cfg)))
	}
	if cfg.NetMode == config.NetTAP {
		var f preflight.Finding
		h.TAP, f = preflight.TAPInContainer(ctx, preflight.TAPHelper, cfg.TUNDevice, cfg.TAPName, cfg.TAPAddr)
		findings = append(findings, f)
	}
	findings = append(findings,
		preflight.QEMU(ctx, cfg.QEMUBinary, cfg.Accel == config.AccelKVM),
		preflight.StorageRoot(cfg.StorageDir),
		preflight.Paths(cfg.StorageDir, []preflight.Var{
			{Name: "IMAGE_PATH", Path: cfg.ImagePath}, {Name: "OVMF_VARS", Path: cfg.OVMFVars},
			{Name: "OVMF_CODE", Path: cfg.OVMFCode}, {Name: "OVMF_VARS_TEMPLATE", Path: cfg.OVMFVarsTemplate},
			{Name: "ISO_PATH", Path: cfg.ISOPath}, {Name: "DRIVERS_ISO", Path: cfg.DriversISO}, {Name: "KERNEL_PATH", Path: cfg.KernelPath}, {Name: "INITRD_PATH", Path: cfg.InitrdPath},
			{Name: "TPM_STATE", Path: tpmState(cfg), Dir: true}, {Name: "the cloud-init key", Path: seedKeyPath(cfg)},
		}),
		preflight.Folders(cfg.StorageDir, []preflight.Var{{Name: "IMAGE_PATH", Path: cfg.ImagePath}, {Name: "OVMF_VARS", Path: cfg.OVMFVars},
			{Name: "TPM_STATE", Path: tpmState(cfg)},
			{Name: "the serial log", Path: filepath.Join(cfg.StorageDir, "logs", cfg.Name+".serial.log")}}),
		preflight.Disk(cfg.ImagePath, cfg.DiskSize > 0),
	)
	if cfg.UEFI() {
		findings = append(findings, preflight.OVMF(cfg.OVMFCode, cfg.OVMFVarsTemplate, cfg.OVMFVars, cfg.OVMFVarsReset))
	}
	if cfg.BootMode == config.BootUEFISecure {
		findings = append(findings, preflight.SecureBoot(cfg.OVMFVarsTemplate, cfg.OVMFVars, cfg.OVMFVarsReset))
	}
	if cfg.TPM {
		findings = append(findings, preflight.TPM(cfg.SwtpmBinary, cfg.TPMState, cfg.TPMReset))
	}
	for _, f := range []struct{ v, p string }{{"ISO_PATH", cfg.ISOPath}, {"DRIVERS_ISO", cfg.DriversISO}, {"KERNEL_PATH", cfg.KernelPath}, {"INITRD_PATH", cfg.InitrdPath}} {
		if f.p != "" {
			findings = append(findings, preflight.ReadOnly("file", f.v, f.p))
		}
	}
	return findings, h
}

// tpmState is TPM_STATE when the VM has a TPM, else "" (nothing to check).
func tpmState(cfg config.Config) string {
	if cfg.TPM {
		return cfg.TPMState
	}
	return ""
}

// seedKeyPath is the cloud-init key's file when the VM has a seed, else ""
// (nothing to check).
func seedKeyPath(cfg config.Config) string {
	if cfg.CloudInit != "" {
		return cfg.SeedKeyPath()
	}
	return ""
}

// brokerSocket is the broker to ask: KVM_BROKER, else the default path.
func brokerSocket(cfg config.Config) string {
	if cfg.Broker != "" && cfg.Broker != config.BrokerOff {
		return cfg.Broker
	}
	return config.DefaultBrokerSocket
}

func forwardPorts(cfg config.Config) []int {
	var out []int
	for _, p := range cfg.Ports {
		out = append(out, p.Host)
	}
	return out
}

// kvmSource decides where KVM comes from: the broker when KVM_BROKER names
// it or its default socket is mounted, else the device. The finding says
// which, and for a failure, what was tried.
func kvmSource(ctx context.Context, cfg config.Config, attempts int) (*os.File, *fdpass.Lease, preflight.Finding) {
	socket := cfg.Broker
	if socket == config.BrokerOff {
		socket = ""
	} else if socket == "" {
		if fi, err := os.Stat(config.DefaultBrokerSocket); err == nil && fi.Mode()&os.ModeSocket != 0 {
			socket = config.DefaultBrokerSocket
		}
	}
	if socket != "" {
		lease, f, finding := preflight.BrokerKVM(ctx, socket, cfg.Name, attempts, kvmProbe)
		return f, lease, finding
	}
	f, finding := preflight.OpenKVM(cfg.KVMDevice, kvmProbe)
	if !finding.OK && cfg.Broker != config.BrokerOff {
		finding.Cause += "; and no broker socket is mounted at " + config.DefaultBrokerSocket
	}
	return f, nil, finding
}

// preflightChecks logs each finding and fails with the exit code of the
// first failure's class.
func preflightChecks(ctx context.Context, cfg config.Config, log *slog.Logger) (Handles, error) {
	if cfg.Accel == config.AccelTCG {
		log.Warn("ACCEL=tcg: emulation, not KVM, as configured; the guest runs many times slower")
	}
	findings, h := Preflight(ctx, cfg, 5)
	var failed []error
	code := 0
	for _, f := range findings {
		if f.OK {
			log.Info("preflight ok", "check", f.Name, "detail", f.Detail)
			continue
		}
		log.Error("preflight failed", "check", f.Name, "symptom", f.Symptom, "cause", f.Cause, "fix", f.Fix)
		failed = append(failed, f)
		if code == 0 {
			code = classCode(f.Class)
		}
	}
	if len(failed) > 0 {
		h.Close()
		return Handles{}, &ExitError{Code: code, Err: errors.Join(failed...)}
	}
	return h, nil
}

func classCode(c preflight.Class) int {
	switch c {
	case preflight.ClassKVM:
		return status.ExitKVM
	case preflight.ClassStorage:
		return status.ExitStorage
	case preflight.ClassNet:
		return status.ExitNet
	case preflight.ClassConfig:
		return status.ExitConfig
	}
	return status.ExitStart
}
