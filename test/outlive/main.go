// Command outlive runs a command (a test run) as a child subreaper, so that
// every process the command starts stays below it, orphans included; when
// the command has ended, a process still left below it (after a short
// grace) outlived the test that started it. outlive names each, with its
// command line, kills it and fails: exit 1, or the command's own status
// when that failed.
//
//	go run ./test/outlive -- go test ./...
package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/procfs"
)

// grace is how long processes may take to end after the command has
// (OUTLIVE_GRACE, a duration, sets another).
var grace = 10 * time.Second

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: outlive -- COMMAND [ARG...]")
		os.Exit(2)
	}
	if d, err := time.ParseDuration(os.Getenv("OUTLIVE_GRACE")); err == nil {
		grace = d
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "outlive: PR_SET_CHILD_SUBREAPER:", err)
		os.Exit(2)
	}
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM) // the command gets them and ends
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	status := 0
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "outlive:", err)
		os.Exit(2)
	}
	stop := make(chan struct{})
	go reapOrphans(cmd.Process.Pid, stop)
	err := cmd.Wait()
	close(stop)
	if err != nil {
		status = 1
		if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() > 0 {
			status = ee.ExitCode()
		}
	}
	left := leftover()
	for end := time.Now().Add(grace); len(left) > 0 && time.Now().Before(end); left = leftover() {
		time.Sleep(200 * time.Millisecond)
	}
	for _, p := range left {
		fmt.Fprintf(os.Stderr, "outlive: process %d outlived the test run that started it: %s\n", p.pid, p.cmdline)
		syscall.Kill(-p.pid, syscall.SIGKILL)
		syscall.Kill(p.pid, syscall.SIGKILL)
	}
	if len(left) > 0 {
		fmt.Fprintf(os.Stderr, "outlive: %d processes outlived the test run (killed now): every test must end what it starts\n", len(left))
		leftover() // reap them
		if status == 0 {
			status = 1
		}
	}
	os.Exit(status)
}

type proc struct {
	pid     int
	cmdline string
}

// reapOrphans reaps, while the command runs, the orphans that ended below
// it (all but the command itself, which cmd.Wait reaps). A zombie left
// until the end still answers kill(pid, 0): an engine restarted by a test
// took its killed containerd's zombie, whose pid was in its pidfile, for a
// containerd still running, and waited on it until it gave up.
func reapOrphans(command int, stop <-chan struct{}) {
	self := os.Getpid()
	chld := make(chan os.Signal, 1)
	signal.Notify(chld, syscall.SIGCHLD)
	defer signal.Stop(chld)
	tick := time.NewTicker(time.Second) // SIGCHLDs coalesce
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-chld:
		case <-tick.C:
		}
		for _, st := range procfs.Processes(func(s procfs.Stat) bool { return s.PPID == self && !s.Alive() && s.PID != command }) {
			unix.Wait4(st.PID, nil, unix.WNOHANG, nil)
		}
	}
}

// leftover reaps the children that have ended and lists those alive.
func leftover() []proc {
	for {
		pid, err := unix.Wait4(-1, nil, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			break
		}
	}
	self := os.Getpid()
	var out []proc
	for _, st := range procfs.Processes(func(s procfs.Stat) bool { return s.PPID == self && s.Alive() }) {
		cl, _ := os.ReadFile(fmt.Sprintf("%s/%d/cmdline", procfs.Root, st.PID))
		out = append(out, proc{st.PID, strings.TrimSpace(strings.ReplaceAll(string(cl), "\x00", " "))})
	}
	return out
}
