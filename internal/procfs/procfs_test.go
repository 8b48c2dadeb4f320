package procfs

import (
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// The caller's own status and stat, read as the kernel gives them.
func TestSelf(t *testing.T) {
	st, err := ReadStatus(0)
	if err != nil {
		t.Fatal(err)
	}
	if st["Pid"] != strconv.Itoa(os.Getpid()) {
		t.Errorf("Pid %q, want %d", st["Pid"], os.Getpid())
	}
	if st.KiB("VmRSS") <= 0 {
		t.Errorf("VmRSS %q: want a size in kB", st["VmRSS"])
	}
	if st.KiB("NoSuchField") != -1 {
		t.Error("an absent field is not -1")
	}
	s, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.PID != os.Getpid() || s.PPID != os.Getppid() || !s.Alive() {
		t.Errorf("stat %+v: want pid %d, ppid %d, alive", s, os.Getpid(), os.Getppid())
	}
}

// A command name with spaces and parentheses does not shift the fields.
func TestParseStatOddName(t *testing.T) {
	s, err := ParseStat("4242 (a) b) (c) Z 17 4242 4242 0 -1")
	if err != nil {
		t.Fatal(err)
	}
	if s.PID != 4242 || s.Comm != "a) b) (c" || s.State != 'Z' || s.PPID != 17 || s.PGRP != 4242 || s.Alive() {
		t.Errorf("parsed %+v", s)
	}
	for _, bad := range []string{"", "4242", "x (a) S 1 1", "42 (a) S", "42 (a) SS 1 1", "42 (a) S one 1"} {
		if _, err := ParseStat(bad); err == nil {
			t.Errorf("ParseStat(%q) took it", bad)
		}
	}
}

// A child that exited and is not yet reaped is a zombie: not alive, and
// found among its parent's children.
func TestZombieChild(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	deadline := time.Now().Add(5 * time.Second)
	for Alive(pid) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if Alive(pid) {
		t.Fatal("an exited child is still alive")
	}
	kids := Processes(func(s Stat) bool { return s.PPID == os.Getpid() && s.State == 'Z' })
	found := false
	for _, k := range kids {
		found = found || k.PID == pid
	}
	if !found {
		t.Errorf("zombie %d not among %+v", pid, kids)
	}
	cmd.Wait()
	if _, err := ReadStat(pid); err == nil {
		t.Error("a reaped child still has a stat")
	}
}

// The CPU times are fields 14 and 15, counted past a command name with
// spaces; a thread's schedstat is its run and wait nanoseconds, and this
// process has run.
func TestCPUTimes(t *testing.T) {
	s, err := ParseStat("7 (q e) S 1 7 7 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 3 0 99 1000 50")
	if err != nil || s.UTime != 1234 || s.STime != 567 {
		t.Errorf("parsed %+v %v, want utime 1234 stime 567", s, err)
	}
	ss, err := ParseSchedstat("8015250 128339 42\n")
	if err != nil || ss.RunNS != 8015250 || ss.WaitNS != 128339 {
		t.Errorf("schedstat %+v %v", ss, err)
	}
	if _, err := ParseSchedstat("x y"); err == nil {
		t.Error("ParseSchedstat took words")
	}
	for i := 0; i < 3e7; i++ { // some CPU time of its own
		_ = i * i
	}
	me, err := ReadSchedstat(os.Getpid(), syscall.Gettid())
	if err != nil || me.RunNS == 0 {
		t.Errorf("own schedstat %+v %v", me, err)
	}
}
