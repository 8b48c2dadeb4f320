// Package control is the runner's control socket: a unix socket beside
// the VM's disk, images/NAME.ctl, through which a process of the VM's own
// uid (a backup job on the VM's node) asks the runner to do what only the
// holder of QEMU's monitor can: a backup at one point in time, into files
// the asker opened and hands over as descriptors. One request and one
// reply per connection, JSON with descriptors (SCM_RIGHTS), as the
// broker's; the peer's uid is checked with SO_PEERCRED.
package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/swarmvm/swarmvm/internal/fdpass"
)

// Version is the wire format's version.
const Version = 1

// Ops.
const (
	OpBackup = "backup" // a backup into the descriptors sent with it
	OpCommit = "commit" // the backup is in the repository: its bitmap is the base from now on
	OpAbort  = "abort"  // the backup was not kept: drop its bitmap
	// Freeze the guest's filesystems through its agent for at most the
	// request's Freeze (the runner thaws them then, whatever happens), for
	// a snapshot taken below the VM (of the storage volume); Thaw ends it.
	OpFreeze = "freeze"
	OpThaw   = "thaw"
	// Snapshot takes an internal snapshot of the disk named ID (the guest
	// frozen around it, as for a backup); SnapshotDelete removes one.
	OpSnapshot       = "snapshot"
	OpSnapshotDelete = "snapshot-delete"
	// Export opens a read-only NBD export of the disk at one point in time
	// (pull mode, for other backup tools), named ID, until Until; its
	// ticket is console.ExportUser/ExportKey. ExportClose ends it early.
	OpExport      = "export"
	OpExportClose = "export-close"
	// Migrate sends the running VM into the attached descriptor
	// (FileMigration), a live migration to the QEMU reading the other end,
	// which has the VM's disk (a hand-off to the VM's next task on the
	// node); it is cancelled at Until, and the reply comes when it ended.
	OpMigrate = "migrate"
	// MigrateIn, to a runner waiting for a guest from another node (on
	// its socket migrate.InPath): the stream is read from the attached
	// descriptor. MigrateDone then says how the sender's side ended
	// (Sent): the guest starts here only when it says OK.
	OpMigrateIn   = "migrate-in"
	OpMigrateDone = "migrate-done"
)

// Descriptor names of a backup, in the order they are attached.
const (
	FileDisk  = "disk0" // a qcow2 file the asker made, as large as the disk, opened read-write
	FileNVRAM = "nvram" // an empty file for the UEFI variables
	FileTPM   = "tpm"   // an empty file for the TPM's state
	// FileMigration is a connected stream socket: the migration goes into it.
	FileMigration = "migration"
)

// Path is the control socket of a VM.
func Path(storage, vm string) string {
	return filepath.Join(storage, "images", vm+".ctl")
}

// Request asks the runner for one thing.
type Request struct {
	Version int    `json:"version"`
	Op      string `json:"op"`
	// ID names the backup: its bitmap is swarmvm-ID. Parent is the last
	// complete backup in the repository, whose bitmap an incremental
	// starts from; "" asks for a full one.
	ID     string   `json:"id"`
	Parent string   `json:"parent,omitempty"`
	Files  []string `json:"files,omitempty"` // the attached descriptors' names
	// Freeze: how long the guest's filesystems may stay frozen (0: no freeze).
	Freeze time.Duration `json:"freeze,omitempty"`
	// Until: when an export closes.
	Until time.Time `json:"until,omitempty"`
	// Sent: how a migration ended on the sending node (migrate-done).
	Sent *Sent `json:"sent,omitempty"`
}

// Sent is the sending runner's word on a migration, as the receiving
// node's job relays it.
type Sent struct {
	OK          bool          `json:"ok"`
	Error       string        `json:"error,omitempty"`
	Downtime    time.Duration `json:"downtime,omitempty"`
	TotalTime   time.Duration `json:"total_time,omitempty"`
	Transferred int64         `json:"transferred,omitempty"`
}

// Reply is the runner's answer.
type Reply struct {
	Version int    `json:"version"`
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	// A backup's: full or incremental and why, filesystem or crash
	// consistency and why, when its point was, and what was copied.
	Mode        string    `json:"mode,omitempty"`
	ModeReason  string    `json:"mode_reason,omitempty"`
	Consistency string    `json:"consistency,omitempty"`
	Why         string    `json:"why,omitempty"`
	Point       time.Time `json:"point,omitempty"`
	DiskSize    int64     `json:"disk_size,omitempty"`
	Bitmap      string    `json:"bitmap,omitempty"`
	Granularity int64     `json:"granularity,omitempty"`
	Took        string    `json:"took,omitempty"`
	Filesystems int       `json:"filesystems,omitempty"` // frozen or thawed
	// An export's: the NBD export's name, the port it is served on in the
	// task, the dirty bitmaps it carries (as qemu:dirty-bitmap:NAME), and
	// when it closes.
	Export  string    `json:"export,omitempty"`
	Port    int       `json:"port,omitempty"`
	Bitmaps []string  `json:"bitmaps,omitempty"`
	Until   time.Time `json:"until,omitempty"`
	// A migration's, as QEMU measured it: how long the guest was paused
	// at the switch-over, the whole migration, and the bytes sent.
	Downtime    time.Duration `json:"downtime,omitempty"`
	TotalTime   time.Duration `json:"total_time,omitempty"`
	Transferred int64         `json:"transferred,omitempty"`
}

