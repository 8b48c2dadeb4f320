package runner

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qemu"
	"github.com/swarmvm/swarmvm/internal/status"
)

// TPM=on: the runner starts swtpm (QEMU's sandbox forbids QEMU to spawn
// it) as its own child, with no_new_privs and swtpm's own seccomp filter,
// handing it its control socket listening (RUN_DIR/swtpm.sock, bound by
// the runner, so QEMU never waits for it); QEMU connects and passes swtpm
// the data channel over it. swtpm keeps the
// TPM's state in TPM_STATE, a 0700 folder of the VM's uid made once; it
// ends when QEMU lets go of the channel (--terminate). If it ends while the
// VM runs, the runner stops the VM and exits status.ExitTPM.

// tpmProc is a running swtpm.
type tpmProc struct {
	pid     int
	exited  chan struct{}   // closed when it has been reaped
	status  unix.WaitStatus // then, how it ended
	output  chan struct{}   // closed when its log copier is done
	control string          // its control socket, removed when it is gone
}

// tpmStopWait is how long swtpm has to end by itself once QEMU is gone.
const tpmStopWait = 2 * time.Second

// prepareTPMState makes the TPM's state folder, or sets the old one aside
// when TPM_RESET asks, and refuses one that is not the VM's alone. A folder
// that is missing while the disk holds data is a lost TPM (BitLocker's
// keys, sealed secrets): refused like lost NVRAM, unless TPM_RESET.
func prepareTPMState(cfg config.Config, log *slog.Logger) error {
	dir := cfg.TPMState
	_, err := os.Lstat(dir)
	switch {
	case err == nil && cfg.TPMReset:
		aside := fmt.Sprintf("%s.%s.bak", dir, time.Now().UTC().Format("20060102T150405Z"))
		if err := os.Rename(dir, aside); err != nil {
			return exitf(status.ExitStorage, "TPM_RESET: set aside %s: %w", dir, err)
		}
		log.Warn("TPM_RESET: the TPM's state was set aside; the VM starts with a new TPM; unset TPM_RESET or it happens at every start", "old", aside, "new", dir)
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return exitf(status.ExitStorage, "TPM_STATE %s: %w", dir, err)
	}
	if err := mkdirFor(cfg, "TPM_STATE", dir); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err == nil {
		log.Info("TPM state folder created", "path", dir)
	} else if !errors.Is(err, os.ErrExist) {
		return exitf(status.ExitStorage, "TPM_STATE %s: %w", dir, err)
	}
	return checkTPMState(dir)
}

// tpmLost refuses to start a VM whose disk already holds data but whose
// TPM state folder is missing, before anything is created: a new TPM would
// be a TPM reset (keys sealed to it, e.g. BitLocker's, gone), which only
// TPM_RESET asks for.
func tpmLost(ctx context.Context, img qemu.Img, cfg config.Config) error {
	lost, err := lostUnderData(ctx, img, cfg, cfg.TPMState, cfg.TPMReset)
	if err != nil || !lost {
		return err
	}
	return exitf(status.ExitStorage, "TPM_STATE %s is missing but the disk %s already holds data: this VM's TPM (keys sealed to it, e.g. BitLocker's) is gone — restore the folder, or set TPM_RESET=true once to start with a new TPM (also for a disk brought from elsewhere, or a VM that had no TPM)", cfg.TPMState, cfg.ImagePath)
}

// checkTPMState refuses a state folder that is a link, not a folder, not
// the runner's uid's, or open to anyone else.
func checkTPMState(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return exitf(status.ExitStorage, "TPM_STATE %s: %w", dir, err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return exitf(status.ExitStorage, "TPM_STATE %s is not a folder (a link or a file): the TPM's state must be a folder of this VM's own — move it away", dir)
	case int(st.Uid) != os.Geteuid():
		return exitf(status.ExitStorage, "TPM_STATE %s belongs to uid %d, not this VM's uid %d: on the node: chown -R %d %s, if it is this VM's", dir, st.Uid, os.Geteuid(), os.Geteuid(), dir)
	case st.Mode&0o777 != 0o700:
		return exitf(status.ExitStorage, "TPM_STATE %s has mode %04o: the TPM's secrets must be readable by this VM alone — on the node: chmod 700 %s", dir, st.Mode&0o777, dir)
	}
	return nil
}

