// Package deploy checks the files operators install: the systemd unit is
// valid for systemd, and the command line it starts is one the broker
// accepts and that reports readiness the way Type=notify expects.
package deploy

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const unit = "../../deploy/systemd/swarmvm-broker.service"

func binary(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "bin", "swarmvm"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("bin/swarmvm missing (make build): %v", err)
	}
	return p
}

func execStart(t *testing.T) []string {
	t.Helper()
	f, err := os.Open(unit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "ExecStart="); ok {
			return strings.Fields(v)
		}
	}
	t.Fatal("no ExecStart in the unit")
	return nil
}

// systemd-analyze finds nothing to say about the unit (it exits 0 even on
// unknown keys, so any output fails the test).
func TestUnitVerifies(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatalf("systemd-analyze not installed (Debian's systemd package): %v", err)
	}
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	args := execStart(t)
	text := strings.Replace(string(b), "ExecStart="+args[0], "ExecStart="+binary(t), 1)
	tmp := filepath.Join(t.TempDir(), "swarmvm-broker.service")
	os.WriteFile(tmp, []byte(text), 0o644)
	out, err := exec.Command("systemd-analyze", "verify", tmp).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// The unit's command line, run as systemd would run it (with a notify
// socket), listens and says READY=1.
func TestUnitCommandNotifiesReady(t *testing.T) {
	args := execStart(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "broker.sock")
	for i, a := range args {
		if a == "/run/swarmvm/broker.sock" {
			args[i] = sock
		}
	}
	notify := filepath.Join(dir, "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cmd := exec.Command(binary(t), args[1:]...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	out := &strings.Builder{}
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() }()
	buf := make([]byte, 128)
	l.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := l.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("notify socket got %q, %v; broker said:\n%s", buf[:n], err, out)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket after READY: %v %v", fi, err)
	}
}
