package backup

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
)

// Another VM's backup restored as this one (restore --as, run as root):
// the disk is made for this VM's uid, 0600, and the source's cloud-init
// key is left behind (this VM gets an instance-id of its own); a second
// restore writes over nothing.
func TestRestoreAs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (to give files to another uid); the test command runs as root")
	}
	repo, store := t.TempDir(), t.TempDir()
	os.MkdirAll(filepath.Join(store, "images"), 0o755)
	dir, err := vmDir(repo, "old", true)
	if err != nil {
		t.Fatal(err)
	}
	id := "20261205T120000Z-aaaaaa"
	os.MkdirAll(filepath.Join(dir, id), 0o700)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, id, DiskFile), "4M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	os.WriteFile(filepath.Join(dir, id, "seed-key"), []byte(strings.Repeat("ab", 32)), 0o600)
	m := Manifest{Version: ManifestVersion, VM: "old", ID: id, Mode: "full", Finished: time.Now()}
	for name, role := range map[string]string{DiskFile: "disk", "seed-key": "seed-key"} {
		size, sum, err := checksum(filepath.Join(dir, id, name))
		if err != nil {
			t.Fatal(err)
		}
		m.Files = append(m.Files, File{Name: name, Role: role, Size: size, SHA256: sum})
	}
	b, _ := json.Marshal(m)
	os.WriteFile(filepath.Join(dir, id, manifestName), b, 0o600)

	env := map[string]string{"VM_NAME": "new", "STORAGE_DIR": store}
	cfg := config.FromEnv(func(k string) string { return env[k] })
	o := RestoreOptions{Repo: repo, ID: id, From: "old", Owner: &Owner{UID: 4242, GID: 10001}}
	if err := Restore(context.Background(), cfg, o, io.Discard); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(cfg.ImagePath)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 4242 || st.Gid != 10001 || fi.Mode().Perm() != 0o600 {
		t.Errorf("restored disk %d:%d %v, want 4242:10001 0600", st.Uid, st.Gid, fi.Mode().Perm())
	}
	if _, err := os.Lstat(cfg.SeedKeyPath()); !os.IsNotExist(err) {
		t.Errorf("the source's cloud-init key was restored as the copy's: %v", err)
	}
	if err := Restore(context.Background(), cfg, o, io.Discard); err == nil || !strings.Contains(err.Error(), "restore never writes over a VM's file") {
		t.Errorf("a second restore: %v", err)
	}
}
