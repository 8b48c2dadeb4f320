package runner

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/broker"
	"github.com/swarmvm/swarmvm/internal/cloudinit"
	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/kvmtest"
	"github.com/swarmvm/swarmvm/internal/procfs"
	"github.com/swarmvm/swarmvm/internal/status"
)

// The test binary is also the fake QEMU (FAKE_QEMU) and the runner under
// test (RUNNER_UNDER_TEST), so that signals, process groups and reaping are
// exercised across real processes as in a container.
func TestMain(m *testing.M) {
	loadFake()
	if os.Getenv("CHILDREN_UNDER_TEST") == "1" {
		childrenScenario()
	}
	if mode := os.Getenv("FAKE_QEMU"); mode != "" {
		fakeQEMU(mode)
	}
	if mode := os.Getenv("FAKE_SWTPM"); mode != "" {
		fakeSwtpm(mode)
	}
	if os.Getenv("RUNNER_UNDER_TEST") == "1" {
		if os.Getenv("KVM_STAND_IN") == "1" {
			kvmProbe = kvmtest.ProbeStandIn
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		cfg := config.FromEnv(os.Getenv)
		log := slog.New(stateAtAnnounce{slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}), cfg.RunDir})
		err := Run(ctx, cfg, log)
		stop()
		if err != nil {
			log.Error("exit", "code", Code(err), "err", err)
		}
		os.Exit(Code(err))
	}
	os.Exit(m.Run())
}

// stateAtAnnounce adds to each log line that announces a state the
// health check reports, as the line is written, what the state file holds
// (state_at_announce=…): a line must never come before its state.
type stateAtAnnounce struct {
	slog.Handler
	runDir string
}

// announcing are the lines that announce a state.
var announcing = map[string]bool{
	"VM running": true,
	"disk in use by another QEMU (its image lock is held): waiting for it to stop; with shared storage this is the VM's earlier task on a node cut off from the managers": true,
	"disk free: the other QEMU has stopped": true,
}

func (h stateAtAnnounce) Handle(ctx context.Context, r slog.Record) error {
	if announcing[r.Message] {
		b, err := os.ReadFile(filepath.Join(h.runDir, "state.json"))
		st := string(b)
		if err != nil {
			st = "absent"
		}
		r.AddAttrs(slog.String("state_at_announce", st))
	}
	return h.Handler.Handle(ctx, r)
}

func (h stateAtAnnounce) WithAttrs(as []slog.Attr) slog.Handler {
	return stateAtAnnounce{h.Handler.WithAttrs(as), h.runDir}
}

// stateAt is what the state file held when the runner wrote its line msg.
func (h *harness) stateAt(msg string) string {
	h.t.Helper()
	for _, l := range strings.Split(h.out.String(), "\n") {
		if line := status.Parse(l); line.Attrs["msg"] == msg {
			return line.Attrs["state_at_announce"]
		}
	}
	h.t.Fatalf("the runner did not log %q", msg)
	return ""
}

type harness struct {
	t       *testing.T
	dir     string
	env     map[string]string
	cmd     *exec.Cmd
	out     syncBuffer
	done    chan struct{}
	code    int
	elapsed time.Duration
}

// newHarness readies a runner under test with the fake QEMU in mode. Its
// accelerator is KVM on the stand-in device (kvmtest.StandInDevice, which
// the runner under test probes with kvmtest.ProbeStandIn): the runner's
// whole KVM branch runs, on hosts with KVM and without.
func newHarness(t *testing.T, mode string) *harness {
	t.Helper()
	dir, err := os.MkdirTemp("", "rn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	wrapper := filepath.Join(dir, "qemu")
	if err := fakeQEMUAt(wrapper, mode, dir); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "fw"), 0o755)
	os.WriteFile(filepath.Join(dir, "fw", "CODE.fd"), make([]byte, 3653632), 0o644)
	os.WriteFile(filepath.Join(dir, "fw", "VARS.fd"), bytes.Repeat([]byte{0xAA}, 540672), 0o644)
	os.MkdirAll(filepath.Join(dir, "store"), 0o755)
	return &harness{t: t, dir: dir, done: make(chan struct{}), env: map[string]string{
		"VM_NAME": "test-vm", "STORAGE_DIR": filepath.Join(dir, "store"), "RUN_DIR": filepath.Join(dir, "run"),
		"QEMU_BINARY": wrapper, "OVMF_CODE": filepath.Join(dir, "fw", "CODE.fd"),
		"OVMF_VARS_TEMPLATE": filepath.Join(dir, "fw", "VARS.fd"), "DISK_SIZE": "64M",
		"KVM_DEVICE": kvmtest.StandInDevice, "KVM_STAND_IN": "1", "KVM_BROKER": "off", "SHUTDOWN_TIMEOUT": "2s", "START_TIMEOUT": "5s", "VM_MEMORY": "256M",
	}}
}

// newTCGHarness is newHarness with ACCEL=tcg, as an operator asks for
// emulation by name. The KVM path has tests of its own
// (TestKVMThroughFdset, TestKVMFromBroker, TestExitCodes).
func newTCGHarness(t *testing.T, mode string) *harness {
	h := newHarness(t, mode)
	h.env["ACCEL"] = "tcg"
	return h
}

func (h *harness) start() {
	h.t.Helper()
	h.startWithPath(os.Getenv("PATH"))
}

func (h *harness) startWithPath(path string) {
	h.t.Helper()
	self, _ := os.Executable()
	h.cmd = exec.Command(self)
	h.cmd.Env = []string{"RUNNER_UNDER_TEST=1", "PATH=" + path}
	for k, v := range h.env {
		h.cmd.Env = append(h.cmd.Env, k+"="+v)
	}
	h.cmd.Stdout, h.cmd.Stderr = &h.out, &h.out
	// A descriptor the runner inherits and was not made to pass on, as a
	// careless parent leaves one: it must not reach QEMU (assertHanded).
	stray, w, err := os.Pipe()
	if err != nil {
		h.t.Fatal(err)
	}
	defer stray.Close()
	defer w.Close()
	h.cmd.ExtraFiles = make([]*os.File, 30) // fd 32: past what QEMU is handed
	h.cmd.ExtraFiles[29] = stray
	if err := h.cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	began := time.Now()
	go func() {
		h.cmd.Wait()
		h.code = h.cmd.ProcessState.ExitCode()
		h.elapsed = time.Since(began)
		close(h.done)
	}()
	h.t.Cleanup(func() {
		h.end()
		if h.t.Failed() {
			h.t.Logf("runner output:\n%s", h.out.String())
		}
	})
}

// end stops a runner the test left running the way Docker would (SIGTERM,
// then SIGKILL), and then ends every QEMU and swtpm it started: as PID 1
// in a container they would go with it; here an orphan would outlive the
// test (scripts/test.sh fails the run for it).
func (h *harness) end() {
	select {
	case <-h.done:
	default:
		h.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.done:
		case <-time.After(30 * time.Second):
			h.cmd.Process.Kill()
			<-h.done
		}
	}
	for _, l := range strings.Split(h.out.String(), "\n") {
		if line := status.Parse(l); line.Attrs["msg"] == "QEMU started" || line.Attrs["msg"] == "swtpm started" {
			// Only while the pid is still this test's fake (a pid is reused).
			pid, _ := strconv.Atoi(line.Attrs["pid"])
			if cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && pid > 1 && strings.Contains(string(cl), h.dir) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}

func (h *harness) waitLog(s string) {
	h.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if strings.Contains(h.out.String(), s) {
			return
		}
		select {
		case <-h.done:
			if strings.Contains(h.out.String(), s) {
				return
			}
			h.t.Fatalf("runner exited %d before logging %q", h.code, s)
		case <-time.After(20 * time.Millisecond):
		}
	}
	h.t.Fatalf("runner did not log %q", s)
}

