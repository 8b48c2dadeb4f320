package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/status"
)

// The control socket (images/NAME.ctl, beside the disk) serves a backup
// job of the VM's own uid: it asks for a backup at one point in time into
// a file it opened in its repository and hands over as a descriptor. The
// runner does what only the monitor's holder can: it formats that file,
// freezes the guest's filesystems through the agent for the moment of the
// point, starts QEMU's backup job in one transaction with a new persistent
// dirty bitmap (swarmvm-ID, in the VM's qcow2), thaws, and waits for the
// copy. An incremental copies what the parent's bitmap recorded and leaves
// it alone; only when the job says the backup is in the repository
// (commit) are the older bitmaps removed. A backup that is not committed
// leaves the parent's bitmap, which still covers everything since the
// parent: the next incremental is right whatever happened in between.
const (
	controlRequestWait = 5 * time.Second
	backupFDSet        = 40
	backupNode         = "swarmvm-backup"
	backupJob          = "swarmvm-backup"
	bitmapPrefix       = "swarmvm-"
	backupPoll         = 250 * time.Millisecond
	backupSay          = 10 * time.Second
	backupQMPWait      = 10 * time.Second
)

type controlServer struct {
	l    *net.UnixListener
	path string
	ino  uint64 // the socket's inode: close removes only its own
	v    *vm
	log  *slog.Logger
	ctx  context.Context
	stop context.CancelFunc

	mu     sync.Mutex
	busy   string  // what runs: one backup, snapshot or export at a time
	export *export // the open export, or nil
}

// take claims the VM's disk for one backup, snapshot or export.
func (s *controlServer) take(what string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.v.handedOver() {
		return errors.New("the guest was handed over to the VM's next task on this node; ask again")
	}
	if s.busy != "" {
		return fmt.Errorf("%s of this VM is running: one backup, snapshot or export at a time", s.busy)
	}
	s.busy = what
	return nil
}

func (s *controlServer) release() {
	s.mu.Lock()
	s.busy = ""
	s.mu.Unlock()
}

// openControl binds the control socket: a socket of this uid's left by an
// earlier run is replaced; anything else under the name is refused (and
// the VM runs on without one).
func openControl(v *vm) *controlServer {
	path := control.Path(v.cfg.StorageDir, v.cfg.Name)
	log := v.log.With("control", path)
	if fi, err := os.Lstat(path); err == nil {
		if !ownSocket(fi) {
			log.Warn("no control socket (no online backups): something other than this VM's socket has its name; remove it on the node", "mode", fi.Mode().String())
			return nil
		}
		os.Remove(path)
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		log.Warn("no control socket (no online backups)", "err", err)
		return nil
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		log.Warn("no control socket (no online backups)", "err", err)
		return nil
	}
	// Removed on close only while it is still this runner's: after a
	// hand-off the next task's socket has the name.
	l.SetUnlinkOnClose(false)
	var ino uint64
	if fi, err := os.Lstat(path); err == nil {
		ino = fi.Sys().(*syscall.Stat_t).Ino
	}
	ctx, stop := context.WithCancel(context.Background())
	s := &controlServer{l: l, path: path, ino: ino, v: v, log: log, ctx: ctx, stop: stop}
	go s.accept()
	return s
}

func ownSocket(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && fi.Mode().Type() == os.ModeSocket && int(st.Uid) == os.Geteuid()
}

func (s *controlServer) close() {
	if s == nil {
		return
	}
	s.stop()
	s.unbind()
}

// unbind stops taking requests and removes the socket, unless another
// runner's (the next task's, after a hand-off) has its name by now.
func (s *controlServer) unbind() {
	s.l.Close()
	if fi, err := os.Lstat(s.path); err == nil && fi.Sys().(*syscall.Stat_t).Ino == s.ino {
		os.Remove(s.path)
	}
}

func (s *controlServer) accept() {
	for {
		c, err := s.l.AcceptUnix()
		if err != nil {
			return
		}
		go s.handle(c)
	}
}

