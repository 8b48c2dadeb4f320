// Package qmp is a client for the QEMU Machine Protocol over a stream
// socket. It negotiates capabilities, tags every command with an id so that
// replies and asynchronous events may interleave freely, honours contexts on
// every call, bounds the size of one message (QEMU's replies can exceed the
// 64 KiB that line scanners assume, so the bound is explicit and generous),
// and turns QMP error replies into *Error.
package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"time"
)

// MaxMessage bounds one QMP message. Large replies (query-qmp-schema is
// about 200 KiB, block graphs grow with disks) fit; a peer that never ends
// a line does not make the client grow without bound.
const MaxMessage = 16 << 20

// ErrClosed is returned for commands issued on, or pending when, the
// connection ends. The error wraps the cause when there is one.
var ErrClosed = errors.New("qmp: connection closed")

// ErrTooLarge reports a message longer than MaxMessage.
var ErrTooLarge = errors.New("qmp: message exceeds size limit")

// Error is an error reply from QEMU.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Event is an asynchronous QMP event.
type Event struct {
	Name      string
	Data      json.RawMessage
	Timestamp time.Time
}

// Version is QEMU's version from the greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// Client is one QMP session. It is safe for concurrent use.
type Client struct {
	conn    net.Conn
	version Version
	events  chan Event // nil until Subscribe
	dropped uint64
	closed  bool

	writeMu sync.Mutex
	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan reply
	err     error // why the read loop ended
	done    chan struct{}
}

type reply struct {
	ret json.RawMessage
	err *Error
}