func (h *harness) exit(within time.Duration) int {
	h.t.Helper()
	select {
	case <-h.done:
		return h.code
	case <-time.After(within):
		h.t.Fatalf("runner still running after %v", within)
	}
	return -1
}

func (h *harness) record() map[string]any {
	h.t.Helper()
	b, err := os.ReadFile(filepath.Join(h.dir, "record.json"))
	if err != nil {
		h.t.Fatalf("fake QEMU left no record: %v", err)
	}
	var r map[string]any
	json.Unmarshal(b, &r)
	return r
}

// The runner opens the KVM device, hands it to QEMU as fd 3 through an
// fdset, and checks through QMP that QEMU uses it. The device is the
// stand-in (kvmtest): what is tested is the wiring, which needs no KVM.
// QEMU's whole descriptor table is what the runner handed it: stdin and the
// two pipes, then exactly the descriptors its argv names, each the right
// file.
func TestKVMThroughFdset(t *testing.T) {
	h := newHarness(t, "ok")
	h.start()
	h.waitLog("KVM verified")
	r := h.record()
	argv := fmt.Sprint(r["argv"])
	if r["fd3"] != kvmtest.StandInDevice || !strings.Contains(argv, "-add-fd fd=3,set=1,opaque=kvm") || !strings.Contains(argv, "-accel kvm,device=/dev/fdset/1") {
		t.Errorf("QEMU got fd3=%v argv=%s; want the KVM device as fd 3 through an fdset", r["fd3"], argv)
	}
	images := filepath.Join(h.env["STORAGE_DIR"], "images")
	assertHanded(t, r, map[string]string{
		"kvm":    kvmtest.StandInDevice,
		"disk":   filepath.Join(images, "test-vm.qcow2"),
		"nvram":  filepath.Join(images, "test-vm.OVMF_VARS.fd"),
		"socket": "socket:[",
	})
	msg, err := Health(context.Background(), h.env["RUN_DIR"])
	if err != nil || !strings.Contains(msg, "KVM enabled") {
		t.Errorf("Health = %q, %v", msg, err)
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(5 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d, want %d", code, status.ExitOK)
	}
}

// assertHanded checks the fake QEMU's recorded descriptor table against its
// argv: 0, 1 and 2 are stdin (/dev/null) and two pipes; every other
// descriptor is one the argv names (fd=N), and every one it names is open
// and is what its role says (want: role → the start of its target; a
// socket's role is "socket").
func assertHanded(t *testing.T, r map[string]any, want map[string]string) {
	t.Helper()
	table := map[int]string{}
	for k, v := range r["fds"].(map[string]any) {
		n, _ := strconv.Atoi(k)
		table[n] = v.(string)
	}
	if !strings.HasPrefix(table[0], "/dev/null") || !strings.HasPrefix(table[1], "pipe:") || !strings.HasPrefix(table[2], "pipe:") {
		t.Errorf("QEMU's 0, 1, 2 = %q, %q, %q; want /dev/null and two pipes", table[0], table[1], table[2])
	}
	named := map[int]string{} // fd → role, from the argv
	for _, a := range r["argv"].([]any) {
		for _, kv := range strings.Split(a.(string), ",") {
			k, v, _ := strings.Cut(kv, "=")
			if k != "fd" && k != "vhostfd" {
				continue
			}
			n, _ := strconv.Atoi(v)
			role := "socket"
			if _, opaque, ok := strings.Cut(a.(string), "opaque="); ok {
				role = opaque
			}
			named[n] = role
		}
	}
	for fd, target := range table {
		// The fake QEMU is this Go test binary: its runtime's poller (an
		// epoll and an eventfd, made when a package's init opens a file
		// before the table is read) is its own, not the runner's.
		if fd <= 2 || target == "anon_inode:[eventpoll]" || target == "anon_inode:[eventfd]" {
			continue
		}
		role, ok := named[fd]
		if !ok {
			t.Errorf("QEMU holds fd %d (%s), which its argv does not name: a descriptor it was not handed", fd, target)
			continue
		}
		if w, known := want[role]; !known || !strings.HasPrefix(target, w) {
			t.Errorf("QEMU's fd %d (%s) is %q, want %q", fd, role, target, want[role])
		}
	}
	for fd, role := range named {
		if _, open := table[fd]; !open {
			t.Errorf("argv names fd %d (%s), which QEMU does not hold", fd, role)
		}
	}
	t.Logf("QEMU's descriptors: %v", table)
}

func TestACPIShutdown(t *testing.T) {
	h := newTCGHarness(t, "ok")
	h.start()
	h.waitLog("VM running")

	r := h.record()
	if r["nnp"] != "1" || r["pgid_is_pid"] != true {
		t.Errorf("QEMU started with NoNewPrivs=%v, own process group=%v", r["nnp"], r["pgid_is_pid"])
	}
	if argv := fmt.Sprint(r["argv"]); !strings.Contains(argv, "-accel tcg") || strings.Contains(argv, "/dev/fdset/1") {
		t.Errorf("QEMU argv %s; want TCG as asked, and no KVM descriptor", argv)
	}
	if msg, err := Health(context.Background(), h.env["RUN_DIR"]); err != nil {
		t.Errorf("Health = %q, %v", msg, err)
	}
	if r := Report(context.Background(), h.env["RUN_DIR"]); !r.Healthy || r.State != status.StateRunning || r.Accel != "tcg" || r.Waiting {
		t.Errorf("Report = %+v", r)
	}
	if l, ok := status.Find(strings.Split(h.out.String(), "\n"), status.VMRunning); !ok || l.Attrs[status.AttrAccel] != "tcg" {
		t.Errorf("the log does not state %s with its accelerator: %+v", status.VMRunning, l)
	}
	time.Sleep(500 * time.Millisecond) // the orphan's sleep ends
	if z := zombies(h.cmd.Process.Pid); len(z) > 0 {
		t.Errorf("runner left zombie children %v", z)
	}

	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(5 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d, want %d", code, status.ExitOK)
	}
	out := h.out.String()
	for _, want := range []string{"pressing the ACPI power button", "guest powered off through ACPI", "reaped orphan"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	serial, _ := os.ReadFile(filepath.Join(h.env["STORAGE_DIR"], "logs", "test-vm.serial.log"))
	if !strings.Contains(string(serial), "SWARMVM-GUEST-BOOTED") {
		t.Errorf("serial log %q lacks the guest's output", serial)
	}
	if _, err := os.Stat(filepath.Join(h.env["RUN_DIR"], "state.json")); !os.IsNotExist(err) {
		t.Errorf("state file left after exit: %v", err)
	}
	if _, err := Health(context.Background(), h.env["RUN_DIR"]); err == nil {
		t.Error("healthy after the VM stopped")
	}
}

// A guest still booting misses the first press of the power button; the
// runner presses again every config.PowerButtonEvery within SHUTDOWN_TIMEOUT.
func TestPowerButtonPressedAgain(t *testing.T) {
	h := newTCGHarness(t, "late-acpi")
	h.env["SHUTDOWN_TIMEOUT"] = "20s"
	h.start()
	h.waitLog("VM running")
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(30 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d, want %d: the second press powers the guest off", code, status.ExitOK)
	}
	out := h.out.String()
	if n := strings.Count(out, "pressing the ACPI power button"); n != 2 {
		t.Errorf("%d presses logged, want 2", n)
	}
	for _, want := range []string{"press=1", "press=2", "guest powered off through ACPI"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s", want)
		}
	}
	if h.elapsed < config.PowerButtonEvery {
		t.Errorf("powered off after %v, before the second press was due", h.elapsed)
	}
}

func TestForcedStopWhenGuestIgnoresACPI(t *testing.T) {
	h := newTCGHarness(t, "ignore-acpi")
	h.start()
	h.waitLog("VM running")
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(10 * time.Second); code != status.ExitForced {
		t.Fatalf("exit %d, want %d (forced)", code, status.ExitForced)
	}
	if h.elapsed > 8*time.Second {
		t.Errorf("stop took %v with SHUTDOWN_TIMEOUT 2s", h.elapsed)
	}
	for _, want := range []string{"guest did not power off in time", "QMP quit", "forced stop"} {
		if !strings.Contains(h.out.String(), want) {
			t.Errorf("log lacks %q", want)
		}
	}
}

// A VM paused on a full volume keeps its runner; stopping it does not wait
// for an ACPI answer a paused guest cannot give.
func TestStopWhilePausedForSpace(t *testing.T) {
	h := newTCGHarness(t, "enospc")
	h.env["SHUTDOWN_TIMEOUT"] = "30s"
	h.start()
	h.waitLog("VM paused: a disk write found the storage volume full")
	h.waitLog(`level=INFO msg="qemu event" vm=test-vm event=STOP`) // a run-state event: at info, not debug
	if !strings.Contains(h.out.String(), `reason="No space left on device"`) {
		t.Errorf("log lacks the reason:\n%s", h.out.String())
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(10 * time.Second); code != status.ExitForced {
		t.Fatalf("exit %d, want %d (forced)", code, status.ExitForced)
	}
	if strings.Contains(h.out.String(), "pressing the ACPI power button") {
		t.Error("pressed the power button of a paused guest")
	}
	if !strings.Contains(h.out.String(), "paused on a full storage volume and cannot answer ACPI") {
		t.Errorf("log lacks why ACPI was skipped:\n%s", h.out.String())
	}
}

func TestSIGKILLWhenQEMUIgnoresQuit(t *testing.T) {
	h := newTCGHarness(t, "hang")
	h.env["SHUTDOWN_TIMEOUT"] = "1s"
	h.start()
	h.waitLog("VM running")
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(quitWait + killWait + 10*time.Second); code != status.ExitForced {
		t.Fatalf("exit %d, want %d", code, status.ExitForced)
	}
	for _, want := range []string{"QEMU did not quit; SIGKILL", "killed by signal 9"} {
		if !strings.Contains(h.out.String(), want) {
			t.Errorf("log lacks %q", want)
		}
	}
}

func TestExitCodes(t *testing.T) {
	tcg := map[string]string{"ACCEL": "tcg"}
	cases := []struct {
		mode string
		env  map[string]string
		code int
		log  string
	}{
		{"fail-start", tcg, status.ExitStart, "Could not open '/x'"},
		{"crash", tcg, status.ExitCrashed, "killed by signal 11"},
		{"poweroff", tcg, status.ExitOK, "guest powered off; QEMU exited 0"},
		{"no-kvm", nil, status.ExitKVM, "KVM not in use: query-kvm says enabled=false"},
		{"panic", tcg, status.ExitPanicked, "the guest kernel panicked (reported through pvpanic)"},
		{"panicked", tcg, status.ExitPanicked, "the guest kernel panicked (reported through pvpanic)"},
		{"ok", map[string]string{"VM_CPUS": "0"}, status.ExitConfig, "VM_CPUS: 0 is outside"},
		{"ok", map[string]string{"KVM_DEVICE": "/dev/kvm-absent"}, status.ExitKVM, "/dev/kvm-absent is missing"},
		{"ok", map[string]string{"DISK_SIZE": "", "ACCEL": "tcg"}, status.ExitStorage, "does not exist"},
		{"ok", map[string]string{"VM_MEMORY": "1T", "ACCEL": "tcg"}, status.ExitOK, "guest=1G"},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s-%d", tc.mode, tc.code), func(t *testing.T) {
			h := newHarness(t, tc.mode)
			for k, v := range tc.env {
				h.env[k] = v
			}
			if tc.log == "guest=1G" { // an explicit size without a cgroup limit is taken as asked
				h.env["VM_MEMORY"] = "1G"
			}
			h.start()
			if tc.mode == "ok" && tc.code == status.ExitOK {
				h.waitLog("VM running")
				h.cmd.Process.Signal(syscall.SIGTERM)
			}
			if code := h.exit(10 * time.Second); code != tc.code {
				t.Fatalf("exit %d, want %d", code, tc.code)
			}
			if !strings.Contains(h.out.String(), tc.log) {
				t.Errorf("log lacks %q", tc.log)
			}
		})
	}
}