// handle answers one request. The peer must be this VM's uid or root.
func (s *controlServer) handle(c *net.UnixConn) {
	defer c.Close()
	reply := func(r control.Reply) { s.reply(c, r) }
	req, named, files, err := s.read(c)
	defer fdpass.Close(files)
	if err != nil {
		reply(control.Reply{Error: err.Error()})
		return
	}
	// The asker going away cancels what it asked for.
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	go func() {
		fdpass.Recv(c, 0) // returns when the peer closes its end
		cancel()
	}()
	r, err := s.do(ctx, req, named)
	if err != nil {
		r = control.Reply{Error: err.Error()}
	} else {
		r.OK = true
	}
	reply(r)
}

// reply sends r on c.
func (s *controlServer) reply(c *net.UnixConn, r control.Reply) {
	r.Version = control.Version
	if b, err := fdpass.Encode(r); err == nil {
		fdpass.Send(c, b)
	}
}

// read checks the peer (the VM's uid or root) and reads its one request,
// with its descriptors by name.
func (s *controlServer) read(c *net.UnixConn) (control.Request, map[string]*os.File, []*os.File, error) {
	peer, err := fdpass.Peer(c)
	if err != nil || (peer.UID != os.Geteuid() && peer.UID != 0) {
		s.log.Warn("control: a peer of another uid refused", "peer_uid", peer.UID, "err", err)
		return control.Request{}, nil, nil, fmt.Errorf("uid %d may not ask this VM's runner (only uid %d and root)", peer.UID, os.Geteuid())
	}
	c.SetReadDeadline(time.Now().Add(controlRequestWait))
	msg, files, err := fdpass.Recv(c, fdpass.AnyFDs)
	if err != nil {
		return control.Request{}, nil, files, fmt.Errorf("reading the request: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	req, err := control.Decode(msg)
	if err != nil {
		return req, nil, files, err
	}
	if len(files) != len(req.Files) {
		return req, nil, files, fmt.Errorf("%d descriptors attached, %d named", len(files), len(req.Files))
	}
	named := map[string]*os.File{}
	for i, n := range req.Files {
		named[n] = files[i]
	}
	return req, named, files, nil
}

// do carries out one request.
func (s *controlServer) do(ctx context.Context, req control.Request, named map[string]*os.File) (control.Reply, error) {
	switch req.Op {
	case control.OpExport:
		return s.openExport(ctx, req)
	case control.OpExportClose:
		return control.Reply{}, s.closeExport(req.ID)
	case control.OpMigrateIn, control.OpMigrateDone:
		return control.Reply{}, errors.New("this runner runs its VM: it is not waiting for a migration")
	case control.OpMigrate:
		if err := s.take("a hand-off"); err != nil {
			return control.Reply{}, err
		}
		defer s.release()
		r, err := s.migrate(ctx, req, named[control.FileMigration])
		if err == nil {
			s.unbind() // the next task binds it now: nothing more is asked here
		}
		return r, err
	case control.OpBackup, control.OpSnapshot:
		if err := s.take("a " + req.Op); err != nil {
			return control.Reply{}, err
		}
		defer s.release()
		if req.Op == control.OpSnapshot {
			return s.v.snapshot(ctx, req)
		}
		began := time.Now()
		r, err := s.v.backup(ctx, req, named)
		s.v.backups.done(r.Point, time.Since(began), err)
		if err != nil {
			s.log.Error("backup failed", status.Key, status.BackupFailed, status.AttrBackup, req.ID, status.AttrErr, err)
			return r, err
		}
		s.log.Info("backup taken; its job keeps it", status.Key, status.BackupDone, status.AttrBackup, req.ID, "mode", r.Mode, "consistency", r.Consistency, "took", r.Took)
		return r, nil
	case control.OpFreeze:
		if s.v.agent == nil || !s.v.agent.answering() {
			return control.Reply{}, errors.New("the guest agent does not answer: nothing to freeze the guest's filesystems with")
		}
		_, n, err := s.v.agent.freeze(ctx, req.Freeze)
		if err != nil {
			return control.Reply{}, fmt.Errorf("freeze: %w", err)
		}
		return control.Reply{Filesystems: n}, nil
	case control.OpThaw:
		if s.v.agent == nil {
			return control.Reply{}, errors.New("the VM has no guest agent")
		}
		if err := s.v.agent.thawNow(ctx, agentThawTries, ""); err != nil {
			return control.Reply{}, fmt.Errorf("thaw: %w", err)
		}
		return control.Reply{}, nil
	case control.OpSnapshotDelete:
		qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
		defer cancel()
		if err := s.v.qmp.Execute(qctx, "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "disk0", "name": req.ID}, nil); err != nil {
			return control.Reply{}, fmt.Errorf("deleting snapshot %s: %w", req.ID, err)
		}
		s.log.Info("snapshot deleted", "snapshot", req.ID)
		return control.Reply{}, nil
	}
	// commit or abort
	return control.Reply{Bitmap: control.BitmapName(req.ID)}, s.v.settleBitmaps(ctx, req)
}

// atPoint runs f with the guest's filesystems frozen through its agent
// when it answers and a freeze is asked, and says which consistency the
// moment had and why.
func (v *vm) atPoint(ctx context.Context, hold time.Duration, log *slog.Logger, f func() error) (consistency, why string, err error) {
	consistency, why = control.CrashConsistent, "no guest agent answering"
	var thaw func() error
	switch {
	case hold == 0:
		why = "no freeze asked"
	case v.agent != nil && v.agent.answering():
		fctx, cancel := context.WithTimeout(ctx, agentCall)
		var n int
		var ferr error
		thaw, n, ferr = v.agent.freeze(fctx, hold)
		cancel()
		if ferr != nil {
			why = "the guest agent's freeze failed: " + ferr.Error()
			log.Warn("the freeze failed; crash-consistent", "err", ferr)
		} else {
			consistency, why = control.FSConsistent, fmt.Sprintf("%d filesystems frozen by the guest agent", n)
		}
	}
	err = f()
	if thaw != nil {
		if terr := thaw(); terr != nil {
			log.Error("the guest's thaw failed (its timer thaws it again)", "err", terr)
		}
	}
	return consistency, why, err
}

// snapshot takes an internal snapshot of the disk, named req.ID.
func (v *vm) snapshot(ctx context.Context, req control.Request) (control.Reply, error) {
	log := v.log.With("snapshot", req.ID)
	var r control.Reply
	var err error
	r.Consistency, r.Why, err = v.atPoint(ctx, req.Freeze, log, func() error {
		qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
		defer cancel()
		return v.qmp.Execute(qctx, "blockdev-snapshot-internal-sync", map[string]any{"device": "disk0", "name": req.ID}, nil)
	})
	r.Point = time.Now().UTC()
	if err != nil {
		return control.Reply{}, fmt.Errorf("snapshot %s: %w", req.ID, err)
	}
	log.Info("snapshot taken", "consistency", r.Consistency, "why", r.Why)
	return r, nil
}

// backup runs one backup into the descriptor named disk0.
func (v *vm) backup(ctx context.Context, req control.Request, files map[string]*os.File) (control.Reply, error) {
	target := files[control.FileDisk]
	if target == nil {
		return control.Reply{}, errors.New("no disk0 descriptor attached")
	}
	began := time.Now()
	log := v.log.With("backup", req.ID)
	disk, err := v.disk0(ctx)
	if err != nil {
		return control.Reply{}, err
	}
	r := control.Reply{DiskSize: disk.Inserted.Image.VirtualSize, Bitmap: control.BitmapName(req.ID)}
	parent := v.pickParent(ctx, disk, req.Parent, &r, log)
	if err := v.qcow2Node(ctx, target, backupFDSet, backupNode, r.DiskSize, nil); err != nil {
		return control.Reply{}, fmt.Errorf("the backup's target: %w", err)
	}
	defer v.dropNode(backupFDSet, backupNode, log)
	backupArgs := map[string]any{"job-id": backupJob, "device": "disk0", "target": backupNode, "sync": "full", "auto-dismiss": false}
	if parent != nil {
		backupArgs["sync"], backupArgs["bitmap"], backupArgs["bitmap-mode"] = "bitmap", parent.Name, "never"
	}
	actions := []qmp.Action{
		{Type: "block-dirty-bitmap-add", Data: map[string]any{"node": "disk0", "name": r.Bitmap, "persistent": true}},
		{Type: "blockdev-backup", Data: backupArgs},
	}
	// The point: the guest's filesystems frozen around the transaction
	// when its agent answers, else as if its power failed then.
	r.Consistency, r.Why, err = v.atPoint(ctx, req.Freeze, log, func() error {
		qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
		defer cancel()
		return v.qmp.Transaction(qctx, actions...)
	})
	r.Point = time.Now().UTC()
	if err != nil {
		return control.Reply{}, fmt.Errorf("starting QEMU's backup: %w", err)
	}
	log.Info("backup started", "mode", r.Mode, "mode_reason", r.ModeReason, "consistency", r.Consistency, "bitmap", r.Bitmap, "disk_size", r.DiskSize)
	if err := v.waitJob(ctx, backupJob, log); err != nil {
		v.removeBitmap(r.Bitmap, log)
		return control.Reply{}, err
	}
	r.Took = time.Since(began).Round(time.Millisecond).String()
	return r, nil
}

// disk0 is the VM's disk as query-block sees it.
func (v *vm) disk0(ctx context.Context) (qmp.Drive, error) {
	qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
	defer cancel()
	drives, err := v.qmp.QueryDrives(qctx)
	if err != nil {
		return qmp.Drive{}, err
	}
	for _, d := range drives {
		if d.Device == "disk0" && d.Inserted != nil {
			return d, nil
		}
	}
	return qmp.Drive{}, errors.New("QEMU has no disk0")
}

// pickParent decides full or incremental, says why, and removes the
// bitmaps no backup can use: those of other backups than the parent, and
// inconsistent ones (QEMU was killed since they were last saved).
func (v *vm) pickParent(ctx context.Context, disk qmp.Drive, parent string, r *control.Reply, log *slog.Logger) *qmp.Bitmap {
	var use *qmp.Bitmap
	want := control.BitmapName(parent)
	r.Mode, r.ModeReason = control.Full, "the first backup of this VM in the repository"
	for _, b := range disk.Inserted.Bitmaps {
		if !strings.HasPrefix(b.Name, bitmapPrefix) {
			continue
		}
		switch {
		case parent != "" && b.Name == want && b.Inconsistent:
			r.ModeReason = fmt.Sprintf("the dirty bitmap of backup %s is inconsistent: QEMU was killed (or crashed) since and could not save it", parent)
		case parent != "" && b.Name == want && !b.Recording:
			r.ModeReason = fmt.Sprintf("the dirty bitmap of backup %s is not recording", parent)
		case parent != "" && b.Name == want:
			b := b
			use = &b
			continue
		}
		v.removeBitmap(b.Name, log)
	}
	if use != nil {
		r.Mode, r.ModeReason = control.Incremental, fmt.Sprintf("changes since backup %s (%d bytes marked when asked)", parent, use.Count)
	} else if parent != "" && r.ModeReason == "the first backup of this VM in the repository" {
		r.ModeReason = fmt.Sprintf("no dirty bitmap of backup %s in the VM's disk: QEMU stopped without saving it (killed or crashed since that backup), or the disk was restored, moved or replaced", parent)
	}
	return use
}

// qcow2Node formats f as a qcow2 of size and opens it in QEMU as node (on
// its file node node-file, through fd set set), on backing: another node's
// name, or nil for none.
func (v *vm) qcow2Node(ctx context.Context, f *os.File, set int, node string, size int64, backing any) error {
	qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
	defer cancel()
	if _, err := v.qmp.AddFD(qctx, set, f, node); err != nil {
		return fmt.Errorf("handing QEMU the file: %w", err)
	}
	file := map[string]any{"driver": "file", "node-name": node + "-file", "filename": qmp.FDSetPath(set)}
	if err := v.qmp.Execute(qctx, "blockdev-add", file, nil); err != nil {
		return fmt.Errorf("opening the file: %w", err)
	}
	create := map[string]any{"job-id": node + "-create", "options": map[string]any{"driver": "qcow2", "file": node + "-file", "size": size}}
	if err := v.qmp.Execute(qctx, "blockdev-create", create, nil); err != nil {
		return fmt.Errorf("formatting the file: %w", err)
	}
	if err := v.waitJob(ctx, node+"-create", v.log); err != nil {
		return fmt.Errorf("formatting the file: %w", err)
	}
	if err := v.qmp.Execute(qctx, "blockdev-add", map[string]any{"driver": "qcow2", "node-name": node, "file": node + "-file", "backing": backing}, nil); err != nil {
		return fmt.Errorf("opening the file as qcow2: %w", err)
	}
	return nil
}

// dropNode closes a node qcow2Node opened, whatever state it is in.
func (v *vm) dropNode(set int, node string, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), backupQMPWait)
	defer cancel()
	for _, n := range []string{node, node + "-file"} {
		if err := v.qmp.Execute(ctx, "blockdev-del", map[string]any{"node-name": n}, nil); err != nil && !strings.Contains(err.Error(), "not found") {
			log.Debug("closing a node", "node", n, "err", err)
		}
	}
	v.qmp.RemoveFDSet(ctx, set)
}

