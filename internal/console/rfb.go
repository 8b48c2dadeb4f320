package console

import (
	"encoding/binary"
	"fmt"
	"io"
)

// viewOnly copies a VNC client's stream to the display, keeping the
// handshake and the messages that only ask to see (pixel format,
// encodings, update requests, fences) and dropping every one that would
// act on the guest: keys, the pointer, the clipboard, a desktop resize and
// QEMU's extended key events. A message it does not know ends the copy:
// without knowing its length, nothing after it could be told apart.
func viewOnly(dst io.Writer, src io.Reader) error {
	read := func(n int) ([]byte, error) {
		b := make([]byte, n)
		_, err := io.ReadFull(src, b)
		return b, err
	}
	pass := func(b []byte) error { _, err := dst.Write(b); return err }

	// ProtocolVersion; then, from 3.7 on, the security type the client
	// chose (QEMU's unix socket offers None), passed on at once: a client
	// waits for the server's answer to it before it sends ClientInit. Then
	// ClientInit, whose shared flag is set: a viewer never asks for the
	// screen alone, which would disconnect every other client.
	v, err := read(12)
	if err != nil {
		return err
	}
	if err := pass(v); err != nil {
		return err
	}
	if string(v[8:11]) >= "007" {
		sec, err := read(1)
		if err != nil {
			return err
		}
		if err := pass(sec); err != nil {
			return err
		}
	}
	if _, err := read(1); err != nil {
		return err
	}
	if err := pass([]byte{1}); err != nil {
		return err
	}
	for {
		t, err := read(1)
		if err != nil {
			return err
		}
		msg := t[0]
		var size int // the whole message, type byte included
		drop := false
		switch msg {
		case 0: // SetPixelFormat
			size = 20
		case 2: // SetEncodings
			h, err := read(3)
			if err != nil {
				return err
			}
			rest, err := read(4 * int(binary.BigEndian.Uint16(h[1:])))
			if err != nil {
				return err
			}
			if err := pass(append(append([]byte{msg}, h...), rest...)); err != nil {
				return err
			}
			continue
		case 3, 150: // FramebufferUpdateRequest, EnableContinuousUpdates
			size = 10
		case 4: // KeyEvent
			size, drop = 8, true
		case 5: // PointerEvent
			size, drop = 6, true
		case 6: // ClientCutText
			h, err := read(7)
			if err != nil {
				return err
			}
			if _, err := io.CopyN(io.Discard, src, int64(binary.BigEndian.Uint32(h[3:]))); err != nil {
				return err
			}
			continue
		case 248: // ClientFence
			h, err := read(8)
			if err != nil {
				return err
			}
			payload, err := read(int(h[7]))
			if err != nil {
				return err
			}
			if err := pass(append(append([]byte{msg}, h...), payload...)); err != nil {
				return err
			}
			continue
		case 251: // SetDesktopSize
			h, err := read(7)
			if err != nil {
				return err
			}
			if _, err := io.CopyN(io.Discard, src, 16*int64(h[5])); err != nil {
				return err
			}
			continue
		case 255: // QEMU's messages
			sub, err := read(1)
			if err != nil {
				return err
			}
			switch sub[0] {
			case 0: // extended key event
				_, err := read(10)
				if err != nil {
					return err
				}
				continue
			case 1: // audio
				op, err := read(2)
				if err != nil {
					return err
				}
				m := append([]byte{255, 1}, op...)
				if binary.BigEndian.Uint16(op) == 2 { // set format
					f, err := read(6)
					if err != nil {
						return err
					}
					m = append(m, f...)
				}
				if err := pass(m); err != nil {
					return err
				}
				continue
			default:
				return fmt.Errorf("view-only console: unknown QEMU client message %d", sub[0])
			}
		default:
			return fmt.Errorf("view-only console: unknown client message %d", msg)
		}
		body, err := read(size - 1)
		if err != nil {
			return err
		}
		if drop {
			continue
		}
		if err := pass(append([]byte{msg}, body...)); err != nil {
			return err
		}
	}
}
