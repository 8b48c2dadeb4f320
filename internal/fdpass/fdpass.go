// Package fdpass carries file descriptors between the broker and the
// runner: one message per SOCK_SEQPACKET record, descriptors attached with
// SCM_RIGHTS, and the broker's versioned, size-bounded wire format.
//
// A receiver takes descriptors with MSG_CMSG_CLOEXEC, accepts exactly the
// number it expects, detects truncated messages and truncated control data,
// and closes every descriptor it received whenever it returns an error, so
// that a hostile peer cannot make it leak or keep descriptors.
package fdpass

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// Limits of one message.
const (
	MaxMessage = 4096 // bytes of payload
	MaxFDs     = 4    // descriptors
)

// Errors a receiver reports. Every one of them means the descriptors that
// came with the message, if any, have been closed.
var (
	ErrTooLarge    = errors.New("fdpass: message larger than the limit")
	ErrCtrunc      = errors.New("fdpass: control data truncated (more descriptors than allowed)")
	ErrUnexpected  = errors.New("fdpass: unexpected number of descriptors")
	ErrBadControl  = errors.New("fdpass: malformed control message")
	ErrNotUnixConn = errors.New("fdpass: not a unix socket")
)

// Send writes msg as one record with files attached. The caller keeps its
// own copies of the descriptors and closes them when it wants.
func Send(c *net.UnixConn, msg []byte, files ...*os.File) error {
	if len(msg) > MaxMessage {
		return ErrTooLarge
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("fdpass: send: %w", err)
	}
	if n != len(msg) || oobn != len(oob) {
		return fmt.Errorf("fdpass: send: short write (%d of %d bytes, %d of %d control)", n, len(msg), oobn, len(oob))
	}
	return nil
}

// AnyFDs tells Recv to accept any number of descriptors up to MaxFDs, for
// a receiver that learns the count from the message itself and checks it.
const AnyFDs = -1

// Recv reads one record and exactly want descriptors (or, with AnyFDs, up
// to MaxFDs). It honours the connection's read deadline. A peer that
// closed returns io.EOF.
func Recv(c *net.UnixConn, want int) ([]byte, []*os.File, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("fdpass: %w", err)
	}
	buf := make([]byte, MaxMessage)
	oob := make([]byte, unix.CmsgSpace(MaxFDs*4))
	var n, oobn, flags int
	var rerr error
	err = raw.Read(func(fd uintptr) bool {
		n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC)
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return nil, nil, fmt.Errorf("fdpass: receive: %w", err)
	}
	fds, perr := parseRights(oob[:oobn])
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), fmt.Sprintf("fdpass-%d", i))
	}
	fail := func(e error) ([]byte, []*os.File, error) {
		Close(files)
		return nil, nil, e
	}
	switch {
	case perr != nil:
		return fail(perr)
	case flags&unix.MSG_CTRUNC != 0:
		return fail(ErrCtrunc)
	case flags&unix.MSG_TRUNC != 0:
		return fail(ErrTooLarge)
	case n == 0 && len(files) == 0:
		return nil, nil, io.EOF
	case want != AnyFDs && len(files) != want:
		return fail(fmt.Errorf("%w: got %d, want %d", ErrUnexpected, len(files), want))
	}
	return buf[:n], files, nil
}

// parseRights returns every descriptor in the control data. On a malformed
// message it still returns the descriptors it could find, for closing.
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadControl, err)
	}
	var fds []int
	var bad error
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			bad = fmt.Errorf("%w: level %d type %d", ErrBadControl, m.Header.Level, m.Header.Type)
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			bad = fmt.Errorf("%w: %v", ErrBadControl, err)
			continue
		}
		fds = append(fds, got...)
	}
	return fds, bad
}

// Close closes every file, ignoring nils.
func Close(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// PeerCred is the identity of the process at the other end of a unix
// socket, as the kernel recorded it when the connection was made.
type PeerCred struct {
	PID, UID, GID int
}

// Peer reads SO_PEERCRED.
func Peer(c *net.UnixConn) (PeerCred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return PeerCred{}, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return PeerCred{}, err
	}
	if cerr != nil {
		return PeerCred{}, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return PeerCred{PID: int(cred.Pid), UID: int(cred.Uid), GID: int(cred.Gid)}, nil
}
