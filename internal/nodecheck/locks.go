package nodecheck

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/preflight"
)

// Shared storage is safe because QEMU's image locks (open file description
// byte-range locks) keep a second QEMU off a disk. That holds across nodes
// only where the filesystem carries those locks to a server every node
// asks: NFSv4 does (locks are part of the protocol), NFSv3 does through
// lockd unless mounted nolock or local_lock, CephFS does. A node-local
// filesystem, or a network one that keeps locks on the client, lets two
// nodes' QEMUs both believe they hold the disk.
type lockScope struct {
	fs      string
	shared  bool   // locks are seen by every node
	unknown bool   // swarmvm cannot tell
	why     string // in words
}

// fsNames are statfs magic numbers of the filesystems the verdict knows.
var fsNames = map[int64]string{
	0x6969: "nfs", 0x00c36400: "ceph", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x65735546: "fuse",
	0x01021997: "9p", 0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs",
	0x794c7630: "overlay", 0x2FC12FC1: "zfs",
}

// locksAcrossNodes says whether QEMU's locks on files under dir are seen
// by every node that mounts the same filesystem.
func locksAcrossNodes(dir string) (lockScope, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return lockScope{}, err
	}
	fs := fsNames[int64(st.Type)]
	switch fs {
	case "nfs":
		opts := mountOptions(dir)
		switch {
		case strings.Contains(opts, "local_lock=all") || strings.Contains(opts, "local_lock=posix") || strings.Contains(opts, ",nolock"):
			return lockScope{fs: "nfs (" + opts + ")", why: "mounted with locks kept on the client (nolock or local_lock): another node does not see them"}, nil
		case strings.Contains(opts, "vers=4"):
			return lockScope{fs: "nfs4", shared: true, why: "NFSv4 carries byte-range locks to the server, so every node sees them"}, nil
		}
		return lockScope{fs: "nfs (" + opts + ")", shared: true, why: "NFSv3 carries locks through lockd (NLM), which must run on every node and the server; NFSv4 is the surer choice"}, nil
	case "ceph":
		return lockScope{fs: fs, shared: true, why: "CephFS carries byte-range locks through its metadata servers"}, nil
	case "cifs", "smb2", "fuse":
		return lockScope{fs: fs, unknown: true, why: "whether byte-range locks reach the server depends on the server and mount options (sshfs keeps them local; GlusterFS forwards them): test it before trusting it"}, nil
	case "":
		fs = fmt.Sprintf("filesystem 0x%x", st.Type)
		return lockScope{fs: fs, unknown: true, why: "swarmvm does not know how this filesystem treats byte-range locks"}, nil
	}
	return lockScope{fs: fs, why: "a node's own filesystem: locks are seen on this node only"}, nil
}

// mountOptions are the options of the mount that holds dir.
func mountOptions(dir string) string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return ""
	}
	defer f.Close()
	best, opts := "", ""
	real, _ := filepath.EvalSymlinks(dir)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) >= 4 && (real == fl[1] || strings.HasPrefix(real, strings.TrimSuffix(fl[1], "/")+"/")) && len(fl[1]) > len(best) {
			best, opts = fl[1], fl[3]
		}
	}
	return opts
}

// Locks reports how QEMU's image locks behave on the storage folder:
// for the node's own folder (local storage) any filesystem will do; a
// folder meant for storage_mode shared must carry the locks to every node.
func Locks(dir string, shared bool) preflight.Finding {
	name := "storage locks"
	if shared {
		name = "shared storage"
	}
	s, err := locksAcrossNodes(dir)
	if err != nil {
		return preflight.Finding{Name: name, Class: preflight.ClassStorage, Symptom: "cannot tell how image locks behave", Cause: err.Error(), Fix: "mount the storage folder at " + dir}
	}
	detail := fmt.Sprintf("%s: %s: %s", dir, s.fs, s.why)
	switch {
	case !shared:
		return preflight.Finding{Name: name, Class: preflight.ClassStorage, OK: true, Detail: detail + " (right for storage_mode local)"}
	case s.shared:
		return preflight.Finding{Name: name, Class: preflight.ClassStorage, OK: true, Detail: detail + ": safe for storage_mode shared"}
	case s.unknown:
		return preflight.Finding{Name: name, Class: preflight.ClassStorage, OK: true, Detail: detail + ": storage_mode shared at your own risk"}
	}
	return preflight.Finding{Name: name, Class: preflight.ClassStorage, Symptom: "two nodes could run QEMUs on one disk",
		Cause: detail, Fix: "mount a filesystem every node shares and that carries locks (NFSv4) at " + dir + ", or keep its VMs on storage_mode local"}
}
