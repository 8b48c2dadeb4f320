package runner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qemu"
	"golang.org/x/sys/unix"
)

// Every disk QEMU opens has passed qemu-img check since it last changed.
// The check runs at start, or, after QEMU closed the disk cleanly (exit
// status 0), once QEMU has exited; then the file's identity and times are
// written beside it (IMAGE_PATH.checked) and the next start, finding the
// file exactly so and no QEMU on it, need not check it again: a start
// without the check's process start. Any write, truncation, rename,
// chmod or chown moves the file's ctime, and then the stamp no longer
// matches and the check runs at start as before. A file system whose
// timestamps have no sub-second part gets no stamp: a write in the same
// second could leave them as they were.

// checkedStamp is a disk file as a clean check found it.
type checkedStamp struct {
	Dev     uint64    `json:"dev"`
	Ino     uint64    `json:"ino"`
	Size    int64     `json:"size"`
	MtimeNS int64     `json:"mtime_ns"`
	CtimeNS int64     `json:"ctime_ns"`
	Checked time.Time `json:"checked"`
}

// fileStamp describes the file f is open on; ok is false on a file system
// with whole-second timestamps.
func fileStamp(f *os.File) (checkedStamp, bool, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return checkedStamp{}, false, err
	}
	s := checkedStamp{Dev: st.Dev, Ino: st.Ino, Size: st.Size, MtimeNS: st.Mtim.Nano(), CtimeNS: st.Ctim.Nano()}
	return s, st.Ctim.Nsec != 0, nil
}

func (s checkedStamp) same(o checkedStamp) bool {
	return s.Dev == o.Dev && s.Ino == o.Ino && s.Size == o.Size && s.MtimeNS == o.MtimeNS && s.CtimeNS == o.CtimeNS
}

// checkedBefore reports whether the disk at path is exactly as a clean
// check after the last clean stop found it, and no QEMU (or qemu-img) has
// it open: then it need not be checked again. Any doubt is a no.
func checkedBefore(path string) (time.Time, bool) {
	b, err := os.ReadFile(config.CheckedStamp(path))
	if err != nil {
		return time.Time{}, false
	}
	var want checkedStamp
	if json.Unmarshal(b, &want) != nil {
		return time.Time{}, false
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return time.Time{}, false
	}
	defer f.Close()
	got, ok, err := fileStamp(f)
	if err != nil || !ok || !got.same(want) {
		return time.Time{}, false
	}
	// A held disk goes through the check, which reports it busy.
	if held, err := qemu.Held(f); err != nil || held {
		return time.Time{}, false
	}
	return want.Checked, true
}

// checkAfterStop checks the disk once QEMU has closed it cleanly and
// stamps it when the check finds it clean and it did not change meanwhile;
// otherwise any stamp goes, and the next start checks. It takes at most
// config.StopCheck, which a clean exit leaves unused by the SIGKILL step.
func (v *vm) checkAfterStop(by time.Time) {
	path := v.cfg.ImagePath
	os.Remove(config.CheckedStamp(path))
	if !v.status.Exited() || v.status.ExitStatus() != 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), until(by, config.StopCheck))
	defer cancel()
	began := time.Now()
	if err := stampDisk(ctx, v.img, path); err != nil {
		v.log.Warn("disk not checked after the stop; the next start checks it", "path", path, "err", err)
		return
	}
	v.log.Info("disk checked after the stop: no errors; the next start need not check it while it stays unchanged", "path", path, "took_ms", time.Since(began).Milliseconds())
}

func stampDisk(ctx context.Context, img qemu.Img, path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	before, ok, err := fileStamp(f)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("its file system keeps whole-second times, too coarse to see a change")
	}
	res, err := img.Check(ctx, path)
	if err != nil {
		return err
	}
	if res.Corruptions > 0 || res.CheckErrors > 0 || res.Leaks > 0 {
		return fmt.Errorf("qemu-img check found %d corruptions, %d check errors, %d leaked clusters", res.Corruptions, res.CheckErrors, res.Leaks)
	}
	after, _, err := fileStamp(f)
	if err != nil {
		return err
	}
	if !after.same(before) {
		return errors.New("it changed while it was checked")
	}
	after.Checked = time.Now().UTC()
	b, _ := json.Marshal(after)
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".checked-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), config.CheckedStamp(path))
}