// MaxMigrate is the longest a migration may be given before it is
// cancelled (the guest stays where it was).
const MaxMigrate = time.Hour

// Modes and consistencies.
const (
	Full            = "full"
	Incremental     = "incremental"
	FSConsistent    = "filesystem" // frozen by the guest agent at the point
	CrashConsistent = "crash"      // as if the power failed at the point
)

// MaxExport is the longest an export stays open: the changes the guest
// makes meanwhile are kept aside beside its disk until it closes.
const MaxExport = 24 * time.Hour

// MaxFreeze is the longest a guest may be held frozen: its applications
// stall on every write meanwhile.
const MaxFreeze = 5 * time.Minute

// BitmapName is the dirty bitmap a backup leaves in the VM's qcow2.
func BitmapName(id string) string { return "swarmvm-" + id }

// Decode parses a request strictly.
func Decode(b []byte) (Request, error) {
	var r Request
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return r, fmt.Errorf("malformed request: %v", err)
	}
	switch {
	case dec.More():
		return r, errors.New("malformed request: trailing data")
	case r.Version != Version:
		return r, fmt.Errorf("unsupported version %d (this runner speaks %d)", r.Version, Version)
	case !slices.Contains([]string{OpBackup, OpCommit, OpAbort, OpFreeze, OpThaw, OpSnapshot, OpSnapshotDelete, OpExport, OpExportClose, OpMigrate, OpMigrateIn, OpMigrateDone}, r.Op):
		return r, fmt.Errorf("unknown op %q", r.Op)
	case !ValidID(r.ID):
		return r, fmt.Errorf("invalid backup id %q", r.ID)
	case r.Parent != "" && !ValidID(r.Parent):
		return r, fmt.Errorf("invalid parent id %q", r.Parent)
	case r.Op == OpFreeze && (r.Freeze <= 0 || r.Freeze > MaxFreeze):
		return r, fmt.Errorf("freeze for %v: give a hold above 0 and at most %v", r.Freeze, MaxFreeze)
	case r.Freeze < 0 || r.Freeze > MaxFreeze:
		return r, fmt.Errorf("freeze for %v: give at most %v", r.Freeze, MaxFreeze)
	case r.Op == OpExport && (r.Until.IsZero() || time.Until(r.Until) > MaxExport):
		return r, fmt.Errorf("an export until %v: give an end within %v", r.Until, MaxExport)
	case r.Op == OpMigrate && (r.Until.IsZero() || time.Until(r.Until) > MaxMigrate):
		return r, fmt.Errorf("a migration until %v: give an end within %v", r.Until, MaxMigrate)
	case (r.Op == OpMigrate || r.Op == OpMigrateIn) && !slices.Equal(r.Files, []string{FileMigration}):
		return r, fmt.Errorf("a migration takes one descriptor, %q; got %q", FileMigration, r.Files)
	case r.Op == OpMigrateDone && (r.Sent == nil || len(r.Files) > 0):
		return r, errors.New("migrate-done says how the migration ended (sent), with no descriptor")
	}
	return r, nil
}

// ValidID: a backup id is 1-40 letters, digits and dashes (a time and a
// random part), so that it can name a folder and a bitmap.
func ValidID(id string) bool {
	if len(id) == 0 || len(id) > 40 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return id[0] != '-'
}

// Ask sends req with files to the runner at socket and waits for its
// reply within ctx.
func Ask(ctx context.Context, socket string, req Request, files ...*os.File) (Reply, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", socket)
	if err != nil {
		return Reply{}, fmt.Errorf("the runner's control socket %s: %w", socket, err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req.Version = Version
	b, err := fdpass.Encode(req)
	if err != nil {
		return Reply{}, err
	}
	if err := fdpass.Send(conn, b, files...); err != nil {
		return Reply{}, fmt.Errorf("to the runner: %w", err)
	}
	msg, _, err := fdpass.Recv(conn, 0)
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return Reply{}, fmt.Errorf("the runner's reply: %w", err)
	}
	var r Reply
	if err := json.Unmarshal(msg, &r); err != nil {
		return Reply{}, fmt.Errorf("the runner's reply: %w", err)
	}
	if !r.OK {
		return r, &RefusedError{Reason: r.Error}
	}
	return r, nil
}

// Answers says whether a runner listens on socket: the VM runs on this
// node.
func Answers(socket string) bool {
	c, err := net.DialTimeout("unixpacket", socket, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// RefusedError is the runner's refusal.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "the runner refused: " + e.Reason }
