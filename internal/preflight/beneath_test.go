package preflight

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestBeneath(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "poc-qemu")
	os.MkdirAll(filepath.Join(root, "images"), 0o755)
	os.WriteFile(filepath.Join(root, "images", "real.qcow2"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(base, "outside.qcow2"), []byte("x"), 0o600)
	links := map[string]string{
		"to-dev.qcow2":     "/dev/null",
		"to-proc.qcow2":    "/proc/self/environ",
		"to-outside.qcow2": "../../outside.qcow2",
		"inside.qcow2":     "real.qcow2",
	}
	for name, target := range links {
		os.Symlink(target, filepath.Join(root, "images", name))
	}
	os.Symlink(base, filepath.Join(root, "escape-dir"))
	syscall.Mkfifo(filepath.Join(root, "images", "fifo.qcow2"), 0o600)

	cases := []struct {
		path string
		ok   bool
		want string
	}{
		{"images/real.qcow2", true, ""},
		{"images/inside.qcow2", true, ""},
		{"images/new.qcow2", true, ""},
		{"images/new-folder/new.qcow2", true, ""},
		{"images/to-dev.qcow2", false, "leads out of the storage root"},
		{"images/to-proc.qcow2", false, "leads out of the storage root"},
		{"images/to-outside.qcow2", false, "leads out of the storage root"},
		{"escape-dir/outside.qcow2", false, "leads out of the storage root"},
		{"escape-dir/new.qcow2", false, "leads out of the storage root"},
		{"images/fifo.qcow2", false, "not a regular file (a FIFO)"},
		{"images/real.qcow2/x", false, "not a directory"},
	}
	for _, tc := range cases {
		f := Beneath(root, "IMAGE_PATH", filepath.Join(root, tc.path))
		if f.OK != tc.ok || (!tc.ok && !strings.Contains(f.Cause, tc.want)) {
			t.Errorf("%s: %+v, want ok=%v %q", tc.path, f, tc.ok, tc.want)
		}
		if !tc.ok && !strings.Contains(f.Cause, "IMAGE_PATH") {
			t.Errorf("%s: cause does not name the variable: %q", tc.path, f.Cause)
		}
	}
	if f := Beneath(root, "OVMF_CODE", "/dev/null"); f.OK || !strings.Contains(f.Cause, "not a regular file") {
		t.Errorf("device outside the root: %+v", f)
	}
	if f := Beneath(root, "OVMF_CODE", filepath.Join(base, "outside.qcow2")); !f.OK {
		t.Errorf("regular file outside the root: %+v", f)
	}
}

// MkdirOwn makes a VM's folders one level at a time and refuses one of
// another uid's, made first or in the moment between a check and the
// making (os.MkdirAll took it; its owner then removed the running VM's
// disk), and a link on the way.
func TestMkdirOwn(t *testing.T) {
	root := t.TempDir()
	if err := MkdirOwn(root, "IMAGE_PATH", filepath.Join(root, "images", "team", "a"), 0o750); err != nil {
		t.Fatalf("making images/team/a: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(root, "images", "team", "a")); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o750 {
		t.Fatalf("images/team/a: %v %v", fi, err)
	}
	if err := MkdirOwn(root, "IMAGE_PATH", filepath.Join(root, "images", "team", "a"), 0o750); err != nil {
		t.Errorf("again, all of it there: %v", err)
	}
	foreign := filepath.Join(root, "images", "other")
	os.Mkdir(foreign, 0o777)
	os.Chown(foreign, 4242, 4242)
	err := MkdirOwn(root, "TPM_STATE", filepath.Join(foreign, "vm"), 0o750)
	if err == nil || !strings.Contains(err.Error(), "TPM_STATE's folder "+foreign+" belongs to uid 4242") {
		t.Errorf("a folder of uid 4242 on the way: %v", err)
	}
	if _, err := os.Stat(filepath.Join(foreign, "vm")); !os.IsNotExist(err) {
		t.Errorf("a folder was made inside uid 4242's: %v", err)
	}
	os.Symlink("/tmp", filepath.Join(root, "images", "link"))
	if err := MkdirOwn(root, "OVMF_VARS", filepath.Join(root, "images", "link", "x"), 0o750); err == nil || !strings.Contains(err.Error(), "is not a folder") {
		t.Errorf("a link on the way: %v", err)
	}
	if err := MkdirOwn(root, "IMAGE_PATH", "/elsewhere/x", 0o750); err == nil {
		t.Error("a folder outside the root was made")
	}
}
