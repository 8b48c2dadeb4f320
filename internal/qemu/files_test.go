package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

func writeFile(t *testing.T, path string, size int, fill byte) []byte {
	t.Helper()
	b := bytes.Repeat([]byte{fill}, size)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func same(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s changed", path)
	}
}

func TestCheckPair(t *testing.T) {
	dir := t.TempDir()
	code, vars4, vars2 := filepath.Join(dir, "CODE_4M.fd"), filepath.Join(dir, "VARS_4M.fd"), filepath.Join(dir, "VARS.fd")
	writeFile(t, code, 3653632, 1)
	writeFile(t, vars4, 540672, 2)
	writeFile(t, vars2, 131072, 3)
	if n, err := CheckPair(code, vars4); err != nil || n != 540672 {
		t.Fatalf("4M pair: %d, %v", n, err)
	}
	if _, err := CheckPair(code, vars2); !errors.Is(err, ErrMismatch) {
		t.Fatalf("4M code with 2M vars: %v, want ErrMismatch", err)
	}
	if _, err := CheckPair(filepath.Join(dir, "missing"), vars4); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing code: %v", err)
	}
}

func TestPrepareVars(t *testing.T) {
	dir := t.TempDir()
	tmpl := filepath.Join(dir, "VARS_4M.fd")
	tmplBytes := writeFile(t, tmpl, 540672, 7)
	vars := filepath.Join(dir, "vm.OVMF_VARS.fd")
	now := time.Date(2026, 11, 29, 1, 2, 3, 0, time.UTC)

	res, err := PrepareVars(tmpl, vars, 540672, false, now)
	if err != nil || !res.Created {
		t.Fatalf("first prepare: %+v, %v", res, err)
	}
	same(t, vars, tmplBytes)
	fi, _ := os.Stat(vars)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("vars mode %v, want 0600", fi.Mode().Perm())
	}

	// The guest's NVRAM changes; a restart keeps it.
	nvram := writeFile(t, vars, 540672, 9)
	if res, err := PrepareVars(tmpl, vars, 540672, false, now); err != nil || res.Created {
		t.Fatalf("second prepare: %+v, %v", res, err)
	}
	same(t, vars, nvram)

	// A vars file of the wrong size is refused and left as it was.
	wrong := writeFile(t, vars, 131072, 5)
	if _, err := PrepareVars(tmpl, vars, 540672, false, now); !errors.Is(err, ErrMismatch) {
		t.Fatalf("wrong size: %v, want ErrMismatch", err)
	}
	same(t, vars, wrong)

	// A reset sets the old file aside, then starts from the template.
	res, err = PrepareVars(tmpl, vars, 540672, true, now)
	if err != nil || !res.Created || res.SetAside != vars+".20261129T010203Z.bak" {
		t.Fatalf("reset: %+v, %v", res, err)
	}
	same(t, res.SetAside, wrong)
	same(t, vars, tmplBytes)
	if left, _ := filepath.Glob(filepath.Join(dir, ".*new-*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestCreateNeverOverwrites(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatalf("qemu-img not installed (scripts/install.sh installs qemu-utils): %v", err)
	}
	ctx := context.Background()
	img := Img{}
	path := filepath.Join(t.TempDir(), "vm.qcow2")
	if err := img.Create(ctx, path, 64<<20); err != nil {
		t.Fatalf("Create: %v", err)
	}
	info, err := img.Info(ctx, path)
	if err != nil || info.Format != "qcow2" || info.VirtualSize != 64<<20 {
		t.Fatalf("Info = %+v, %v", info, err)
	}
	if has, err := img.HasData(ctx, path); err != nil || has {
		t.Fatalf("new image HasData = %v, %v", has, err)
	}
	if out, err := exec.Command("qemu-io", "-c", "write -P 0x5a 0 64k", path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	if has, err := img.HasData(ctx, path); err != nil || !has {
		t.Fatalf("written image HasData = %v, %v", has, err)
	}
	before, _ := os.ReadFile(path)
	if err := img.Create(ctx, path, 128<<20); !errors.Is(err, ErrExists) {
		t.Fatalf("second Create: %v, want ErrExists", err)
	}
	same(t, path, before)
	if _, err := img.Info(ctx, filepath.Join(t.TempDir(), "none.qcow2")); err == nil {
		t.Fatal("Info of a missing image succeeded")
	}
}
