package runner

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/procfs"
	"github.com/swarmvm/swarmvm/internal/status"
)

// withTPM turns TPM=on for a harness, with the test binary as swtpm in the
// given FAKE_SWTPM mode; swtpmRecord reads what it wrote.
func withTPM(h *harness, mode string) {
	bin := filepath.Join(h.dir, "swtpm-"+mode)
	if err := fakeBinary(bin, map[string]string{"FAKE_SWTPM": mode, "FAKE_SWTPM_RECORD": filepath.Join(h.dir, "swtpm.json")}); err != nil {
		h.t.Fatal(err)
	}
	h.env["TPM"], h.env["SWTPM_BINARY"] = "on", bin
}

func swtpmRecord(t *testing.T, h *harness) (argv []string, pid int, status string) {
	t.Helper()
	var r struct {
		Argv   []string
		Pid    int
		Status string
		FD3    string `json:"fd3"`
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(filepath.Join(h.dir, "swtpm.json"))
		if err == nil && json.Unmarshal(b, &r) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm left no record: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.HasPrefix(r.FD3, "socket:") {
		t.Errorf("swtpm's fd 3 is %q, want its end of the socket pair", r.FD3)
	}
	return r.Argv, r.Pid, r.Status
}

// TPM=on: swtpm runs beside QEMU with no_new_privs, its state in a new
// 0700 folder, on a control socket QEMU connects to; a stop ends both.
func TestTPMStartsAndStops(t *testing.T) {
	h := newTCGHarness(t, "ok")
	withTPM(h, "serve")
	h.start()
	h.waitLog("VM running")
	argv, pid, procStatus := swtpmRecord(t, h)
	state := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.tpm")
	joined := strings.Join(argv, " ")
	for _, want := range []string{"socket --tpm2", "--tpmstate dir=" + state + ",mode=0600", "--ctrl type=unixio,fd=3", "--terminate", "--seccomp action=kill"} {
		if !strings.Contains(joined, want) {
			t.Errorf("swtpm argv %q lacks %q", joined, want)
		}
	}
	if procfs.ParseStatus(procStatus)["NoNewPrivs"] != "1" {
		t.Errorf("swtpm runs without no_new_privs: %s", procfs.ParseStatus(procStatus)["NoNewPrivs"])
	}
	fi, err := os.Stat(state)
	if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("TPM state folder: %v %v", fi, err)
	}
	qargv := fmt.Sprint(h.record()["argv"])
	for _, want := range []string{"-tpmdev emulator,id=tpm0,chardev=tpmctrl", "-device tpm-crb,tpmdev=tpm0", "socket,id=tpmctrl,path=" + filepath.Join(h.env["RUN_DIR"], "swtpm.sock")} {
		if !strings.Contains(qargv, want) {
			t.Errorf("QEMU argv lacks %q: %s", want, qargv)
		}
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	if code := h.exit(10 * time.Second); code != status.ExitOK {
		t.Fatalf("exit %d, want 0", code)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("swtpm (pid %d) still there after the runner ended", pid)
	}
}

// swtpm ends under a running VM: the runner stops QEMU and exits status.ExitTPM,
// saying so.
func TestTPMEndedStopsTheVM(t *testing.T) {
	h := newTCGHarness(t, "ok")
	withTPM(h, "serve")
	h.start()
	h.waitLog("VM running")
	_, pid, _ := swtpmRecord(t, h)
	syscall.Kill(pid, syscall.SIGKILL)
	if code := h.exit(15 * time.Second); code != status.ExitTPM {
		t.Fatalf("exit %d, want %d", code, status.ExitTPM)
	}
	out := h.out.String()
	for _, want := range []string{"swtpm ended while the VM ran; stopping the VM", "killed by signal 9", "shutdown: QMP quit"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
}

// The TPM's state folder is the VM's alone and never replaced silently: a
// folder open to others is refused; one missing while the disk holds data
// is refused (a lost TPM); TPM_RESET sets the old one aside.
func TestTPMStateKept(t *testing.T) {
	newDisk := func(t *testing.T, h *harness, data bool) string {
		h.env["BOOT_MODE"] = "bios" // NVRAM has its own test of the same rule
		disk := filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.qcow2")
		os.MkdirAll(filepath.Dir(disk), 0o755)
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img: %v %s", err, out)
		}
		if data {
			exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", disk).Run()
		}
		return filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.tpm")
	}
	t.Run("open to others", func(t *testing.T) {
		h := newTCGHarness(t, "ok")
		withTPM(h, "serve")
		state := newDisk(t, h, false)
		os.Mkdir(state, 0o755)
		h.start()
		if code := h.exit(15 * time.Second); code != status.ExitStorage {
			t.Fatalf("exit %d, want %d", code, status.ExitStorage)
		}
		if !strings.Contains(h.out.String(), "chmod 700") {
			t.Error("the refusal does not give the fix")
		}
	})
	t.Run("lost", func(t *testing.T) {
		h := newTCGHarness(t, "ok")
		withTPM(h, "serve")
		state := newDisk(t, h, true)
		// UEFI with a reset NVRAM: the refusal comes before the NVRAM is made.
		h.env["BOOT_MODE"], h.env["OVMF_VARS_RESET"] = "uefi", "true"
		h.start()
		if code := h.exit(15 * time.Second); code != status.ExitStorage {
			t.Fatalf("exit %d, want %d", code, status.ExitStorage)
		}
		if !strings.Contains(h.out.String(), "TPM_RESET=true once") {
			t.Error("the refusal does not give the fix")
		}
		for _, f := range []string{state, filepath.Join(h.env["STORAGE_DIR"], "images", "test-vm.OVMF_VARS.fd")} {
			if _, err := os.Stat(f); !os.IsNotExist(err) {
				t.Errorf("%s was made before the refusal: %v", f, err)
			}
		}
	})
	t.Run("reset", func(t *testing.T) {
		h := newTCGHarness(t, "ok")
		withTPM(h, "serve")
		state := newDisk(t, h, true)
		os.Mkdir(state, 0o700)
		os.WriteFile(filepath.Join(state, "tpm2-00.permall"), []byte("old TPM"), 0o600)
		h.env["TPM_RESET"] = "true"
		h.start()
		h.waitLog("VM running")
		aside, _ := filepath.Glob(state + ".*.bak")
		if len(aside) != 1 {
			t.Fatalf("old state set aside: %v", aside)
		}
		if b, _ := os.ReadFile(filepath.Join(aside[0], "tpm2-00.permall")); string(b) != "old TPM" {
			t.Errorf("the old state was not kept whole: %q", b)
		}
		if fi, err := os.Stat(state); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("new state folder: %v %v", fi, err)
		}
		h.cmd.Process.Signal(syscall.SIGTERM)
		h.exit(10 * time.Second)
	})
}

