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
	const max = 4096
	s, err := openSerial(path, max)
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
	huge := bytes.Repeat([]byte("y"), 3*max)
	if n, err := s.Write(huge); err != nil || n != len(huge) {
		t.Fatalf("huge write: %d, %v", n, err)
	}
	s.Close()
	cur, _ := os.Stat(path)
	old, _ := os.Stat(path + ".1")
	if cur == nil || old == nil {
		t.Fatalf("expected %s and %s.1", path, path)
	}
	if cur.Size() > max || old.Size() > max {
		t.Errorf("sizes %d and %d exceed the cap %d after %d bytes written", cur.Size(), old.Size(), max, total+len(huge))
	}
	b, _ := os.ReadFile(path)
	if !bytes.HasSuffix(b, huge[:0]) || !bytes.Contains(b, []byte("yyyy")) {
		t.Errorf("latest output not kept")
	}
	t.Logf("wrote %d bytes; kept %d + %d", total+len(huge), cur.Size(), old.Size())
}