// A run that fails preflight changes nothing: an existing disk and vars
// file are byte-identical afterwards. Each case fails at its own check,
// the only one that fails, with that check's exit code.
func TestFailedPreflightLeavesFilesAlone(t *testing.T) {
	cases := map[string]struct {
		env   map[string]string
		check string
		code  int
	}{
		"no kvm":         {map[string]string{"KVM_DEVICE": "/dev/kvm-absent"}, "kvm device", status.ExitKVM},
		"not kvm":        {map[string]string{"KVM_DEVICE": "/dev/null"}, "kvm device", status.ExitKVM},
		"wrong vars":     {map[string]string{"OVMF_VARS_TEMPLATE": ""}, "ovmf", status.ExitStorage}, // replaced below by a 2M template
		"qemu not found": {map[string]string{"QEMU_BINARY": "/nonexistent/qemu"}, "qemu", status.ExitStart},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, "ok")
			images := filepath.Join(h.env["STORAGE_DIR"], "images")
			os.MkdirAll(images, 0o755)
			disk := filepath.Join(images, "test-vm.qcow2")
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img: %v %s", err, out)
			}
			vars := filepath.Join(images, "test-vm.OVMF_VARS.fd")
			os.WriteFile(vars, bytes.Repeat([]byte{0x5A}, 540672), 0o600)
			for k, v := range tc.env {
				h.env[k] = v
			}
			if name == "wrong vars" {
				small := filepath.Join(h.dir, "fw", "VARS_2M.fd")
				os.WriteFile(small, make([]byte, 131072), 0o644)
				h.env["OVMF_VARS_TEMPLATE"] = small
			}
			before := map[string][]byte{disk: read(t, disk), vars: read(t, vars)}
			h.start()
			if code := h.exit(10 * time.Second); code != tc.code {
				t.Fatalf("exit %d, want %d", code, tc.code)
			}
			var failed []string
			for _, l := range strings.Split(h.out.String(), "\n") {
				if line := status.Parse(l); line.Attrs["msg"] == "preflight failed" {
					failed = append(failed, line.Attrs["check"])
				}
			}
			if len(failed) != 1 || failed[0] != tc.check {
				t.Errorf("failed checks %q, want only %q", failed, tc.check)
			}
			for p, b := range before {
				if !bytes.Equal(read(t, p), b) {
					t.Errorf("%s changed by a failed run", p)
				}
			}
		})
	}
}

