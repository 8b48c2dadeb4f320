package qemu

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// QEMU's image locking (file-posix): open file description locks on single
// bytes of the image file. A process holding permission bit i takes a
// shared lock on byte 100+i; one that will not share permission i with
// others takes a shared lock on byte 200+i. Each checks the other range
// for conflicts. The permission bits are QEMU's BLK_PERM_*.
const (
	lockPermBase   = 100
	lockSharedBase = 200
	permRead       = 0 // BLK_PERM_CONSISTENT_READ
	permWrite      = 1 // BLK_PERM_WRITE
)

// ErrWriter reports an image that another process holds for writing.
var ErrWriter = errors.New("image is open for writing by another process")

// LockRead takes QEMU's locks on an open image for a consistent read that
// shares no write: no QEMU can open the image for writing while f stays
// open, and LockRead fails (ErrWriter) when one already has. Closing f
// releases the locks.
func LockRead(f *os.File) error {
	for _, b := range []int64{lockPermBase + permRead, lockSharedBase + permWrite} {
		if err := ofdLock(f, unix.F_RDLCK, b); err != nil {
			return fmt.Errorf("lock %s: %w", f.Name(), err)
		}
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: lockPermBase + permWrite, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	if lk.Type != unix.F_UNLCK {
		return fmt.Errorf("%s: %w (a QEMU runs on it)", f.Name(), ErrWriter)
	}
	return nil
}

func ofdLock(f *os.File, typ int16, b int64) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: b, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return ErrWriter
		}
		return err
	}
	return nil
}

// Held reports whether any process holds QEMU's image locks on the file
// f is open on: a QEMU, or a qemu-img or qemu-io, has the image open.
func Held(f *os.File) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: lockPermBase, Len: 2 * (lockSharedBase - lockPermBase)}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return lk.Type != unix.F_UNLCK, nil
}
