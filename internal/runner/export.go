package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/status"
)

// Pull mode: other backup tools read the disk at one point in time over
// NBD, with the dirty bitmaps of swarmvm's backups as qemu:dirty-bitmap:
// meta contexts. The point is kept by fleecing: a qcow2 over the disk (in
// a file beside it, unlinked as soon as it is made) to which QEMU copies
// what the guest is about to overwrite, and which reads through to the
// disk everywhere else; frozen copies of the bitmaps sit on it. QEMU's
// NBD server serves it read-only on a socket the runner binds on
// EXPORT_PORT and hands over, behind TLS with a pre-shared key: the
// export ticket (console.ExportUser and ExportKey), which only the
// holder of the VM's console key can mint. The export closes when its
// ticket expires, when its owner closes it, or with the VM.
const (
	exportFDSet = 41
	exportNode  = "swarmvm-export" // the fleece node, its job, its export and its listening socket
	exportTLS   = "swarmvm-export-tls"
	exportName  = "disk0"
	exportConns = 16
)

// export is the open export.
type export struct {
	id      string
	until   time.Time
	end     chan struct{} // closed to close it early
	endOnce sync.Once
	done    chan struct{} // closed once it is closed
}

// openExport opens an export for the asker, or says why not.
func (s *controlServer) openExport(ctx context.Context, req control.Request) (control.Reply, error) {
	v := s.v
	if v.cfg.ExportPort == 0 {
		return control.Reply{}, errors.New("this VM serves no exports: deploy it with --export-port (EXPORT_PORT)")
	}
	key, err := console.LoadKey("CONSOLE_KEY_FILE", v.cfg.ConsoleKeyFile)
	if err != nil {
		return control.Reply{}, err
	}
	if err := s.take("an export"); err != nil {
		return control.Reply{}, err
	}
	log := s.log.With(status.AttrBackup, req.ID)
	r, err := v.startExport(ctx, req, key, log)
	if err != nil {
		v.stopExport(log)
		s.release()
		return control.Reply{}, err
	}
	ex := &export{id: req.ID, until: req.Until, end: make(chan struct{}), done: make(chan struct{})}
	s.mu.Lock()
	s.export, s.busy = ex, "an export (open until "+req.Until.UTC().Format(time.RFC3339)+")"
	s.mu.Unlock()
	log.Info("export opened", status.Key, status.ExportOpened, "port", r.Port, "bitmaps", strings.Join(r.Bitmaps, ","),
		"until", req.Until.UTC().Format(time.RFC3339), "consistency", r.Consistency)
	go s.keepExport(ex, log)
	return r, nil
}

// keepExport closes the export when its time is up, its owner asks, the
// runner stops or QEMU ends.
func (s *controlServer) keepExport(ex *export, log *slog.Logger) {
	t := time.NewTimer(time.Until(ex.until))
	defer t.Stop()
	why := ""
	select {
	case <-t.C:
		why = "its ticket expired"
	case <-ex.end:
		why = "closed by its owner"
	case <-s.ctx.Done():
		why = "the runner stops"
	case <-s.v.exited:
		why = "QEMU ended"
	}
	if why != "QEMU ended" {
		s.v.stopExport(log)
	}
	s.mu.Lock()
	s.export, s.busy = nil, ""
	s.mu.Unlock()
	log.Info("export closed", status.Key, status.ExportClosed, status.AttrWhy, why)
	close(ex.done)
}

// closeExport closes export id and waits until it is.
func (s *controlServer) closeExport(id string) error {
	s.mu.Lock()
	ex := s.export
	s.mu.Unlock()
	if ex == nil || ex.id != id {
		return fmt.Errorf("no export %s is open", id)
	}
	ex.endOnce.Do(func() { close(ex.end) })
	<-ex.done
	return nil
}

// startExport builds the export; what it made is undone by stopExport.
func (v *vm) startExport(ctx context.Context, req control.Request, key []byte, log *slog.Logger) (control.Reply, error) {
	disk, err := v.disk0(ctx)
	if err != nil {
		return control.Reply{}, err
	}
	r := control.Reply{Export: exportName, Port: v.cfg.ExportPort, Until: req.Until, DiskSize: disk.Inserted.Image.VirtualSize, Bitmaps: []string{}}
	var bitmaps []qmp.Bitmap
	for _, b := range disk.Inserted.Bitmaps {
		if strings.HasPrefix(b.Name, bitmapPrefix) && !b.Inconsistent && b.Recording {
			bitmaps = append(bitmaps, b)
			r.Bitmaps = append(r.Bitmaps, b.Name)
		}
	}
	// By the format node's name: -drive names the device, not the node.
	node := disk.Inserted.NodeName
	if err := v.fleece(ctx, r.DiskSize, node); err != nil {
		return control.Reply{}, err
	}
	if err := v.exportServer(ctx, key, req); err != nil {
		return control.Reply{}, err
	}
	// The point: copy-before-write starts, and the bitmaps are copied as
	// they are, in one transaction.
	actions := []qmp.Action{{Type: "blockdev-backup", Data: map[string]any{"job-id": exportNode, "device": "disk0", "target": exportNode, "sync": "none"}}}
	for _, b := range bitmaps {
		actions = append(actions,
			qmp.Action{Type: "block-dirty-bitmap-add", Data: map[string]any{"node": exportNode, "name": b.Name, "granularity": b.Granularity, "persistent": false, "disabled": true}},
			qmp.Action{Type: "block-dirty-bitmap-merge", Data: map[string]any{"node": exportNode, "target": b.Name, "bitmaps": []any{map[string]any{"node": node, "name": b.Name}}}})
	}
	r.Consistency, r.Why, err = v.atPoint(ctx, req.Freeze, log, func() error {
		qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
		defer cancel()
		return v.qmp.Transaction(qctx, actions...)
	})
	r.Point = time.Now().UTC()
	if err != nil {
		return control.Reply{}, fmt.Errorf("the export's point: %w", err)
	}
	qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
	defer cancel()
	add := map[string]any{"type": "nbd", "id": exportNode, "node-name": exportNode, "name": exportName,
		"description": v.cfg.Name + " at " + r.Point.Format(time.RFC3339), "writable": false, "bitmaps": r.Bitmaps}
	if err := v.qmp.Execute(qctx, "block-export-add", add, nil); err != nil {
		return control.Reply{}, fmt.Errorf("exporting the disk: %w", err)
	}
	return r, nil
}

