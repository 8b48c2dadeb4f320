package runner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/preflight"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

// cgroupRoot is where the container's own cgroup is mounted.
var cgroupRoot = "/sys/fs/cgroup"

// kvmProbe proves a KVM descriptor works before QEMU gets it; nil is
// kvmdev.Probe. Only this package's tests set it, in the runner they start
// (the test binary), to a stand-in's: the runner's whole KVM branch then
// runs on hosts that have no KVM.
var kvmProbe preflight.KVMProbe

// prepared is what the start step needs: the facts QEMU's spec is built
// from (buildSpec), the descriptors QEMU is handed, and the serial log.
type prepared struct {
	facts  facts
	kids   *children // every child process goes through it
	img    qemu.Img  // qemu-img, run through kids
	fds    Handles
	serial *serialLog
	state  string // state file for `swarmvm health`
	// With a console, QEMU's stdin (the serial port's receive side) is
	// this pipe, and its output also goes to the console's clients.
	serialIn  *os.File
	serialTee io.Writer
	tpm       *tpmProc // swtpm, started just before QEMU (TPM=on)
}

func (p *prepared) close() {
	p.fds.Close()
	if p.serialIn != nil {
		p.serialIn.Close()
	}
	if p.serial != nil {
		p.serial.Close()
	}
}

// prepare checks the node, then readies storage and firmware. Nothing is
// created before every check has passed, so a failed preflight leaves the
// disk and the vars file exactly as they were.
func prepare(ctx context.Context, cfg config.Config, log *slog.Logger, ph *phases, kids *children) (*prepared, error) {
	fds, err := preflightChecks(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	ph.done("preflight")
	p := &prepared{fds: fds, kids: kids, img: qemu.Img{Exec: kids.run}, state: filepath.Join(cfg.RunDir, "state.json")}
	if err := p.prepare(ctx, cfg, log, ph); err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

func (p *prepared) prepare(ctx context.Context, cfg config.Config, log *slog.Logger, ph *phases) error {
	limit := memoryLimit(cgroupRoot)
	mem, err := cfg.GuestMemoryMiB(limit)
	if err != nil {
		return &ExitError{Code: ExitConfig, Err: err}
	}
	log.Info("memory", "guest", config.FormatMiB(mem), "qemu_overhead", config.FormatMiB(cfg.OverheadMiB()), "container_limit", limitString(limit))
	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return exitf(ExitStorage, "run folder: %w (mount a tmpfs at %s)", err, filepath.Dir(cfg.RunDir))
	}
	bootISO, err := prepareDisk(ctx, cfg, p.img, p.state, log)
	if err != nil {
		return err
	}
	ph.done("disk")
	// A lost TPM is refused before the NVRAM is made.
	if cfg.TPM {
		if err := tpmLost(ctx, p.img, cfg); err != nil {
			return err
		}
	}
	if cfg.UEFI() {
		if err := prepareVars(ctx, cfg, p.img, log); err != nil {
			return err
		}
		ph.done("firmware vars")
	}
	if cfg.TPM {
		if err := prepareTPMState(cfg, log); err != nil {
			return err
		}
	}
	if err := p.openOwn(cfg); err != nil {
		return err
	}
	// The storage layout: images/ (disks, NVRAM), isos/ (install media),
	// logs/ (serial consoles).
	// (Made where missing; whose they are is checked where it matters: the
	// folders of the VM's own files, by preflight and mkdirFor. isos/ holds
	// read-only media, and may be anyone's.)
	for _, d := range []string{"images", "isos", "logs"} {
		if err := os.MkdirAll(filepath.Join(cfg.StorageDir, d), 0o750); err != nil {
			return exitf(ExitStorage, "storage folder %s: %w", d, err)
		}
	}
	logDir := filepath.Join(cfg.StorageDir, "logs")
	p.serial, err = openSerial(filepath.Join(logDir, cfg.Name+".serial.log"), cfg.SerialLogMax)
	if err != nil {
		return exitf(ExitStorage, "serial log: %w", err)
	}
	log.Info("serial console", "log", p.serial.path, "max", cfg.SerialLogMax)
	if free, err := freeBytes(filepath.Dir(cfg.ImagePath)); err == nil && free < ResumeFree {
		log.Warn("the storage volume holding the disk is nearly full: the VM will pause when a write finds no space, until space is freed",
			"volume", filepath.Dir(cfg.ImagePath), "free_mib", free>>20)
	}
	p.facts.memMiB, p.facts.bootFromISO, p.facts.uid = mem, bootISO, os.Geteuid()
	if p.fds.QMP, err = listenUnix(qmpSocket(cfg)); err != nil {
		return exitf(ExitStart, "QMP socket: %w", err)
	}
	if p.fds.Health, err = listenUnix(healthSocket(cfg)); err != nil {
		return exitf(ExitStart, "health socket: %w", err)
	}
	ph.done("files and serial log")
	return nil
}

// mkdirFor makes the folder path is in. Below the storage root, which VMs
// share, one level at a time, each checked as made or found: root's or
// this VM's own (preflight.MkdirOwn; a folder another uid makes between
// preflight and now is refused, not used). Elsewhere, the operator's.
func mkdirFor(cfg config.Config, variable, path string) error {
	dir := filepath.Dir(path)
	if rel, err := filepath.Rel(cfg.StorageDir, dir); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return exitf(ExitStorage, "%s's folder %s: %w", variable, dir, err)
		}
		return nil
	}
	if err := preflight.MkdirOwn(cfg.StorageDir, variable, dir, 0o750); err != nil {
		return exitf(ExitStorage, "%v", err)
	}
	return nil
}

