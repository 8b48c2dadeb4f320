package runner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/status"
)

// While the VM is paused because the storage volume is full, the runner
// checks the volume every spacePoll and resumes the VM once ResumeFree
// bytes are available, so that a resumed guest does not pause again on its
// next write.
const (
	ResumeFree   = 32 << 20
	spacePoll    = 2 * time.Second
	spaceLogEach = 15 // polls between two "still waiting" lines
)

// ErrStorageFull marks a VM paused by QEMU because a write found the
// storage volume full. A restart cannot help; freeing space does.
var ErrStorageFull = errors.New("storage volume full")

// spaceWait is the runner's watch over a VM paused for lack of space.
type spaceWait struct {
	tick  *time.Ticker
	dir   string
	polls int
}

// onEvent acts on one QMP event. done is true when the runner must stop
// supervising and return err.
func (v *vm) onEvent(ctx context.Context, ev qmp.Event) (done bool, err error) {
	v.metrics.event(ev.Name)
	switch ev.Name {
	case "GUEST_PANICKED":
		return true, v.panicked(ev.Data)
	case "BLOCK_IO_ERROR":
		var e qmp.BlockIOError
		if err := json.Unmarshal(ev.Data, &e); err != nil {
			v.log.Error("disk I/O error; QEMU's report of it is unreadable", "data", string(ev.Data), "err", err)
			return false, nil
		}
		if e.Action == "stop" && e.NoSpace {
			v.pausedForSpace(e)
			return false, nil
		}
		v.log.Error("disk I/O error", "device", e.Device, "operation", e.Operation, "action", e.Action, "reason", e.Reason)
		return false, nil
	case "RESUME":
		v.agent.setClock("the VM resumed")
		if v.space != nil {
			v.stopSpaceWait()
			v.log.Info("VM resumed after the storage volume had room again", status.Key, status.Resumed)
			return false, nil
		}
	}
	level := slog.LevelDebug
	if runStateEvents[ev.Name] {
		level = slog.LevelInfo
	}
	v.log.Log(ctx, level, "qemu event", "event", ev.Name, "data", string(ev.Data))
	return false, nil
}

// runStateEvents change what the VM is doing (paused, running, reset,
// powered down), or say what an operator reads the log for (the guest set
// its clock, a crash kernel loaded, a memory failure, a block job failed):
// rare. QEMU's other events (NIC_RX_FILTER_CHANGED, ...) are logged at
// debug; every event is counted in the metrics.
var runStateEvents = map[string]bool{
	"STOP": true, "RESUME": true, "RESET": true, "POWERDOWN": true, "SHUTDOWN": true,
	"SUSPEND": true, "WAKEUP": true, "WATCHDOG": true, "RTC_CHANGE": true,
	"GUEST_CRASHLOADED": true, "MEMORY_FAILURE": true, "BLOCK_JOB_ERROR": true,
}

// noteDropped says when QEMU's events came faster than the runner read
// them and some were lost (qmp.EventQueue).
func (v *vm) noteDropped() {
	if d := v.qmp.Dropped(); d > v.dropped {
		v.log.Warn("QMP events lost: they came faster than the runner read them", "lost", d-v.dropped, "lost_in_all", d)
		v.dropped = d
	}
}

// panicked stops a VM whose guest kernel reported a panic through pvpanic
// (QEMU paused it): there is nothing to shut down cleanly, so QEMU quits,
// and the exit code tells Swarm's restart policy to start it again.
func (v *vm) panicked(data json.RawMessage) error {
	v.log.Error("guest kernel panicked (pvpanic); stopping QEMU", "data", string(data), "serial_log", v.serial)
	// The stop has its own budget, as on SIGTERM: a cancelled ctx must not
	// cut the QMP quit short.
	if err := v.force(context.Background(), "guest panicked"); err != nil && Code(err) != status.ExitForced {
		return err
	}
	return exitf(status.ExitPanicked, "the guest kernel panicked (reported through pvpanic); its last messages are in the serial log %s", v.serial)
}

// pausedForSpace starts (once per pause) the watch that resumes the VM.
func (v *vm) pausedForSpace(e qmp.BlockIOError) {
	if v.space != nil {
		return
	}
	dir := filepath.Dir(v.cfg.ImagePath)
	v.space = &spaceWait{tick: time.NewTicker(spacePoll), dir: dir}
	v.log.Error("VM paused: a disk write found the storage volume full; free space there and the VM resumes by itself", status.Key, status.StateFull,
		"device", e.Device, "reason", e.Reason, "volume", dir, "free", freeDesc(dir), "resume_at_free_mib", ResumeFree>>20)
}

// checkSpace resumes the VM once the volume has room.
func (v *vm) checkSpace(ctx context.Context) {
	w := v.space
	w.polls++
	free, err := freeBytes(w.dir)
	if err != nil || free < ResumeFree {
		if w.polls%spaceLogEach == 0 {
			v.log.Warn("VM still paused: storage volume full", "volume", w.dir, "free", freeDesc(w.dir), "resume_at_free_mib", ResumeFree>>20)
		}
		return
	}
	v.log.Info("storage volume has room again; resuming the VM (QMP cont)", "volume", w.dir, "free_mib", free>>20)
	if err := v.call(ctx, v.qmp.Cont); err != nil {
		v.log.Warn("cont failed; will try again", "err", err)
	}
}

func freeBytes(dir string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize), nil
}

func freeDesc(dir string) string {
	n, err := freeBytes(dir)
	if err != nil {
		return "unknown: " + err.Error()
	}
	return fmt.Sprintf("%dMiB", n>>20)
}

func (v *vm) stopSpaceWait() {
	if v.space != nil {
		v.space.tick.Stop()
		v.space = nil
	}
}

// pausedBefore handles a VM found paused on an I/O error when QMP
// connected: the drives' I/O status says whether space ran out.
func (v *vm) pausedBefore(ctx context.Context) {
	cctx, cancel := context.WithTimeout(ctx, qmpCall)
	defer cancel()
	blocks, err := v.qmp.QueryBlock(cctx)
	if err != nil {
		v.log.Error("VM paused on an I/O error; query-block failed", "err", err)
		return
	}
	for _, b := range blocks {
		if b.IOStatus == "nospace" {
			v.pausedForSpace(qmp.BlockIOError{Device: b.Device, Reason: "found paused when QMP connected"})
			return
		}
	}
	v.log.Error("VM paused on an I/O error other than a full volume; see QEMU's messages above")
}
