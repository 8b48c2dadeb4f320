package backup

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

// A repository that only another node mounts: the backup is taken on the
// VM's node into a staging folder beside its disk (images/.NAME.backup,
// the VM's uid's), and sent to a receiver on the repository's node over
// the channel a move uses (mutual TLS with a key made for this transfer,
// a Swarm secret both jobs get). The receiver holds the repository's lock
// throughout: it first tells the sender what a new backup can build on
// (the newest complete backup and its chain's length), then writes what
// comes as ID.partial, checks every file against the manifest's SHA-256,
// writes the manifest last and renames the folder: complete or not there.
// Only its answer lets the sender commit the backup's bitmap; a transfer
// cut anywhere leaves the parent's bitmap, and the next backup is right.

// offer is the receiver's first line.
type offer struct {
	Newest string `json:"newest"`
	Length int    `json:"length"`
}

// sending is the sender's first line: the manifest (as manifest.json
// holds it, written last by the receiver); its files follow in order.
type sending struct {
	Manifest json.RawMessage `json:"manifest"`
}

type answer struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// maxLine bounds a protocol line (a manifest holds the service spec).
const maxLine = 4 << 20

// Stage is where a backup for a repository on another node is made.
func Stage(cfg config.Config) string {
	return filepath.Join(cfg.StorageDir, "images", "."+cfg.Name+".backup")
}

// Send takes a backup on the VM's node and sends it to the receiver at
// peer (host:port), keyFile holding the transfer's key.
func Send(ctx context.Context, cfg config.Config, o Options, peer, keyFile string, out io.Writer) (Manifest, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	stage, release, err := openStage(cfg)
	if err != nil {
		return Manifest{}, err
	}
	defer release()
	conn, err := vmdisk.Dial(ctx, peer, keyFile, out)
	if err != nil {
		return Manifest{}, err
	}
	defer conn.Close()
	r := bufio.NewReaderSize(conn, 64<<10)
	var of offer
	if err := readLine(r, &of); err != nil {
		return Manifest{}, fmt.Errorf("the repository's side: %w", err)
	}
	parent, why := choose(of.Newest, of.Length, o)
	var final string
	m, err := take(ctx, cfg, o, stage, parent, why, of.Newest != "", out, func(m Manifest, dir string) error {
		final = dir
		return sendBackup(conn, r, m, dir, out)
	})
	if final != "" {
		os.RemoveAll(final)
	}
	return m, err
}

// openStage makes the staging folder (the VM's uid's, 0700), takes its
// lock (one backup of the VM at a time here too) and empties it of what a
// cut run left.
func openStage(cfg config.Config) (string, func(), error) {
	dir := Stage(cfg)
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", nil, err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return "", nil, err
	}
	if !fi.IsDir() || ownerOf(fi) != os.Geteuid() {
		return "", nil, fmt.Errorf("%s is not this VM's folder (%v, uid %d): refused; remove it", dir, fi.Mode().Type(), ownerOf(fi))
	}
	release, err := lock(dir, cfg.Name)
	if err != nil {
		return "", nil, err
	}
	des, _ := os.ReadDir(dir)
	for _, de := range des {
		if de.Name() != lockName {
			os.RemoveAll(filepath.Join(dir, de.Name()))
		}
	}
	return dir, release, nil
}

// sendBackup streams a finished backup folder and waits for the
// receiver's answer.
func sendBackup(conn net.Conn, r *bufio.Reader, m Manifest, dir string, out io.Writer) error {
	raw, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(conn, 1<<20)
	if err := writeLine(w, sending{Manifest: raw}); err != nil {
		return err
	}
	var total int64
	for _, f := range m.Files {
		in, err := os.Open(filepath.Join(dir, f.Name))
		if err != nil {
			return err
		}
		n, err := io.Copy(w, io.LimitReader(in, f.Size))
		in.Close()
		if err == nil && n != f.Size {
			err = fmt.Errorf("%s has %d bytes, the manifest says %d", f.Name, n, f.Size)
		}
		if err != nil {
			return fmt.Errorf("sending %s to the repository's side: %w", f.Name, err)
		}
		total += n
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("sending to the repository's side: %w", err)
	}
	fmt.Fprintf(out, "sent backup %s: %d files, %d bytes\n", m.ID, len(m.Files), total)
	var a answer
	if err := readLine(r, &a); err != nil {
		return fmt.Errorf("no answer from the repository's side: %w", err)
	}
	if !a.OK {
		return fmt.Errorf("the repository's side refused the backup: %s", a.Error)
	}
	fmt.Fprintf(out, "the repository's side checked and kept backup %s\n", m.ID)
	return nil
}

