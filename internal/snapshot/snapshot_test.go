package snapshot

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
)

func qemuIO(t *testing.T, img, cmd string) string {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, img).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-io %s: %v %s", cmd, err, out)
	}
	return string(out)
}

// A stopped VM's snapshot and revert: the disk's data and the NVRAM come
// back; the state before is kept (a before-revert snapshot, the NVRAM set
// aside); the disk's dirty bitmaps, which QEMU reverts no disk with, are
// removed.
func TestStoppedSnapshotRevert(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "images"), 0o700)
	cfg := config.FromEnv(func(k string) string {
		return map[string]string{"VM_NAME": "snap-1", "STORAGE_DIR": root, "BOOT_MODE": "uefi"}[k]
	})
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", cfg.ImagePath, "64M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	os.WriteFile(cfg.OVMFVars, []byte("vars before"), 0o600)
	qemuIO(t, cfg.ImagePath, "write -P 0x41 0 64k")
	exec.Command("qemu-img", "bitmap", "--add", cfg.ImagePath, "swarmvm-b1").Run()
	ctx := context.Background()
	var out bytes.Buffer
	if err := Create(ctx, cfg, "s1", 0, &out); err != nil {
		t.Fatal(err)
	}
	if err := Create(ctx, cfg, "s1", 0, &out); err == nil || !strings.Contains(err.Error(), "already has a snapshot s1") {
		t.Errorf("a second s1: %v", err)
	}
	qemuIO(t, cfg.ImagePath, "write -P 0x42 0 64k")
	os.WriteFile(cfg.OVMFVars, []byte("vars after"), 0o600)
	list, err := List(ctx, cfg)
	if err != nil || len(list) != 1 || list[0].Name != "s1" || strings.Join(list[0].State, ",") != "nvram" {
		t.Fatalf("ls: %+v %v", list, err)
	}
	now := time.Date(2026, 12, 5, 13, 0, 0, 0, time.UTC)
	if err := Revert(ctx, cfg, "s1", now, &out); err != nil {
		t.Fatalf("revert: %v\n%s", err, out.String())
	}
	if got := qemuIO(t, cfg.ImagePath, "read -P 0x41 0 64k"); strings.Contains(got, "failed") {
		t.Errorf("after the revert the disk reads: %s", got)
	}
	if b, _ := os.ReadFile(cfg.OVMFVars); string(b) != "vars before" {
		t.Errorf("NVRAM after the revert: %q", b)
	}
	if b, _ := os.ReadFile(cfg.OVMFVars + ".reverted-20261205T130000Z"); string(b) != "vars after" {
		t.Errorf("the NVRAM set aside: %q", b)
	}
	list, _ = List(ctx, cfg)
	if len(list) != 2 || list[1].Name != "before-revert-20261205T130000Z" {
		t.Errorf("snapshots after the revert: %+v", list)
	}
	if info, _ := exec.Command("qemu-img", "info", "-U", cfg.ImagePath).Output(); strings.Contains(string(info), "swarmvm-b1") {
		t.Errorf("the bitmap survived the revert:\n%s", info)
	}
	if err := Revert(ctx, cfg, "nope", now, &out); err == nil || !strings.Contains(err.Error(), "has no snapshot nope") {
		t.Errorf("revert to a snapshot that is not there: %v", err)
	}
	if err := Remove(ctx, cfg, "s1", &out); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir(cfg, "s1")); !os.IsNotExist(err) {
		t.Errorf("the snapshot's folder is still there: %v", err)
	}
}
