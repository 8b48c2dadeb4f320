package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// extent is a line of nbdinfo --map.
type extent struct {
	off, n int64
	desc   string
}

// nbdMap runs nbdinfo --map=ctx against uri.
func nbdMap(t testing.TB, ctx, uri string) ([]extent, error) {
	t.Helper()
	out, err := exec.Command("nbdinfo", "--map="+ctx, uri).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("nbdinfo --map=%s: %v: %s", ctx, err, out)
	}
	var es []extent
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(l)
		if len(f) < 4 {
			return nil, fmt.Errorf("nbdinfo --map line %q", l)
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		es = append(es, extent{off, n, strings.Join(f[3:], " ")})
	}
	return es, nil
}

// lastWroteIn is the guest writer's last block in a serial log, as
// lastWrote counts.
func lastWroteIn(path string) int {
	b, _ := os.ReadFile(path)
	m := wroteRE.FindAllStringSubmatch(string(b), -1)
	if len(m) == 0 {
		return -1
	}
	r, _ := strconv.Atoi(m[len(m)-1][1])
	k, _ := strconv.Atoi(m[len(m)-1][2])
	return (r-1)*writerBlocks + k
}

var uriRE = regexp.MustCompile(`(?m)^(nbds://\S+)$`)

// Pull mode through Swarm: a VM deployed with an export port, whose guest
// writes without pause from 64 MiB on. After a full backup, swarmvm backup
// export opens an NBD export at one point: nbdinfo --map of its
// qemu:dirty-bitmap:swarmvm-<full> lists changed extents, all in the
// guest's write area; two copies of the export taken while the guest goes
// on writing are the same bytes. Without TLS, or with a key not signed
// with the VM's, nothing is served; a backup while it is open is refused;
// --close closes it, after which the next backup is incremental (the
// bitmap is intact); an export whose ticket runs out closes by itself.
func TestSwarmPullExport(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	repo := backupRepo(t)
	t.Setenv("SWARMVM_CONSOLE_KEYS", t.TempDir())
	name := fmt.Sprintf("e2e-export-%d", time.Now().UnixNano()%100000)
	port := 20000 + int(time.Now().UnixNano()%10000)
	e.removeAfter(name)
	args := e.vmArgs(name, "tcg", "--export-port", strconv.Itoa(port), "--env", fmt.Sprintf("KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.writer=%d", writerBlocks))
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "120s"}, args...)...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	serial := filepath.Join(e.storage, "logs", name+".serial.log")
	waitUntil(t, "the guest writing", 180*time.Second, func() bool { return lastWroteIn(serial) >= 0 })

	// A full backup: its bitmap marks what the guest writes from now on.
	var out string
	var code int
	deadline := time.Now().Add(60 * time.Second)
	for out, code = e.swarmvm("backup", name, "--repo", repo); code != 0 && time.Now().Before(deadline); out, code = e.swarmvm("backup", name, "--repo", repo) {
		time.Sleep(2 * time.Second)
	}
	ids := backupIDs(t, repo, name)
	if code != 0 || len(ids) != 1 {
		t.Fatalf("full backup: exit %d, backups %v:\n%s", code, ids, out)
	}
	full := ids[0]
	w := lastWroteIn(serial)
	waitUntil(t, "the guest writing after the backup", 120*time.Second, func() bool { return lastWroteIn(serial) >= w+3 })

	psk := filepath.Join(t.TempDir(), "ticket.psk")
	out, code = e.swarmvm("backup", "export", name, "--ttl", "10m", "--psk-file", psk)
	m := uriRE.FindStringSubmatch(out)
	if code != 0 || m == nil || !strings.Contains(out, "export ") || !strings.Contains(out, "meta context qemu:dirty-bitmap:swarmvm-"+full+": what changed since backup "+full) {
		t.Fatalf("backup export: exit %d:\n%s", code, out)
	}
	t.Logf("backup export:\n%s", out)
	uri := m[1]
	if fi, err := os.Stat(psk); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("the ticket file: %v %v", fi, err)
	}
	exportID := regexp.MustCompile(`export (\S+) on node`).FindStringSubmatch(out)
	if exportID == nil {
		t.Fatalf("no export id in:\n%s", out)
	}

	// The bitmap: changed extents, every one in the guest's write area.
	es, err := nbdMap(t, "qemu:dirty-bitmap:swarmvm-"+full, uri)
	if err != nil {
		t.Fatal(err)
	}
	var dirty int64
	for _, x := range es {
		if x.desc != "dirty" {
			continue
		}
		dirty += x.n
		if x.off < 64<<20 || x.off+x.n > (64+writerBlocks)<<20 {
			t.Errorf("dirty extent [%d, %d) outside the guest's writes [64 MiB, %d MiB)", x.off, x.off+x.n, 64+writerBlocks)
		}
	}
	t.Logf("qemu:dirty-bitmap:swarmvm-%s: %d extents, %d bytes dirty", full, len(es), dirty)
	if dirty < 3<<20 {
		t.Errorf("%d bytes dirty; the guest wrote at least 3 MiB since the backup: %+v", dirty, es)
	}
	if alloc, err := nbdMap(t, "base:allocation", uri); err != nil || len(alloc) == 0 {
		t.Errorf("base:allocation: %v %+v", err, alloc)
	}

	// One point: two copies while the guest writes are the same bytes.
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")
	run(t, "nbdcopy", uri, a)
	w = lastWroteIn(serial)
	waitUntil(t, "the guest writing between the copies", 120*time.Second, func() bool { return lastWroteIn(serial) >= w+3 })
	run(t, "nbdcopy", uri, b)
	if !sameFiles(t, a, b) {
		t.Errorf("two copies of one export differ: it is not one point in time")
	}

	// The ticket: no TLS, or another key, gets nothing.
	plain := "nbd://127.0.0.1:" + strconv.Itoa(port) + "/disk0"
	if out, err := exec.Command("nbdinfo", plain).CombinedOutput(); err == nil {
		t.Errorf("nbdinfo without TLS was served:\n%s", out)
	}
	user, _, _ := strings.Cut(string(must(os.ReadFile(psk))), ":")
	wrong := filepath.Join(dir, "wrong.psk")
	os.WriteFile(wrong, []byte(user+":"+strings.Repeat("ab", 32)+"\n"), 0o600)
	if out, err := exec.Command("nbdinfo", strings.Replace(uri, psk, wrong, 1)).CombinedOutput(); err == nil {
		t.Errorf("nbdinfo with a key not signed with the VM's was served:\n%s", out)
	}
	if out, code := e.swarmvm("backup", name, "--repo", repo); code == 0 || !strings.Contains(out, "an export (open until") {
		t.Errorf("a backup while the export is open: exit %d:\n%s", code, out)
	}

	// Closed on request: nothing served; the next backup is incremental.
	if out, code := e.swarmvm("backup", "export", name, "--close", exportID[1]); code != 0 || !strings.Contains(out, "closed") {
		t.Errorf("export --close: exit %d:\n%s", code, out)
	}
	if out, err := exec.Command("nbdinfo", uri).CombinedOutput(); err == nil {
		t.Errorf("the closed export still served:\n%s", out)
	}
	if out, code := e.swarmvm("backup", name, "--repo", repo); code != 0 || !strings.Contains(out, "incremental backup (changes since backup "+full) {
		t.Errorf("the backup after the export: exit %d:\n%s", code, out)
	}

	// An export whose end comes closes by itself (the job's side, run here
	// as the VM's uid, asks for one 6 s long).
	uid := vmUID(t, name)
	cmd := exec.Command(swarmvmBin(t), "backup", "export", "here", "--id", "short-1", "--until", time.Now().Add(6*time.Second).UTC().Format(time.RFC3339))
	cmd.Env = []string{"VM_NAME=" + name, "STORAGE_DIR=" + e.storage, "PATH=" + os.Getenv("PATH")}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: runnerUID}}
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "export short-1 open") {
		t.Fatalf("export here: %v\n%s", err, out)
	}
	waitUntil(t, "the short export to close by itself", 60*time.Second, func() bool {
		out, _ := exec.Command("docker", "service", "logs", "--raw", name).CombinedOutput()
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "event=export-closed") && strings.Contains(l, "backup=short-1") && strings.Contains(l, "its ticket expired") {
				return true
			}
		}
		return false
	})
	if out, code := e.swarmvm("backup", name, "--repo", repo); code != 0 || !strings.Contains(out, "incremental backup") {
		t.Errorf("the backup after the expired export: exit %d:\n%s", code, out)
	}
}

// waitUntil polls f until it holds, or fails the test after timeout.
func waitUntil(t testing.TB, what string, timeout time.Duration, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// sameFiles compares two files' bytes.
func sameFiles(t testing.TB, a, b string) bool {
	t.Helper()
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	if err1 != nil || err2 != nil {
		t.Fatalf("reading copies: %v %v", err1, err2)
	}
	return bytes.Equal(x, y)
}

// vmUID is a VM service's uid.
func vmUID(t testing.TB, service string) uint32 {
	t.Helper()
	out, err := exec.Command("docker", "service", "inspect", "--format", "{{.Spec.TaskTemplate.ContainerSpec.User}}", service).Output()
	if err != nil {
		t.Fatal(err)
	}
	u, _, _ := strings.Cut(strings.TrimSpace(string(out)), ":")
	n, err := strconv.ParseUint(u, 10, 32)
	if err != nil {
		t.Fatalf("service user %q", out)
	}
	return uint32(n)
}
