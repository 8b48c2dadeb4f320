package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v %s", args, err, out)
	}
}

// Raw and qcow2 sources convert to a new qcow2 with their data, reporting
// progress; the destination is never replaced; images that refer to other
// files are named for what they refer to.
func TestConvertAndSelfContained(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	raw := filepath.Join(dir, "src.raw")
	data := bytes.Repeat([]byte("swarmvm!"), 1<<17) // 1 MiB
	if err := os.WriteFile(raw, append(make([]byte, 8<<20), data...), 0o644); err != nil {
		t.Fatal(err)
	}
	var img Img
	info, err := img.Info(ctx, raw)
	if err != nil || info.Format != "raw" || info.SelfContained(raw) != "" {
		t.Fatalf("raw: %+v %v", info, err)
	}
	dst := filepath.Join(dir, "vm.qcow2")
	var last float64
	if err := img.Convert(ctx, raw, "raw", dst, func(p float64) { last = p }); err != nil {
		t.Fatal(err)
	}
	if last != 100 {
		t.Errorf("last progress %v, want 100", last)
	}
	if fi, _ := os.Stat(dst); fi == nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("converted image mode: %v", fi)
	}
	back := filepath.Join(dir, "back.raw")
	qemuImg(t, "convert", "-f", "qcow2", "-O", "raw", dst, back)
	if b, _ := os.ReadFile(back); !bytes.Equal(b[8<<20:], data) {
		t.Error("converted image lost the data")
	}
	if err := img.Convert(ctx, raw, "raw", dst, nil); !errors.Is(err, ErrExists) {
		t.Errorf("converting onto an existing image: %v, want ErrExists", err)
	}

	// The other formats an import takes, as qemu-img writes them.
	for _, f := range []string{"vmdk", "vhdx", "vdi"} {
		src := filepath.Join(dir, "src."+f)
		qemuImg(t, "convert", "-f", "raw", "-O", f, raw, src)
		info, err := img.Info(ctx, src)
		if err != nil || info.Format != f || info.SelfContained(src) != "" {
			t.Errorf("%s: %+v %v %q", f, info, err, info.SelfContained(src))
			continue
		}
		out := filepath.Join(dir, f+".qcow2")
		if err := img.Convert(ctx, src, f, out, nil); err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		back := filepath.Join(dir, f+".back")
		qemuImg(t, "convert", "-f", "qcow2", "-O", "raw", out, back)
		if b, _ := os.ReadFile(back); !bytes.Equal(b[8<<20:], data) {
			t.Errorf("%s: converted image lost the data", f)
		}
	}

	overlay := filepath.Join(dir, "overlay.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", dst, "-F", "qcow2", overlay)
	info, err = img.Info(ctx, overlay)
	if err != nil || !strings.Contains(info.SelfContained(overlay), "backing file ("+dst+")") {
		t.Errorf("overlay: %q %v", info.SelfContained(overlay), err)
	}
	ext := filepath.Join(dir, "ext.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "ext.data"), ext, "16M")
	info, err = img.Info(ctx, ext)
	if err != nil || !strings.Contains(info.SelfContained(ext), "external data file") {
		t.Errorf("external data file: %q %v", info.SelfContained(ext), err)
	}
}

// LockRead keeps QEMU from writing while it is held, and refuses an image
// a QEMU has open for writing.
func TestLockRead(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "vm.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "16M")
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := LockRead(f); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-io", "-f", "qcow2", img, "-c", "write 0 512").CombinedOutput()
	if err == nil || !strings.Contains(string(out), `Failed to get "write" lock`) {
		t.Errorf("qemu-io wrote under LockRead: %v %s", err, out)
	}
	f.Close()
	if out, err := exec.Command("qemu-io", "-f", "qcow2", img, "-c", "write 0 512").CombinedOutput(); err != nil {
		t.Errorf("qemu-io after the lock was released: %v %s", err, out)
	}

	writer := exec.Command("qemu-io", "-f", "qcow2", img, "-c", "sleep 60000")
	if err := writer.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { writer.Process.Kill(); writer.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		f, _ := os.Open(img)
		err := LockRead(f)
		f.Close()
		if errors.Is(err, ErrWriter) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("LockRead with a writer present: %v, want ErrWriter", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Held sees a qemu-io that has the image open, reading or writing, and
// nothing once it is gone.
func TestHeld(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "vm.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "16M")
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if held, err := Held(f); held || err != nil {
		t.Fatalf("Held with nobody on the image: %v %v", held, err)
	}
	for _, mode := range [][]string{{"-r"}, {}} {
		holder := exec.Command("qemu-io", append(mode, "-f", "qcow2", img, "-c", "sleep 60000")...)
		if err := holder.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			held, err := Held(f)
			if err != nil {
				t.Fatal(err)
			}
			if held {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("qemu-io %v has the image open, Held says no", mode)
			}
			time.Sleep(20 * time.Millisecond)
		}
		holder.Process.Kill()
		holder.Wait()
		if held, err := Held(f); held || err != nil {
			t.Fatalf("Held after qemu-io %v ended: %v %v", mode, held, err)
		}
	}
}
