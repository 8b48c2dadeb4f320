package status

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
)

// The runner's end writes with slog's text handler, as `swarmvm run` does;
// this end reads the lines back, as they come from `docker service logs`.
func TestLogLinesRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil)).With("vm", "web-1")
	log.Info("KVM verified", Key, KVMVerified, "query_kvm", "enabled=true present=true")
	log.Info("VM running", Key, VMRunning, "status", "running", AttrAccel, "tcg")
	err := errors.New(`IMAGE_PATH /x y.qcow2 belongs to uid 5 — "chown" it`)
	log.Error("exit", Key, Exited, AttrCode, 4, AttrErr, err)
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		lines = append(lines, "web-1.1.abc@node-1    | "+l)
	}
	if _, ok := Find(lines, KVMVerified); !ok {
		t.Errorf("no %s in %q", KVMVerified, lines)
	}
	run, ok := Find(lines, VMRunning)
	if !ok || run.Attrs[AttrAccel] != "tcg" || run.Attrs["vm"] != "web-1" {
		t.Errorf("vm-running: %v %+v", ok, run)
	}
	exit, ok := Find(lines, Exited)
	if !ok || exit.Attrs[AttrCode] != "4" || exit.Attrs[AttrErr] != err.Error() {
		t.Errorf("exit: %v %+v", ok, exit)
	}
	// A message that merely mentions a fact states nothing.
	if _, ok := Find([]string{`level=INFO msg="waiting for KVM verified" event=kvm-verified-later`}, KVMVerified); ok {
		t.Error("a look-alike value was read as the fact")
	}
	if _, ok := Find([]string{`level=INFO msg="KVM verified"`}, KVMVerified); ok {
		t.Error("the message text was read as the fact")
	}
}

func TestParseQuotedAndBare(t *testing.T) {
	l := Parse(`prefix | time=2026 level=WARN msg="a \"quoted\" = thing" event=exit code=6 err="QEMU ended (killed by signal 9)" tail=x`)
	want := map[string]string{"level": "WARN", "msg": `a "quoted" = thing`, "code": "6", "err": "QEMU ended (killed by signal 9)", "tail": "x"}
	for k, v := range want {
		if l.Attrs[k] != v {
			t.Errorf("%s = %q, want %q", k, l.Attrs[k], v)
		}
	}
	if l.Event != Exited {
		t.Errorf("event %q", l.Event)
	}
	// Damaged input ends the parse, without a panic.
	for _, s := range []string{`msg="unterminated`, `=x`, `a=`, `===`, ``, `| | |`} {
		Parse(s)
	}
}

func TestHealthJSON(t *testing.T) {
	for _, out := range []string{"", "healthy: VM x running", `{"healthy":true}`, "{"} {
		if _, ok := ParseHealth(out); ok {
			t.Errorf("%q read as a health status", out)
		}
	}
	h, ok := ParseHealth(`{"healthy":false,"state":"paused-storage-full","reason":"full","waiting":true}` + "\n")
	if !ok || h.State != StateFull || h.Healthy || !h.Waiting {
		t.Errorf("%+v", h)
	}
}

func TestExitCodes(t *testing.T) {
	for i, e := range ExitCodes {
		if e.Code != i || e.Meaning == "" {
			t.Errorf("entry %d: %+v", i, e)
		}
	}
	if len(ExitCodes) != ExitTPM+1 {
		t.Errorf("%d codes listed, the last is %d", len(ExitCodes), ExitTPM)
	}
	for _, c := range []int{ExitConfig, ExitKVM, ExitStorage} {
		if !Exit(c).Permanent {
			t.Errorf("exit %d: a restart meets it again", c)
		}
	}
	for _, c := range []int{ExitCrashed, ExitPanicked, ExitDiskBusy, ExitStart, ExitTPM, 137} {
		if Exit(c).Permanent {
			t.Errorf("exit %d: a restart may help", c)
		}
	}
	if !strings.Contains(ExitTable(), "10  the guest kernel panicked") || !strings.Contains(ExitTable(), "11  the VM's TPM (swtpm) ended") {
		t.Errorf("table:\n%s", ExitTable())
	}
}
