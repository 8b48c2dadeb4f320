package qemu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// ReadQCOW2 says what qemu-img info says of the images qemu-img makes:
// plain (both versions), with a backing file, with an external data file.
func TestReadQCOW2AgreesWithQemuImg(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatalf("qemu-img is needed (Debian's qemu-utils; scripts/install.sh installs it): %v", err)
	}
	dir := t.TempDir()
	mk := func(name string, args ...string) string {
		p := filepath.Join(dir, name)
		a := append([]string{"create", "-q", "-f", "qcow2"}, args...)
		a = append(a, p, "64M")
		if out, err := exec.Command("qemu-img", a...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v %s", a, err, out)
		}
		return p
	}
	base := mk("base.qcow2")
	images := []string{
		base,
		mk("v2.qcow2", "-o", "compat=0.10"),
		mk("child.qcow2", "-b", base, "-F", "qcow2"),
		mk("data.qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw")),
	}
	for _, p := range images {
		want, err := Img{}.Info(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ReadQCOW2(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if got.Format != want.Format || got.VirtualSize != want.VirtualSize || got.BackingFile != want.BackingFile || got.Specific.Data.DataFile != want.Specific.Data.DataFile {
			t.Errorf("%s: read %+v\nqemu-img says %+v", filepath.Base(p), got, want)
		}
		if (got.SelfContained(p) == "") != (want.SelfContained(p) == "") {
			t.Errorf("%s: self-contained %q vs qemu-img's %q", filepath.Base(p), got.SelfContained(p), want.SelfContained(p))
		}
	}
	// Not qcow2: a raw image, an empty file, a short one.
	for name, data := range map[string][]byte{"raw.img": make([]byte, 1<<20), "empty": nil, "short": []byte("QFI\xfb\x00")} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, data, 0o600)
		if _, err := ReadQCOW2(p); !errors.Is(err, ErrNotQCOW2) {
			t.Errorf("%s: %v, want ErrNotQCOW2", name, err)
		}
	}
}

// The flag alone (a data file whose name extension is missing) is enough
// to refuse the image.
func TestReadQCOW2DataFileFlag(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "d.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", p, "64M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	f.WriteAt([]byte{0, 0, 0, 0, 0, 0, 0, qcow2IncompatData}, 72)
	f.Close()
	info, err := ReadQCOW2(p)
	if err != nil || info.SelfContained(p) == "" {
		t.Fatalf("a flagged data file passed: %+v %v", info, err)
	}
}