// listenUnix binds and listens on a unix socket at path (replacing a stale
// one) and returns the listening descriptor, for QEMU to serve on. Closing
// the runner's copy leaves the socket file in place.
func listenUnix(path string) (*os.File, error) {
	os.Remove(path)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	defer l.Close()
	return l.File()
}

// Handles are the descriptors QEMU is handed (KVM, a TAP, vhost-net) and
// the broker leases behind them, which stay open while the VM runs.
type Handles struct {
	KVM, TAP, Vhost    *os.File
	KVMLease, NetLease *fdpass.Lease
	// The VM's own disk and NVRAM, opened and checked by the runner, each
	// read-only and read-write (QEMU opens them through fdsets).
	Disk, Vars []*os.File
	// The QMP sockets, listening, bound by the runner (listenUnix).
	QMP, Health *os.File
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
	for _, f := range []**os.File{&h.KVM, &h.TAP, &h.Vhost, &h.QMP, &h.Health} {
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
			{Name: "TPM_STATE", Path: tpmState(cfg), Dir: true},
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
		return ExitKVM
	case preflight.ClassStorage:
		return ExitStorage
	case preflight.ClassNet:
		return ExitNet
	case preflight.ClassConfig:
		return ExitConfig
	}
	return ExitStart
}

// prepareDisk creates the disk when it is absent and DISK_SIZE asks for it,
// refuses an image that is not qcow2, and says whether an install medium
// should boot first (the disk holds no data yet).
func prepareDisk(ctx context.Context, cfg config.Config, img qemu.Img, statePath string, log *slog.Logger) (bool, error) {
	if err := mkdirFor(cfg, "IMAGE_PATH", cfg.ImagePath); err != nil {
		return false, err
	}
	if _, err := os.Stat(cfg.ImagePath); errors.Is(err, os.ErrNotExist) {
		err := img.Create(ctx, cfg.ImagePath, cfg.DiskSize)
		switch {
		case errors.Is(err, qemu.ErrExists):
			// Someone else's file, made in the moment between the check
			// and the creation: never adopted (it could be a file they can
			// read, or a disk of their making).
			return false, exitf(ExitStorage, "IMAGE_PATH %s appeared while the runner was creating it: another process made it; the runner uses only a disk it made or found its own at start — remove that file and start again", cfg.ImagePath)
		case err != nil:
			return false, exitf(ExitStorage, "create IMAGE_PATH %s: %w", cfg.ImagePath, err)
		default:
			log.Info("disk created", "path", cfg.ImagePath, "size", cfg.DiskSize)
		}
	}
	// The header says what qemu-img info would, without a process start;
	// qemu-img info only names another format.
	info, err := qemu.ReadQCOW2(cfg.ImagePath)
	if errors.Is(err, qemu.ErrNotQCOW2) {
		if info, err = img.Info(ctx, cfg.ImagePath); err == nil {
			return false, exitf(ExitStorage, "IMAGE_PATH %s is %s, not qcow2 — convert it with qemu-img convert -O qcow2, or point IMAGE_PATH at the qcow2 image", cfg.ImagePath, info.Format)
		}
	}
	if err != nil {
		return false, exitf(ExitStorage, "IMAGE_PATH %s: %w", cfg.ImagePath, err)
	}
	// QEMU (and qemu-img check) would open what the image names by name,
	// wherever it is: the checks above and the descriptor QEMU gets would
	// not cover it. So this comes before any qemu-img opens the image.
	if why := info.SelfContained(cfg.ImagePath); why != "" {
		return false, exitf(ExitStorage, "IMAGE_PATH %s refused: %s", cfg.ImagePath, why)
	}
	// qemu-img check (unless the disk is as it was checked after the last
	// clean stop, checked.go), and map for the boot order, side by side:
	// each is a process start.
	var (
		wg       sync.WaitGroup
		checked  qemu.CheckResult
		checkErr error
		has      bool
		hasErr   error
	)
	when, unchanged := checkedBefore(cfg.ImagePath)
	if !unchanged {
		wg.Go(func() { checked, checkErr = img.Check(ctx, cfg.ImagePath) })
	}
	if cfg.ISOPath != "" {
		wg.Go(func() { has, hasErr = img.HasData(ctx, cfg.ImagePath) })
	}
	wg.Wait()
	if unchanged {
		log.Info("disk checked", "path", cfg.ImagePath, "result", "unchanged since its check after the last clean stop", "checked", when.Format(time.RFC3339))
	} else if err := diskVerdict(checked, checkErr, cfg.ImagePath, log); Code(err) == ExitDiskBusy && cfg.StorageMode == config.StorageShared {
		if err := waitDisk(ctx, img, cfg.ImagePath, statePath, log); err != nil {
			return false, err
		}
	} else if err != nil {
		return false, err
	}
	if cfg.DiskSize > 0 && info.VirtualSize != cfg.DiskSize {
		log.Warn("disk size differs from DISK_SIZE; the disk is never resized by swarmvm", "path", cfg.ImagePath, "disk", info.VirtualSize, "DISK_SIZE", cfg.DiskSize)
	}
	if cfg.ISOPath == "" {
		return false, nil
	}
	if hasErr != nil {
		return false, exitf(ExitStorage, "IMAGE_PATH %s: %w", cfg.ImagePath, hasErr)
	}
	log.Info("boot order", "first", map[bool]string{true: "disk", false: "ISO_PATH (disk is empty)"}[has])
	return !has, nil
}

