package runner

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// serialLog is the VM's serial console on the storage volume, capped: when
// a write would take it past max bytes, its content becomes <path>.1 (the
// previous .1 is dropped) and it starts again. At most about 2×max bytes
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

// rotate keeps the full log as <log>.1 and starts it again, without ever
// letting go of the log's own name: the log is copied to a new file of the
// runner's (made under a random name) which replaces <log>.1, and the log
// itself is truncated through its descriptor. Renaming the log away would
// leave its name free for another uid to take, and a <log>.1 another uid
// owns could not be replaced and would block every write; here that costs
// only the older generation, which the log then says.
func (s *serialLog) rotate() error {
	kept := s.keepOld()
	if err := s.f.Truncate(0); err != nil {
		return err
	}
	s.size = 0
	if kept != nil {
		n, _ := fmt.Fprintf(s.f, "---- swarmvm: older output dropped: %v ----\n", kept)
		s.size += int64(n)
	}
	return nil
}

// keepOld copies the log to <log>.1; an error means the copy was dropped.
func (s *serialLog) keepOld() error {
	in, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", s.f.Fd()), os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(s.path), "."+filepath.Base(s.path)+".rot-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = io.Copy(tmp, in)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), s.path+".1")
	}
	if err != nil {
		return fmt.Errorf("%s.1 not written: %w", filepath.Base(s.path), err)
	}
	return nil
}

func (s *serialLog) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.f.Close()
}