func read(t *testing.T, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// zombies lists children of pid that have exited but not been reaped.
func zombies(pid int) []procfs.Stat {
	return procfs.Processes(func(s procfs.Stat) bool { return s.PPID == pid && s.State == 'Z' })
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// With an install medium, an empty disk boots the medium first; once the
// disk holds data, the disk boots first.
// A disk that holds data without its NVRAM is refused, and left alone:
// a new vars file would be an NVRAM reset, which only OVMF_VARS_RESET asks
// for; with it, the VM starts from the template.
func TestLostNVRAMRefused(t *testing.T) {
	for _, reset := range []bool{false, true} {
		h := newTCGHarness(t, "ok")
		disk := writtenDisk(t, filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2"))
		sum := fileSum(t, disk)
		vars := filepath.Join(filepath.Dir(disk), "test-vm.OVMF_VARS.fd")
		if !reset {
			h.start()
			if code := h.exit(10 * time.Second); code != status.ExitStorage {
				t.Fatalf("exit %d, want %d", code, status.ExitStorage)
			}
			for _, want := range []string{"OVMF_VARS " + vars + " is missing but the disk", "set OVMF_VARS_RESET=true once"} {
				if !strings.Contains(h.out.String(), want) {
					t.Errorf("log lacks %q", want)
				}
			}
			if _, err := os.Stat(vars); !os.IsNotExist(err) {
				t.Errorf("vars created by a refused run: %v", err)
			}
			if fileSum(t, disk) != sum {
				t.Error("disk changed by a refused run")
			}
			continue
		}
		h.env["OVMF_VARS_RESET"] = "true"
		h.start()
		h.waitLog("VM running")
		if _, err := os.Stat(vars); err != nil {
			t.Errorf("vars not created with OVMF_VARS_RESET: %v", err)
		}
		h.cmd.Process.Signal(syscall.SIGTERM)
		h.exit(5 * time.Second)
	}
}

// writtenDisk makes a 64M qcow2 at path whose first 64k hold data.
func writtenDisk(t *testing.T, path string) string {
	t.Helper()
	os.MkdirAll(filepath.Dir(path), 0o755)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", path, "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v %s", err, out)
	}
	if out, err := exec.Command("qemu-io", "-c", "write 0 64k", path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	return path
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestISOBootOrder(t *testing.T) {
	for _, written := range []bool{false, true} {
		h := newTCGHarness(t, "ok")
		iso := filepath.Join(h.env["STORAGE_DIR"], "isos", "install.iso")
		os.MkdirAll(filepath.Dir(iso), 0o755)
		os.WriteFile(iso, make([]byte, 4096), 0o644)
		h.env["ISO_PATH"] = iso
		if written {
			disk := writtenDisk(t, filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2"))
			// An installed VM has its NVRAM.
			tmpl, _ := os.ReadFile(h.env["OVMF_VARS_TEMPLATE"])
			os.WriteFile(filepath.Join(filepath.Dir(disk), "test-vm.OVMF_VARS.fd"), tmpl, 0o600)
		}
		h.start()
		h.waitLog("VM running")
		argv := fmt.Sprint(h.record()["argv"])
		want := map[bool]string{false: "ide-cd,drive=cd0,bus=ide.0,bootindex=1", true: "ide-cd,drive=cd0,bus=ide.0,bootindex=2"}[written]
		if !strings.Contains(argv, want) {
			t.Errorf("disk written=%v: argv lacks %q: %s", written, want, argv)
		}
		h.cmd.Process.Signal(syscall.SIGTERM)
		h.exit(5 * time.Second)
	}
}

// startTestBroker runs a real broker in the test process for the runner
// under test (root) and returns its socket and audit output.
func startTestBroker(t *testing.T) (string, *syncBuffer) {
	t.Helper()
	return startTestBrokerAt(t, filepath.Join(t.TempDir(), "broker.sock"))
}

func startTestBrokerAt(t *testing.T, socket string) (string, *syncBuffer) {
	t.Helper()
	cfg := broker.DefaultConfig()
	cfg.Socket = socket
	cfg.SocketGroup, cfg.AllowUIDs = -1, []int{os.Getuid()}
	cfg.KVMDevice, cfg.ProbeKVM = kvmtest.StandInDevice, kvmtest.ProbeStandIn
	l, err := broker.Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	audit := &syncBuffer{}
	b := broker.New(cfg, slog.New(slog.NewJSONHandler(audit, nil)), slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Serve(ctx, l); close(done) }()
	t.Cleanup(func() { cancel(); <-done; b.Wait() })
	return cfg.Socket, audit
}

// With KVM_BROKER, QEMU's KVM descriptor comes from the broker (the
// container's own KVM_DEVICE does not even exist), and the lease ends with
// the VM.
func TestKVMFromBroker(t *testing.T) {
	sock, audit := startTestBroker(t)
	h := newHarness(t, "ok")
	h.env["KVM_BROKER"] = sock
	h.env["KVM_DEVICE"] = "/dev/kvm-absent"
	h.start()
	h.waitLog("KVM verified")
	if !strings.Contains(h.out.String(), "broker "+sock+": KVM API 12") {
		t.Errorf("preflight does not say KVM came from the broker")
	}
	if r := h.record(); r["fd3"] != kvmtest.StandInDevice {
		t.Errorf("QEMU's fd 3 is %v, want the broker's %s", r["fd3"], kvmtest.StandInDevice)
	}
	if !strings.Contains(audit.String(), `"result":"granted"`) || !strings.Contains(audit.String(), `"vm":"test-vm"`) {
		t.Errorf("no grant audited: %s", audit.String())
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(5 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d", code)
	}
	deadline := time.Now().Add(3 * time.Second)
	for !strings.Contains(audit.String(), `"result":"lease-ended"`) {
		if time.Now().After(deadline) {
			t.Fatalf("lease not ended after the runner exited: %s", audit.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestKVMBrokerRequiredButAbsent(t *testing.T) {
	h := newHarness(t, "ok")
	h.env["KVM_BROKER"] = filepath.Join(h.dir, "no-broker.sock")
	h.start()
	if code := h.exit(15 * time.Second); code != status.ExitKVM {
		t.Fatalf("exit %d, want %d", code, status.ExitKVM)
	}
	for _, want := range []string{"no broker socket at " + h.env["KVM_BROKER"], "start the broker on this node"} {
		if !strings.Contains(h.out.String(), want) {
			t.Errorf("log lacks %q", want)
		}
	}
}

// A damaged disk is refused before QEMU starts, and left exactly as it was:
// swarmvm never repairs.
func TestDamagedDiskRefused(t *testing.T) {
	cases := map[string]func(path string){
		"flipped header": func(p string) {
			b, _ := os.ReadFile(p)
			b[0], b[1] = b[0]^0xff, b[1]^0xff
			os.WriteFile(p, b, 0o600)
		},
		"truncated": func(p string) {
			exec.Command("qemu-io", "-c", "write -P 0x33 0 8M", p).Run()
			fi, _ := os.Stat(p)
			os.Truncate(p, fi.Size()/3)
		},
		"corrupt refcounts": func(p string) {
			exec.Command("qemu-io", "-c", "write -P 0x33 0 1M", p).Run()
			// The refcount table offset is header bytes 48–55; point it
			// at the header itself, so refcounts read as garbage.
			b, _ := os.ReadFile(p)
			for i := 48; i < 56; i++ {
				b[i] = 0
			}
			os.WriteFile(p, b, 0o600)
		},
	}
	for name, damage := range cases {
		t.Run(name, func(t *testing.T) {
			h := newTCGHarness(t, "ok")
			disk := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2")
			os.MkdirAll(filepath.Dir(disk), 0o755)
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img: %v %s", err, out)
			}
			damage(disk)
			before := read(t, disk)
			h.start()
			if code := h.exit(15 * time.Second); code != status.ExitStorage {
				t.Fatalf("exit %d, want %d", code, status.ExitStorage)
			}
			if !strings.Contains(h.out.String(), "IMAGE_PATH") || !strings.Contains(h.out.String(), "never repairs") && !strings.Contains(h.out.String(), "not qcow2") {
				t.Errorf("log does not explain the refusal")
			}
			if !bytes.Equal(read(t, disk), before) {
				t.Error("the damaged disk was changed")
			}
			if strings.Contains(h.out.String(), "starting QEMU") {
				t.Error("QEMU was started on a damaged disk")
			}
		})
	}
}

// A disk path that leads out of the storage root through a link is refused
// before anything is created, naming the variable.
func TestPathLeavingStorageRefused(t *testing.T) {
	for _, target := range []string{"/dev/zero", "/proc/self/environ", "../../outside.qcow2"} {
		h := newTCGHarness(t, "ok")
		images := filepath.Join(h.env["STORAGE_DIR"], "images")
		os.MkdirAll(images, 0o755)
		os.Symlink(target, filepath.Join(images, "test-vm.qcow2"))
		h.start()
		if code := h.exit(10 * time.Second); code != status.ExitStorage {
			t.Fatalf("link to %s: exit %d, want %d", target, code, status.ExitStorage)
		}
		if !strings.Contains(h.out.String(), "IMAGE_PATH") || !strings.Contains(h.out.String(), "leads out of the storage root") {
			t.Errorf("link to %s: log does not explain", target)
		}
		if _, err := os.Stat(filepath.Join(images, "test-vm.OVMF_VARS.fd")); !os.IsNotExist(err) {
			t.Errorf("link to %s: the vars file was created by a refused run", target)
		}
	}
}

// A broker that is not up yet (starting, or restarting) is asked
// again with backoff; the VM starts once it answers.
func TestRunnerWaitsForBrokerRestart(t *testing.T) {
	h := newHarness(t, "ok")
	sock := filepath.Join(h.dir, "late", "broker.sock")
	h.env["KVM_BROKER"] = sock
	h.start()
	time.Sleep(700 * time.Millisecond) // the runner's first attempts find no socket
	startTestBrokerAt(t, sock)
	h.waitLog("KVM verified")
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(5 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d", code)
	}
}

// A broker killed mid-request (it read the request, then died without an
// answer) is asked again too, and the VM starts from its successor.
func TestRunnerRetriesBrokerKilledMidRequest(t *testing.T) {
	h := newHarness(t, "ok")
	sock := filepath.Join(h.dir, "dying", "broker.sock")
	os.MkdirAll(filepath.Dir(sock), 0o755)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	h.env["KVM_BROKER"] = sock
	h.start()
	c, err := l.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 4096)); err != nil {
		t.Fatalf("reading the request: %v", err)
	}
	c.Close()
	l.Close() // removes the socket: the successor listens on a new one
	startTestBrokerAt(t, sock)
	h.waitLog("KVM verified")
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(5 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d", code)
	}
}

// A stop asked for while the runner waits on QEMU's answer during the
// start (here query-status, which this QEMU never answers) is a stop: QEMU
// quits and the runner exits 0. It was exit 5, "start failed", and the
// service's removal during a start looked like a failure.
func TestStopDuringStartQuestion(t *testing.T) {
	h := newHarness(t, "mute-status")
	h.start()
	h.waitLog("KVM verified") // the next question is query-status
	time.Sleep(100 * time.Millisecond)
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(10 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d, want %d", code, status.ExitOK)
	}
	if out := h.out.String(); !strings.Contains(out, "stopped during start") || strings.Contains(out, "start failed") {
		t.Errorf("the runner's log does not say the start was stopped:\n%s", out)
	}
}

// On a node that is not the VM's home, the runner refuses before anything
// exists: no disk, no NVRAM, no QEMU, exit 4 saying why.
func TestNotOnHomeRefused(t *testing.T) {
	h := newHarness(t, "ok")
	h.env["ACCEL"] = "tcg"
	h.env["HOME_NODE"] = "homenodeid"
	h.env["NODE_ID"] = "othernodeid"
	h.env["NODE_HOSTNAME"] = "node-3"
	h.start()
	if code := h.exit(10 * time.Second); code != status.ExitStorage {
		t.Fatalf("exit %d, want %d", code, status.ExitStorage)
	}
	for _, want := range []string{"this node node-3 (othernodeid) is not the VM's home node homenodeid", "swarmvm move"} {
		if !strings.Contains(h.out.String(), want) {
			t.Errorf("log lacks %q", want)
		}
	}
	for _, f := range []string{"images/test-vm.qcow2", "images/test-vm.OVMF_VARS.fd"} {
		if _, err := os.Stat(filepath.Join(h.env["STORAGE_DIR"], f)); !os.IsNotExist(err) {
			t.Errorf("%s exists on a node that is not the home: %v", f, err)
		}
	}
	if _, err := os.Stat(filepath.Join(h.dir, "record.json")); !os.IsNotExist(err) {
		t.Error("QEMU was started")
	}
	// The same on its home, by hostname: it runs.
	h2 := newHarness(t, "ok")
	h2.env["ACCEL"] = "tcg"
	h2.env["HOME_NODE"] = "Node-3"
	h2.env["NODE_ID"] = "othernodeid"
	h2.env["NODE_HOSTNAME"] = "node-3"
	h2.start()
	h2.waitLog("VM running")
}

// On shared storage a disk another QEMU holds (its image lock) makes the
// runner wait, with health saying why and --liveness-worthy ErrDiskHeld,
// and start the VM once the holder lets go; on local storage it exits 9 at
// once.
func TestSharedStorageWaitsForHeldDisk(t *testing.T) {
	for _, mode := range []string{"local", "shared"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, "ok")
			h.env["ACCEL"] = "tcg"
			h.env["STORAGE_MODE"] = mode
			img := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2")
			os.MkdirAll(filepath.Dir(img), 0o755)
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "64M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v %s", err, out)
			}
			holder := exec.Command("qemu-io", "-f", "qcow2", img, "-c", "sleep 60000")
			if err := holder.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
			time.Sleep(300 * time.Millisecond) // qemu-io takes its lock
			h.start()
			if mode == "local" {
				if code := h.exit(15 * time.Second); code != status.ExitDiskBusy {
					t.Fatalf("exit %d, want %d", code, status.ExitDiskBusy)
				}
				return
			}
			h.waitLog("waiting for it to stop")
			_, err := Health(context.Background(), h.env["RUN_DIR"])
			if !errors.Is(err, ErrDiskHeld) || !strings.Contains(err.Error(), "earlier task on a node cut off") {
				t.Errorf("health while waiting: %v", err)
			}
			if r := Report(context.Background(), h.env["RUN_DIR"]); r.State != status.StateDiskHeld || r.Healthy || !r.Waiting {
				t.Errorf("status while waiting: %+v", r)
			}
			time.Sleep(3 * diskPoll)
			if _, err := os.Stat(filepath.Join(h.dir, "record.json")); !os.IsNotExist(err) {
				t.Fatal("QEMU started while another held the disk")
			}
			holder.Process.Kill()
			holder.Wait()
			h.waitLog("disk free: the other QEMU has stopped")
			h.waitLog("VM running")
			// Each state is in place before the line that announces it
			// (a reader of the line once got the older state).
			if st := h.stateAt("disk in use by another QEMU (its image lock is held): waiting for it to stop; with shared storage this is the VM's earlier task on a node cut off from the managers"); !strings.Contains(st, `"waiting":`) {
				t.Errorf("when the wait was announced, the state file held %s", st)
			}
			if st := h.stateAt("disk free: the other QEMU has stopped"); st != "absent" {
				t.Errorf("when the wait's end was announced, the state file held %s", st)
			}
			if st := h.stateAt("VM running"); !strings.Contains(st, `"pid":`) {
				t.Errorf("when the VM was announced running, the state file held %s", st)
			}
			h.cmd.Process.Signal(syscall.SIGTERM)
			if code := h.exit(10 * time.Second); code != status.ExitOK {
				t.Fatalf("exit %d after the wait, want 0", code)
			}
		})
	}
}

// A file another uid makes under the VM's name after preflight is never
// adopted: the disk is created or refused, and an NVRAM file that appears
// is refused by the owner check on the descriptor. A fake qemu-img plants
// the file (as uid 4242) at the moment the runner creates the disk.
func TestPlantedFilesNotAdopted(t *testing.T) {
	for _, plant := range []string{"disk", "nvram"} {
		t.Run(plant, func(t *testing.T) {
			h := newHarness(t, "ok")
			h.env["ACCEL"] = "tcg"
			// What the other uid plants: a usable qcow2, or NVRAM of the
			// template's size, world-writable.
			planted := filepath.Join(h.dir, "planted")
			target := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2")
			if plant == "disk" {
				if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", planted, "64M").CombinedOutput(); err != nil {
					t.Fatalf("%v %s", err, out)
				}
			} else {
				target = filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.OVMF_VARS.fd")
				os.WriteFile(planted, make([]byte, 540672), 0o666)
			}
			bin := filepath.Join(h.dir, "bin")
			os.MkdirAll(bin, 0o755)
			real, err := exec.LookPath("qemu-img")
			if err != nil {
				t.Fatal(err)
			}
			script := fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = create ]; then cp %s %s; chown 4242 %s; chmod 0666 %s; fi\nexec %s \"$@\"\n", planted, target, target, target, real)
			os.WriteFile(filepath.Join(bin, "qemu-img"), []byte(script), 0o755)
			h.startWithPath(bin + ":" + os.Getenv("PATH"))
			if code := h.exit(15 * time.Second); code != status.ExitStorage {
				t.Fatalf("exit %d, want %d", code, status.ExitStorage)
			}
			want := map[string]string{"disk": "appeared while the runner was creating it", "nvram": "owned by uid 4242"}[plant]
			if !strings.Contains(h.out.String(), want) {
				t.Errorf("log lacks %q", want)
			}
			if _, err := os.Stat(filepath.Join(h.dir, "record.json")); !os.IsNotExist(err) {
				t.Error("QEMU was started with a planted file")
			}
			if a, b := fileSum(t, planted), fileSum(t, target); a != b {
				t.Errorf("the planted %s was written to", plant)
			}
		})
	}
}