// fleece makes the node that keeps the export's point: a qcow2 over the
// disk's format node, in a file beside it, unlinked at once (nothing is left behind however
// the runner ends; the space returns when QEMU lets go).
func (v *vm) fleece(ctx context.Context, size int64, disk string) error {
	f, err := os.CreateTemp(filepath.Join(v.cfg.StorageDir, "images"), "."+v.cfg.Name+".export-")
	if err != nil {
		return fmt.Errorf("the export's overlay beside the disk: %w", err)
	}
	os.Remove(f.Name())
	defer f.Close()
	if err := v.qcow2Node(ctx, f, exportFDSet, exportNode, size, disk); err != nil {
		return fmt.Errorf("the export's overlay: %w", err)
	}
	return nil
}

// exportServer starts QEMU's NBD server on a socket bound on EXPORT_PORT
// (QEMU binds nothing itself), with TLS keyed by the export's ticket.
func (v *vm) exportServer(ctx context.Context, key []byte, req control.Request) error {
	dir := filepath.Join(v.cfg.RunDir, "export")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	user := console.ExportUser(v.cfg.Name, req.ID, req.Until)
	if err := os.WriteFile(filepath.Join(dir, "keys.psk"), []byte(console.PSKLine(user, console.ExportKey(key, user))), 0o600); err != nil {
		return err
	}
	l, err := net.ListenTCP("tcp", &net.TCPAddr{Port: v.cfg.ExportPort})
	if err != nil {
		return fmt.Errorf("EXPORT_PORT: cannot listen on %d: %w", v.cfg.ExportPort, err)
	}
	lf, err := l.File()
	l.Close()
	if err != nil {
		return err
	}
	defer lf.Close()
	qctx, cancel := context.WithTimeout(ctx, backupQMPWait)
	defer cancel()
	if err := v.qmp.Execute(qctx, "object-add", map[string]any{"qom-type": "tls-creds-psk", "id": exportTLS, "endpoint": "server", "dir": dir}, nil); err != nil {
		return fmt.Errorf("the export's TLS: %w", err)
	}
	if err := v.qmp.GetFD(qctx, exportNode, lf); err != nil {
		return fmt.Errorf("handing QEMU the export's socket: %w", err)
	}
	start := map[string]any{"addr": map[string]any{"type": "fd", "data": map[string]any{"str": exportNode}}, "tls-creds": exportTLS, "max-connections": exportConns}
	if err := v.qmp.Execute(qctx, "nbd-server-start", start, nil); err != nil {
		return fmt.Errorf("QEMU's NBD server: %w", err)
	}
	return nil
}

// stopExport undoes what startExport made, whatever it got to: clients
// are cut off, the point and its overlay dropped, the key removed.
func (v *vm) stopExport(log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*backupQMPWait)
	defer cancel()
	quiet := func(cmd string, args map[string]any) {
		if err := v.qmp.Execute(ctx, cmd, args, nil); err != nil {
			log.Debug("closing the export", "cmd", cmd, "err", err)
		}
	}
	quiet("block-export-del", map[string]any{"id": exportNode, "mode": "hard"})
	quiet("nbd-server-stop", map[string]any{})
	quiet("closefd", map[string]any{"fdname": exportNode})
	quiet("job-cancel", map[string]any{"id": exportNode})
	v.waitJobGone(ctx, exportNode)
	v.dropNode(exportFDSet, exportNode, log)
	quiet("object-del", map[string]any{"id": exportTLS})
	os.RemoveAll(filepath.Join(v.cfg.RunDir, "export"))
}

// waitJobGone waits for a cancelled job that dismisses itself to go.
func (v *vm) waitJobGone(ctx context.Context, id string) {
	for ctx.Err() == nil {
		jobs, err := v.qmp.QueryJobs(ctx)
		if err != nil {
			return
		}
		gone := true
		for _, j := range jobs {
			gone = gone && j.ID != id
		}
		if gone {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}
