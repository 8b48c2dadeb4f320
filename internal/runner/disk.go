package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/poll"
	"github.com/swarmvm/swarmvm/internal/preflight"
	"github.com/swarmvm/swarmvm/internal/qemu"
	"github.com/swarmvm/swarmvm/internal/status"
)

// prepareDisk creates the disk when it is absent and DISK_SIZE asks for it,
// refuses an image that is not qcow2 or not self-contained, checks it, and
// says whether an install medium should boot first (the disk holds no data
// yet).
func prepareDisk(ctx context.Context, cfg config.Config, img qemu.Img, statePath string, handoff bool, log *slog.Logger) (bool, error) {
	if err := mkdirFor(cfg, "IMAGE_PATH", cfg.ImagePath); err != nil {
		return false, err
	}
	if err := createDisk(ctx, cfg, img, log); err != nil {
		return false, err
	}
	info, err := diskHeader(ctx, cfg.ImagePath, img)
	if err != nil {
		return false, err
	}
	// qemu-img check (unless the disk is as it was checked after the last
	// clean stop, checked.go), and map for the boot order, side by side:
	// each is a process start.
	var (
		wg       sync.WaitGroup
		checkErr error
		has      bool
		hasErr   error
	)
	if handoff {
		// The running QEMU this start takes the guest from holds the disk.
		log.Info("disk not checked: the VM's running task on this node holds it, and hands it over with the guest", "path", cfg.ImagePath)
	} else {
		wg.Go(func() { checkErr = checkAtStart(ctx, cfg, img, statePath, log) })
	}
	if cfg.ISOPath != "" {
		wg.Go(func() { has, hasErr = img.HasData(ctx, cfg.ImagePath) })
	}
	wg.Wait()
	if checkErr != nil {
		return false, checkErr
	}
	if cfg.DiskSize > 0 && info.VirtualSize != cfg.DiskSize {
		log.Warn("disk size differs from DISK_SIZE; the disk is never resized by swarmvm", "path", cfg.ImagePath, "disk", info.VirtualSize, "DISK_SIZE", cfg.DiskSize)
	}
	if cfg.ISOPath == "" {
		return false, nil
	}
	if hasErr != nil {
		return false, exitf(status.ExitStorage, "IMAGE_PATH %s: %w", cfg.ImagePath, hasErr)
	}
	log.Info("boot order", "first", map[bool]string{true: "disk", false: "ISO_PATH (disk is empty)"}[has])
	return !has, nil
}

// createDisk makes the disk when there is none (preflight let that through
// only with DISK_SIZE set).
func createDisk(ctx context.Context, cfg config.Config, img qemu.Img, log *slog.Logger) error {
	if _, err := os.Stat(cfg.ImagePath); !errors.Is(err, os.ErrNotExist) {
		return nil
	}
	err := img.Create(ctx, cfg.ImagePath, cfg.DiskSize)
	switch {
	case errors.Is(err, qemu.ErrExists):
		// Someone else's file, made in the moment between the check and
		// the creation: never adopted (it could be a file they can read,
		// or a disk of their making).
		return exitf(status.ExitStorage, "IMAGE_PATH %s appeared while the runner was creating it: another process made it; the runner uses only a disk it made or found its own at start — remove that file and start again", cfg.ImagePath)
	case err != nil:
		return exitf(status.ExitStorage, "create IMAGE_PATH %s: %w", cfg.ImagePath, err)
	}
	log.Info("disk created", "path", cfg.ImagePath, "size", cfg.DiskSize)
	return nil
}

// diskHeader reads the image's qcow2 header, which says what qemu-img info
// would without a process start (qemu-img info only names another format),
// and refuses an image that names other files: QEMU (and qemu-img check)
// would open them by name, wherever they are, outside the checks and the
// descriptor QEMU gets. So this comes before any qemu-img opens the image.
func diskHeader(ctx context.Context, path string, img qemu.Img) (qemu.ImageInfo, error) {
	info, err := qemu.ReadQCOW2(path)
	if errors.Is(err, qemu.ErrNotQCOW2) {
		if info, err = img.Info(ctx, path); err == nil {
			return info, exitf(status.ExitStorage, "IMAGE_PATH %s is %s, not qcow2 — convert it with qemu-img convert -O qcow2, or point IMAGE_PATH at the qcow2 image", path, info.Format)
		}
	}
	if err != nil {
		return info, exitf(status.ExitStorage, "IMAGE_PATH %s: %w", path, err)
	}
	if why := info.SelfContained(path); why != "" {
		return info, exitf(status.ExitStorage, "IMAGE_PATH %s refused: %s", path, why)
	}
	return info, nil
}

// checkAtStart runs qemu-img check, unless the disk is as the check after
// the last clean stop found it; on shared storage, a disk another QEMU
// holds is waited for (waitDisk).
func checkAtStart(ctx context.Context, cfg config.Config, img qemu.Img, statePath string, log *slog.Logger) error {
	if when, unchanged := checkedBefore(cfg.ImagePath); unchanged {
		log.Info("disk checked", "path", cfg.ImagePath, "result", "unchanged since its check after the last clean stop", "checked", when.Format(time.RFC3339))
		return nil
	}
	err := checkDisk(ctx, img, cfg.ImagePath, log)
	if Code(err) == status.ExitDiskBusy && cfg.StorageMode == config.StorageShared {
		return waitDisk(ctx, img, cfg.ImagePath, statePath, log)
	}
	return err
}

// checkDisk runs qemu-img check before QEMU opens the disk.
func checkDisk(ctx context.Context, img qemu.Img, path string, log *slog.Logger) error {
	res, err := img.Check(ctx, path)
	return diskVerdict(res, err, path, log)
}

