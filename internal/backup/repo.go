// Package backup keeps a VM's backups in a repository: a folder a node
// mounts (or every node: NFS), with a folder of each VM's own, readable by
// nobody but root and that VM's uid:
//
//	REPO/NAME/.lock          held while a backup or a prune runs
//	REPO/NAME/ID/            a complete backup: manifest.json and its files
//	REPO/NAME/ID.partial/    a backup under way or cut short: never listed,
//	                         removed by the next run
//
// A backup's disk0.qcow2 is the whole disk (full) or the clusters that
// changed since its parent (incremental: a qcow2 whose backing file is the
// parent's, ../PARENT/disk0.qcow2), so the repository grows with the
// changed data. The manifest is written last and the folder renamed from
// .partial at the end: a backup is complete exactly when its folder has
// its final name.
package backup

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ManifestVersion is the manifest's format.
const ManifestVersion = 1

const (
	manifestName = "manifest.json"
	partial      = ".partial"
	lockName     = ".lock"
	DiskFile     = "disk0.qcow2"
)

// Manifest describes one complete backup.
type Manifest struct {
	Version int    `json:"version"`
	VM      string `json:"vm"`
	ID      string `json:"id"`
	// Parent is the backup an incremental one changes; "" for a full one.
	Parent     string `json:"parent,omitempty"`
	Mode       string `json:"mode"` // full or incremental
	ModeReason string `json:"mode_reason"`
	// Consistency: filesystem (frozen by the guest agent at the point) or
	// crash (as if the power failed then), and why.
	Consistency    string    `json:"consistency"`
	ConsistencyWhy string    `json:"consistency_why"`
	Online         bool      `json:"online"` // taken from the running VM
	Point          time.Time `json:"point"`
	Finished       time.Time `json:"finished"`
	Node           string    `json:"node"`
	Bitmap         string    `json:"bitmap,omitempty"` // the dirty bitmap this backup left in the VM's disk
	DiskSize       int64     `json:"disk_size"`        // the disk's virtual size
	Files          []File    `json:"files"`
	// Definition is the VM's service as it was deployed (the Engine API's
	// service spec), for a restore to deploy it again.
	Definition json.RawMessage `json:"definition,omitempty"`
}

// File is one file of a backup, with its checksum.
type File struct {
	Name   string `json:"name"`
	Role   string `json:"role"` // disk, nvram, tpm, seed-key
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Entry is a backup as ls lists it.
type Entry struct {
	Manifest
	Dir  string `json:"dir"`
	Used int64  `json:"used"` // bytes its files take on the repository
}

// NewID makes a backup's id: its time (sortable) and a random part.
func NewID(now time.Time) string {
	b := make([]byte, 3)
	rand.Read(b)
	return now.UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(b)
}

// vmDir opens (making it when missing) the VM's folder in the repository,
// refusing a repository or a folder of someone else's: the repository
// must be root's or this uid's, the VM's folder this uid's with no access
// for anyone else (root may read any VM's).
func vmDir(repo, vm string, create bool) (string, error) {
	fi, err := os.Stat(repo)
	if err != nil {
		return "", fmt.Errorf("repository %s: %w — give a folder that exists on the VM's node (mounted on every node for NFS)", repo, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("repository %s is not a folder", repo)
	}
	if uid := ownerOf(fi); uid != 0 && uid != os.Geteuid() {
		return "", fmt.Errorf("repository %s belongs to uid %d, neither root nor this VM's uid %d: refused (another tenant could read or replace backups); give a folder of root's", repo, uid, os.Geteuid())
	}
	dir := filepath.Join(repo, vm)
	if create {
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("the VM's folder in the repository %s: %w — the repository must let the VM's uid %d make it (root's, mode 1733 or group %d with 1770), or make it: install -d -o %d -m 0700 %s", dir, err, os.Geteuid(), os.Getegid(), os.Geteuid(), dir)
		}
	}
	li, err := os.Lstat(dir)
	if err != nil {
		return "", fmt.Errorf("the VM's folder in the repository %s: %w", dir, err)
	}
	switch {
	case !li.IsDir():
		return "", fmt.Errorf("%s is not a folder (%s): refused", dir, li.Mode().Type())
	case ownerOf(li) != os.Geteuid() && (create || os.Geteuid() != 0): // root reads every VM's
		return "", fmt.Errorf("%s belongs to uid %d, not this VM's uid %d: refused; remove it if it is not this VM's", dir, ownerOf(li), os.Geteuid())
	case li.Mode().Perm()&0o077 != 0 && ownerOf(li) == os.Geteuid():
		if err := os.Chmod(dir, 0o700); err != nil {
			return "", fmt.Errorf("%s is mode %v, readable by others: %w", dir, li.Mode().Perm(), err)
		}
	}
	return dir, nil
}

func ownerOf(fi os.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}

// lock takes the VM's repository lock: one backup or prune at a time.
func lock(dir, vm string) (release func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	// A restore reads a repository mounted read-only, and restore --as
	// reads another VM's folder as root that may read, not write.
	if errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EACCES) {
		f, err = os.OpenFile(filepath.Join(dir, lockName), os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	}
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("a backup of %s is running (its repository lock %s is held): wait for it", vm, f.Name())
		}
		return nil, err
	}
	return func() { f.Close() }, nil
}

// List reads the VM's complete backups in the repository, oldest first
// (by when each finished).
// A folder that is partial, or whose manifest is unreadable, is not one.
func List(repo, vm string) ([]Entry, error) {
	dir, err := vmDir(repo, vm, false)
	if err != nil {
		return nil, err
	}
	return list(dir)
}

func list(dir string) ([]Entry, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, de := range des {
		name := de.Name()
		if !de.IsDir() || strings.HasSuffix(name, partial) || strings.HasPrefix(name, ".") {
			continue
		}
		m, err := readManifest(filepath.Join(dir, name))
		if err != nil || m.ID != name {
			continue
		}
		e := Entry{Manifest: m, Dir: filepath.Join(dir, name)}
		for _, f := range m.Files {
			if fi, err := os.Stat(filepath.Join(e.Dir, f.Name)); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok {
					e.Used += st.Blocks * 512
				}
			}
		}
		out = append(out, e)
	}
	// In the order they were taken: ids only sort by the second.
	slices.SortFunc(out, func(a, b Entry) int {
		if c := a.Finished.Compare(b.Finished); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

func readManifest(dir string) (Manifest, error) {
	var m Manifest
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%s: %w", filepath.Join(dir, manifestName), err)
	}
	if m.Version != ManifestVersion {
		return m, fmt.Errorf("%s: manifest version %d, this swarmvm reads %d", dir, m.Version, ManifestVersion)
	}
	return m, nil
}

// Chain is the backups a restore of id reads, the full one first.
func Chain(entries []Entry, id string) ([]Entry, error) {
	byID := map[string]Entry{}
	for _, e := range entries {
		byID[e.ID] = e
	}
	var chain []Entry
	for next := id; next != ""; {
		e, ok := byID[next]
		if !ok {
			if next == id {
				return nil, fmt.Errorf("no complete backup %s", id)
			}
			return nil, fmt.Errorf("backup %s needs %s, which is not in the repository", id, next)
		}
		chain = append(chain, e)
		if len(chain) > len(entries) {
			return nil, fmt.Errorf("backup %s: its parents form a loop", id)
		}
		next = e.Parent
	}
	slices.Reverse(chain)
	return chain, nil
}

// checksum reads a file whole: its size and SHA-256.
func checksum(path string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	return n, hex.EncodeToString(h.Sum(nil)), err
}

// syncDir makes a folder's entries (a rename, a new file) durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
