package preflight

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNotOwn is a VM file that is not this runner's own: another uid's, not
// a regular file, reached through a link, or with another name (a hard
// link someone else could read it through).
var ErrNotOwn = errors.New("not this VM's own file")

// OpenOwn opens one of the VM's own files (its disk, its NVRAM) once, and
// checks the open descriptor, not the name: a regular file of the runner's
// uid with one link, reached without a symbolic link (beneath the storage
// root, resolved by the kernel with openat2). QEMU is then handed this
// descriptor (and reopenings of it), so what was checked is what it uses,
// whatever appears under the name meanwhile.
func OpenOwn(root, variable, path string, flag int) (*os.File, error) {
	fd, err := openNoLinks(root, path, flag)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", variable, path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	if err := ownFile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s %s: %w", variable, path, err)
	}
	return f, nil
}

// CreateOwn creates path, which must not exist, as this uid's own file
// with perm, the way OpenOwn opens one: beneath the storage root without
// following a symbolic link; a file already there, whoever made it, is an
// error wrapping os.ErrExist and is left as it is.
func CreateOwn(root, variable, path string, perm uint32) (*os.File, error) {
	fd, err := openNoLinksMode(root, path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, perm)
	if err != nil {
		if errors.Is(err, unix.EEXIST) {
			err = fmt.Errorf("%w (made by another process meanwhile)", os.ErrExist)
		}
		return nil, fmt.Errorf("%s %s: %w", variable, path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

func openNoLinks(root, path string, flag int) (int, error) {
	return openNoLinksMode(root, path, flag, 0)
}

func openNoLinksMode(root, path string, flag int, perm uint32) (int, error) {
	flag |= unix.O_CLOEXEC | unix.O_NOFOLLOW
	rel, err := filepath.Rel(root, path)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return unix.Open(path, flag, perm)
	}
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(rootFD)
	how := &unix.OpenHow{Flags: uint64(flag), Mode: uint64(perm), Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS}
	fd, err := unix.Openat2(rootFD, rel, how)
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
		return -1, fmt.Errorf("%w: reached through a symbolic link", ErrNotOwn)
	}
	return fd, err
}

func ownFile(f *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return fmt.Errorf("%w: %s, not a regular file", ErrNotOwn, kind(st.Mode&unix.S_IFMT))
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%w: owned by uid %d, and this VM runs as uid %d", ErrNotOwn, st.Uid, os.Geteuid())
	case st.Nlink != 1:
		return fmt.Errorf("%w: it has %d names (hard links)", ErrNotOwn, st.Nlink)
	}
	return nil
}

// Reopen opens the file behind f again with other flags (QEMU wants a
// read-only and a read-write descriptor, with O_DIRECT for cache=none),
// through f itself, so that it is the same file whatever its name now
// points at.
func Reopen(f *os.File, flag int) (*os.File, error) {
	g, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), flag|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("reopen %s: %w", f.Name(), err)
	}
	var a, b unix.Stat_t
	if unix.Fstat(int(f.Fd()), &a) != nil || unix.Fstat(int(g.Fd()), &b) != nil || a.Dev != b.Dev || a.Ino != b.Ino {
		g.Close()
		return nil, fmt.Errorf("reopen %s: %w: another file", f.Name(), ErrNotOwn)
	}
	return g, nil
}

// Folders checks the folders between the storage root and each of the VM's
// own files (its disk, its NVRAM): each must be root's or the runner's own.
// A folder another uid made first (images/prod/, made by another VM) lets
// that uid remove or rename what the VM keeps in it. Missing folders are
// fine: the runner makes them, as its own.
func Folders(root string, vars []Var) Finding {
	const name, symptom = "folders", "VM files in a folder another user controls"
	for _, v := range vars {
		rel, err := filepath.Rel(root, filepath.Dir(v.Path))
		if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
			continue // directly in the root, or outside it (Paths judges those)
		}
		dir := root
		for _, part := range strings.Split(rel, "/") {
			dir = filepath.Join(dir, part)
			var st unix.Stat_t
			err := unix.Lstat(dir, &st)
			if errors.Is(err, unix.ENOENT) {
				break
			}
			if err != nil {
				return fail(name, ClassStorage, symptom, fmt.Sprintf("%s %s: %v", v.Name, dir, err), "check "+v.Name)
			}
			if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
				return fail(name, ClassStorage, symptom,
					fmt.Sprintf("%s %s is in %s, a folder of uid %d: that user can remove or rename what is in it", v.Name, v.Path, dir, st.Uid),
					fmt.Sprintf("keep %s in a folder of root's (images/) or of this VM's uid %d", v.Name, os.Geteuid()))
			}
		}
	}
	return pass(name, ClassStorage, "the VM's files are in folders of root's or its own")
}

// MkdirOwn makes the folder dir below root and the folders above it that
// are missing, one level at a time, each made beneath the last by its
// descriptor (no link followed), and checks each, made now or found, to be
// root's or this process's uid's. A folder another uid made first, or
// between a check and now, is refused, never used: its owner could remove
// or rename what the VM keeps in it. perm is for the folders made.
func MkdirOwn(root, variable, dir string, perm os.FileMode) error {
	rel, err := filepath.Rel(root, dir)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("%s's folder %s is not below the storage root %s", variable, dir, root)
	}
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s: storage root %s: %w", variable, root, err)
	}
	defer func() { unix.Close(fd) }()
	at := root
	for _, part := range strings.Split(rel, "/") {
		if part == "." || part == "" {
			continue
		}
		at = filepath.Join(at, part)
		if err := unix.Mkdirat(fd, part, uint32(perm.Perm())); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("%s's folder %s: %w", variable, at, err)
		}
		next, err := unix.Openat(fd, part, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("%s's folder %s is not a folder (a link, or a file): %w", variable, at, err)
		}
		unix.Close(fd)
		fd = next
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return fmt.Errorf("%s's folder %s: %w", variable, at, err)
		}
		if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
			return fmt.Errorf("%s's folder %s belongs to uid %d, which can remove or rename what is in it: keep %s in a folder of root's (images/) or of this VM's uid %d", variable, at, st.Uid, variable, os.Geteuid())
		}
	}
	return nil
}
