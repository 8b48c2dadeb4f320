package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// restore --as's job with exactly the job's capabilities (root, bounded
// to CAP_DAC_READ_SEARCH, CAP_CHOWN, CAP_FOWNER): another VM's backup, in
// that VM's 0700 folder, restored over a VM deployed with a TPM — its
// disk and its 0700 TPM folder, both its uid's, set aside — gives every
// file to that VM's uid, and its TPM folder stays its own.
func TestRestoreAsWithTheJobsCapabilities(t *testing.T) {
	require(t)
	const oldUID, newUID, gid = 20001, 20002, runnerUID
	repo, store := backupRepo(t), t.TempDir()
	images := filepath.Join(store, "images")
	os.MkdirAll(images, 0o755)
	os.Chown(images, 0, gid)
	os.Chmod(images, 0o1770|os.ModeSticky)

	id := "20261205T120000Z-aaaaaa"
	dir := filepath.Join(repo, "old", id)
	os.MkdirAll(dir, 0o700)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, "disk0.qcow2"), "4M")
	os.WriteFile(filepath.Join(dir, "tpm.permall"), []byte("the old VM's TPM state"), 0o600)
	type file struct {
		Name   string `json:"name"`
		Role   string `json:"role"`
		Size   int64  `json:"size"`
		SHA256 string `json:"sha256"`
	}
	var files []file
	for _, f := range []file{{Name: "disk0.qcow2", Role: "disk"}, {Name: "tpm.permall", Role: "tpm"}} {
		b, err := os.ReadFile(filepath.Join(dir, f.Name))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		f.Size, f.SHA256 = int64(len(b)), hex.EncodeToString(sum[:])
		files = append(files, f)
	}
	m, _ := json.Marshal(map[string]any{"version": 1, "vm": "old", "id": id, "mode": "full", "finished": time.Now().UTC(), "files": files})
	os.WriteFile(filepath.Join(dir, "manifest.json"), m, 0o600)
	os.WriteFile(filepath.Join(repo, "old", ".lock"), nil, 0o600) // as the first backup leaves it
	chownAll(t, filepath.Join(repo, "old"), oldUID)

	// The new VM's own files, as its first start left them.
	tpmDir := filepath.Join(images, "new.tpm")
	os.Mkdir(tpmDir, 0o700)
	os.WriteFile(filepath.Join(tpmDir, "tpm2-00.permall"), []byte("the new VM's first TPM state"), 0o600)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(images, "new.qcow2"), "4M")
	for _, p := range []string{tpmDir, filepath.Join(tpmDir, "tpm2-00.permall"), filepath.Join(images, "new.qcow2")} {
		os.Chown(p, newUID, gid)
	}

	cmd := exec.Command("setpriv", "--bounding-set=-all,+dac_read_search,+chown,+fowner", "--inh-caps=-all", "--",
		swarmvmBin(t), "restore", "here", "--repo", repo, "--backup", id, "--from", "old", "--owner", "20002:10001", "--replace")
	cmd.Env = []string{"VM_NAME=new", "STORAGE_DIR=" + store, "TPM=on", "PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	t.Logf("restore here as the job runs it:\n%s", out)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	for p, mode := range map[string]os.FileMode{filepath.Join(images, "new.qcow2"): 0o600, tpmDir: 0o700 | os.ModeDir, filepath.Join(tpmDir, "tpm2-00.permall"): 0o600} {
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != newUID || fi.Mode() != mode {
			t.Errorf("%s: uid %d mode %v, want %d %v", p, st.Uid, fi.Mode(), newUID, mode)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(tpmDir, "tpm2-00.permall")); string(b) != "the old VM's TPM state" {
		t.Errorf("the TPM state restored: %q", b)
	}
	asides, _ := filepath.Glob(filepath.Join(tpmDir, "tpm2-00.permall.replaced-*"))
	disks, _ := filepath.Glob(filepath.Join(images, "new.qcow2.replaced-*"))
	if len(asides) != 1 || len(disks) != 1 || !strings.Contains(string(out), "is a copy of old with its own identity") {
		t.Errorf("set aside: TPM %v, disk %v", asides, disks)
	}
}