// diskVerdict judges qemu-img check's result: a disk another QEMU holds is
// refused with its own exit code, a corrupt one is refused and never
// repaired; leaked clusters are only reported.
func diskVerdict(res qemu.CheckResult, err error, path string, log *slog.Logger) error {
	switch {
	case errors.Is(err, qemu.ErrLocked):
		return diskBusy(path)
	case err != nil:
		return exitf(status.ExitStorage, "IMAGE_PATH %s could not be checked: %v — it may be damaged; swarmvm never repairs a disk: inspect a copy with qemu-img check", path, err)
	case res.Corruptions > 0 || res.CheckErrors > 0:
		return exitf(status.ExitStorage, "IMAGE_PATH %s is corrupt: qemu-img check found %d corruptions and %d check errors — swarmvm never repairs a disk: repair a copy (qemu-img check -r all) or restore a backup", path, res.Corruptions, res.CheckErrors)
	case res.Leaks > 0:
		log.Warn("disk has leaked clusters (harmless, space only); not repaired", "path", path, "leaks", res.Leaks)
	default:
		log.Info("disk checked", "path", path, "result", "no errors")
	}
	return nil
}

// openOwn opens the disk and NVRAM once each, checks the descriptors (the
// runner's own regular files, one link, no symbolic link on the way), and
// keeps them, with their reopenings, for QEMU: a file another process
// swaps in under the name afterwards is never used.
func (p *prepared) openOwn(cfg config.Config) error {
	direct := 0
	if cfg.DiskCache == "none" {
		direct = unix.O_DIRECT
	}
	var err error
	if p.fds.Disk, err = openOwn(cfg.StorageDir, "IMAGE_PATH", cfg.ImagePath, direct); err != nil {
		return err
	}
	if cfg.UEFI() {
		p.fds.Vars, err = openOwn(cfg.StorageDir, "OVMF_VARS", cfg.OVMFVars, 0)
	}
	return err
}

// openOwn opens path read-write, checked, and again read-only through the
// first descriptor; flag adds to both (O_DIRECT).
func openOwn(root, variable, path string, flag int) ([]*os.File, error) {
	rw, err := preflight.OpenOwn(root, variable, path, os.O_RDWR|flag)
	if errors.Is(err, unix.EINVAL) && flag&unix.O_DIRECT != 0 {
		return nil, exitf(status.ExitStorage, "%v — the filesystem holding it does not take O_DIRECT, which DISK_CACHE=none needs: set DISK_CACHE=writeback", err)
	}
	if err != nil {
		return nil, exitf(status.ExitStorage, "%v — the runner uses only the files it made or checked as its own: remove the file if it is not this VM's, or chown it to this VM's uid %d", err, os.Geteuid())
	}
	ro, err := preflight.Reopen(rw, os.O_RDONLY|flag)
	if err != nil {
		rw.Close()
		return nil, exitf(status.ExitStorage, "%v", err)
	}
	return []*os.File{rw, ro}, nil
}

// ErrDiskHeld marks a runner on shared storage waiting for another QEMU to
// let go of the disk. A restart cannot help; the other QEMU ending does.
var ErrDiskHeld = errors.New("disk held by another QEMU")

// diskPoll is how often a runner waiting for a held disk tries its lock.
const diskPoll = 2 * time.Second

// waitDisk waits, on shared storage, until no other QEMU holds the disk,
// then checks it as usual. There a held disk is, in the normal case, this
// VM's earlier task on a node cut off from the managers, which started this
// one meanwhile: the image lock keeps this QEMU out while that one runs,
// and waiting (instead of exiting) lets this task take over the moment the
// old QEMU is gone, without Swarm's restart limit running out meanwhile.
// health says why the VM is not running yet.
func waitDisk(ctx context.Context, img qemu.Img, path, statePath string, log *slog.Logger) error {
	waiting := fmt.Sprintf("%v: IMAGE_PATH %s is locked by another QEMU, with shared storage most likely this VM's earlier task on a node cut off from the managers; this task starts the VM when that one has stopped", ErrDiskHeld, path)
	// The state before the line that announces it: whoever reads the
	// line (a test, an operator) and asks health at once gets the state.
	if err := writeState(statePath, state{Waiting: waiting}); err != nil {
		return exitf(status.ExitStorage, "state file: %w", err)
	}
	defer os.Remove(statePath)
	log.Warn("disk in use by another QEMU (its image lock is held): waiting for it to stop; with shared storage this is the VM's earlier task on a node cut off from the managers", status.Key, status.StateDiskHeld, "path", path)
	began, n := time.Now(), 0
	stopped := exitf(status.ExitDiskBusy, "stopped while waiting for IMAGE_PATH %s, held by another QEMU", path)
	if !poll.Sleep(ctx, diskPoll) { // it was checked just now
		return stopped
	}
	var verdict error
	err := poll.Until(ctx, diskPoll, func(ctx context.Context) (bool, error) {
		if verdict = checkDisk(ctx, img, path, log); Code(verdict) != status.ExitDiskBusy {
			return true, nil
		}
		if n++; n%30 == 0 {
			log.Warn("still waiting: disk held by another QEMU", "path", path, "waited", time.Since(began).Round(time.Second))
		}
		return false, nil
	})
	if err != nil {
		return stopped
	}
	os.Remove(statePath) // no longer waiting, before it is said
	if verdict == nil {
		log.Info("disk free: the other QEMU has stopped", "path", path, "waited", time.Since(began).Round(time.Second))
	}
	return verdict
}

func diskBusy(path string) error {
	return exitf(status.ExitDiskBusy, "IMAGE_PATH %s is in use by another QEMU (its image lock is held): two VMs may not share a disk — stop the other VM, or give this one its own IMAGE_PATH", path)
}