// A disk that names another file (a backing file anywhere on the node, an
// external data file) is refused before QEMU: QEMU would open that file by
// name, past every check the runner makes on its own files.
func TestDiskReachingBeyondItselfRefused(t *testing.T) {
	for _, c := range []struct{ name, opts, want string }{
		{"backing file", "-b /etc/passwd -F raw", "it has a backing file (/etc/passwd)"},
		{"data file", "-o data_file=DATA", "it has an external data file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t, "ok")
			h.env["ACCEL"] = "tcg"
			img := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2")
			os.MkdirAll(filepath.Dir(img), 0o755)
			opts := strings.Fields(strings.ReplaceAll(c.opts, "DATA", filepath.Join(h.dir, "data.raw")))
			args := append(append([]string{"create", "-q", "-f", "qcow2"}, opts...), img, "64M")
			if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img %v: %v %s", args, err, out)
			}
			h.start()
			if code := h.exit(15 * time.Second); code != status.ExitStorage {
				t.Fatalf("exit %d, want %d", code, status.ExitStorage)
			}
			if !strings.Contains(h.out.String(), c.want) {
				t.Errorf("log lacks %q", c.want)
			}
			if _, err := os.Stat(filepath.Join(h.dir, "record.json")); !os.IsNotExist(err) {
				t.Error("QEMU was started")
			}
		})
	}
}