// QEMU fails before it connects to swtpm: the runner still ends swtpm.
func TestTPMEndedWhenQEMUFailsToStart(t *testing.T) {
	h := newTCGHarness(t, "fail-start")
	withTPM(h, "serve")
	h.start()
	if code := h.exit(15 * time.Second); code != status.ExitStart {
		t.Fatalf("exit %d, want %d", code, status.ExitStart)
	}
	_, pid, _ := swtpmRecord(t, h)
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("swtpm (pid %d) left running", pid)
	}
	if !strings.Contains(h.out.String(), "swtpm still running after QEMU ended; SIGTERM") {
		t.Errorf("log does not say swtpm was ended")
	}
}

// TPM_STATE under a folder another uid made is refused before anything is
// made, naming the variable and the owner: that owner could swap the state
// folder while the VM runs and receive the TPM's whole state at its next
// clean stop. (Before: TPM_STATE was in neither the path nor the folder
// checks, and the VM ran.)
func TestTPMStateInForeignFolderRefused(t *testing.T) {
	h := newTCGHarness(t, "ok")
	withTPM(h, "ok")
	other := filepath.Join(h.env["STORAGE_DIR"], "images", "other")
	os.MkdirAll(other, 0o777)
	os.Chown(other, 4242, 4242)
	h.env["TPM_STATE"] = filepath.Join(other, "test-vm.tpm")
	h.start()
	if code := h.exit(10 * time.Second); code != status.ExitStorage {
		t.Fatalf("exit %d, want %d", code, status.ExitStorage)
	}
	if out := h.out.String(); !strings.Contains(out, "TPM_STATE "+h.env["TPM_STATE"]+" is in "+other+", a folder of uid 4242") {
		t.Errorf("log does not name TPM_STATE and the folder's owner:\n%s", out)
	}
	if _, err := os.Stat(h.env["TPM_STATE"]); !os.IsNotExist(err) {
		t.Errorf("the TPM's state folder was made in uid 4242's folder: %v", err)
	}
}
