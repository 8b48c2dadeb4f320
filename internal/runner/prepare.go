package runner

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/preflight"
	"github.com/swarmvm/swarmvm/internal/qemu"
	"github.com/swarmvm/swarmvm/internal/status"
)

// cgroupRoot is where the container's own cgroup is mounted.
var cgroupRoot = "/sys/fs/cgroup"

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
	// bootedHere: the VM's serial log was here before this start (it ran
	// on this node before).
	bootedHere bool
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
func prepare(ctx context.Context, cfg config.Config, log *slog.Logger, ph *phases, kids *children, handoff bool) (*prepared, error) {
	fds, err := preflightChecks(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	ph.done("preflight")
	p := &prepared{fds: fds, kids: kids, img: qemu.Img{Exec: kids.run}, state: filepath.Join(cfg.RunDir, "state.json")}
	p.facts.incoming = handoff
	if err := p.prepare(ctx, cfg, log, ph); err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

// prepare readies, in order: the memory size, the run folder, the disk,
// the NVRAM and TPM state, the VM's own files opened once, the serial
// log, and the QMP sockets.
func (p *prepared) prepare(ctx context.Context, cfg config.Config, log *slog.Logger, ph *phases) error {
	limit := memoryLimit(cgroupRoot)
	mem, err := cfg.GuestMemoryMiB(limit)
	if err != nil {
		return &ExitError{Code: status.ExitConfig, Err: err}
	}
	log.Info("memory", "guest", config.FormatMiB(mem), "qemu_overhead", config.FormatMiB(cfg.OverheadMiB()), "container_limit", limitString(limit))
	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return exitf(status.ExitStorage, "run folder: %w (mount a tmpfs at %s)", err, filepath.Dir(cfg.RunDir))
	}
	bootISO, err := prepareDisk(ctx, cfg, p.img, p.state, p.facts.incoming, log)
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
	if err := p.openSerialLog(cfg, log); err != nil {
		return err
	}
	if free, err := freeBytes(filepath.Dir(cfg.ImagePath)); err == nil && free < ResumeFree {
		log.Warn("the storage volume holding the disk is nearly full: the VM will pause when a write finds no space, until space is freed",
			"volume", filepath.Dir(cfg.ImagePath), "free_mib", free>>20)
	}
	p.facts.memMiB, p.facts.bootFromISO, p.facts.uid = mem, bootISO, os.Geteuid()
	if p.fds.QMP, err = listenUnix(qmpSocket(cfg)); err != nil {
		return exitf(status.ExitStart, "QMP socket: %w", err)
	}
	if p.fds.Health, err = listenUnix(healthSocket(cfg)); err != nil {
		return exitf(status.ExitStart, "health socket: %w", err)
	}
	if cfg.GuestAgent {
		if p.fds.Agent, err = listenUnix(agentSocket(cfg)); err != nil {
			return exitf(status.ExitStart, "guest agent socket: %w", err)
		}
		p.facts.agent = true
	}
	ph.done("files and serial log")
	return nil
}

// openSerialLog makes the storage layout where it is missing: images/
// (disks, NVRAM), isos/ (install media), logs/ (serial consoles); whose
// the folders are is checked where it matters: the folders of the VM's
// own files, by preflight and mkdirFor. isos/ holds read-only media, and
// may be anyone's. Then it opens the serial log.
func (p *prepared) openSerialLog(cfg config.Config, log *slog.Logger) error {
	for _, d := range []string{"images", "isos", "logs"} {
		if err := os.MkdirAll(filepath.Join(cfg.StorageDir, d), 0o750); err != nil {
			return exitf(status.ExitStorage, "storage folder %s: %w", d, err)
		}
	}
	path := filepath.Join(cfg.StorageDir, "logs", cfg.Name+".serial.log")
	_, err := os.Lstat(path)
	p.bootedHere = err == nil
	p.serial, err = openSerial(path, cfg.SerialLogMax)
	if err != nil {
		return exitf(status.ExitStorage, "serial log: %w", err)
	}
	log.Info("serial console", "log", p.serial.path, "max", cfg.SerialLogMax)
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
			return exitf(status.ExitStorage, "%s's folder %s: %w", variable, dir, err)
		}
		return nil
	}
	if err := preflight.MkdirOwn(cfg.StorageDir, variable, dir, 0o750); err != nil {
		return exitf(status.ExitStorage, "%v", err)
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

func limitString(n int64) string {
	if n == 0 {
		return "none"
	}
	return fmt.Sprintf("%dM", n>>20)
}
