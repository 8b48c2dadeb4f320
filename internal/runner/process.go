package runner

import (
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/migrate"
	"github.com/swarmvm/swarmvm/internal/qemu"
	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/status"
)

// vm is a started QEMU and what the runner holds of it.
type vm struct {
	cfg   config.Config
	log   *slog.Logger
	spec  qemu.Spec
	state string
	pid   int

	exited  chan struct{} // closed when QEMU has been reaped
	status  unix.WaitStatus
	output  sync.WaitGroup // the serial and stderr copiers
	stderr  *tail
	qmp     *qmp.Client
	events  <-chan qmp.Event // the QMP session's, subscribed on connecting
	dropped uint64           // events lost so far, as last said
	lease   *fdpass.Lease    // the broker's KVM lease, nil without a broker
	tapOf   *fdpass.Lease    // the broker's TAP lease (bridge mode), or nil
	img     qemu.Img         // qemu-img, through the runner's owner of children
	space   *spaceWait       // set while the VM is paused for lack of space
	serial  string           // the serial log's path, for error messages
	initial string           // the run state QMP found when it connected

	// TPM=on: swtpm, the runner's child beside QEMU; nil without one.
	tpm *tpmProc
	// GUEST_AGENT=on: the runner's client of the guest agent, once QEMU
	// runs; nil without one.
	agent *guestAgent
	// METRICS_PORT: the metrics server, which counts QMP events; nil
	// without one.
	metrics *metricsServer
	runs    runs            // the VM's record across tasks, as this start found it
	console *console.Server // the console, nil without one
	backups backupStats     // online backups served, for the metrics
	// stopBegan is when the runner was told to stop (SIGTERM): the stop
	// and what follows it end within config.StopBudget of it.
	stopBegan time.Time
	// outputDone is closed once the serial and stderr copiers are done.
	outputDone chan struct{}
	// handed is closed when the guest went, live, to the VM's next task
	// (handoff.go): this QEMU is paused for good.
	handed   chan struct{}
	handedMu sync.Mutex
	// scheduleStop ends the backup schedule (BACKUP_EVERY), nil without.
	scheduleStop func()
	// ticket, when set, says the guest comes from another node (a
	// migration), not from this node's task before.
	ticket *migrate.Ticket
	// images are the runner's copies of the disk's and the NVRAM's
	// descriptors it handed QEMU, closed when QEMU has ended.
	images []*os.File
}

