package runner

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/status"
)

// The record across runs: starts counted, each end by its reason, a run
// that never recorded its end counted as unrecorded at the next start.
func TestRunsRecord(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "logs"), 0o700)
	cfg := config.Config{Name: "rec-1", StorageDir: dir}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	if r := startRun(cfg, log); r.Starts != 1 || !r.Running || len(r.Exits) != 0 {
		t.Fatalf("first start: %+v", r)
	}
	endRun(cfg, status.ExitForced, log)
	r := startRun(cfg, log)
	if r.Starts != 2 || r.Exits["forced"] != 1 || r.Last == nil || r.Last.Code != status.ExitForced {
		t.Fatalf("second start: %+v", r)
	}
	// no endRun: the runner was killed
	r = startRun(cfg, log)
	if r.Starts != 3 || r.Exits[unrecorded] != 1 || r.Exits["forced"] != 1 {
		t.Fatalf("start after a kill: %+v", r)
	}
	if !strings.Contains(logs.String(), "ended without recording how") || !strings.Contains(logs.String(), "last_exit_reason=forced") {
		t.Errorf("log:\n%s", logs.String())
	}
	endRun(cfg, status.ExitOK, log)
	got, err := readRuns(runsPath(cfg))
	if err != nil || got.Running || got.Exits["ok"] != 1 || got.Starts != 3 {
		t.Fatalf("after a clean end: %+v, %v", got, err)
	}

	// A link left under the name is not read, and is replaced, not
	// written through.
	target := filepath.Join(dir, "elsewhere.json")
	os.WriteFile(target, []byte(`{"starts":99}`), 0o600)
	os.Remove(runsPath(cfg))
	os.Symlink(target, runsPath(cfg))
	logs.Reset()
	if r := startRun(cfg, log); r.Starts != 1 {
		t.Errorf("a link's record was read: %+v", r)
	}
	if b, _ := os.ReadFile(target); string(b) != `{"starts":99}` {
		t.Errorf("written through the link: %s", b)
	}
	if fi, err := os.Lstat(runsPath(cfg)); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("the link was not replaced by a file: %v %v", fi, err)
	}
	if !strings.Contains(logs.String(), "unreadable") {
		t.Errorf("no warning for the link:\n%s", logs.String())
	}
}

// Every exit code of swarmvm run has a name of its own.
func TestExitReasons(t *testing.T) {
	seen := map[string]int{}
	for _, e := range status.ExitCodes {
		name := exitReason(e.Code)
		if strings.HasPrefix(name, "code-") {
			t.Errorf("exit code %d (%s) has no name", e.Code, e.Meaning)
		}
		if c, dup := seen[name]; dup {
			t.Errorf("codes %d and %d are both %q", c, e.Code, name)
		}
		seen[name] = e.Code
	}
	if exitReason(137) != "code-137" {
		t.Errorf("137: %s", exitReason(137))
	}
}

// The record is in the metrics: starts, and ends by reason; a lease that
// is not the broker's (nil) sends nothing.
func TestCollectRuns(t *testing.T) {
	c := &vmCollector{labels: map[string]string{"vm": "rec-1", "node": "n"}, runs: runs{Starts: 3, Exits: map[string]int{"ok": 1, unrecorded: 1}},
		leases: map[string]*fdpass.Lease{"kvm": nil}}
	got := map[string]float64{}
	record := func(d *prometheus.Desc, v float64, lv ...string) {
		name := d.String()
		name = name[strings.Index(name, `fqName: "`)+9:]
		got[name[:strings.Index(name, `"`)]+strings.Join(lv, ",")] = v
	}
	c.collectRuns(record, record)
	want := map[string]float64{"swarmvm_vm_starts_total": 3, "swarmvm_vm_exits_totalok": 1, "swarmvm_vm_exits_totalunrecorded": 1}
	if len(got) != len(want) {
		t.Errorf("series %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}