// A disk in a folder another uid made is refused before anything is made:
// that uid could remove or rename it.
func TestDiskInForeignFolderRefused(t *testing.T) {
	h := newHarness(t, "ok")
	h.env["ACCEL"] = "tcg"
	prod := filepath.Join(h.env["STORAGE_DIR"], "images", "prod")
	os.MkdirAll(prod, 0o777)
	os.Chown(prod, 4242, 4242)
	h.env["IMAGE_PATH"] = filepath.Join(prod, "test-vm.qcow2")
	h.start()
	if code := h.exit(10 * time.Second); code != status.ExitStorage {
		t.Fatalf("exit %d, want %d", code, status.ExitStorage)
	}
	if !strings.Contains(h.out.String(), "a folder of uid 4242") {
		t.Errorf("log lacks the folder's owner")
	}
	if _, err := os.Stat(h.env["IMAGE_PATH"]); !os.IsNotExist(err) {
		t.Errorf("a disk was made in the foreign folder: %v", err)
	}
}

// With CONSOLE_PORT the runner reads its key and binds the port before
// QEMU starts, refusing a missing key or a taken port by name; once the VM
// runs, QEMU has a screen on a VNC socket in the run folder and the port
// answers 401 to a request without a ticket.
func TestConsoleSetUp(t *testing.T) {
	port := func(t *testing.T) (int, net.Listener) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return l.Addr().(*net.TCPAddr).Port, l
	}
	t.Run("no key", func(t *testing.T) {
		h := newTCGHarness(t, "ok")
		p, l := port(t)
		l.Close()
		h.env["CONSOLE_PORT"], h.env["CONSOLE_KEY_FILE"] = strconv.Itoa(p), filepath.Join(h.dir, "absent.key")
		h.start()
		if code := h.exit(10 * time.Second); code != status.ExitConfig {
			t.Fatalf("exit %d, want %d", code, status.ExitConfig)
		}
		if !strings.Contains(h.out.String(), "CONSOLE_KEY_FILE: cannot read the console key") {
			t.Errorf("log does not name CONSOLE_KEY_FILE:\n%s", h.out.String())
		}
	})
	key := func(h *harness) {
		k := filepath.Join(h.dir, "console.key")
		os.WriteFile(k, bytes.Repeat([]byte{1}, 32), 0o400)
		h.env["CONSOLE_KEY_FILE"] = k
	}
	t.Run("port taken", func(t *testing.T) {
		h := newTCGHarness(t, "ok")
		key(h)
		p, l := port(t)
		defer l.Close()
		h.env["CONSOLE_PORT"] = strconv.Itoa(p)
		h.start()
		if code := h.exit(10 * time.Second); code != status.ExitNet {
			t.Fatalf("exit %d, want %d", code, status.ExitNet)
		}
		if !strings.Contains(h.out.String(), "CONSOLE_PORT: cannot listen on") {
			t.Errorf("log does not name CONSOLE_PORT:\n%s", h.out.String())
		}
		if _, err := os.Stat(filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2")); !os.IsNotExist(err) {
			t.Errorf("a disk was made by a run refused for its console: %v", err)
		}
	})
	t.Run("tls", func(t *testing.T) {
		h := newTCGHarness(t, "ok")
		key(h)
		p, l := port(t)
		l.Close()
		certPEM, keyPEM, pool := selfSigned(t)
		h.env["CONSOLE_PORT"] = strconv.Itoa(p)
		h.env["CONSOLE_TLS_CERT"], h.env["CONSOLE_TLS_KEY"] = filepath.Join(h.dir, "tls.crt"), filepath.Join(h.dir, "tls.key")
		os.WriteFile(h.env["CONSOLE_TLS_CERT"], certPEM, 0o400)
		os.WriteFile(h.env["CONSOLE_TLS_KEY"], keyPEM, 0o400)
		h.start()
		h.waitLog("web console ready")
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
		defer tr.CloseIdleConnections()
		base := fmt.Sprintf("https://127.0.0.1:%d/", p)
		resp, err := tr.RoundTrip(mustRequest(t, base))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || resp.TLS == nil {
			t.Errorf("GET / over TLS without a ticket: %d (tls %v), want 401", resp.StatusCode, resp.TLS != nil)
		}
		k, _ := os.ReadFile(h.env["CONSOLE_KEY_FILE"])
		resp, err = tr.RoundTrip(mustRequest(t, base+"?ticket="+console.Mint(k, "test-vm", console.View, time.Now().Add(time.Minute))))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusSeeOther || len(resp.Cookies()) != 0 || !strings.HasPrefix(loc, "/vnc.html?") {
			t.Errorf("with a ticket over TLS: %d to %q, cookies %v; want a redirect to the viewer, no cookie", resp.StatusCode, loc, resp.Cookies())
		}
		// Go's TLS server answers plain HTTP with a bare 400.
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/?ticket=x", p)); err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("plain HTTP on a TLS console: %d, want 400", resp.StatusCode)
			}
		}
	})
	t.Run("serving", func(t *testing.T) {
		h := newTCGHarness(t, "ok")
		key(h)
		p, l := port(t)
		l.Close()
		h.env["CONSOLE_PORT"] = strconv.Itoa(p)
		h.start()
		h.waitLog("web console ready")
		argv := fmt.Sprint(h.record()["argv"])
		if !strings.Contains(argv, "-vnc unix:"+filepath.Join(h.env["RUN_DIR"], "vnc.sock")) || !strings.Contains(argv, "usb-tablet") {
			t.Errorf("argv %s: want a VNC display on the run folder's socket and a tablet", argv)
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", p))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET / without a ticket: %d, want 401", resp.StatusCode)
		}
		h.cmd.Process.Signal(syscall.SIGTERM)
		if code := h.exit(5 * time.Second); code != status.ExitOK {
			t.Fatalf("exit %d", code)
		}
		if _, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), time.Second); err == nil {
			t.Error("the console port still answers after the runner exited")
		}
	})
}

