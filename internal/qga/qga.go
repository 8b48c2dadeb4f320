// Package qga is a client for the QEMU guest agent: the program in the
// guest that answers JSON commands on a virtio-serial port, which QEMU
// joins to a unix socket on the host.
//
// Everything the agent says is the guest's, so it is read as hostile
// input: one reply is at most MaxReply bytes, every call is bounded by its
// context (a deadline is required), and a peer that writes garbage, huge
// lines or nothing costs an error and a closed connection, never a hang
// or unbounded memory. The channel has no framing of its own and may hold
// replies meant for an earlier client, so every connection starts with
// guest-sync-delimited: the agent answers with a 0xFF byte before its
// reply, which tells where the fresh replies begin.
package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"time"
)

// MaxReply bounds one reply (a guest with many addresses answers
// guest-network-get-interfaces in a few KiB).
const MaxReply = 1 << 20

// maxSkipped bounds what a sync reads past before the fresh replies: stale
// replies and noise left in the channel.
const maxSkipped = 4 << 20

var (
	// ErrTooLarge reports a reply past MaxReply, or a sync that found no
	// delimiter in maxSkipped bytes.
	ErrTooLarge = errors.New("qga: reply exceeds size limit")
	// ErrNoDeadline reports a call whose context has no deadline.
	ErrNoDeadline = errors.New("qga: a call needs a context with a deadline")
)

// Error is an error reply from the agent.
type Error struct {
	Command, Class, Desc string
}

func (e *Error) Error() string { return fmt.Sprintf("qga: %s: %s: %s", e.Command, e.Class, e.Desc) }

// Client is one connection to an agent, synchronised. It is not safe for
// concurrent use: its owner serialises calls.
type Client struct {
	conn net.Conn
	r    *bufio.Reader
}

// Dial connects to the agent's socket and synchronises within ctx.
func Dial(ctx context.Context, path string) (*Client, error) {
	if _, ok := ctx.Deadline(); !ok {
		return nil, ErrNoDeadline
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	c := New(conn)
	if err := c.Sync(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// New wraps a connection; call Sync before anything else.
func New(conn net.Conn) *Client {
	return &Client{conn: conn, r: bufio.NewReaderSize(conn, 4096)}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Sync makes the agent's next reply the answer to this client's next
// command: it sends a 0xFF byte (which resets the agent's parser) and
// guest-sync-delimited with a random id, skips everything up to the 0xFF
// the agent puts before its answer, and reads replies until the one with
// that id.
func (c *Client) Sync(ctx context.Context) error {
	defer bound(ctx, c.conn)()
	id := rand.Int64N(1 << 52) // exact in JSON's numbers
	cmd, _ := json.Marshal(request{Execute: "guest-sync-delimited", Arguments: map[string]int64{"id": id}})
	if _, err := c.conn.Write(append(append([]byte{0xFF}, cmd...), '\n')); err != nil {
		return ctxErr(ctx, fmt.Errorf("qga: sync: %w", err))
	}
	for {
		if err := skipToDelimiter(c.r); err != nil {
			return ctxErr(ctx, fmt.Errorf("qga: sync: %w", err))
		}
		line, err := readReply(c.r)
		if err != nil {
			return ctxErr(ctx, fmt.Errorf("qga: sync: %w", err))
		}
		var got int64
		if err := decode(line, "guest-sync-delimited", &got); err == nil && got == id {
			return nil
		}
		// an answer to an earlier client's sync: look for the next one
	}
}

// Call runs one command; out, when not nil, receives the reply's "return".
func (c *Client) Call(ctx context.Context, cmd string, args, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		return ErrNoDeadline
	}
	defer bound(ctx, c.conn)()
	b, err := json.Marshal(request{Execute: cmd, Arguments: args})
	if err != nil {
		return err
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return ctxErr(ctx, fmt.Errorf("qga: %s: %w", cmd, err))
	}
	line, err := readReply(c.r)
	if err != nil {
		return ctxErr(ctx, fmt.Errorf("qga: %s: %w", cmd, err))
	}
	return decode(line, cmd, out)
}

// Send writes a command that gets no reply when it succeeds
// (guest-shutdown: the agent goes with its guest).
func (c *Client) Send(ctx context.Context, cmd string, args any) error {
	defer bound(ctx, c.conn)()
	b, err := json.Marshal(request{Execute: cmd, Arguments: args})
	if err != nil {
		return err
	}
	_, err = c.conn.Write(append(b, '\n'))
	return ctxErr(ctx, err)
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

// skipToDelimiter reads past everything up to and including a 0xFF byte.
func skipToDelimiter(r *bufio.Reader) error {
	for skipped := 0; ; {
		chunk, err := r.ReadSlice(0xFF)
		skipped += len(chunk)
		if err == nil {
			return nil
		}
		if err != bufio.ErrBufferFull {
			return err
		}
		if skipped > maxSkipped {
			return ErrTooLarge
		}
	}
}

// readReply reads the next non-blank line, at most MaxReply bytes.
func readReply(r *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(buf)+len(chunk) > MaxReply {
			return nil, ErrTooLarge
		}
		buf = append(buf, chunk...)
		switch {
		case err == bufio.ErrBufferFull:
			continue
		case err == io.EOF && len(bytes.TrimSpace(buf)) > 0:
			return nil, io.ErrUnexpectedEOF
		case err != nil:
			return nil, err
		}
		// 0xFF bytes are the agent's delimiters, never JSON.
		if line := bytes.TrimSpace(bytes.ReplaceAll(buf, []byte{0xFF}, nil)); len(line) > 0 {
			return line, nil
		}
		buf = buf[:0]
	}
}

// decode reads one reply: its "return" into out (when not nil), or its
// "error" as *Error; anything else is malformed.
func decode(line []byte, cmd string, out any) error {
	var m struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return fmt.Errorf("qga: %s: malformed reply: %w", cmd, err)
	}
	switch {
	case m.Error != nil:
		return &Error{Command: cmd, Class: m.Error.Class, Desc: m.Error.Desc}
	case m.Return == nil:
		return fmt.Errorf("qga: %s: reply without return or error", cmd)
	case out == nil:
		return nil
	}
	if err := json.Unmarshal(m.Return, out); err != nil {
		return fmt.Errorf("qga: %s: unexpected reply: %w", cmd, err)
	}
	return nil
}

// bound makes the connection's I/O end at ctx's deadline or cancellation.
func bound(ctx context.Context, conn net.Conn) func() {
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		stop()
		conn.SetDeadline(time.Time{})
	}
}

// ctxErr prefers the context's error to the timeout it caused.
func ctxErr(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	return err
}
