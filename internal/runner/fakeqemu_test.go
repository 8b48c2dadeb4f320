// A fake's descriptor table is compared with what the runner handed it:
// the runtime must not open cgroup files of its own for GOMAXPROCS.

//go:debug containermaxprocs=0
//go:debug updatemaxprocs=0

package runner

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/procfs"
)

// fakeBinary makes path a stand-in program: a link to this test binary,
// with the environment it is to run in (FAKE_QEMU=mode, …) in a file
// beside it, which TestMain reads (loadFake). No shell runs in between, so
// the fake holds exactly the descriptors it was started with.
func fakeBinary(path string, env map[string]string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	var b strings.Builder
	for k, v := range env {
		fmt.Fprintf(&b, "%s=%s\n", k, v)
	}
	if err := os.WriteFile(path+".fake", []byte(b.String()), 0o644); err != nil {
		return err
	}
	os.Remove(path)
	return os.Symlink(self, path)
}

// fakeQEMUAt makes path the fake QEMU in mode, recording into dir.
func fakeQEMUAt(path, mode, dir string) error {
	return fakeBinary(path, map[string]string{"FAKE_QEMU": mode, "FAKE_QEMU_RECORD": filepath.Join(dir, "record.json")})
}

// loadFake sets the environment a fake binary was made with, when this
// test binary runs as one.
func loadFake() {
	// Read by system calls: os.ReadFile would start the runtime's poller,
	// whose descriptors the fake would then hold and record.
	fd, err := unix.Open(os.Args[0]+".fake", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	b := make([]byte, 4096)
	n, _ := unix.Read(fd, b)
	unix.Close(fd)
	b = b[:max(n, 0)]
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			os.Setenv(k, v)
		}
	}
}

// fakeQEMU stands in for qemu-system-x86_64 when the test binary is run
// with FAKE_QEMU set. It records its argv and descriptors, serves QMP on the
// sockets its argv names, and behaves as FAKE_QEMU says:
//
//	ok           power off (exit 0) on system_powerdown
//	late-acpi    miss the first system_powerdown (the guest is still
//	             booting), power off on the next
//	ignore-acpi  ignore system_powerdown; exit 0 on quit
//	hang         ignore system_powerdown, quit and SIGTERM
//	fail-start   print an error and exit 1 before opening QMP
//	crash        die of SIGSEGV a moment after QMP is up
//	poweroff     the guest powers off by itself after QMP is up
//	no-kvm       answer query-kvm with enabled=false
//	panic        the guest panics after the first query-status (GUEST_PANICKED)
//	panicked     the guest panicked before QMP connected (query-status says so)
//	enospc       a write finds the volume full after the first query-status
//	             (BLOCK_IO_ERROR nospace, STOP); exit 0 on quit
//	worst        everything a stop can meet at once: after the first
//	             query-status it answers no QMP command, it ignores SIGTERM,
//	             and a process of another session holds its output pipes
//	             (its pid in pipe-holder.pid beside the record)
func fakeQEMU(mode string) {
	args := os.Args[1:]
	if len(args) == 1 && args[0] == "--version" {
		fmt.Println("QEMU emulator version 10.0.13 (fake)")
		os.Exit(0)
	}
	record(args)
	if mode == "fail-start" {
		fmt.Fprintln(os.Stderr, "qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file or directory")
		os.Exit(1)
	}
	if mode == "hang" || mode == "worst" {
		signal.Ignore(syscall.SIGTERM)
	}
	if mode == "worst" {
		holder := exec.Command("/bin/sh", "-c", "sleep 120")
		holder.Stdout, holder.Stderr = os.Stdout, os.Stderr
		holder.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if holder.Start() == nil {
			os.WriteFile(filepath.Join(filepath.Dir(os.Getenv("FAKE_QEMU_RECORD")), "pipe-holder.pid"), []byte(strconv.Itoa(holder.Process.Pid)), 0o644)
		}
	}
	var listeners []net.Listener
	for i, a := range args {
		// The TPM's socket QEMU connects to, as a client, and holds.
		if a == "-chardev" && strings.HasPrefix(args[i+1], "socket,id=tpmctrl,path=") {
			c, err := net.Dial("unix", strings.TrimPrefix(args[i+1], "socket,id=tpmctrl,path="))
			if err != nil {
				fmt.Fprintln(os.Stderr, "fake qemu: tpm:", err)
				os.Exit(1)
			}
			defer c.Close()
			continue
		}
		if a == "-chardev" && strings.HasPrefix(args[i+1], "socket,") {
			for _, kv := range strings.Split(args[i+1], ",") {
				var l net.Listener
				var err error
				if p, ok := strings.CutPrefix(kv, "path="); ok {
					l, err = net.Listen("unix", p)
				} else if n, ok := strings.CutPrefix(kv, "fd="); ok {
					fd, _ := strconv.Atoi(n)
					l, err = net.FileListener(os.NewFile(uintptr(fd), "monitor"))
				} else {
					continue
				}
				if err != nil {
					fmt.Fprintln(os.Stderr, "fake qemu:", err)
					os.Exit(1)
				}
				listeners = append(listeners, l)
			}
		}
	}
	fmt.Println("fake guest: SWARMVM-GUEST-BOOTED")
	// Leave an orphan behind for the runner to reap.
	exec.Command("/bin/sh", "-c", "sleep 0.2 &").Run()
	exit := make(chan int)
	for _, l := range listeners {
		go serveQMP(l, mode, exit)
	}
	switch mode {
	case "crash":
		time.Sleep(300 * time.Millisecond)
		// The Go runtime would turn a SIGSEGV into a panic; a shell in
		// this same process dies of it the way QEMU would.
		syscall.Exec("/bin/sh", []string{"sh", "-c", "kill -SEGV $$"}, nil)
	case "poweroff":
		time.Sleep(300 * time.Millisecond)
		os.Exit(0)
	}
	os.Exit(<-exit)
}