// With CLOUD_INIT=nocloud the runner builds the seed from the files in
// CLOUD_INIT_DIR on the run folder, gives it to QEMU read-only, and logs
// its instance-id but none of its content; no seed file lands under the
// storage folder.
func TestCloudInitSeed(t *testing.T) {
	h := newTCGHarness(t, "ok")
	dir := filepath.Join(h.dir, "secrets")
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, SeedUserData), []byte("#cloud-config\npassword: hunter2-secret\n"), 0o400)
	os.WriteFile(filepath.Join(dir, SeedMetaData), []byte("local-hostname: seeded\n"), 0o400)
	h.env["CLOUD_INIT"], h.env["CLOUD_INIT_DIR"] = "nocloud", dir
	h.env["CLOUD_INIT_SSH_KEYS"] = "ssh-ed25519 AAAAkey test"
	h.start()
	h.waitLog("VM running")
	seed := filepath.Join(h.env["RUN_DIR"], "cidata.iso")
	argv := fmt.Sprint(h.record()["argv"])
	if !strings.Contains(argv, "id=cidata,format=raw,readonly=on,file="+seed) || !strings.Contains(argv, "virtio-blk-pci,drive=cidata") {
		t.Errorf("argv %s lacks the read-only seed", argv)
	}
	files, err := cloudinit.Read(seed)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(files["user-data"]), "hunter2-secret") || !strings.Contains(string(files["meta-data"]), "local-hostname: seeded") ||
		!strings.Contains(string(files["meta-data"]), "ssh-ed25519 AAAAkey test") {
		t.Errorf("seed files %q", files)
	}
	h.waitLog(`msg="cloud-init seed"`)
	if strings.Contains(h.out.String(), "hunter2") {
		t.Error("the runner's log holds user-data")
	}
	filepath.Walk(h.env["STORAGE_DIR"], func(path string, fi os.FileInfo, err error) error {
		if b, _ := os.ReadFile(path); err == nil && !fi.IsDir() && bytes.Contains(b, []byte("hunter2")) {
			t.Errorf("%s under the storage folder holds user-data", path)
		}
		return nil
	})
	// The id is keyed with the VM's own key, made beside the disk (its
	// own, 0600): the log holds the keyed id, never the unkeyed digest a
	// reader could test guessed passwords against (one was recovered so).
	keyFile := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2.cloud-init-key")
	fi, err := os.Stat(keyFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("cloud-init key %v %v", fi, err)
	}
	keyHex, _ := os.ReadFile(keyFile)
	key, err := hex.DecodeString(strings.TrimSpace(string(keyHex)))
	if err != nil || len(key) != 32 {
		t.Fatalf("cloud-init key file holds %q", keyHex)
	}
	seedOf := func(key []byte) cloudinit.Seed {
		return cloudinit.Seed{UserData: []byte("#cloud-config\npassword: hunter2-secret\n"), MetaData: []byte("local-hostname: seeded\n"),
			Hostname: "test-vm", SSHKeys: []string{"ssh-ed25519 AAAAkey test"}, Key: key}
	}
	keyed, plain := seedOf(key).InstanceID(), seedOf(nil).InstanceID()
	if !strings.Contains(h.out.String(), "instance_id="+keyed) || strings.Contains(h.out.String(), plain) {
		t.Errorf("log: want the keyed id %s and not the unkeyed %s:\n%s", keyed, plain, h.out.String())
	}
	if !strings.Contains(string(files["meta-data"]), keyed) {
		t.Errorf("the seed's meta-data does not carry the keyed id %s", keyed)
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	h.exit(5 * time.Second)

	// Started again: the same key, the same id (cloud-init sees the same
	// instance).
	again := newTCGHarness(t, "ok")
	again.dir, again.env = h.dir, h.env
	again.start()
	again.waitLog(`msg="cloud-init seed"`)
	if !strings.Contains(again.out.String(), "instance_id="+keyed) {
		t.Errorf("second start: the id changed:\n%s", again.out.String())
	}
	again.cmd.Process.Signal(syscall.SIGTERM)
	again.exit(5 * time.Second)
}

// A VM that booted on this node before its instance-id was keyed (its
// serial log is there, its disk holds data) keeps its unkeyed id, pinned:
// a new one would make cloud-init start over (new SSH host keys, user-data
// again). The id itself is not logged.
func TestCloudInitLegacyIDKept(t *testing.T) {
	h := newTCGHarness(t, "ok")
	dir := filepath.Join(h.dir, "secrets")
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, SeedUserData), []byte("#cloud-config\npassword: 123456\n"), 0o400)
	h.env["CLOUD_INIT"], h.env["CLOUD_INIT_DIR"] = "nocloud", dir
	h.env["BOOT_MODE"] = "bios" // no NVRAM to miss
	store := h.env["STORAGE_DIR"]
	writtenDisk(t, filepath.Join(store, "images", "test-vm.qcow2"))
	os.MkdirAll(filepath.Join(store, "logs"), 0o755)
	os.WriteFile(filepath.Join(store, "logs", "test-vm.serial.log"), []byte("an earlier boot\n"), 0o600)
	h.start()
	h.waitLog(`msg="cloud-init seed"`)
	key, _ := os.ReadFile(filepath.Join(store, "images", "test-vm.qcow2.cloud-init-key"))
	plain := cloudinit.Seed{UserData: []byte("#cloud-config\npassword: 123456\n"), Hostname: "test-vm"}.InstanceID()
	files, err := cloudinit.Read(filepath.Join(h.env["RUN_DIR"], "cidata.iso"))
	if err != nil {
		t.Fatal(err)
	}
	if string(key) != unkeyed || !strings.Contains(string(files["meta-data"]), plain) {
		t.Errorf("key file %q, meta-data %s: want the unkeyed id %s pinned", key, files["meta-data"], plain)
	}
	if out := h.out.String(); strings.Contains(out, plain) || !strings.Contains(out, "keeps the unkeyed one") {
		t.Errorf("log: the unkeyed id must not be in it, and the pin must be said:\n%s", out)
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	h.exit(5 * time.Second)
}

func mustRequest(t *testing.T, url string) *http.Request {
	r, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// selfSigned makes a certificate for 127.0.0.1 and a pool that trusts it.
func selfSigned(t *testing.T) (certPEM, keyPEM []byte, pool *x509.CertPool) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "console"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(k)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}), pool
}

