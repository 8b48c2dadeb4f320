// Package nodecheck is the node itself, as a VM needs it: probes of this
// machine (broker, storage, image locks across nodes, the routing mesh) for
// swarmvm node check and node label, and the storage layout node label
// prepares. It asks nothing of the Engine API.
package nodecheck

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/preflight"
)

// Options says what a VM-capable node must have.
type Options struct {
	KVMDevice     string
	BrokerDir     string
	Storage       string
	SharedStorage string // the folder of storage_mode shared VMs, if any
	// Accel is what the node is probed for: kvm (the default), or tcg for
	// a node without KVM, which runs only the VMs that ask for TCG.
	Accel string
}

// Probe checks this node (the machine it runs on) for what VMs need: a
// working KVM device, a broker answering on its socket, the storage folders
// for the VMs' users with image locks of the right reach, and the routing
// mesh. It says first where it runs and what the CPU offers. Probed for
// TCG, neither KVM nor the broker is required; what they lack is said.
func Probe(ctx context.Context, o Options) []preflight.Finding {
	kvm, f := preflight.OpenKVM(o.KVMDevice, nil)
	if kvm != nil {
		kvm.Close()
	}
	broker := Broker(ctx, o.BrokerDir+"/broker.sock")
	if o.Accel == config.AccelTCG {
		f = notNeeded(f, "VMs here run under TCG (emulation, slowly)")
		broker = notNeeded(broker, "TCG VMs with user networking need none; bridge networking does")
	}
	fs := []preflight.Finding{preflight.ThisMachine().Finding(), f, broker, Storage(o.Storage), Locks(o.Storage, false)}
	if o.SharedStorage != "" {
		fs = append(fs, Storage(o.SharedStorage), Locks(o.SharedStorage, true))
	}
	return append(fs, IPVS())
}

// ProbeInTask checks a node from inside a Swarm task there (a probe job,
// run as the runner's user in its group, with the storage and broker
// folders mounted as a VM's are): KVM as a VM gets it, from the broker
// (the descriptor granted and proven with a test VM), the storage folders
// with their image locks, and the routing mesh. A task cannot open the
// device itself (Swarm gives a service none), and that the task ran at all
// proves the runner image is on the node.
func ProbeInTask(ctx context.Context, o Options) []preflight.Finding {
	socket := o.BrokerDir + "/broker.sock"
	lease, f, kvm := preflight.BrokerKVM(ctx, socket, "node-probe", 3, nil)
	if lease != nil {
		f.Close()
		lease.Close()
	}
	if o.Accel == config.AccelTCG {
		kvm = notNeeded(kvm, "VMs here run under TCG (emulation, slowly); bridge networking still needs the broker")
	}
	fs := []preflight.Finding{kvm, Storage(o.Storage), Locks(o.Storage, false)}
	if o.SharedStorage != "" {
		fs = append(fs, Storage(o.SharedStorage), Locks(o.SharedStorage, true))
	}
	return append(fs, IPVS())
}

// notNeeded turns a failed finding into a passed one that says what is
// missing and why that is fine here.
func notNeeded(f preflight.Finding, why string) preflight.Finding {
	if f.OK {
		return f
	}
	return preflight.Finding{Name: f.Name, Class: f.Class, OK: true, Detail: "none here (" + f.Cause + "): " + why}
}

// IPVS tells whether Swarm's routing mesh can work here: it needs the
// kernel's IPVS. Without it, ports published in ingress mode are not
// reachable on this node; host mode still works. Not a reason to refuse
// the label.
func IPVS() preflight.Finding {
	f := preflight.Finding{Name: "routing mesh", Class: preflight.ClassNet, OK: true}
	if _, err := os.Stat("/proc/net/ip_vs"); err != nil {
		f.Detail = "no IPVS in this kernel (/proc/net/ip_vs): ports published in ingress mode will not answer here; use publish: host"
	} else {
		f.Detail = "IPVS present: ingress-mode ports work"
	}
	return f
}

// Broker counts any well-formed answer as a live broker: a refusal
// (this probe is not the runner's user) proves it is listening.
func Broker(ctx context.Context, socket string) preflight.Finding {
	const name, symptom = "broker", "VM tasks will fail preflight: KVM not available"
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	lease, err := fdpass.Ask(actx, socket, fdpass.Request{VM: "node-probe", KVM: true})
	var refused *fdpass.RefusedError
	switch {
	case err == nil:
		lease.Close()
		return preflight.Finding{Name: name, Class: preflight.ClassKVM, OK: true, Detail: socket + " answers (granted KVM to this probe)"}
	case errors.As(err, &refused):
		return preflight.Finding{Name: name, Class: preflight.ClassKVM, OK: true, Detail: socket + " answers (refused this probe: " + refused.Reason + ")"}
	}
	cause := fmt.Sprintf("no broker answers on %s: %v", socket, err)
	if errors.Is(err, syscall.ENOENT) {
		cause = "no broker socket at " + socket
	}
	return preflight.Finding{Name: name, Class: preflight.ClassKVM, Symptom: symptom, Cause: cause,
		Fix: "install and start the broker on this node: systemctl enable --now swarmvm-broker (deploy/systemd)"}
}