// checkDisk runs qemu-img check before QEMU opens the disk.
func checkDisk(ctx context.Context, img qemu.Img, path string, log *slog.Logger) error {
	res, err := img.Check(ctx, path)
	return diskVerdict(res, err, path, log)
}

// diskVerdict judges qemu-img check's result: a disk another QEMU holds is
// refused with its own exit code, a corrupt one is refused and never
// repaired; leaked clusters are only reported.
func diskVerdict(res qemu.CheckResult, err error, path string, log *slog.Logger) error {
	switch {
	case errors.Is(err, qemu.ErrLocked):
		return diskBusy(path)
	case err != nil:
		return exitf(ExitStorage, "IMAGE_PATH %s could not be checked: %v — it may be damaged; swarmvm never repairs a disk: inspect a copy with qemu-img check", path, err)
	case res.Corruptions > 0 || res.CheckErrors > 0:
		return exitf(ExitStorage, "IMAGE_PATH %s is corrupt: qemu-img check found %d corruptions and %d check errors — swarmvm never repairs a disk: repair a copy (qemu-img check -r all) or restore a backup", path, res.Corruptions, res.CheckErrors)
	case res.Leaks > 0:
		log.Warn("disk has leaked clusters (harmless, space only); not repaired", "path", path, "leaks", res.Leaks)
	default:
		log.Info("disk checked", "path", path, "result", "no errors")
	}
	return nil
}