// waitJob polls a block job until it concludes, logs its progress, and
// dismisses it; a cancelled ctx cancels the job.
func (v *vm) waitJob(ctx context.Context, id string, log *slog.Logger) error {
	said := time.Now()
	wait := 5 * time.Millisecond // a short job (formatting the target) ends within milliseconds
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), backupQMPWait)
		defer cancel()
		v.qmp.Execute(dctx, "job-dismiss", map[string]any{"id": id}, nil)
	}()
	for {
		qctx, cancel := context.WithTimeout(context.Background(), backupQMPWait)
		jobs, err := v.qmp.QueryJobs(qctx)
		cancel()
		if err != nil {
			return fmt.Errorf("block job %s: %w", id, err)
		}
		var job *qmp.Job
		for i := range jobs {
			if jobs[i].ID == id {
				job = &jobs[i]
			}
		}
		switch {
		case job == nil:
			return fmt.Errorf("block job %s is gone", id)
		case job.Status == "concluded" && job.ErrorMsg != "":
			return fmt.Errorf("block job %s: %s", id, job.ErrorMsg)
		case job.Status == "concluded":
			return nil
		case time.Since(said) >= backupSay:
			log.Info("backup progress", "job", id, "done", job.Current, "of", job.Total)
			said = time.Now()
		}
		select {
		case <-ctx.Done():
			cctx, cancel := context.WithTimeout(context.Background(), backupQMPWait)
			v.qmp.Execute(cctx, "job-cancel", map[string]any{"id": id}, nil)
			cancel()
			v.waitConcluded(id)
			return fmt.Errorf("block job %s cancelled: %w", id, context.Cause(ctx))
		case <-v.exited:
			return errors.New("QEMU ended during the backup")
		case <-time.After(wait):
			wait = min(2*wait, backupPoll)
		}
	}
}

