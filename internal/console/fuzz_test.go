package console

import (
	"bytes"
	"testing"
	"time"
)

// FuzzVerify feeds arbitrary strings to the ticket check, which reads what
// anyone who reaches a console port sends. No panic; and a ticket it
// accepts is exactly one that Mint makes for what it says: no other
// spelling of a valid ticket is accepted.
func FuzzVerify(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	f.Add(Mint(key, "web-1", View, now.Add(time.Minute)))
	f.Add(Mint(key, "web-1", Input, now.Add(time.Hour)))
	f.Add(Mint(key, "web-2", Input, now.Add(time.Hour)))
	f.Add("v1.x")
	f.Fuzz(func(t *testing.T, ticket string) {
		tk, err := Verify(key, "web-1", ticket, now)
		if err != nil {
			return
		}
		if tk.VM != "web-1" || (tk.Grant != View && tk.Grant != Input) || !now.Before(tk.Expires) {
			t.Fatalf("accepted %+v", tk)
		}
		if again := Mint(key, tk.VM, tk.Grant, tk.Expires); again != ticket {
			t.Fatalf("accepted %q, which is not how the ticket it says is spelt (%q)", ticket, again)
		}
	})
}

// FuzzViewOnly feeds arbitrary client bytes to the view-only filter. No
// panic, never more out than in, and what it lets through passes through
// it again unchanged: had it let a key, pointer or clipboard message
// through, the second pass would drop it.
func FuzzViewOnly(f *testing.F) {
	hello := "RFB 003.008\n\x01\x01"
	f.Add([]byte(hello + "\x04\x01\x00\x00\x00\x00\x00\x41" + "\x03\x00\x00\x00\x00\x00\x04\x00\x03\x00"))
	f.Add([]byte(hello + "\x02\x00\x00\x02\x00\x00\x00\x00\xff\xff\xff\x21" + "\x05\x01\x00\x10\x00\x20"))
	f.Add([]byte(hello + "\x06\x00\x00\x00\x00\x00\x03abc" + "\xff\x00\x00\x01\x00\x00\x00\x00\x00\x41" + "\xff\x01\x00\x02\x01\x02\x00\x00\xac\x44"))
	f.Add([]byte(hello + "\xf8\x00\x00\x00\x00\x00\x00\x00\x02hi" + "\xfb\x00\x00\x00\x00\x00\x01" + string(make([]byte, 16))))
	f.Add([]byte("RFB 003.003\n\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var once bytes.Buffer
		viewOnly(&once, bytes.NewReader(data))
		if once.Len() > len(data) {
			t.Fatalf("%d bytes out of %d in", once.Len(), len(data))
		}
		var twice bytes.Buffer
		viewOnly(&twice, bytes.NewReader(once.Bytes()))
		if !bytes.Equal(once.Bytes(), twice.Bytes()) {
			t.Fatalf("what the filter let through changes when filtered again:\n%q\n%q", once.Bytes(), twice.Bytes())
		}
	})
}