// record writes argv, the descriptor QEMU got as fd 3 and its whole
// descriptor table (number → what it is), for the test.
func record(args []string) {
	out := os.Getenv("FAKE_QEMU_RECORD")
	if out == "" {
		return
	}
	fd3, _ := os.Readlink("/proc/self/fd/3")
	fds := map[string]string{}
	for _, n := range openFDs() {
		if target, err := os.Readlink("/proc/self/fd/" + n); err == nil {
			fds[n] = target
		}
	}
	status, _ := procfs.ReadStatus(0)
	nnp := status["NoNewPrivs"]
	pgid, _ := syscall.Getpgid(0)
	b, _ := json.Marshal(map[string]any{"argv": args, "fd3": fd3, "fds": fds, "nnp": nnp, "pgid_is_pid": pgid == os.Getpid()})
	os.WriteFile(out, b, 0o644)
}

// openFDs lists the process's descriptors by raw system calls: os.ReadDir
// would start the runtime's poller, whose descriptors would be listed too.
func openFDs() []string {
	dir, err := unix.Open("/proc/self/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	defer unix.Close(dir)
	var names []string
	buf := make([]byte, 8192)
	for {
		n, err := unix.ReadDirent(dir, buf)
		if err != nil || n <= 0 {
			break
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
	out := names[:0]
	for _, name := range names {
		if name != strconv.Itoa(dir) {
			out = append(out, name)
		}
	}
	return out
}

func serveQMP(l net.Listener, mode string, exit chan int) {
	var pressed, statusAsked atomic.Bool
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			fmt.Fprint(c, `{"QMP": {"version": {"qemu": {"micro": 13, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": []}}`+"\r\n")
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				var req struct {
					Execute string          `json:"execute"`
					ID      json.RawMessage `json:"id"`
				}
				json.Unmarshal(sc.Bytes(), &req)
				if mode == "worst" && statusAsked.Load() {
					continue // mute: every call waits out its timeout
				}
				if req.Execute == "query-status" {
					statusAsked.Store(true)
					if mode == "mute-status" {
						continue // never answered: the start waits on it
					}
				}
				ret := any(map[string]any{})
				switch req.Execute {
				case "query-kvm":
					ret = map[string]bool{"enabled": mode != "no-kvm", "present": true}
				case "query-status":
					ret = map[string]any{"running": true, "status": "running"}
					if mode == "panicked" {
						ret = map[string]any{"running": false, "status": "guest-panicked"}
					}
				}
				fmt.Fprintf(c, `{"return": %s, "id": %s}`+"\r\n", must(json.Marshal(ret)), req.ID)
				switch {
				case req.Execute == "query-status" && mode == "enospc":
					fmt.Fprint(c, `{"event": "BLOCK_IO_ERROR", "data": {"device": "disk0", "nospace": true, "reason": "No space left on device", "operation": "write", "action": "stop"}, "timestamp": {"seconds": 1, "microseconds": 0}}`+"\r\n")
					fmt.Fprint(c, `{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 1}}`+"\r\n")
				case req.Execute == "query-status" && mode == "panic":
					fmt.Fprint(c, `{"event": "GUEST_PANICKED", "data": {"action": "pause"}, "timestamp": {"seconds": 1, "microseconds": 0}}`+"\r\n")
				case req.Execute == "system_powerdown" && mode == "late-acpi" && !pressed.Swap(true):
					// not listening yet
				case req.Execute == "system_powerdown" && (mode == "ok" || mode == "late-acpi"):
					fmt.Fprint(c, `{"event": "POWERDOWN", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}`+"\r\n")
					go func() { time.Sleep(100 * time.Millisecond); exit <- 0 }()
				case req.Execute == "quit" && mode != "hang":
					exit <- 0
				}
			}
		}()
	}
}

func must(b []byte, _ error) []byte { return b }

// fakeSwtpm stands in for swtpm when the test binary runs with FAKE_SWTPM
// set: it writes its argv, pid and status to FAKE_SWTPM_RECORD, then
// serves its control channel (fd 3) the way swtpm --terminate does for
// this purpose: it takes one connection on the listening socket and ends
// when that closes.
func fakeSwtpm(mode string) {
	if mode == "hang" { // ignores SIGTERM, and its channel closing
		signal.Ignore(syscall.SIGTERM)
	}
	status, _ := os.ReadFile("/proc/self/status")
	target, _ := os.Readlink("/proc/self/fd/3")
	b, _ := json.Marshal(map[string]any{"argv": os.Args[1:], "pid": os.Getpid(), "status": string(status), "fd3": target})
	os.WriteFile(os.Getenv("FAKE_SWTPM_RECORD"), b, 0o644)
	l, err := net.FileListener(os.NewFile(3, "ctrl"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake swtpm:", err)
		os.Exit(1)
	}
	c, err := l.Accept()
	if err != nil {
		os.Exit(1)
	}
	buf := make([]byte, 4096)
	for {
		if _, err := c.Read(buf); err != nil {
			if mode == "hang" {
				select {}
			}
			os.Exit(0)
		}
	}
}
