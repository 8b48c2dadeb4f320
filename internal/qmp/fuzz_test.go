package qmp

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzReadMessage feeds arbitrary server bytes to the decoder: no panic, no
// message past the size bound, and the reader always makes progress.
func FuzzReadMessage(f *testing.F) {
	f.Add([]byte(`{"QMP": {"version": {"qemu": {"micro": 13, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}` + "\r\n"))
	f.Add([]byte(`{"return": {"enabled": true, "present": true}, "id": "1"}` + "\n" + `{"event": "SHUTDOWN", "data": {"guest": true}, "timestamp": {"seconds": 1, "microseconds": 2}}` + "\n"))
	f.Add([]byte(`{"error": {"class": "GenericError", "desc": "x"}, "id": 7}` + "\n"))
	f.Add([]byte(`{"return": {"enab`))
	f.Add([]byte("\n\n\r\n{}\n[1,2]\n\"s\"\nnull\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bufio.NewReaderSize(bytes.NewReader(data), 64)
		for i := 0; i <= len(data); i++ {
			m, err := readMessage(r)
			if err != nil {
				return
			}
			if m.Event != "" {
				dispatchEventTo(m)
			}
		}
		t.Fatalf("decoder made no progress on %d bytes", len(data))
	})
}

// dispatchEventTo runs the event path on a client with no reader.
func dispatchEventTo(m message) {
	c := &Client{events: make(chan Event, 1)}
	c.dispatchEvent(m)
	c.dispatchEvent(m) // a full channel drops, never blocks
}