// After a clean stop the disk is checked and stamped; the next start finds
// it unchanged and does not check it again; a change, a QEMU holding the
// disk, or an unclean end brings the check back at start.
func TestDiskCheckedAfterCleanStop(t *testing.T) {
	h := newTCGHarness(t, "ok")
	disk := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2")
	stamp := disk + ".checked"
	run := func(mode string) *harness {
		t.Helper()
		r := newTCGHarness(t, mode)
		r.dir, r.env = h.dir, h.env
		r.env["QEMU_BINARY"] = filepath.Join(h.dir, "qemu-"+mode)
		if err := fakeQEMUAt(r.env["QEMU_BINARY"], mode, h.dir); err != nil {
			t.Fatal(err)
		}
		r.start()
		return r
	}
	stopped := func(r *harness) string {
		t.Helper()
		r.waitLog("VM running")
		r.cmd.Process.Signal(syscall.SIGTERM)
		if code := r.exit(10 * time.Second); code != status.ExitOK {
			t.Fatalf("exit %d, want 0\n%s", code, r.out.String())
		}
		return r.out.String()
	}
	const checkedAtStart, skipped, stamped = `result="no errors"`, "unchanged since its check after the last clean stop", "disk checked after the stop"

	out := stopped(run("ok"))
	if !strings.Contains(out, checkedAtStart) || !strings.Contains(out, stamped) {
		t.Fatalf("first run: want the check at start and after the stop:\n%s", out)
	}
	if _, err := os.Stat(stamp); err != nil {
		t.Fatalf("no stamp after a clean stop: %v", err)
	}
	out = stopped(run("ok"))
	if strings.Contains(out, checkedAtStart) || !strings.Contains(out, skipped) {
		t.Fatalf("second run on the unchanged disk: want no check at start:\n%s", out)
	}

	// A write moves the file's times: checked at start again.
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4k", disk).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	out = stopped(run("ok"))
	if !strings.Contains(out, checkedAtStart) || strings.Contains(out, skipped) {
		t.Fatalf("after a write: want the check at start:\n%s", out)
	}

	// Stamped, but another QEMU holds the disk: the check runs and finds it busy.
	holder := exec.Command("qemu-io", "-f", "qcow2", disk, "-c", "sleep 60000")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // qemu-io takes its lock
	r := run("ok")
	if code := r.exit(15 * time.Second); code != status.ExitDiskBusy {
		t.Fatalf("stamped disk held by another: exit %d, want %d\n%s", code, status.ExitDiskBusy, r.out.String())
	}
	holder.Process.Kill()
	holder.Wait()

	// QEMU dies: no stamp, the next start checks.
	r = run("crash")
	if code := r.exit(15 * time.Second); code != status.ExitCrashed {
		t.Fatalf("crash: exit %d, want %d", code, status.ExitCrashed)
	}
	if _, err := os.Stat(stamp); !os.IsNotExist(err) {
		t.Fatalf("stamp kept after QEMU crashed: %v", err)
	}
	out = stopped(run("ok"))
	if !strings.Contains(out, checkedAtStart) {
		t.Fatalf("after a crash: want the check at start:\n%s", out)
	}
}

// A flood of idle connections on the console port (none sends a request)
// leaves the runner within its bounds and the VM running: it holds at most
// consoleConns of them, consoleConnsPerIP from one address, each cut off
// after consoleHeaderWait; the rest wait in the kernel's backlog or are
// closed at once. (Before: 15,000 such connections took all the runner's
// descriptors and grew it from 14 MB to 230–300 MB.)
func TestConsoleFloodBounded(t *testing.T) {
	h := newTCGHarness(t, "ok")
	k := filepath.Join(h.dir, "console.key")
	os.WriteFile(k, bytes.Repeat([]byte{1}, 32), 0o400)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := l.Addr().(*net.TCPAddr).Port
	l.Close()
	h.env["CONSOLE_KEY_FILE"], h.env["CONSOLE_PORT"] = k, strconv.Itoa(p)
	h.start()
	h.waitLog("web console ready")
	pid := h.cmd.Process.Pid
	fds0, rss0 := procFDs(t, pid), procRSS(t, pid)
	var flood []net.Conn
	defer func() {
		for _, c := range flood {
			c.Close()
		}
	}()
	mostFDs, mostRSS := fds0, rss0
	for i := 0; i < 3000; i++ {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), 200*time.Millisecond)
		if err == nil {
			flood = append(flood, c)
		}
		if i%200 == 0 {
			mostFDs, mostRSS = max(mostFDs, procFDs(t, pid)), max(mostRSS, procRSS(t, pid))
		}
	}
	time.Sleep(time.Second)
	mostFDs, mostRSS = max(mostFDs, procFDs(t, pid)), max(mostRSS, procRSS(t, pid))
	t.Logf("%d idle connections open to the console; the runner: descriptors %d → at most %d, RSS %d → at most %d KiB", len(flood), fds0, mostFDs, rss0, mostRSS)
	if mostFDs > fds0+consoleConnsPerIP+8 {
		t.Errorf("the runner held %d descriptors under the flood, %d before: more than one address's %d connections", mostFDs, fds0, consoleConnsPerIP)
	}
	if mostRSS > HeapLimit>>10 {
		t.Errorf("the runner grew to %d KiB under the flood, over its %d MiB limit", mostRSS, HeapLimit>>20)
	}
	if r := Report(context.Background(), h.env["RUN_DIR"]); !r.Healthy {
		t.Errorf("the VM under the flood: %+v", r)
	}
	for _, c := range flood {
		c.Close()
	}
	flood = nil
	// The flood over, the console answers again.
	deadline := time.Now().Add(2 * consoleHeaderWait)
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", p))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusUnauthorized {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the console does not answer after the flood: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(h.out.String(), "too many connections from this address") {
		t.Error("the refusals were not audited")
	}
}

func procFDs(t *testing.T, pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// procRSS is VmRSS in KiB.
func procRSS(t *testing.T, pid int) int64 {
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	return st.KiB("VmRSS")
}

// A stop that meets everything at once still ends within the budget the
// service's stop_grace_period is made of (config.StopBudget): a guest that
// ignores the power button, a QEMU that answers no QMP and ignores SIGTERM,
// a process of another session holding QEMU's output pipes, a swtpm that
// ignores SIGTERM and its channel closing, and a console to close. (The
// steps after QEMU had bounds of their own, outside the budget: up to
// SHUTDOWN_TIMEOUT + 25 s against the budget's + 20 s.)
func TestStopWithinBudgetWhateverHangs(t *testing.T) {
	h := newTCGHarness(t, "worst")
	withTPM(h, "hang")
	k := filepath.Join(h.dir, "console.key")
	os.WriteFile(k, bytes.Repeat([]byte{1}, 32), 0o400)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.env["CONSOLE_KEY_FILE"], h.env["CONSOLE_PORT"] = k, strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	h.env["SHUTDOWN_TIMEOUT"] = "1s"
	t.Cleanup(func() {
		if b, err := os.ReadFile(filepath.Join(h.dir, "pipe-holder.pid")); err == nil {
			if pid, _ := strconv.Atoi(string(b)); pid > 1 {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		for _, p := range []string{"swtpm.json"} { // the fake swtpm, killed by the runner or here
			var r struct{ Pid int }
			if b, err := os.ReadFile(filepath.Join(h.dir, p)); err == nil && json.Unmarshal(b, &r) == nil && r.Pid > 1 {
				syscall.Kill(r.Pid, syscall.SIGKILL)
			}
		}
	})
	h.start()
	h.waitLog("VM running")
	budget := config.StopBudget(time.Second)
	began := time.Now()
	h.cmd.Process.Signal(syscall.SIGTERM)
	code := h.exit(budget + 30*time.Second)
	took := time.Since(began)
	t.Logf("stopped in %v (budget %v), exit %d", took.Round(10*time.Millisecond), budget, code)
	if took > budget+time.Second {
		t.Errorf("the stop took %v, over its budget %v", took.Round(10*time.Millisecond), budget)
	}
	if code != status.ExitForced {
		t.Errorf("exit %d, want %d (forced)", code, status.ExitForced)
	}
	out := h.out.String()
	for _, want := range []string{"QEMU did not quit; SIGKILL", "QEMU's output pipes still open after it ended", "swtpm ignored SIGTERM; SIGKILL"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
}
