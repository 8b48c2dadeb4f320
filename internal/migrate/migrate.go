// Package migrate carries a live migration of a VM from one node to
// another. Two Swarm jobs, one on each node and as the VM's uid, join the
// two runners: on the VM's node, Send hands the running runner one end of
// a socket pair (control op migrate, as a hand-off on one node does) and
// relays what its QEMU writes there to the receiving job, over the mutual
// TLS connection `move` uses (a key pair made for this migration only); on
// the target node, Receive hands the waiting runner (started by the
// service update with the VM's ticket for this node) one end of its own
// pair (op migrate-in) and writes what arrives into the other. Neither
// QEMU listens on a port, and neither runner leaves its node.
//
// On the wire, the stream is framed: data frames, then one end frame with
// the sending runner's answer (QEMU's figures, or why the migration
// failed): the target starts the guest only once the source says its
// QEMU has let go of the disk.
package migrate

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

// Ticket says that the VM's next task on Node takes a running guest over
// from another node until Until: its runner starts QEMU waiting for it
// instead of booting the VM. It is the file images/NAME.migrate (shared
// storage: every node sees it), written before the service update that
// starts the task, so that the task cannot start without it.
type Ticket struct {
	ID    string    `json:"id"`
	Node  string    `json:"node"`
	Until time.Time `json:"until"`
}

// TicketPath is the VM's ticket file.
func TicketPath(storage, vm string) string {
	return filepath.Join(storage, "images", vm+".migrate")
}

// InPath is the socket the waiting runner takes the stream on.
func InPath(storage, vm string) string {
	return filepath.Join(storage, "images", vm+".in.ctl")
}

// WriteTicket writes the VM's ticket, replacing an earlier one.
func WriteTicket(cfg config.Config, t Ticket) error {
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	path := TicketPath(cfg.StorageDir, cfg.Name)
	tmp := path + ".tmp"
	os.Remove(tmp)
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("the migration's ticket: %w", err)
	}
	return os.Rename(tmp, path)
}

// ReadTicket reads the VM's ticket for node, if there is one that holds
// now; ok is false otherwise.
func ReadTicket(storage, vm, node string, now time.Time) (Ticket, bool) {
	b, err := os.ReadFile(TicketPath(storage, vm))
	if err != nil {
		return Ticket{}, false
	}
	var t Ticket
	if json.Unmarshal(b, &t) != nil || t.Node == "" || t.Node != node || !now.Before(t.Until) || !control.ValidID(t.ID) {
		return Ticket{}, false
	}
	return t, true
}

// Frames.
const (
	frameData = 'D'
	frameEnd  = 'E'
	chunk     = 256 << 10
	maxEnd    = 64 << 10
	// say is how often the sender prints its progress.
	say = 5 * time.Second
)

func writeFrame(w io.Writer, kind byte, p []byte) error {
	var h [5]byte
	h[0] = kind
	binary.BigEndian.PutUint32(h[1:], uint32(len(p)))
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	_, err := w.Write(p)
	return err
}

// Send runs on the VM's node: it asks the running runner to migrate into a
// socket it relays to the receiver at peer, and ends with the runner's
// answer, which it also sends on.
func Send(ctx context.Context, cfg config.Config, peer, keyFile, id string, until time.Time, log io.Writer) error {
	conn, err := vmdisk.Dial(ctx, peer, keyFile, log)
	if err != nil {
		return fmt.Errorf("the receiving node: %w", err)
	}
	defer conn.Close()
	in, out, err := pair()
	if err != nil {
		return err
	}
	defer in.Close()
	answer := make(chan error, 1)
	var reply control.Reply
	go func() {
		r, err := control.Ask(ctx, control.Path(cfg.StorageDir, cfg.Name), control.Request{Op: control.OpMigrate, ID: id, Files: []string{control.FileMigration}, Until: until}, out)
		out.Close() // the stream ends once QEMU's copy is closed too
		reply = r
		answer <- err
	}()
	w := bufio.NewWriterSize(conn, chunk+5)
	began, said, sent := time.Now(), time.Now(), int64(0)
	buf := make([]byte, chunk)
	var relayErr error
	for {
		n, err := in.Read(buf)
		if n > 0 {
			if werr := writeFrame(w, frameData, buf[:n]); werr != nil {
				relayErr = fmt.Errorf("to the receiving node: %w", werr)
				break
			}
			sent += int64(n)
		}
		if err != nil {
			if err != io.EOF {
				relayErr = fmt.Errorf("from QEMU: %w", err)
			}
			break
		}
		if time.Since(said) >= say {
			said = time.Now()
			fmt.Fprintf(log, "sent %d MiB in %s (%.0f MiB/s)\n", sent>>20, time.Since(began).Round(time.Second), float64(sent)/(1<<20)/time.Since(began).Seconds())
		}
	}
	if relayErr != nil {
		in.Close() // QEMU's writes fail: the migration fails, the guest runs on here
	}
	err = <-answer
	end := endFrame{OK: err == nil && relayErr == nil, Reply: reply}
	switch {
	case relayErr != nil:
		end.Error = relayErr.Error()
	case err != nil:
		end.Error = err.Error()
	}
	if relayErr == nil {
		b, _ := json.Marshal(end)
		if werr := writeFrame(w, frameEnd, b); werr == nil {
			relayErr = w.Flush()
		} else {
			relayErr = werr
		}
	}
	if !end.OK {
		return fmt.Errorf("the migration failed; the VM runs on here: %s", end.Error)
	}
	if relayErr != nil {
		// The guest left this node; the target may not have heard that its
		// QEMU let go of the disk.
		return fmt.Errorf("the guest was sent, but the end could not be told to the receiving node: %w", relayErr)
	}
	fmt.Fprintf(log, "sent: %d MiB in %s; QEMU's figures: downtime %d ms, migration %d ms\n", sent>>20, time.Since(began).Round(time.Millisecond), reply.Downtime.Milliseconds(), reply.TotalTime.Milliseconds())
	return nil
}