// Receive takes one backup of the VM into the repository on this node,
// from the sender that holds the transfer's key, listening on listen.
func Receive(ctx context.Context, cfg config.Config, repo, listen, keyFile string, out io.Writer) (Manifest, error) {
	dir, done, release, err := openForBackup(repo, cfg.Name, out)
	if err != nil {
		return Manifest{}, err
	}
	defer release()
	newest, length := offerOf(done)
	conn, err := vmdisk.Accept(ctx, listen, keyFile, out)
	if err != nil {
		return Manifest{}, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	w := bufio.NewWriter(conn)
	if err := writeLine(w, offer{Newest: newest, Length: length}); err != nil {
		return Manifest{}, err
	}
	m, err := receiveBackup(bufio.NewReaderSize(conn, 1<<20), cfg.Name, dir, newest, out)
	a := answer{OK: err == nil}
	if err != nil {
		a.Error = err.Error()
	}
	writeLine(w, a)
	return m, err
}

// receiveBackup reads one backup into dir/ID.partial, checks it, and
// renames it to dir/ID.
func receiveBackup(r *bufio.Reader, vm, dir, newest string, out io.Writer) (Manifest, error) {
	var s sending
	if err := readLine(r, &s); err != nil {
		return Manifest{}, fmt.Errorf("the sender: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(s.Manifest, &m); err != nil {
		return Manifest{}, fmt.Errorf("the sender's manifest: %w", err)
	}
	if err := checkManifest(m, vm, newest); err != nil {
		return Manifest{}, err
	}
	work := filepath.Join(dir, m.ID+partial)
	if err := os.Mkdir(work, 0o700); err != nil {
		return Manifest{}, err
	}
	fmt.Fprintf(out, "receiving backup %s of %s (%s): %d files\n", m.ID, vm, m.Mode, len(m.Files))
	if err := receiveFiles(r, m, work); err != nil {
		os.RemoveAll(work)
		return Manifest{}, err
	}
	if err := writeSynced(filepath.Join(work, manifestName), s.Manifest); err != nil {
		os.RemoveAll(work)
		return Manifest{}, err
	}
	if err := syncDir(work); err != nil {
		os.RemoveAll(work)
		return Manifest{}, err
	}
	if err := os.Rename(work, filepath.Join(dir, m.ID)); err != nil {
		os.RemoveAll(work)
		return Manifest{}, err
	}
	fmt.Fprintf(out, "backup %s complete in the repository: %s, %s-consistent, %d files checked\n", m.ID, m.Mode, m.Consistency, len(m.Files))
	return m, syncDir(dir)
}

// checkManifest refuses what the sender may not say: another VM, an id or
// file name that could leave the folder, a parent other than the newest
// backup here.
func checkManifest(m Manifest, vm, newest string) error {
	switch {
	case m.Version != ManifestVersion:
		return fmt.Errorf("manifest version %d (this side reads %d)", m.Version, ManifestVersion)
	case m.VM != vm:
		return fmt.Errorf("a backup of %q, not of %s: refused", m.VM, vm)
	case !control.ValidID(m.ID):
		return fmt.Errorf("backup id %q: refused", m.ID)
	case m.Parent != "" && m.Parent != newest:
		return fmt.Errorf("backup %s builds on %s, which is not the newest backup here (%q): refused", m.ID, m.Parent, newest)
	case len(m.Files) == 0 || m.Files[0].Name != DiskFile:
		return fmt.Errorf("backup %s has no %s first: refused", m.ID, DiskFile)
	}
	seen := map[string]bool{}
	for _, f := range m.Files {
		if f.Name == "" || f.Name == manifestName || seen[f.Name] || strings.ContainsAny(f.Name, "/\x00") || strings.HasPrefix(f.Name, ".") || f.Size < 0 || len(f.SHA256) != 64 {
			return fmt.Errorf("backup %s: file %q (%d bytes): refused", m.ID, f.Name, f.Size)
		}
		seen[f.Name] = true
	}
	return nil
}

// receiveFiles writes each file as it comes, new, and compares its
// SHA-256 with the manifest's.
func receiveFiles(r io.Reader, m Manifest, work string) error {
	for _, f := range m.Files {
		p := filepath.Join(work, f.Name)
		dst, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return err
		}
		sum := sha256.New()
		n, err := io.Copy(io.MultiWriter(dst, sum), io.LimitReader(r, f.Size))
		if err == nil && n != f.Size {
			err = fmt.Errorf("%s: the sender stopped after %d of %d bytes", f.Name, n, f.Size)
		}
		if err == nil {
			err = dst.Sync()
		}
		if cerr := dst.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("receiving %s: %w", f.Name, err)
		}
		if got := hex.EncodeToString(sum.Sum(nil)); got != f.SHA256 {
			return fmt.Errorf("%s does not match its manifest (sha256 %.12s…, the manifest says %.12s…): refused", f.Name, got, f.SHA256)
		}
	}
	return nil
}

func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func writeLine(w *bufio.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	w.Write(append(b, '\n'))
	return w.Flush()
}

func readLine(r *bufio.Reader, v any) error {
	var line []byte
	for {
		part, more, err := r.ReadLine()
		if err != nil {
			return err
		}
		line = append(line, part...)
		if len(line) > maxLine {
			return fmt.Errorf("a line over %d bytes", maxLine)
		}
		if !more {
			break
		}
	}
	dec := json.NewDecoder(strings.NewReader(string(line)))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}
