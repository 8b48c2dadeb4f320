// Package procfs reads what the kernel says of a process in /proc: its
// status (uids, capabilities, no_new_privs, seccomp, memory) and its stat
// (command name, state, parent). It is the one place that parses them: the
// security audit, the runner and the tests all prove what they claim from
// here.
package procfs

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Root is where procfs is mounted.
const Root = "/proc"

// Status is /proc/<pid>/status, field name to value (trimmed; kB units
// stay in the value, e.g. "1234 kB").
type Status map[string]string

// ReadStatus reads the status of pid (0: the caller).
func ReadStatus(pid int) (Status, error) {
	b, err := os.ReadFile(path(pid, "status"))
	if err != nil {
		return nil, err
	}
	return ParseStatus(string(b)), nil
}

// ParseStatus parses the text of a status file.
func ParseStatus(text string) Status {
	st := Status{}
	for _, l := range strings.Split(text, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			st[k] = strings.TrimSpace(v)
		}
	}
	return st
}

// KiB is a field in kB (VmRSS, VmHWM, …), or -1 when it is absent or not
// a number.
func (s Status) KiB(field string) int64 {
	f := strings.Fields(s[field])
	if len(f) == 0 {
		return -1
	}
	n, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// Stat is what swarmvm reads of /proc/<pid>/stat.
type Stat struct {
	PID   int
	Comm  string // the command name, without its parentheses
	State byte   // R, S, D, Z, X, …
	PPID  int
	PGRP  int
	// UTime and STime are the CPU time spent in user and kernel mode, in
	// clock ticks (ClockTicks a second).
	UTime, STime uint64
}

// ClockTicks is the kernel's USER_HZ, the unit of stat's times: 100 on
// every architecture Linux builds for with a fixed value, which amd64
// and arm64 are.
const ClockTicks = 100

// Alive is a process that has not exited (neither zombie nor dead).
func (s Stat) Alive() bool { return s.State != 'Z' && s.State != 'X' }

// ReadStat reads the stat of pid (0: the caller).
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile(path(pid, "stat"))
	if err != nil {
		return Stat{}, err
	}
	return ParseStat(string(b))
}

// ParseStat parses the text of a stat file. The command name sits in
// parentheses and may itself hold spaces and parentheses: the fields
// after it start after its last closing one.
func ParseStat(text string) (Stat, error) {
	open, end := strings.IndexByte(text, '('), strings.LastIndexByte(text, ')')
	if open < 1 || end < open {
		return Stat{}, errors.New("procfs: stat without a command name")
	}
	pid, err := strconv.Atoi(strings.TrimSpace(text[:open]))
	if err != nil {
		return Stat{}, fmt.Errorf("procfs: stat pid: %w", err)
	}
	f := strings.Fields(text[end+1:])
	if len(f) < 3 || len(f[0]) != 1 {
		return Stat{}, errors.New("procfs: stat too short")
	}
	st := Stat{PID: pid, Comm: text[open+1 : end], State: f[0][0]}
	if st.PPID, err = strconv.Atoi(f[1]); err != nil {
		return Stat{}, fmt.Errorf("procfs: stat ppid: %w", err)
	}
	if st.PGRP, err = strconv.Atoi(f[2]); err != nil {
		return Stat{}, fmt.Errorf("procfs: stat pgrp: %w", err)
	}
	if len(f) > 12 { // fields 14 and 15 of proc(5)
		st.UTime, _ = strconv.ParseUint(f[11], 10, 64)
		st.STime, _ = strconv.ParseUint(f[12], 10, 64)
	}
	return st, nil
}

// Schedstat is a thread's /proc/<pid>/task/<tid>/schedstat: its time on a
// CPU and its time runnable but waiting for one, in nanoseconds.
type Schedstat struct {
	RunNS, WaitNS uint64
}

// ReadSchedstat reads thread tid of process pid.
func ReadSchedstat(pid, tid int) (Schedstat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/schedstat", pid, tid))
	if err != nil {
		return Schedstat{}, err
	}
	return ParseSchedstat(string(b))
}

// ParseSchedstat parses the text of a schedstat file.
func ParseSchedstat(text string) (Schedstat, error) {
	f := strings.Fields(text)
	if len(f) < 2 {
		return Schedstat{}, errors.New("procfs: schedstat too short")
	}
	run, err1 := strconv.ParseUint(f[0], 10, 64)
	wait, err2 := strconv.ParseUint(f[1], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return Schedstat{}, fmt.Errorf("procfs: schedstat: %w", err)
	}
	return Schedstat{RunNS: run, WaitNS: wait}, nil
}

// Alive is true for a live process: it exists and has not exited.
func Alive(pid int) bool {
	st, err := ReadStat(pid)
	return err == nil && st.Alive()
}

// Processes is the stat of every process readable now, those that match
// keep (nil keeps all). A process that ends while it is read is left out.
func Processes(keep func(Stat) bool) []Stat {
	ents, _ := os.ReadDir(Root)
	var out []Stat
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := ReadStat(pid)
		if err != nil {
			continue
		}
		if keep == nil || keep(st) {
			out = append(out, st)
		}
	}
	return out
}

func path(pid int, file string) string {
	if pid == 0 {
		return Root + "/self/" + file
	}
	return Root + "/" + strconv.Itoa(pid) + "/" + file
}

// ChildNamed is a live child of ppid whose command name starts with
// prefix (the kernel keeps 15 bytes of it), or 0.
func ChildNamed(ppid int, prefix string) int {
	kids := Processes(func(s Stat) bool { return s.PPID == ppid && s.Alive() && strings.HasPrefix(s.Comm, prefix) })
	if len(kids) == 0 {
		return 0
	}
	return kids[0].PID
}
