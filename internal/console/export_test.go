package console

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// An export's key follows from its identity and the VM's key alone: the
// same on both sides, another for another export, VM, end or VM key, and
// never a console ticket's signature; the identity holds no ':' (the PSK
// files' separator) for a VM name and a backup id.
func TestExportKey(t *testing.T) {
	key := bytes.Repeat([]byte{7}, MinKeyBytes)
	until := time.Unix(1796487466, 0)
	user := ExportUser("web-1", "20261205T160746Z-639b10", until)
	if user != "swarmvm-export.web-1.20261205T160746Z-639b10.1796487466" {
		t.Errorf("identity %q", user)
	}
	psk := ExportKey(key, user)
	if len(psk) != 32 || !bytes.Equal(psk, ExportKey(key, user)) {
		t.Fatalf("key %x: want 32 bytes, the same each time", psk)
	}
	other := bytes.Repeat([]byte{8}, MinKeyBytes)
	for what, k := range map[string][]byte{
		"another export": ExportKey(key, ExportUser("web-1", "20261205T160746Z-639b11", until)),
		"another VM":     ExportKey(key, ExportUser("web-2", "20261205T160746Z-639b10", until)),
		"another end":    ExportKey(key, ExportUser("web-1", "20261205T160746Z-639b10", until.Add(time.Second))),
		"another VM key": ExportKey(other, user),
	} {
		if bytes.Equal(k, psk) {
			t.Errorf("%s has the same key", what)
		}
	}
	// A console ticket signs "v1.…": never "export/…".
	if strings.HasPrefix("export/"+user, ticketVersion+".") {
		t.Error("an export identity could be a console ticket's body")
	}
	line := PSKLine(user, psk)
	if strings.Count(line, ":") != 1 || !strings.HasSuffix(line, "\n") || len(line) != len(user)+1+64+1 {
		t.Errorf("PSK line %q", line)
	}
}