// The storage layout on a node. The VMs' group may enter the root and read
// isos/; images/ and logs/ are shared like /tmp: root's, group-writable,
// sticky, so that each VM (its own uid) creates its files there (0600) and
// cannot remove or rename another's.
const (
	rootDirMode   os.FileMode = 0o750
	sharedDirMode             = os.ModeSticky | 0o770
)

var sharedDirs = []string{"images", "logs"}

// PrepareStorage gives the storage folder on this node the layout VMs
// need, creating what is missing and setting the group and modes of the
// folders (files are never touched). It needs root; it reports each change.
func PrepareStorage(dir string) ([]string, error) {
	type folder struct {
		path string
		uid  int // -1 keeps the owner
		mode os.FileMode
	}
	folders := []folder{{dir, -1, rootDirMode}, {filepath.Join(dir, "isos"), -1, rootDirMode}}
	for _, d := range sharedDirs {
		folders = append(folders, folder{filepath.Join(dir, d), 0, sharedDirMode})
	}
	var did []string
	for _, d := range folders {
		changes, err := ensureDir(d.path, d.uid, d.mode)
		did = append(did, changes...)
		if err != nil {
			return did, err
		}
	}
	return did, nil
}

// ensureDir makes path a folder of group config.RunnerGID with exactly mode (and
// owner uid, unless -1), creating it if missing, and says what it changed.
func ensureDir(path string, uid int, mode os.FileMode) ([]string, error) {
	var did []string
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.Mkdir(path, mode.Perm()); err != nil {
			return did, err
		}
		did = append(did, "created "+path)
		if fi, err = os.Stat(path); err != nil {
			return did, err
		}
	case err != nil:
		return did, err
	case !fi.IsDir():
		return did, fmt.Errorf("%s is not a folder", path)
	}
	st := fi.Sys().(*syscall.Stat_t)
	owner := int(st.Uid)
	if uid >= 0 {
		owner = uid
	}
	if owner != int(st.Uid) || st.Gid != config.RunnerGID {
		if err := os.Chown(path, owner, config.RunnerGID); err != nil {
			return did, err
		}
		did = append(did, fmt.Sprintf("%s: owner %d:%d -> %d:%d", path, st.Uid, st.Gid, owner, config.RunnerGID))
	}
	if have := fi.Mode() & (os.ModePerm | os.ModeSticky); have != mode {
		if err := os.Chmod(path, mode); err != nil {
			return did, err
		}
		did = append(did, fmt.Sprintf("%s: mode %v -> %v", path, have, mode))
	}
	return did, nil
}

// Storage checks the storage layout PrepareStorage makes.
func Storage(dir string) preflight.Finding {
	const name, symptom = "storage", "VM tasks will fail: bind source missing, or VMs cannot keep their files apart"
	fix := fmt.Sprintf("swarmvm node label on this node, as root, prepares it (or: install -d -g %d -m 0750 %s %s/isos; install -d -o root -g %d -m 1770 %s/images %s/logs)",
		config.RunnerGID, dir, dir, config.RunnerGID, dir, dir)
	fail := func(cause string) preflight.Finding {
		return preflight.Finding{Name: name, Class: preflight.ClassStorage, Symptom: symptom, Cause: cause, Fix: fix}
	}
	fi, err := os.Stat(dir)
	if err != nil || !fi.IsDir() {
		return fail(dir + " does not exist on this node")
	}
	if st := fi.Sys().(*syscall.Stat_t); !(st.Gid == config.RunnerGID && fi.Mode()&0o050 == 0o050) && fi.Mode()&0o005 != 0o005 {
		return fail(fmt.Sprintf("%s is %d:%d mode %v: group %d may not enter it", dir, st.Uid, st.Gid, fi.Mode().Perm(), config.RunnerGID))
	}
	for _, d := range sharedDirs {
		p := filepath.Join(dir, d)
		fi, err := os.Stat(p)
		if err != nil || !fi.IsDir() {
			return fail(p + " does not exist")
		}
		st := fi.Sys().(*syscall.Stat_t)
		if st.Gid != config.RunnerGID || fi.Mode()&0o070 != 0o070 || fi.Mode()&os.ModeSticky == 0 {
			return fail(fmt.Sprintf("%s is %d:%d mode %v: each VM runs as its own uid in group %d and needs it group-writable and sticky", p, st.Uid, st.Gid, fi.Mode()&(os.ModePerm|os.ModeSticky), config.RunnerGID))
		}
	}
	return preflight.Finding{Name: name, Class: preflight.ClassStorage, OK: true,
		Detail: fmt.Sprintf("%s: images/ and logs/ group %d, sticky: each VM keeps its own files", dir, config.RunnerGID)}
}