// endFrame is the sender's last word.
type endFrame struct {
	OK    bool          `json:"ok"`
	Error string        `json:"error,omitempty"`
	Reply control.Reply `json:"reply"`
}

// Receive runs on the target node: it takes the sender's connection on
// listen, hands the runner waiting there (its socket, InPath) one end of a
// socket pair, and writes the stream into the other; the sender's end
// frame goes to the runner as op migrate-done.
func Receive(ctx context.Context, cfg config.Config, listen, keyFile, id string, until time.Time, log io.Writer) error {
	defer os.Remove(TicketPath(cfg.StorageDir, cfg.Name))
	ctx, cancel := context.WithDeadline(ctx, until.Add(time.Minute))
	defer cancel()
	conn, err := vmdisk.Accept(ctx, listen, keyFile, log)
	if err != nil {
		return err
	}
	defer conn.Close()
	socket := InPath(cfg.StorageDir, cfg.Name)
	for !control.Answers(socket) {
		if time.Now().After(until) || ctx.Err() != nil {
			return fmt.Errorf("no runner of the VM waits on this node for its guest (%s)", socket)
		}
		time.Sleep(250 * time.Millisecond)
	}
	in, out, err := pair()
	if err != nil {
		return err
	}
	defer out.Close()
	_, err = control.Ask(ctx, socket, control.Request{Op: control.OpMigrateIn, ID: id, Files: []string{control.FileMigration}}, in)
	in.Close()
	if err != nil {
		return fmt.Errorf("the waiting runner: %w", err)
	}
	fmt.Fprintln(log, "receiving the guest")
	r := bufio.NewReaderSize(conn, chunk+5)
	var end endFrame
	for {
		var h [5]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return fmt.Errorf("the stream from the VM's node ended early: %w", err)
		}
		n := binary.BigEndian.Uint32(h[1:])
		if h[0] == frameData && n <= chunk {
			if _, err := io.CopyN(out, r, int64(n)); err != nil {
				return fmt.Errorf("to QEMU: %w", err)
			}
			continue
		}
		if h[0] != frameEnd || n > maxEnd {
			return fmt.Errorf("the stream from the VM's node is malformed (frame %q, %d bytes)", h[0], n)
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return fmt.Errorf("the stream's end: %w", err)
		}
		if err := json.Unmarshal(b, &end); err != nil {
			return fmt.Errorf("the stream's end: %w", err)
		}
		break
	}
	unix.Shutdown(int(out.Fd()), unix.SHUT_WR)
	done := control.Request{Op: control.OpMigrateDone, ID: id, Sent: &control.Sent{OK: end.OK, Error: end.Error, Downtime: end.Reply.Downtime, TotalTime: end.Reply.TotalTime, Transferred: end.Reply.Transferred}}
	if _, err := control.Ask(ctx, socket, done); err != nil {
		return fmt.Errorf("telling the waiting runner how the migration ended: %w", err)
	}
	if !end.OK {
		return fmt.Errorf("the migration failed on the VM's node; it runs on there: %s", end.Error)
	}
	fmt.Fprintf(log, "received: QEMU's figures: downtime %d ms, migration %d ms, %d MiB\n", end.Reply.Downtime.Milliseconds(), end.Reply.TotalTime.Milliseconds(), end.Reply.Transferred>>20)
	return nil
}

// pair is a connected stream socket pair: the end this process keeps,
// and the one it hands over.
func pair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socket pair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "migration"), os.NewFile(uintptr(fds[1]), "migration-qemu"), nil
}