// openOwn opens the disk and NVRAM once each, checks the descriptors (the
// runner's own regular files, one link, no symbolic link on the way), and
// keeps them, with their reopenings, for QEMU: a file another process
// swaps in under the name afterwards is never used.
func (p *prepared) openOwn(cfg config.Config) error {
	direct := 0
	if cfg.DiskCache == "none" {
		direct = unix.O_DIRECT
	}
	var err error
	if p.fds.Disk, err = openOwn(cfg.StorageDir, "IMAGE_PATH", cfg.ImagePath, direct); err != nil {
		return err
	}
	if cfg.UEFI() {
		p.fds.Vars, err = openOwn(cfg.StorageDir, "OVMF_VARS", cfg.OVMFVars, 0)
	}
	return err
}

// openOwn opens path read-write, checked, and again read-only through the
// first descriptor; flag adds to both (O_DIRECT).
func openOwn(root, variable, path string, flag int) ([]*os.File, error) {
	rw, err := preflight.OpenOwn(root, variable, path, os.O_RDWR|flag)
	if errors.Is(err, unix.EINVAL) && flag&unix.O_DIRECT != 0 {
		return nil, exitf(ExitStorage, "%v — the filesystem holding it does not take O_DIRECT, which DISK_CACHE=none needs: set DISK_CACHE=writeback", err)
	}
	if err != nil {
		return nil, exitf(ExitStorage, "%v — the runner uses only the files it made or checked as its own: remove the file if it is not this VM's, or chown it to this VM's uid %d", err, os.Geteuid())
	}
	ro, err := preflight.Reopen(rw, os.O_RDONLY|flag)
	if err != nil {
		rw.Close()
		return nil, exitf(ExitStorage, "%v", err)
	}
	return []*os.File{rw, ro}, nil
}

// ErrDiskHeld marks a runner on shared storage waiting for another QEMU to
// let go of the disk. A restart cannot help; the other QEMU ending does.
var ErrDiskHeld = errors.New("disk held by another QEMU")

// diskPoll is how often a runner waiting for a held disk tries its lock.
const diskPoll = 2 * time.Second

// waitDisk waits, on shared storage, until no other QEMU holds the disk,
// then checks it as usual. There a held disk is, in the normal case, this
// VM's earlier task on a node cut off from the managers, which started this
// one meanwhile: the image lock keeps this QEMU out while that one runs,
// and waiting (instead of exiting) lets this task take over the moment the
// old QEMU is gone, without Swarm's restart limit running out meanwhile.
// health says why the VM is not running yet.
func waitDisk(ctx context.Context, img qemu.Img, path, statePath string, log *slog.Logger) error {
	waiting := fmt.Sprintf("%v: IMAGE_PATH %s is locked by another QEMU, with shared storage most likely this VM's earlier task on a node cut off from the managers; this task starts the VM when that one has stopped", ErrDiskHeld, path)
	// The state before the line that announces it: whoever reads the
	// line (a test, an operator) and asks health at once gets the state.
	if err := writeState(statePath, state{Waiting: waiting}); err != nil {
		return exitf(ExitStorage, "state file: %w", err)
	}
	defer os.Remove(statePath)
	log.Warn("disk in use by another QEMU (its image lock is held): waiting for it to stop; with shared storage this is the VM's earlier task on a node cut off from the managers", "path", path)
	began := time.Now()
	tick := time.NewTicker(diskPoll)
	defer tick.Stop()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return exitf(ExitDiskBusy, "stopped while waiting for IMAGE_PATH %s, held by another QEMU", path)
		case <-tick.C:
		}
		err := checkDisk(ctx, img, path, log)
		if Code(err) != ExitDiskBusy {
			os.Remove(statePath) // no longer waiting, before it is said
			if err == nil {
				log.Info("disk free: the other QEMU has stopped", "path", path, "waited", time.Since(began).Round(time.Second))
			}
			return err
		}
		if n%30 == 0 {
			log.Warn("still waiting: disk held by another QEMU", "path", path, "waited", time.Since(began).Round(time.Second))
		}
	}
}

