package runner

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSerialLogIsCapped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.serial.log")
	const limit = 4096
	s, err := openSerial(path, limit)
	if err != nil {
		t.Fatal(err)
	}
	line := []byte(strings.Repeat("x", 99) + "\n")
	total := 0
	for i := 0; i < 1000; i++ {
		n, err := s.Write(line)
		if err != nil || n != len(line) {
			t.Fatalf("write %d: %d, %v", i, n, err)
		}
		total += n
	}
	huge := bytes.Repeat([]byte("y"), 3*limit)
	if n, err := s.Write(huge); err != nil || n != len(huge) {
		t.Fatalf("huge write: %d, %v", n, err)
	}
	s.Close()
	cur, _ := os.Stat(path)
	old, _ := os.Stat(path + ".1")
	if cur == nil || old == nil {
		t.Fatalf("expected %s and %s.1", path, path)
	}
	if cur.Size() > limit || old.Size() > limit {
		t.Errorf("sizes %d and %d exceed the cap %d after %d bytes written", cur.Size(), old.Size(), limit, total+len(huge))
	}
	// A write larger than the cap keeps its last limit bytes, alone in the
	// log; the generation before holds the lines written before it.
	b, _ := os.ReadFile(path)
	if !bytes.Equal(b, huge[len(huge)-limit:]) {
		t.Errorf("the log holds %d bytes (%q…), want the last %d of the huge write", len(b), b[:min(len(b), 16)], limit)
	}
	if b1, _ := os.ReadFile(path + ".1"); !bytes.HasSuffix(b1, line) {
		t.Errorf("%s.1 does not end with the last line written before: %q", path, b1[max(0, len(b1)-16):])
	}
	t.Logf("wrote %d bytes; kept %d + %d", total+len(huge), cur.Size(), old.Size())
}

// A serial log name that another VM took first (a link to a file it can
// read, or a file of its own) is refused, not written through.
func TestSerialLogRefusesForeignFiles(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "other-vms-file")
	os.WriteFile(target, nil, 0o666)
	link := filepath.Join(dir, "vm.serial.log")
	os.Symlink(target, link)
	if _, err := openSerial(link, 1024); err == nil {
		t.Fatal("wrote the serial log through a link")
	}
	if b, _ := os.ReadFile(target); len(b) != 0 {
		t.Fatalf("the link's target got %q", b)
	}
	foreign := filepath.Join(dir, "vm2.serial.log")
	os.WriteFile(foreign, nil, 0o666)
	os.Chown(foreign, 4242, 4242)
	if _, err := openSerial(foreign, 1024); err == nil || !strings.Contains(err.Error(), "belongs to uid 4242") {
		t.Fatalf("another uid's file: %v", err)
	}
}

// Rotation cannot be blocked or redirected by what another uid leaves under
// <log>.1: a name it cannot replace (here a folder, which not even root can
// rename a file over) costs the older generation, said in the log, and
// writing goes on; a link there is replaced, never written through. The log
// keeps its own name throughout.
func TestSerialRotationNotBlocked(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vm.serial.log")
	os.Mkdir(path+".1", 0o755)
	const max = 64 << 10
	s, err := openSerial(path, max)
	if err != nil {
		t.Fatal(err)
	}
	line := bytes.Repeat([]byte("x"), 1000)
	for i := 0; i < 200; i++ {
		if _, err := s.Write(line); err != nil {
			t.Fatalf("write %d after a blocked rotation: %v", i, err)
		}
	}
	s.Close()
	b, _ := os.ReadFile(path)
	if !bytes.Contains(b, []byte("older output dropped: vm.serial.log.1 not written")) || len(b) > max {
		t.Errorf("log after blocked rotations: %d bytes, notice %v", len(b), bytes.Contains(b, []byte("older output dropped")))
	}

	os.Remove(path + ".1")
	target := filepath.Join(dir, "theirs")
	os.WriteFile(target, nil, 0o666)
	os.Symlink(target, path+".1")
	s, err = openSerial(path, max)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		s.Write(line)
	}
	s.Close()
	if b, _ := os.ReadFile(target); len(b) != 0 {
		t.Errorf("rotation wrote %d bytes through the link", len(b))
	}
	if fi, err := os.Lstat(path + ".1"); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("%s.1 is not the kept log: %v", path, err)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, ".vm.serial.log.rot-*")); len(m) > 0 {
		t.Errorf("temporaries left: %v", m)
	}
}