// start launches QEMU: no_new_privs set first, its own process group, the
// KVM descriptor as fd 3, the serial console on a pipe to the capped log,
// and its stderr into the runner's log.
func start(cfg config.Config, p *prepared, log *slog.Logger) (*vm, error) {
	bin, err := exec.LookPath(cfg.QEMUBinary)
	if err != nil {
		return nil, exitf(status.ExitStart, "QEMU_BINARY: %w", err)
	}
	f := p.facts
	f.fds = p.fds.handed()
	spec := buildSpec(cfg, f)
	handed := p.fds.files() // in the order buildSpec numbered them
	argv := qemu.Argv(spec)
	v := &vm{cfg: cfg, log: log, spec: spec, state: p.state, exited: make(chan struct{}), handed: make(chan struct{}), stderr: newTail(20), lease: p.fds.KVMLease, tapOf: p.fds.NetLease, serial: p.serial.path, img: p.img}
	v.tpm = p.tpm
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, exitf(status.ExitInternal, "open %s: %w", os.DevNull, err)
	}
	defer devnull.Close()
	serialR, serialW, err := os.Pipe()
	if err != nil {
		return nil, exitf(status.ExitInternal, "serial pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		serialR.Close()
		serialW.Close()
		return nil, exitf(status.ExitInternal, "stderr pipe: %w", err)
	}
	stdin := devnull
	if p.serialIn != nil {
		stdin = p.serialIn
	}
	files := append([]*os.File{stdin, serialW, errW}, handed...)
	log.Info("starting QEMU", "binary", bin, "argv", strings.Join(argv, " "))
	pid, exited, err := p.kids.start(bin, append([]string{bin}, argv...), &os.ProcAttr{
		Env:   []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR=" + cfg.RunDir},
		Files: files,
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	serialW.Close()
	errW.Close()
	if p.serialIn != nil { // QEMU holds the read end; the runner must not
		p.serialIn.Close()
		p.serialIn = nil
	}
	if err != nil {
		serialR.Close()
		errR.Close()
		return nil, exitf(status.ExitStart, "start QEMU: %w", err)
	}
	v.pid = pid
	go func() { v.status = <-exited; close(v.exited) }()
	// QEMU has its own copies; broker leases, if any, stay open. The
	// disk's and the NVRAM's are kept, to release the image locks QEMU
	// leaves on them after a hand-off (releaseImageLocks).
	v.images = append(p.fds.Disk, p.fds.Vars...)
	p.fds.Disk, p.fds.Vars = nil, nil
	p.fds.closeFiles()
	log.Info("QEMU started", "pid", v.pid)
	v.collectOutput(serialR, errR, serialSinks(cfg, p, log))
	return v, nil
}

// inheritNone marks every descriptor the runner inherited beyond 0, 1 and
// 2 close-on-exec, so that QEMU, swtpm and qemu-img get only what they are
// handed: whatever started the runner (a shell, a test, an engine that
// leaks one) has no way through to the VM. The runtime's own descriptors
// are close-on-exec already.
func inheritNone() error {
	err := unix.CloseRange(3, math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	// Kernels before 5.11 lack CLOSE_RANGE_CLOEXEC: one descriptor at a time.
	ents, rerr := os.ReadDir("/proc/self/fd")
	if rerr != nil {
		return fmt.Errorf("close_range: %v; /proc/self/fd: %w", err, rerr)
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
		}
	}
	return nil
}

// startNoNewPrivs starts the process with no_new_privs set, so that QEMU
// and anything it could exec can never gain privilege (invariant 2). The
// flag is per thread and inherited by the child: it is set on every thread
// where the runtime allows that, and in any case on the thread that forks.
func startNoNewPrivs(bin string, argv []string, attr *os.ProcAttr) (*os.Process, error) {
	if _, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); errno != 0 && errno != syscall.ENOTSUP {
		return nil, fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", errno)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	return os.StartProcess(bin, argv, attr)
}

// serialSinks is where the serial console's output goes: the log file,
// the console's clients, and with UEFI the firmware watch.
func serialSinks(cfg config.Config, p *prepared, log *slog.Logger) io.Writer {
	var out io.Writer = p.serial
	if p.serialTee != nil {
		out = io.MultiWriter(p.serial, p.serialTee)
	}
	if cfg.UEFI() {
		out = io.MultiWriter(out, newFirmwareWatch(log, cfg.BootMode))
	}
	return out
}

// collectOutput copies QEMU's serial output and stderr until QEMU (and
// anything holding its pipes) has closed them; outputDone closes then.
func (v *vm) collectOutput(serialR, errR io.ReadCloser, serialOut io.Writer) {
	v.output.Add(2)
	go v.copySerial(serialR, serialOut)
	go v.copyStderr(errR)
	v.outputDone = make(chan struct{})
	go func() { v.output.Wait(); close(v.outputDone) }()
}

func (v *vm) copySerial(r io.ReadCloser, w io.Writer) {
	defer v.output.Done()
	defer r.Close()
	if _, err := io.Copy(w, r); err != nil {
		v.log.Error("serial log", "err", err)
	}
}

// copyStderr logs QEMU's own messages line by line and keeps the last
// few for error reports.
func (v *vm) copyStderr(r io.ReadCloser) {
	defer v.output.Done()
	copyLines(r, func(line string) {
		v.stderr.add(line)
		v.log.Warn("qemu", "msg", line)
	})
}

// exitDescription says how QEMU ended.
func (v *vm) exitDescription() string { return describeWait(v.status) }

// tail keeps the last n lines.
type tail struct {
	mu    sync.Mutex
	n     int
	lines []string
}

func newTail(n int) *tail { return &tail{n: n} }

func (t *tail) add(s string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, s)
	if len(t.lines) > t.n {
		t.lines = t.lines[len(t.lines)-t.n:]
	}
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, " | ")
}
