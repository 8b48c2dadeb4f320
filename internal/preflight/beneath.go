package preflight

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Beneath checks a path that lies under the storage root the way the kernel
// resolves it, with openat2(RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS) from the
// root: a symlink that leads out of the root (to /dev, /proc/self, another
// VM's folder) is refused, and so is anything that is not a regular file (a
// FIFO, a device). A path that does not exist yet is judged by its nearest
// existing folder. Paths outside the root are only checked for being
// regular files.
func Beneath(root, variable, path string) Finding {
	return beneath(root, Var{Name: variable, Path: path})
}

func beneath(root string, v Var) Finding {
	const name, symptom = "path", "unsafe path"
	variable, path := v.Name, v.Path
	rel, err := filepath.Rel(root, path)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return regularOrAbsent(name, symptom, v)
	}
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return pass(name, ClassStorage, "%s: storage root %s not open (%v); the storage check reports it", variable, root, err)
	}
	defer unix.Close(rootFD)
	how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS}
	for probe := rel; ; probe = filepath.Dir(probe) {
		fd, err := unix.Openat2(rootFD, probe, how)
		switch {
		case err == nil:
			defer unix.Close(fd)
			return checkFD(name, symptom, v, fd, probe == rel)
		case errors.Is(err, unix.EXDEV), errors.Is(err, unix.ELOOP):
			return fail(name, ClassStorage, symptom,
				fmt.Sprintf("%s %s leads out of the storage root %s through a symbolic link", variable, path, root),
				fmt.Sprintf("point %s at a real file under %s (no links out of it)", variable, root))
		case errors.Is(err, unix.ENOENT) && probe != ".":
			continue
		default:
			return fail(name, ClassStorage, symptom, fmt.Sprintf("%s %s: %v", variable, path, err), "check "+variable)
		}
	}
}

func checkFD(name, symptom string, v Var, fd int, exists bool) Finding {
	variable, path := v.Name, v.Path
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fail(name, ClassStorage, symptom, err.Error(), "check "+variable)
	}
	mode := st.Mode & unix.S_IFMT
	if exists && v.Dir && mode != unix.S_IFDIR {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("%s %s is not a folder (%s)", variable, path, kind(mode)),
			fmt.Sprintf("point %s at a folder of the VM's own", variable))
	}
	if exists && !v.Dir && mode != unix.S_IFREG {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("%s %s is not a regular file (%s)", variable, path, kind(mode)),
			fmt.Sprintf("point %s at a regular file", variable))
	}
	if !exists && mode != unix.S_IFDIR {
		return fail(name, ClassStorage, symptom, fmt.Sprintf("a part of %s %s is not a folder (%s)", variable, path, kind(mode)), "check "+variable)
	}
	return pass(name, ClassStorage, "%s resolves under the storage root", variable)
}

func regularOrAbsent(name, symptom string, v Var) Finding {
	variable, path := v.Name, v.Path
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().IsRegular() && !v.Dir || fi.IsDir() && v.Dir {
		return pass(name, ClassStorage, "%s is outside the storage root", variable)
	}
	return fail(name, ClassStorage, symptom, fmt.Sprintf("%s %s is not a regular file (%s)", variable, path, fi.Mode().Type()),
		fmt.Sprintf("point %s at a regular file", variable))
}

func kind(mode uint32) string {
	switch mode {
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFDIR:
		return "a folder"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("mode %#o", mode)
}

// Var is a path variable and its value.
type Var struct {
	Name, Path string
	Dir        bool // the path names a folder (TPM_STATE), not a file
}

// Paths runs Beneath for every set path variable and reports the first
// problem, or one pass for them all.
func Paths(root string, vars []Var) Finding {
	n := 0
	for _, v := range vars {
		if v.Path == "" {
			continue
		}
		if f := beneath(root, v); !f.OK {
			return f
		}
		n++
	}
	return pass("paths", ClassStorage, "%d path variables resolve safely (nothing leads out of %s; regular files only)", n, root)
}
