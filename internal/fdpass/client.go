package fdpass

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// Lease is a granted request: the descriptors, and the connection whose
// lifetime is the lease. Closing it tells the broker to remove what it
// created (the TAP).
type Lease struct {
	conn     *net.UnixConn
	Response Response
	// Attempts is how many times the request was sent before this grant
	// (its sender's count: 1 when the broker answered the first).
	Attempts int
	files    map[string]*os.File
	once     sync.Once
	ended    chan struct{}
	replies  chan []byte // the broker's answers to LeaseRequests
	ask      sync.Mutex  // one question at a time
}

// Take hands over one granted descriptor; the caller closes it. It is nil
// when that descriptor was not granted.
func (l *Lease) Take(name string) *os.File {
	f := l.files[name]
	delete(l.files, name)
	return f
}

// Ended returns a channel that is closed when the broker's end of the lease
// goes away (the broker stopped or restarted). Descriptors already taken
// keep working; only the broker's bookkeeping of the lease is lost.
func (l *Lease) Ended() <-chan struct{} {
	l.read()
	return l.ended
}

// read starts the lease's one reader: the broker's answers go to replies
// (one waits; an unasked one is dropped), its end closes ended.
func (l *Lease) read() {
	l.once.Do(func() {
		l.ended = make(chan struct{})
		l.replies = make(chan []byte, 1)
		go func() {
			defer close(l.ended)
			for {
				msg, _, err := Recv(l.conn, 0)
				switch {
				case err == nil:
					select {
					case l.replies <- msg:
					default:
					}
				case errors.Is(err, ErrUnexpected), errors.Is(err, ErrCtrunc), errors.Is(err, ErrTooLarge):
				default:
					return
				}
			}
		}()
	})
}

// Held says whether the broker's end of the lease is still there.
func (l *Lease) Held() bool {
	select {
	case <-l.Ended():
		return false
	default:
		return true
	}
}

// ErrLeaseEnded is Stats' error once the broker's end of the lease is gone.
var ErrLeaseEnded = errors.New("the broker's end of the lease is gone")

// Stats asks the broker for the counters of the TAP this lease made. A
// broker that predates the question never answers: ctx bounds the wait.
func (l *Lease) Stats(ctx context.Context) (*TAPStats, error) {
	l.read()
	l.ask.Lock()
	defer l.ask.Unlock()
	select {
	case <-l.replies: // an answer that came after its question gave up
	default:
	}
	b, err := Encode(LeaseRequest{Version: Version, Stats: true})
	if err != nil {
		return nil, err
	}
	if err := Send(l.conn, b); err != nil {
		return nil, err
	}
	select {
	case <-ctx.Done():
		return nil, fmt.Errorf("broker stats: %w", ctx.Err())
	case <-l.ended:
		return nil, ErrLeaseEnded
	case msg := <-l.replies:
		var r LeaseReply
		if err := json.Unmarshal(msg, &r); err != nil {
			return nil, fmt.Errorf("broker stats: %w", err)
		}
		if r.Error != "" || r.TAP == nil {
			return nil, fmt.Errorf("broker stats: %s", cmp.Or(r.Error, "no counters in the reply"))
		}
		return r.TAP, nil
	}
}

// Close ends the lease and closes every descriptor not taken.
func (l *Lease) Close() error {
	for _, f := range l.files {
		f.Close()
	}
	l.files = nil
	return l.conn.Close()
}

// RefusedError is the broker's refusal, with its reason.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "broker refused: " + e.Reason }

// Ask connects to the broker's socket, sends req and returns the grant.
// The whole exchange is bounded by ctx.
func Ask(ctx context.Context, socket string, req Request) (*Lease, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", socket)
	if err != nil {
		return nil, fmt.Errorf("broker %s: %w", socket, err)
	}
	conn := c.(*net.UnixConn)
	lease, err := ask(ctx, conn, req)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return lease, nil
}

func ask(ctx context.Context, conn *net.UnixConn, req Request) (*Lease, error) {
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req.Version = Version
	b, err := Encode(req)
	if err != nil {
		return nil, err
	}
	if err := Send(conn, b); err != nil {
		return nil, err
	}
	msg, files, err := Recv(conn, AnyFDs)
	if err != nil {
		return nil, fmt.Errorf("broker reply: %w", err)
	}
	var resp Response
	if err := json.Unmarshal(msg, &resp); err != nil {
		Close(files)
		return nil, fmt.Errorf("broker reply: %w", err)
	}
	if !resp.OK {
		Close(files)
		return nil, &RefusedError{Reason: resp.Error}
	}
	if len(files) != len(resp.FDs) {
		Close(files)
		return nil, fmt.Errorf("broker reply: %w: %d attached, %d named", ErrUnexpected, len(files), len(resp.FDs))
	}
	l := &Lease{conn: conn, Response: resp, files: map[string]*os.File{}}
	for i, name := range resp.FDs {
		if _, dup := l.files[name]; dup {
			Close(files)
			return nil, errors.New("broker reply: descriptor named twice: " + name)
		}
		l.files[name] = files[i]
	}
	conn.SetDeadline(time.Time{})
	return l, nil
}
