package runner

import (
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
)

// serialLog is the VM's serial console on the storage volume, capped: when
// a write would take it past max bytes, the file becomes <path>.1 (the
// previous .1 is dropped) and a new one starts. At most about 2×max bytes
// are ever kept, whatever the guest prints.
type serialLog struct {
	path string
	max  int64

	mu   sync.Mutex
	f    *os.File
	size int64
}

func openSerial(path string, max int64) (*serialLog, error) {
	s := &serialLog{path: path, max: max}
	if err := s.open(); err != nil {
		return nil, err
	}
	_, err := fmt.Fprintf(s, "---- swarmvm: QEMU starting at %s ----\n", time.Now().UTC().Format(time.RFC3339))
	return s, err
}

// open appends to the log, which must be a regular file of this process's
// own: never a link (another VM could have left one under this name,
// pointing at a file it reads) and never another user's file.
func (s *serialLog) open() error {
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0o600)
	if err != nil {
		return err
	}
	fi, err := f.Stat()
	if err == nil {
		err = ownRegular(s.path, fi)
	}
	if err != nil {
		f.Close()
		return err
	}
	s.f, s.size = f, fi.Size()
	return nil
}

func ownRegular(path string, fi os.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file (%s)", path, fi.Mode().Type())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s belongs to uid %d, not this VM's uid %d: remove it on the node if it is not this VM's log", path, st.Uid, os.Geteuid())
	} else if ok && st.Nlink != 1 {
		return fmt.Errorf("%s has %d names (hard links): another name could be read by someone else; remove the other names", path, st.Nlink)
	}
	return nil
}

// Write appends p, rotating first when p would not fit. A single write
// larger than max is cut to its last max bytes.
func (s *serialLog) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(p)
	if int64(len(p)) > s.max {
		p = p[int64(len(p))-s.max:]
	}
	if s.size+int64(len(p)) > s.max {
		if err := s.rotate(); err != nil {
			return 0, err
		}
	}
	w, err := s.f.Write(p)
	s.size += int64(w)
	if err != nil {
		return w, err
	}
	return n, nil
}

func (s *serialLog) rotate() error {
	s.f.Close()
	if err := os.Rename(s.path, s.path+".1"); err != nil && !os.IsNotExist(err) {
		return err
	}
	return s.open()
}

func (s *serialLog) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.f.Close()
}
