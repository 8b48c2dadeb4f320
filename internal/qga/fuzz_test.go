package qga

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzReply feeds arbitrary agent bytes to the decoder as a sync and a
// call read them: no panic, no reply past the size bound, progress on
// every step.
func FuzzReply(f *testing.F) {
	f.Add([]byte("\xff{\"return\": 42}\n{\"return\": {\"id\": \"debian\", \"pretty-name\": \"Debian\"}}\n"))
	f.Add([]byte("{\"return\": {}}\n\x00\x01\xff\xff{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\n"))
	f.Add([]byte("\xff{\"return\": [{\"name\": \"eth0\", \"ip-addresses\": [{\"ip-address-type\": \"ipv4\", \"ip-address\": \"10.0.2.15\", \"prefix\": 24}]}]}\n"))
	f.Add([]byte("\xff{\"ret"))
	f.Add([]byte("\n\n\xff\n[1]\nnull\n\"s\"\n{}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bufio.NewReaderSize(bytes.NewReader(data), 64)
		if skipToDelimiter(r) != nil {
			return
		}
		for i := 0; i <= len(data); i++ {
			line, err := readReply(r)
			if err != nil {
				return
			}
			if len(line) > MaxReply || len(line) == 0 {
				t.Fatalf("reply of %d bytes", len(line))
			}
			var id int64
			decode(line, "guest-sync-delimited", &id)
			var ifs []Interface
			if decode(line, "guest-network-get-interfaces", &ifs) == nil {
				Addresses(ifs, 4)
			}
			var o OSInfo
			if decode(line, "guest-get-osinfo", &o) == nil {
				_ = o.String()
			}
		}
		t.Fatalf("decoder made no progress on %d bytes", len(data))
	})
}
