package nodecheck

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/preflight"
)

// node label prepares the storage layout: from nothing, and from the
// single-user layout (all 10001:10001 0750), without touching a file; the
// probe fails before and passes after.
func TestPrepareStorage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (chown): run it with make test")
	}
	for _, legacy := range []bool{false, true} {
		dir := filepath.Join(t.TempDir(), "store")
		disk := filepath.Join(dir, "images", "old.qcow2")
		if legacy {
			for _, d := range []string{dir, dir + "/images", dir + "/isos", dir + "/logs"} {
				os.Mkdir(d, 0o750)
				os.Chown(d, 10001, 10001)
			}
			os.WriteFile(disk, []byte("disk"), 0o600)
			os.Chown(disk, 10001, 10001)
		}
		if f := Storage(dir); f.OK || !strings.Contains(f.Fix, "swarmvm node label") {
			t.Errorf("legacy=%v: probe before: %+v", legacy, f)
		}
		did, err := PrepareStorage(dir)
		if err != nil {
			t.Fatalf("legacy=%v: %v (did %v)", legacy, err, did)
		}
		t.Logf("legacy=%v: %s", legacy, strings.Join(did, "; "))
		for _, d := range []string{"images", "logs"} {
			fi, _ := os.Stat(filepath.Join(dir, d))
			st := fi.Sys().(*syscall.Stat_t)
			if st.Uid != 0 || st.Gid != config.RunnerGID || fi.Mode()&(os.ModePerm|os.ModeSticky) != os.ModeSticky|0o770 {
				t.Errorf("%s: %d:%d %v", d, st.Uid, st.Gid, fi.Mode())
			}
		}
		if f := Storage(dir); !f.OK {
			t.Errorf("legacy=%v: probe after: %+v", legacy, f)
		}
		if again, _ := PrepareStorage(dir); len(again) != 0 {
			t.Errorf("a second run changed %v", again)
		}
		if legacy {
			fi, _ := os.Stat(disk)
			if st := fi.Sys().(*syscall.Stat_t); st.Uid != 10001 || fi.Mode().Perm() != 0o600 {
				t.Errorf("a VM's file was touched: %d %v", st.Uid, fi.Mode())
			}
		}
	}
}

// node check says how image locks behave on the storage: any filesystem
// serves local storage; a node's own filesystem is refused for shared
// storage, naming it.
func TestProbeLocks(t *testing.T) {
	dir := t.TempDir()
	if f := Locks(dir, false); !f.OK || !strings.Contains(f.Detail, "right for storage_mode local") {
		t.Errorf("local: %+v", f)
	}
	f := Locks(dir, true)
	if f.OK || !strings.Contains(f.Cause, "locks are seen on this node only") || !strings.Contains(f.Fix, "NFSv4") {
		t.Errorf("a node's own filesystem for shared storage: %+v", f)
	}
}

// A node probed for TCG needs neither KVM nor a broker: what it lacks is
// said, and the probe passes; probed for KVM, the same node fails on both.
// The probe says first where it runs and what the CPU offers.
func TestProbeForTCG(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	if _, err := PrepareStorage(store); err != nil {
		t.Fatal(err)
	}
	o := Options{KVMDevice: "/dev/kvm-absent", BrokerDir: t.TempDir(), Storage: store}
	byName := func(fs []preflight.Finding) map[string]preflight.Finding {
		m := map[string]preflight.Finding{}
		for _, f := range fs {
			m[f.Name] = f
		}
		return m
	}
	kvm := byName(Probe(t.Context(), o))
	if kvm["kvm device"].OK || kvm["broker"].OK {
		t.Errorf("probed for KVM without a device or broker: %+v %+v", kvm["kvm device"], kvm["broker"])
	}
	o.Accel = config.AccelTCG
	fs := Probe(t.Context(), o)
	if fs[0].Name != "machine" || !strings.Contains(fs[0].Detail, "the CPU") {
		t.Errorf("the probe does not start with where it runs: %+v", fs[0])
	}
	tcg := byName(fs)
	for _, name := range []string{"kvm device", "broker"} {
		if f := tcg[name]; !f.OK || !strings.HasPrefix(f.Detail, "none here (") {
			t.Errorf("probed for TCG, %s: %+v", name, f)
		}
	}
	if !strings.Contains(tcg["kvm device"].Detail, "run under TCG") || !strings.Contains(tcg["broker"].Detail, "bridge networking does") {
		t.Errorf("what is lacking is not explained: %q, %q", tcg["kvm device"].Detail, tcg["broker"].Detail)
	}
}
