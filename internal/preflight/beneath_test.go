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
