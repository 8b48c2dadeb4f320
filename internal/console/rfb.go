package console

import (
	"encoding/binary"
	"fmt"
	"io"
)

// clientMsg is what the view-only filter knows of one RFB client message:
// the length of its fixed part (type byte included), the length of what
// follows as that part gives it, and whether a viewer may send it.
type clientMsg struct {
	name string
	head int
	tail func(head []byte) int64
	pass bool
}

func u16At(i int, k int64) func([]byte) int64 {
	return func(h []byte) int64 { return k * int64(binary.BigEndian.Uint16(h[i:])) }
}

func u32At(i int) func([]byte) int64 {
	return func(h []byte) int64 { return int64(binary.BigEndian.Uint32(h[i:])) }
}

func u8At(i int, k int64) func([]byte) int64 {
	return func(h []byte) int64 { return k * int64(h[i]) }
}

// clientMsgs are the client messages, by type (RFC 6143 and the
// extensions QEMU's server takes). Only those that ask to see pass: keys,
// the pointer, the clipboard and a desktop resize act on the guest.
var clientMsgs = map[byte]clientMsg{
	0:   {name: "SetPixelFormat", head: 20, pass: true},
	2:   {name: "SetEncodings", head: 4, tail: u16At(2, 4), pass: true},
	3:   {name: "FramebufferUpdateRequest", head: 10, pass: true},
	4:   {name: "KeyEvent", head: 8},
	5:   {name: "PointerEvent", head: 6},
	6:   {name: "ClientCutText", head: 8, tail: u32At(4)},
	150: {name: "EnableContinuousUpdates", head: 10, pass: true},
	248: {name: "ClientFence", head: 9, tail: u8At(8, 1), pass: true},
	251: {name: "SetDesktopSize", head: 8, tail: u8At(6, 16)},
}

// qemuMsgs are QEMU's client messages (type 255), by subtype; head counts
// the type and subtype bytes.
var qemuMsgs = map[byte]clientMsg{
	0: {name: "QEMU extended key event", head: 12},
	1: {name: "QEMU audio", head: 4, pass: true, tail: func(h []byte) int64 {
		if binary.BigEndian.Uint16(h[2:]) == 2 { // set format
			return 6
		}
		return 0
	}},
}

// viewOnly copies a VNC client's stream to the display, keeping the
// handshake and the messages that only ask to see and dropping every one
// that would act on the guest (clientMsgs says which). A message it does
// not know ends the copy: without knowing its length, nothing after it
// could be told apart.
func viewOnly(dst io.Writer, src io.Reader) error {
	if err := viewOnlyHandshake(dst, src); err != nil {
		return err
	}
	for {
		if err := viewOnlyMessage(dst, src); err != nil {
			return err
		}
	}
}

// viewOnlyHandshake passes ProtocolVersion; then, from 3.7 on, the
// security type the client chose (QEMU's unix socket offers None), at
// once: a client waits for the server's answer to it before it sends
// ClientInit. Then ClientInit, whose shared flag is set: a viewer never
// asks for the screen alone, which would disconnect every other client.
func viewOnlyHandshake(dst io.Writer, src io.Reader) error {
	v := make([]byte, 12)
	if _, err := io.ReadFull(src, v); err != nil {
		return err
	}
	if _, err := dst.Write(v); err != nil {
		return err
	}
	if string(v[8:11]) >= "007" {
		if _, err := io.CopyN(dst, src, 1); err != nil {
			return err
		}
	}
	if _, err := io.ReadFull(src, make([]byte, 1)); err != nil {
		return err
	}
	_, err := dst.Write([]byte{1})
	return err
}

// viewOnlyMessage reads one client message and passes or drops it whole.
func viewOnlyMessage(dst io.Writer, src io.Reader) error {
	head := make([]byte, 1, 20)
	if _, err := io.ReadFull(src, head); err != nil {
		return err
	}
	m, known := clientMsgs[head[0]]
	if head[0] == 255 {
		head = head[:2]
		if _, err := io.ReadFull(src, head[1:]); err != nil {
			return err
		}
		if m, known = qemuMsgs[head[1]]; !known {
			return fmt.Errorf("view-only console: unknown QEMU client message %d", head[1])
		}
	} else if !known {
		return fmt.Errorf("view-only console: unknown client message %d", head[0])
	}
	read := len(head)
	head = head[:m.head]
	if _, err := io.ReadFull(src, head[read:]); err != nil {
		return err
	}
	var tail int64
	if m.tail != nil {
		tail = m.tail(head)
	}
	if !m.pass {
		_, err := io.CopyN(io.Discard, src, tail)
		return err
	}
	msg := append(head, make([]byte, tail)...) // at most 256 KiB: SetEncodings
	if _, err := io.ReadFull(src, msg[len(head):]); err != nil {
		return err
	}
	_, err := dst.Write(msg)
	return err
}