// message is any QMP message from the server.
type message struct {
	QMP *struct {
		Version struct {
			QEMU    struct{ Major, Minor, Micro int } `json:"qemu"`
			Package string                            `json:"package"`
		} `json:"version"`
	} `json:"QMP"`
	ID     json.RawMessage `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// Dial connects to a QMP unix socket and negotiates the session.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial: %w", err)
	}
	c, err := New(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// New runs the handshake on conn (greeting, qmp_capabilities) and starts
// reading. The client owns conn from here on.
func New(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{
		conn:    conn,
		pending: map[string]chan reply{},
		done:    make(chan struct{}),
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	stop := deadlineFrom(ctx, conn.SetDeadline)
	greeting, err := readMessage(r)
	if err == nil && greeting.QMP == nil {
		err = fmt.Errorf("first message is not a QMP greeting")
	}
	if err != nil {
		stop()
		return nil, fmt.Errorf("qmp: greeting: %w", ctxErr(ctx, err))
	}
	v := greeting.QMP.Version
	c.version = Version{v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro, v.Package}
	if err := c.write(map[string]any{"execute": "qmp_capabilities", "id": "caps"}); err != nil {
		stop()
		return nil, fmt.Errorf("qmp: qmp_capabilities: %w", ctxErr(ctx, err))
	}
	for {
		m, err := readMessage(r)
		if err != nil {
			stop()
			return nil, fmt.Errorf("qmp: qmp_capabilities: %w", ctxErr(ctx, err))
		}
		if m.Error != nil {
			stop()
			return nil, &Error{Command: "qmp_capabilities", Class: m.Error.Class, Desc: m.Error.Desc}
		}
		if m.Return != nil {
			break
		}
		c.dispatchEvent(m)
	}
	stop()
	go c.readLoop(r)
	return c, nil
}

// Version is QEMU's version as the greeting told it.
func (c *Client) Version() Version { return c.version }

// EventQueue is how many events wait for a subscriber that has not read
// them; one more is dropped, and counted (Dropped), rather than stall the
// replies behind it.
const EventQueue = 256

// Subscribe returns the channel every asynchronous event goes to from now
// on, in order; the session has one (a second call returns it again). It
// is closed when the connection ends. Before anyone subscribes, events
// are not kept: a session that only asks questions (a health check) never
// holds them.
func (c *Client) Subscribe() <-chan Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.events == nil {
		c.events = make(chan Event, EventQueue)
		if c.closed {
			close(c.events)
		}
	}
	return c.events
}

// Dropped is how many events found the subscriber's queue full.
func (c *Client) Dropped() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dropped
}

// Done is closed when the connection has ended; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is the reason the connection ended, nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the session.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Execute runs one command. args may be nil; out, if not nil, receives the
// reply's "return" value. QEMU's error replies come back as *Error.
func (c *Client) Execute(ctx context.Context, cmd string, args, out any) error {
	return c.execute(ctx, cmd, args, out, nil)
}

// execute is Execute with control data (descriptors) sent with the command.
func (c *Client) execute(ctx context.Context, cmd string, args, out any, oob []byte) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	c.nextID++
	id := strconv.FormatUint(c.nextID, 10)
	ch := make(chan reply, 1)
	c.pending[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()

	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	if err := c.writeCtx(ctx, req, oob); err != nil {
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			r.err.Command = cmd
			return r.err
		}
		if out != nil && len(r.ret) > 0 {
			if err := json.Unmarshal(r.ret, out); err != nil {
				return fmt.Errorf("qmp: %s: decode reply: %w", cmd, err)
			}
		}
		return nil
	case <-c.done:
		return fmt.Errorf("qmp: %s: %w", cmd, c.Err())
	case <-ctx.Done():
		return fmt.Errorf("qmp: %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) writeCtx(ctx context.Context, v any, oob []byte) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	// Only the write deadline: the read loop must not time out because one
	// caller was in a hurry.
	stop := deadlineFrom(ctx, c.conn.SetWriteDeadline)
	defer stop()
	if oob == nil {
		return ctxErr(ctx, c.writeLocked(v))
	}
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return errNoUnix
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	// QEMU takes the descriptors with the bytes they came with: the
	// command and its descriptors go in one message.
	n, _, err := uc.WriteMsgUnix(append(b, '\n'), oob, nil)
	if err == nil && n != len(b)+1 {
		err = fmt.Errorf("short write: %d of %d bytes", n, len(b)+1)
	}
	return ctxErr(ctx, err)
}

func (c *Client) write(v any) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	return c.writeLocked(v)
}

func (c *Client) writeLocked(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = c.conn.Write(append(b, '\n'))
	return err
}

func (c *Client) readLoop(r *bufio.Reader) {
	var err error
	for {
		var m message
		m, err = readMessage(r)
		if err != nil {
			break
		}
		switch {
		case m.Event != "":
			c.dispatchEvent(m)
		case m.Return != nil || m.Error != nil:
			c.dispatchReply(m)
		}
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		err = ErrClosed
	} else {
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	c.mu.Lock()
	c.err = err
	c.closed = true
	if c.events != nil {
		close(c.events)
	}
	c.mu.Unlock()
	c.conn.Close()
	close(c.done)
}

func (c *Client) dispatchReply(m message) {
	var id string
	if json.Unmarshal(m.ID, &id) != nil {
		return // not one of ours: every command we send has a string id
	}
	c.mu.Lock()
	ch := c.pending[id]
	c.mu.Unlock()
	if ch == nil {
		return
	}
	r := reply{ret: m.Return}
	if m.Error != nil {
		r.err = &Error{Class: m.Error.Class, Desc: m.Error.Desc}
	}
	ch <- r
}

func (c *Client) dispatchEvent(m message) {
	if m.Event == "" {
		return
	}
	ev := Event{Name: m.Event, Data: m.Data}
	if m.Timestamp != nil {
		ev.Timestamp = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
	}
	c.mu.Lock() // Subscribe and the close take it: never a send on a closed channel
	defer c.mu.Unlock()
	if c.events == nil {
		return
	}
	select {
	case c.events <- ev:
	default:
		c.dropped++
	}
}

// readMessage reads one newline-terminated JSON message of at most
// MaxMessage bytes. A stream that ends inside a message is
// io.ErrUnexpectedEOF, not a clean end.
func readMessage(r *bufio.Reader) (message, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(buf)+len(chunk) > MaxMessage {
			return message{}, ErrTooLarge
		}
		buf = append(buf, chunk...)
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			if err == io.EOF && len(bytes.TrimSpace(buf)) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return message{}, err
		}
		if len(bytes.TrimSpace(buf)) == 0 {
			buf = buf[:0]
			continue
		}
		var m message
		if err := json.Unmarshal(buf, &m); err != nil {
			return message{}, fmt.Errorf("malformed message: %w", err)
		}
		return m, nil
	}
}

// deadlineFrom makes I/O honour ctx, its deadline and its cancellation,
// through a connection's deadline setter. The returned func undoes both.
func deadlineFrom(ctx context.Context, set func(time.Time) error) func() {
	if d, ok := ctx.Deadline(); ok {
		set(d)
	}
	stop := context.AfterFunc(ctx, func() { set(time.Unix(1, 0)) })
	return func() {
		stop()
		set(time.Time{})
	}
}

// ctxErr prefers the context's error to the timeout it caused. The
// connection's deadline can fire a moment before the context's own timer,
// so a timeout at or past the context's deadline counts as the context's.
func ctxErr(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("%w (%v)", cerr, err)
	}
	if d, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(d) {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
}
