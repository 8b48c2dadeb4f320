package runner

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// children is the one owner of the runner's child processes: QEMU, swtpm,
// qemu-img, and whatever comes. Each is started through it, and its one
// reaper collects every exit (orphans too: as PID 1, or a subreaper, the
// runner inherits them) and hands each child's status to whoever waits for
// it. Nothing else may wait: a second waiter (os/exec's, say) would race
// the reaper for the status and lose it (qemu-img's check after QEMU
// stopped got ECHILD). The reaper starts with the first child; the
// preflight checks' short programs run and end before that.
type children struct {
	log *slog.Logger

	mu      sync.Mutex
	waits   map[int]chan unix.WaitStatus
	started bool
}

func newChildren(log *slog.Logger) *children {
	return &children{log: log, waits: map[int]chan unix.WaitStatus{}}
}

// start starts bin with no_new_privs set and returns its pid and a channel
// that gets its wait status once.
func (c *children) start(bin string, argv []string, attr *os.ProcAttr) (int, <-chan unix.WaitStatus, error) {
	c.mu.Lock()
	defer c.mu.Unlock() // the reaper cannot hand out this pid's status before it is registered
	if !c.started {
		c.startReaper()
	}
	proc, err := startNoNewPrivs(bin, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	pid := proc.Pid // Release sets it to -1
	ch := make(chan unix.WaitStatus, 1)
	c.waits[pid] = ch
	proc.Release()
	return pid, ch, nil
}

// startReaper becomes the subreaper of what the runner starts (PID 1 in a
// container is one anyway) and reaps from now on. Called with mu held.
func (c *children) startReaper() {
	c.started = true
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		c.log.Warn("cannot become child subreaper", "err", err)
	}
	sigchld := make(chan os.Signal, 8)
	signal.Notify(sigchld, syscall.SIGCHLD) // before any child can report
	go func() {
		for {
			c.reapAll()
			<-sigchld
		}
	}()
}

// reapAll collects every exited child and hands its status on.
func (c *children) reapAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		c.mu.Lock()
		ch := c.waits[pid]
		delete(c.waits, pid)
		c.mu.Unlock()
		if ch != nil {
			ch <- ws
		} else {
			c.log.Debug("reaped orphan", "pid", pid)
		}
	}
}

// run runs bin to its end through the owner, its output to stdout and
// stderr, and returns its exit code; when ctx ends first, its process
// group is killed, and the error says so. It is qemu.Img's Exec.
func (c *children) run(ctx context.Context, bin string, args []string, stdout, stderr io.Writer) (int, error) {
	path, err := exec.LookPath(bin)
	if err != nil {
		return -1, err
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return -1, err
	}
	defer devnull.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return -1, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return -1, err
	}
	pid, exited, err := c.start(path, append([]string{bin}, args...), &os.ProcAttr{
		Env:   []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		Files: []*os.File{devnull, outW, errW},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return -1, fmt.Errorf("start %s: %w", bin, err)
	}
	var copied sync.WaitGroup
	copied.Go(func() { io.Copy(stdout, outR); outR.Close() })
	copied.Go(func() { io.Copy(stderr, errR); errR.Close() })
	var ws unix.WaitStatus
	select {
	case ws = <-exited:
	case <-ctx.Done():
		killGroup(pid, unix.SIGKILL)
		ws = <-exited
		copied.Wait()
		return -1, fmt.Errorf("%s: %w (killed)", bin, ctx.Err())
	}
	copied.Wait()
	if ws.Signaled() {
		return -1, fmt.Errorf("%s: %s", bin, describeWait(ws))
	}
	return ws.ExitStatus(), nil
}

// killGroup signals the process group of a child the runner started in a
// group of its own (pid is its leader). A pid below 2 is never signalled:
// kill(-1) is every process the runner may signal, kill(0) its own group.
func killGroup(pid int, sig unix.Signal) {
	if pid > 1 {
		unix.Kill(-pid, sig)
	}
}

// killPID signals one child, never a pid below 2.
func killPID(pid int, sig unix.Signal) {
	if pid > 1 {
		unix.Kill(pid, sig)
	}
}