// startTPM starts swtpm on its control socket, listening, and names the
// socket in QEMU's spec.
func startTPM(cfg config.Config, p *prepared, log *slog.Logger) (*tpmProc, error) {
	bin, err := exec.LookPath(cfg.SwtpmBinary)
	if err != nil {
		return nil, exitf(status.ExitTPM, "SWTPM_BINARY: %w", err)
	}
	sock := tpmSocket(cfg)
	ctrl, err := listenUnix(sock)
	if err != nil {
		return nil, exitf(status.ExitInternal, "TPM control socket: %w", err)
	}
	defer ctrl.Close()
	logR, logW, err := os.Pipe()
	if err != nil {
		return nil, exitf(status.ExitInternal, "swtpm log pipe: %w", err)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		logR.Close()
		logW.Close()
		return nil, exitf(status.ExitInternal, "open %s: %w", os.DevNull, err)
	}
	defer devnull.Close()
	argv := []string{bin, "socket", "--tpm2",
		"--tpmstate", "dir=" + cfg.TPMState + ",mode=0600",
		"--ctrl", "type=unixio,fd=3",
		"--terminate",
		// Errors only, to stderr, which the runner logs; from level 2 swtpm
		// dumps every TPM command and response, secrets included.
		"--log", "level=1",
		"--seccomp", "action=kill",
	}
	log.Info("starting swtpm", "argv", fmt.Sprint(argv[1:]), "state", cfg.TPMState)
	pid, exit, err := p.kids.start(bin, argv, &os.ProcAttr{
		Env:   []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		Files: []*os.File{devnull, logW, logW, ctrl},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	logW.Close()
	if err != nil {
		logR.Close()
		return nil, exitf(status.ExitTPM, "start swtpm: %w", err)
	}
	t := &tpmProc{pid: pid, exited: make(chan struct{}), output: make(chan struct{}), control: sock}
	go func() { t.status = <-exit; close(t.exited) }()
	go func() {
		defer close(t.output)
		copyLines(logR, func(line string) { log.Warn("swtpm", "msg", line) })
	}()
	p.facts.tpm = true
	p.tpm = t
	log.Info("swtpm started", "pid", t.pid)
	return t, nil
}

// copyLines calls f for each line r gives until it ends, then closes it.
func copyLines(r io.ReadCloser, f func(string)) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 64<<10)
	for sc.Scan() {
		f(sc.Text())
	}
}

// tpmEnded is the runner's answer to swtpm ending under a running VM:
// QEMU is stopped (a TPM that vanished is not one a guest can go on with),
// and the runner exits status.ExitTPM.
func (v *vm) tpmEnded(ctx context.Context) error {
	how := describeWait(v.tpm.status)
	v.log.Error("swtpm ended while the VM ran; stopping the VM", "swtpm", how)
	if err := v.force(ctx, "the TPM (swtpm) ended"); err != nil && Code(err) == status.ExitInternal {
		return err
	}
	return exitf(status.ExitTPM, "the VM's TPM (swtpm, pid %d) ended (%s) while the VM ran; the VM was stopped — its state in %s is kept; see the swtpm lines above", v.tpm.pid, how, v.cfg.TPMState)
}

// stop ends swtpm once QEMU is gone, by the deadline: it ends by itself
// when its channel closes; else SIGTERM, then SIGKILL to its group, each
// wait within what is left.
func (t *tpmProc) stop(by time.Time, log *slog.Logger) {
	if !waitBy(t.exited, time.Now().Add(until(by, tpmStopWait))) {
		log.Warn("swtpm still running after QEMU ended; SIGTERM", "pid", t.pid)
		killPID(t.pid, unix.SIGTERM)
		if !waitBy(t.exited, time.Now().Add(until(by, time.Until(by)/2))) {
			log.Warn("swtpm ignored SIGTERM; SIGKILL", "pid", t.pid)
			killGroup(t.pid, unix.SIGKILL)
			waitBy(t.exited, by)
		}
	}
	waitBy(t.output, by)
	os.Remove(t.control)
}

func describeWait(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("killed by signal %d (%s)", ws.Signal(), ws.Signal())
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}
