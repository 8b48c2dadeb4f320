package backup

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeBackup(t *testing.T, dir string, m Manifest) {
	t.Helper()
	m.Version = ManifestVersion
	os.MkdirAll(filepath.Join(dir, m.ID), 0o700)
	b, _ := json.Marshal(m)
	os.WriteFile(filepath.Join(dir, m.ID, manifestName), b, 0o600)
}

// Only complete backups are listed, in the order they finished (two in
// one second sort by that, not by id); a chain runs from the full one;
// a missing parent is named.
func TestListAndChain(t *testing.T) {
	repo := t.TempDir()
	dir, err := vmDir(repo, "vm-1", true)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	writeBackup(t, dir, Manifest{ID: "20261205T120000Z-ffffff", Mode: "full", Finished: at})
	writeBackup(t, dir, Manifest{ID: "20261205T120000Z-000000", Mode: "incremental", Parent: "20261205T120000Z-ffffff", Finished: at.Add(time.Millisecond)})
	writeBackup(t, dir, Manifest{ID: "20261205T120001Z-aaaaaa", Mode: "incremental", Parent: "20261205T115959Z-gone00", Finished: at.Add(time.Second)})
	os.MkdirAll(filepath.Join(dir, "20261205T120002Z-bbbbbb"+partial), 0o700) // cut short
	writeBackup(t, filepath.Join(dir, "x"), Manifest{ID: "nested"})
	list, err := List(repo, "vm-1")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range list {
		ids = append(ids, e.ID)
	}
	if strings.Join(ids, " ") != "20261205T120000Z-ffffff 20261205T120000Z-000000 20261205T120001Z-aaaaaa" {
		t.Fatalf("listed %v", ids)
	}
	chain, err := Chain(list, "20261205T120000Z-000000")
	if err != nil || len(chain) != 2 || chain[0].Mode != "full" {
		t.Errorf("chain %v, %v", chain, err)
	}
	if _, err := Chain(list, "20261205T120001Z-aaaaaa"); err == nil || !strings.Contains(err.Error(), "needs 20261205T115959Z-gone00") {
		t.Errorf("a chain with a missing parent: %v", err)
	}
}

// A repository or a VM folder of another uid's is refused; a folder
// readable by others is made private; the lock admits one holder.
func TestRepositoryOwnership(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (to make files of other uids); the test command runs as root")
	}
	repo := t.TempDir()
	os.Chown(repo, 4242, 4242)
	if _, err := vmDir(repo, "vm-1", true); err == nil || !strings.Contains(err.Error(), "belongs to uid 4242") {
		t.Errorf("another uid's repository: %v", err)
	}
	os.Chown(repo, 0, 0)
	os.Mkdir(filepath.Join(repo, "vm-2"), 0o700)
	os.Chown(filepath.Join(repo, "vm-2"), 4242, 4242)
	if _, err := vmDir(repo, "vm-2", true); err == nil || !strings.Contains(err.Error(), "belongs to uid 4242") {
		t.Errorf("another uid's VM folder: %v", err)
	}
	os.Mkdir(filepath.Join(repo, "vm-3"), 0o755)
	dir, err := vmDir(repo, "vm-3", true)
	if fi, _ := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("an open VM folder: %v %v", fi.Mode(), err)
	}
	release, err := lock(dir, "vm-3")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lock(dir, "vm-3"); err == nil || !strings.Contains(err.Error(), "a backup of vm-3 is running") {
		t.Errorf("a second lock: %v", err)
	}
	release()
	if r, err := lock(dir, "vm-3"); err != nil {
		t.Errorf("the lock after its release: %v", err)
	} else {
		r()
	}
}

// A backup file that no longer matches its manifest is named, as is one
// that is missing.
func TestCheckFiles(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, DiskFile), []byte("the disk"), 0o600)
	size, sum, err := checksum(filepath.Join(dir, DiskFile))
	if err != nil {
		t.Fatal(err)
	}
	e := Entry{Manifest: Manifest{ID: "b1", Files: []File{{Name: DiskFile, Size: size, SHA256: sum}, {Name: "nvram.fd", Size: 1, SHA256: "00"}}}, Dir: dir}
	if err := checkFiles(e, DiskFile); err != nil {
		t.Fatalf("an intact disk: %v", err)
	}
	if err := checkFiles(e, ""); err == nil || !strings.Contains(err.Error(), "backup b1: nvram.fd is missing") {
		t.Errorf("a missing file: %v", err)
	}
	os.WriteFile(filepath.Join(dir, DiskFile), []byte("the dusk"), 0o600)
	if err := checkFiles(e, DiskFile); err == nil || !strings.Contains(err.Error(), "backup b1: disk0.qcow2 does not match its manifest") {
		t.Errorf("a changed disk: %v", err)
	}
}

// Prune keeps the rules' backups, the newest, and what kept ones build on.
func TestPlan(t *testing.T) {
	day := func(d, h int) time.Time { return time.Date(2026, 11, d, h, 0, 0, 0, time.UTC) }
	es := []Entry{
		{Manifest: Manifest{ID: "a", Mode: "full", Point: day(2, 1)}},                     // ISO week 45
		{Manifest: Manifest{ID: "b", Mode: "incremental", Parent: "a", Point: day(2, 9)}}, // newest of 2 Nov
		{Manifest: Manifest{ID: "c", Mode: "full", Point: day(20, 1)}},
		{Manifest: Manifest{ID: "d", Mode: "incremental", Parent: "c", Point: day(21, 1)}},
		{Manifest: Manifest{ID: "e", Mode: "incremental", Parent: "d", Point: day(21, 5)}},
		{Manifest: Manifest{ID: "f", Mode: "incremental", Parent: "e", Point: day(22, 5)}},
	}
	got := func(k Keep) string {
		var kept []string
		for _, d := range Plan(es, k) {
			if d.Keep {
				kept = append(kept, d.ID)
			}
		}
		return strings.Join(kept, "")
	}
	for k, want := range map[Keep]string{
		{Last: 1}:            "cdef", // f needs e, d, c
		{Daily: 2}:           "cdef", // 22 Nov (f), 21 Nov (e)
		{Weekly: 2}:          "abcdef",
		{Last: 1, Weekly: 1}: "cdef",
	} {
		if g := got(k); g != want {
			t.Errorf("%+v kept %s, want %s", k, g, want)
		}
	}
	es[3].Mode, es[3].Parent = "full", "" // d is a full backup
	if g := got(Keep{Last: 1}); g != "def" {
		t.Errorf("after a full d, kept %s", g)
	}
}