// waitConcluded waits a little for a cancelled job to conclude, so that
// it can be dismissed.
func (v *vm) waitConcluded(id string) {
	for range 40 {
		ctx, cancel := context.WithTimeout(context.Background(), backupQMPWait)
		jobs, err := v.qmp.QueryJobs(ctx)
		cancel()
		if err != nil {
			return
		}
		for _, j := range jobs {
			if j.ID == id && j.Status == "concluded" {
				return
			}
		}
		time.Sleep(backupPoll)
	}
}

// settleBitmaps: a committed backup's bitmap is the base from now on (every
// other of swarmvm's is removed); an aborted one's is removed.
func (v *vm) settleBitmaps(ctx context.Context, req control.Request) error {
	disk, err := v.disk0(ctx)
	if err != nil {
		return err
	}
	keep := control.BitmapName(req.ID)
	found := false
	for _, b := range disk.Inserted.Bitmaps {
		switch {
		case b.Name == keep && req.Op == control.OpCommit:
			found = true
		case b.Name == keep || (req.Op == control.OpCommit && strings.HasPrefix(b.Name, bitmapPrefix)):
			v.removeBitmap(b.Name, v.log)
		}
	}
	if req.Op == control.OpCommit && !found {
		return fmt.Errorf("no bitmap %s in the VM's disk: the next backup is full", keep)
	}
	return nil
}

func (v *vm) removeBitmap(name string, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), backupQMPWait)
	defer cancel()
	if err := v.qmp.Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": "disk0", "name": name}, nil); err != nil {
		log.Warn("backup: removing a dirty bitmap", "bitmap", name, "err", err)
		return
	}
	log.Info("backup: dirty bitmap removed", "bitmap", name)
}
