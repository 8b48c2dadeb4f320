package qemu

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// FuzzQCOW2Header feeds arbitrary bytes to the qcow2 header reader, which
// reads images a tenant may have written. No panic; and what matters for
// safety holds whatever the bytes: a header that names a backing file
// (a nonzero offset) or sets the external data file bit is never read as
// a self-contained image, which QEMU would then open past the runner's
// checks.
func FuzzQCOW2Header(f *testing.F) {
	dir := f.TempDir()
	for name, args := range map[string][]string{
		"plain.qcow2":   {"create", "-q", "-f", "qcow2", "IMG", "64M"},
		"v2.qcow2":      {"create", "-q", "-f", "qcow2", "-o", "compat=0.10", "IMG", "64M"},
		"backing.qcow2": {"create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", "IMG", "64M"},
		"data.qcow2":    {"create", "-q", "-f", "qcow2", "-o", "data_file=" + filepath.Join(dir, "data.raw"), "IMG", "64M"},
	} {
		img := filepath.Join(dir, name)
		for i, a := range args {
			if a == "IMG" {
				args[i] = img
			}
		}
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			f.Fatalf("qemu-img %v: %v %s", args, err, out)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:min(len(b), 4096)])
	}
	f.Add([]byte("QFI\xfb"))
	f.Fuzz(func(t *testing.T, data []byte) {
		info, err := readQCOW2(bytes.NewReader(data))
		if err != nil {
			return
		}
		if info.Format != "qcow2" || len(data) < qcow2V2HeaderLen {
			t.Fatalf("read %+v from %d bytes", info, len(data))
		}
		be := binary.BigEndian
		backing := be.Uint64(data[8:]) != 0
		external := be.Uint32(data[4:]) == 3 && len(data) >= 80 && be.Uint64(data[72:])&qcow2IncompatData != 0
		if (backing || external) && info.SelfContained("x") == "" {
			t.Fatalf("a header with backing offset %#x and incompatible features %#x read as self-contained: %+v", be.Uint64(data[8:]), be.Uint64(data[72:min(len(data), 80)]), info)
		}
	})
}

// FuzzVarStore feeds arbitrary bytes to the reader of OVMF's variable
// store (a VM's NVRAM, which its guest writes): no panic, and every
// variable read lies within the bytes.
func FuzzVarStore(f *testing.F) {
	for _, p := range []string{"/usr/share/OVMF/OVMF_VARS_4M.ms.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatalf("%v (Debian's ovmf package is needed)", err)
		}
		f.Add(b[:min(len(b), 1<<16)])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		vars, err := varStore(data)
		if err != nil {
			return
		}
		for name, size := range vars {
			if size < 0 || size > len(data) || len(name) > len(data) {
				t.Fatalf("variable %q of %d bytes read from %d bytes", name, size, len(data))
			}
		}
	})
}
