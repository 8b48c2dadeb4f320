package runner

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/status"
)

// runs is the VM's record across its tasks, logs/NAME.runs.json in the
// storage folder: how often a runner started it and how each run ended.
// A task that Swarm replaces on the same node, or on any node of shared
// storage, reads on where the last one stopped; so do the metrics'
// swarmvm_vm_starts_total and swarmvm_vm_exits_total. Running is set at
// the start and cleared at the exit: a record found running was ended
// without a word (SIGKILL, the container's memory limit, a lost node).
type runs struct {
	Starts  int            `json:"starts"`
	Exits   map[string]int `json:"exits"` // by exitReason
	Running bool           `json:"running"`
	Last    *lastExit      `json:"last,omitempty"`
}

type lastExit struct {
	Code   int       `json:"code"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// unrecorded is the reason of a run that ended without recording it.
const unrecorded = "unrecorded"

// exitReason names an exit code for a label.
func exitReason(code int) string {
	switch code {
	case status.ExitOK:
		return "ok"
	case status.ExitInternal:
		return "internal"
	case status.ExitConfig:
		return "config"
	case status.ExitKVM:
		return "kvm"
	case status.ExitStorage:
		return "storage"
	case status.ExitStart:
		return "start"
	case status.ExitCrashed:
		return "crashed"
	case status.ExitForced:
		return "forced"
	case status.ExitNet:
		return "net"
	case status.ExitDiskBusy:
		return "disk-busy"
	case status.ExitPanicked:
		return "panicked"
	case status.ExitTPM:
		return "tpm"
	}
	return "code-" + strconv.Itoa(code)
}

func runsPath(cfg config.Config) string {
	return filepath.Join(cfg.StorageDir, "logs", cfg.Name+".runs.json")
}

// readRuns reads the record, trusting only a regular file of this uid's
// own (logs/ is shared by the node's VMs); anything else reads as none.
func readRuns(path string) (runs, error) {
	r := runs{Exits: map[string]int{}}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if os.IsNotExist(err) {
		return r, nil
	} else if err != nil {
		return r, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err == nil {
		err = ownRegular(path, fi)
	}
	if err != nil {
		return r, err
	}
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return runs{Exits: map[string]int{}}, fmt.Errorf("%s: %v", path, err)
	}
	if r.Exits == nil {
		r.Exits = map[string]int{}
	}
	return r, nil
}

// writeRuns replaces the record through a new file: a link or another
// uid's file left under the name is replaced, never written through.
func writeRuns(path string, r runs) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// startRun counts this start, and an earlier run that ended unrecorded,
// and says so. What it returns is the record as the metrics show it; a
// record that cannot be read or written costs a warning, never the VM.
func startRun(cfg config.Config, log *slog.Logger) runs {
	path := runsPath(cfg)
	r, err := readRuns(path)
	if err != nil {
		log.Warn("the VM's record of its runs is unreadable; counting afresh", "path", path, "err", err)
	}
	if r.Running {
		r.Exits[unrecorded]++
		log.Warn("the VM's last run ended without recording how (the runner killed: SIGKILL, the container's memory limit, or the node lost)", "starts", r.Starts)
	}
	r.Starts++
	r.Running = true
	if err := writeRuns(path, r); err != nil {
		log.Warn("cannot record this start", "path", path, "err", err)
	}
	attrs := []any{"starts", r.Starts}
	if r.Last != nil {
		attrs = append(attrs, "last_exit_code", r.Last.Code, "last_exit_reason", r.Last.Reason, "last_exit_at", r.Last.At.UTC().Format(time.RFC3339))
	}
	log.Info("run recorded", attrs...)
	return r
}

// endRun records how this run ended.
func endRun(cfg config.Config, code int, log *slog.Logger) {
	path := runsPath(cfg)
	r, err := readRuns(path)
	if err != nil {
		log.Warn("the VM's record of its runs is unreadable; counting afresh", "path", path, "err", err)
	}
	reason := exitReason(code)
	r.Exits[reason]++
	r.Running = false
	r.Last = &lastExit{Code: code, Reason: reason, At: time.Now().UTC()}
	if err := writeRuns(path, r); err != nil {
		log.Warn("cannot record how this run ended", "path", path, "err", err)
	}
}
