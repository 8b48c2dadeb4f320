package console

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// A view-only client's stream reaches the display without a single key,
// pointer, clipboard, resize or QEMU key event, and with every message that
// only asks to see, byte for byte.
func TestViewOnlyFilter(t *testing.T) {
	var in, want bytes.Buffer
	both := func(b ...byte) { in.Write(b); want.Write(b) }
	both([]byte("RFB 003.008\n")...)
	both(1, 1)                                                          // security None, ClientInit shared
	both(append([]byte{0, 0, 0, 0}, bytes.Repeat([]byte{7}, 16)...)...) // SetPixelFormat
	enc := []byte{2, 0, 0, 3}
	for _, e := range []int32{0, -223, -258} {
		enc = binary.BigEndian.AppendUint32(enc, uint32(e))
	}
	both(enc...)                                // SetEncodings, 3 of them
	in.Write([]byte{4, 1, 0, 0, 0, 0, 0, 0x41}) // KeyEvent: dropped
	both(3, 0, 0, 0, 0, 0, 4, 0, 3, 0)          // FramebufferUpdateRequest
	in.Write([]byte{5, 1, 0, 10, 0, 20})        // PointerEvent: dropped
	in.Write([]byte{6, 0, 0, 0, 0, 0, 0, 5})    // ClientCutText "rm -r": dropped
	in.WriteString("rm -r")
	in.Write([]byte{255, 0, 0, 1, 0, 0, 0, 0x1e, 0, 0, 0, 0x1e}) // QEMU extended key: dropped
	in.Write([]byte{251, 0, 4, 0, 3, 0, 1, 0})                   // SetDesktopSize with one screen: dropped
	in.Write(bytes.Repeat([]byte{9}, 16))
	both(248, 0, 0, 0, 0, 0, 0, 0, 2, 0xaa, 0xbb) // ClientFence with a payload
	both(255, 1, 0, 2, 1, 2, 0, 0, 0xac, 0x44)    // QEMU audio: set format
	both(150, 1, 0, 0, 0, 0, 4, 0, 3, 0)          // EnableContinuousUpdates

	var got bytes.Buffer
	err := viewOnly(&got, bytes.NewReader(in.Bytes()))
	if err == nil || !strings.Contains(err.Error(), "EOF") {
		t.Errorf("end of stream: %v, want EOF", err)
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Errorf("passed:\n%v\nwant:\n%v", got.Bytes(), want.Bytes())
	}

	// What it cannot measure, it does not pass.
	var none bytes.Buffer
	err = viewOnly(&none, strings.NewReader("RFB 003.008\n\x01\x01\x63rest"))
	if err == nil || !strings.Contains(err.Error(), "unknown client message 99") || bytes.Contains(none.Bytes(), []byte("rest")) {
		t.Errorf("unknown message: %v, passed %q", err, none.Bytes())
	}
}

// A view-only console connects as noVNC does: the client sends its
// security type and waits for the server's answer before it sends
// ClientInit, so the filter passes the type on at once (it read both as
// one before, and a real client never connected); and ClientInit's shared
// flag is set, so a viewer cannot take the screen from the others.
func TestViewOnlyHandshakeAsAClientDoes(t *testing.T) {
	clientSide, filterIn := net.Pipe()
	filterOut, serverSide := net.Pipe()
	defer clientSide.Close()
	defer serverSide.Close()
	go func() { viewOnly(filterOut, filterIn); filterOut.Close() }()
	read := func(c net.Conn, n int) []byte {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, n)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatalf("waited for %d bytes: %v (the filter held them back)", n, err)
		}
		return b
	}
	done := make(chan []byte, 1)
	go func() { // the client, step by step; the server's side is below
		clientSide.Write([]byte("RFB 003.008\n"))
		clientSide.Write([]byte{1}) // security None; now it waits for SecurityResult
		<-done
		clientSide.Write([]byte{0}) // ClientInit asking for the screen alone
	}()
	if v := read(serverSide, 12); string(v) != "RFB 003.008\n" {
		t.Fatalf("version %q", v)
	}
	if sec := read(serverSide, 1); sec[0] != 1 {
		t.Fatalf("security type %d", sec[0])
	}
	done <- nil // SecurityResult OK
	if init := read(serverSide, 1); init[0] != 1 {
		t.Errorf("ClientInit's shared flag reached the display as %d, want 1 (shared)", init[0])
	}
}