func diskBusy(path string) error {
	return exitf(ExitDiskBusy, "IMAGE_PATH %s is in use by another QEMU (its image lock is held): two VMs may not share a disk — stop the other VM, or give this one its own IMAGE_PATH", path)
}

func prepareVars(ctx context.Context, cfg config.Config, img qemu.Img, log *slog.Logger) error {
	want, err := qemu.CheckPair(cfg.OVMFCode, cfg.OVMFVarsTemplate)
	if err != nil {
		return exitf(ExitStorage, "OVMF: %w", err)
	}
	if err := varsLost(ctx, img, cfg); err != nil {
		return err
	}
	if err := mkdirFor(cfg, "OVMF_VARS", cfg.OVMFVars); err != nil {
		return err
	}
	res, err := qemu.PrepareVars(cfg.OVMFVarsTemplate, cfg.OVMFVars, want, cfg.OVMFVarsReset, time.Now())
	if err != nil {
		return exitf(ExitStorage, "OVMF_VARS %s: %w", cfg.OVMFVars, err)
	}
	if res.SetAside != "" {
		log.Warn("OVMF_VARS_RESET: NVRAM set aside and recreated from the template; unset OVMF_VARS_RESET or it happens at every start",
			"old", res.SetAside, "new", cfg.OVMFVars)
	} else if res.Created {
		log.Info("OVMF vars created from the template", "path", cfg.OVMFVars, "template", cfg.OVMFVarsTemplate)
	}
	return nil
}

// lostUnderData reports whether a VM's own state file or folder (NVRAM,
// TPM) is missing while its disk already holds data and no reset of it was
// asked for: state that existed and is gone, not a new VM's.
func lostUnderData(ctx context.Context, img qemu.Img, cfg config.Config, path string, reset bool) (bool, error) {
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) || reset {
		return false, nil
	}
	has, err := img.HasData(ctx, cfg.ImagePath)
	if err != nil {
		return false, exitf(ExitStorage, "IMAGE_PATH %s: %w", cfg.ImagePath, err)
	}
	return has, nil
}

// varsLost refuses to start a VM whose disk already holds data but whose
// NVRAM file is missing: making a new one from the template would be an
// NVRAM reset (boot entries, Secure Boot state), which only
// OVMF_VARS_RESET asks for.
func varsLost(ctx context.Context, img qemu.Img, cfg config.Config) error {
	lost, err := lostUnderData(ctx, img, cfg, cfg.OVMFVars, cfg.OVMFVarsReset)
	if err != nil || !lost {
		return err // a new VM's NVRAM starts from the template
	}
	return exitf(ExitStorage, "OVMF_VARS %s is missing but the disk %s already holds data: this VM's NVRAM (UEFI boot entries, Secure Boot state) is gone — restore the file, or set OVMF_VARS_RESET=true once to start from the template (also for a disk brought from elsewhere)", cfg.OVMFVars, cfg.ImagePath)
}

func limitString(n int64) string {
	if n == 0 {
		return "none"
	}
	return fmt.Sprintf("%dM", n>>20)
}
