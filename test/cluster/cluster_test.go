// Package cluster runs swarmvm on a real multi-node Swarm: three Docker
// engines on this machine made by scripts/cluster.sh, each in network, mount
// and UTS namespaces of its own, with node-local storage, a folder all nodes
// share, a broker each, and a manager on Debian trixie's engine (26.x) beside
// workers on bookworm's (20.10). VMs run the test guest under TCG (asked for
// by name): the tests need guests that boot, write to their disks and answer
// ACPI. scripts/test.sh sets SWARMVM_E2E=1, under which a missing
// prerequisite fails instead of skipping; the cluster is brought up once for
// the package and taken down after it.
package cluster

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	nodes  = 3
	state  = "/var/lib/swarmvm-cluster"
	shared = "/var/lib/poc-qemu-shared" // the shared folder, as every node sees it
	local  = "/var/lib/poc-qemu"        // each node's own folder, as it sees it
)

var (
	image   = envOr("SWARMVM_IMAGE", "swarmvm/runner:dev")
	repo, _ = filepath.Abs(filepath.Join("..", ".."))
	bin     = filepath.Join(repo, "bin", "swarmvm")
	script  = filepath.Join(repo, "scripts", "cluster.sh")
	up      bool // the cluster came up in TestMain
	upErr   string
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func TestMain(m *testing.M) {
	if os.Getenv("SWARMVM_E2E") == "1" && os.Geteuid() == 0 {
		out, err := exec.Command(script, "up").CombinedOutput()
		up, upErr = err == nil, string(out)
		if up {
			err = placeGuest()
			up, upErr = err == nil, fmt.Sprint(err)
		}
	}
	code := m.Run()
	if up && os.Getenv("SWARMVM_CLUSTER_KEEP") != "1" {
		if out, err := exec.Command(script, "down").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "cluster.sh down: %v\n%s", err, out)
			code = 1
		}
	}
	os.Exit(code)
}

// require skips loudly outside the full suite and fails inside it.
func require(t testing.TB) {
	t.Helper()
	if os.Getenv("SWARMVM_E2E") != "1" {
		t.Skip("cluster test: run it with make test (sets SWARMVM_E2E=1, builds the image and the guest)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("cluster tests must run as root (namespaces, engines, other users' files)")
	}
	if !up {
		t.Fatalf("the test cluster did not come up (scripts/cluster.sh up):\n%s", upErr)
	}
}

// placeGuest puts the test guest's kernel and initrd where every VM can
// read them: each node's isos/ and the shared one.
func placeGuest() error {
	dirs := []string{filepath.Join(state, "shared", "isos")}
	for n := 1; n <= nodes; n++ {
		dirs = append(dirs, filepath.Join(storage(n), "isos"))
	}
	for _, d := range dirs {
		for _, f := range []string{"vmlinuz", "initrd.img"} {
			b, err := os.ReadFile(filepath.Join(repo, ".cache", "guest", f))
			if err != nil {
				return fmt.Errorf("test guest missing (make guest): %w", err)
			}
			if err := os.WriteFile(filepath.Join(d, f), b, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// storage is node n's own storage folder, seen from the host.
func storage(n int) string { return filepath.Join(state, fmt.Sprintf("n%d", n), "storage") }

// sharedStorage is the shared folder, seen from the host.
func sharedStorage() string { return filepath.Join(state, "shared") }

func hostname(n int) string { return fmt.Sprintf("svmc-n%d", n) }

func dockerHost(n int) string { return fmt.Sprintf("unix:///run/swarmvm-cluster/n%d/docker.sock", n) }

// manager is the node the CLI talks to: node 1 unless a test moves it.
var manager = 1

// dk runs the docker CLI against node n's engine.
func dk(t testing.TB, n int, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command("docker", append([]string{"-H", dockerHost(n)}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// must is dk that fails the test on an error.
func must(t testing.TB, n int, args ...string) string {
	t.Helper()
	out, err := dk(t, n, args...)
	if err != nil {
		t.Fatalf("docker %s (node %d): %v\n%s", strings.Join(args, " "), n, err, out)
	}
	return out
}

// swarmvm runs the CLI against the manager and returns its output and exit code.
func swarmvm(t testing.TB, args ...string) (string, int) {
	t.Helper()
	return swarmvmOn(t, manager, args...)
}

func swarmvmOn(t testing.TB, n int, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+dockerHost(n))
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("swarmvm %v: %v", args, err)
	}
	return string(out), code
}

func cluster(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(script, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cluster.sh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// label sets vm-capable on exactly the given nodes, and restores every
// node's label state when the test ends.
func label(t testing.TB, on ...int) {
	t.Helper()
	for n := 1; n <= nodes; n++ {
		verb := "unlabel"
		for _, o := range on {
			if o == n {
				verb = "label"
			}
		}
		args := []string{"node", verb, hostname(n)}
		if verb == "label" {
			args = append(args, "--force") // without a probe job each time: TestNodeProbeFromJob probes
		}
		if out, code := swarmvm(t, args...); code != 0 {
			t.Fatalf("swarmvm %s: %d\n%s", strings.Join(args, " "), code, out)
		}
	}
}

// vmArgs describe a VM that boots the test guest directly under TCG, with
// a short ACPI wait. storageDir is local or shared.
func vmArgs(name, storageDir string, extra ...string) []string {
	a := []string{"--name", name, "--accel", "tcg", "--memory", "256M", "--disk-size", "1G", "--image", image,
		"--boot-mode", "bios", "--shutdown-timeout", "20s", "--storage", storageDir,
		"--env", "KERNEL_PATH=" + storageDir + "/isos/vmlinuz", "--env", "INITRD_PATH=" + storageDir + "/isos/initrd.img"}
	return append(a, extra...)
}

// cmdline is the guest's kernel command line, with extra words.
func cmdline(words ...string) []string {
	return []string{"--env", "KERNEL_CMDLINE=" + strings.Join(append([]string{"console=ttyS0 quiet"}, words...), " ")}
}

// deploy runs swarmvm deploy and fails the test on a non-zero exit; the
// service and its home record are removed when the test ends.
func deploy(t testing.TB, args ...string) string {
	t.Helper()
	name := ""
	for i, a := range args {
		if a == "--name" {
			name = args[i+1]
		}
	}
	removeAfter(t, name)
	out, code := swarmvm(t, append([]string{"deploy", "--wait", "3m"}, args...)...)
	if code != 0 {
		t.Fatalf("deploy %s: exit %d\n%s", name, code, out)
	}
	return out
}

func removeAfter(t testing.TB, name string) {
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := dk(t, manager, "service", "ps", "--no-trunc", name)
			t.Logf("tasks of %s:\n%s", name, out)
			out, _ = dk(t, manager, "service", "logs", "--raw", name)
			t.Logf("runner log of %s:\n%s", name, tail(out, 60))
		}
		dk(t, manager, "service", "rm", name)
		waitNoQEMU(t, name, 3*time.Minute)
		dk(t, manager, "config", "rm", "swarmvm-home-"+name)
	})
}

func tail(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// task is a service's newest task as Swarm reports it.
type task struct{ node, state, err string }

func newestTask(t testing.TB, service string) task {
	t.Helper()
	out, _ := dk(t, manager, "service", "ps", "--no-trunc", "--format", "{{.Node}}|{{.CurrentState}}|{{.Error}}", service)
	f := strings.SplitN(strings.Split(out, "\n")[0], "|", 3)
	for len(f) < 3 {
		f = append(f, "")
	}
	return task{node: f[0], state: f[1], err: f[2]}
}

// waitTask waits until the newest task's state starts with want (on node,
// unless node is empty).
func waitTask(t testing.TB, service, want, node string, timeout time.Duration) task {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var tk task
	for time.Now().Before(deadline) {
		tk = newestTask(t, service)
		if strings.HasPrefix(tk.state, want) && (node == "" || tk.node == node) {
			return tk
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("%s: newest task %+v, want %s on %q within %v", service, tk, want, node, timeout)
	return tk
}

// waitFile waits for path to contain want (count times at least).
func waitFile(t testing.TB, path, want string, count int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(path)
		if bytes.Count(b, []byte(want)) >= count {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	b, _ := os.ReadFile(path)
	t.Fatalf("%s: no %q (×%d) within %v:\n%s", path, want, count, timeout, tail(string(b), 30))
}

func serialLog(dir, vm string) string { return filepath.Join(dir, "logs", vm+".serial.log") }

// qemus lists the QEMU processes running a VM, on any node of this machine.
func qemus(vm string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if strings.Contains(args[0], "qemu-system") && bytes.Contains(b, []byte("\x00guest="+vm+",")) {
			out = append(out, pid)
		}
	}
	return out
}

func waitNoQEMU(t testing.TB, vm string, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for len(qemus(vm)) > 0 {
		if time.Now().After(deadline) {
			t.Errorf("QEMU of %s still running after %v", vm, timeout)
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// vmFiles lists, for each node's own storage and the shared folder, the
// files of a VM in images/.
func vmFiles(vm string) map[string][]string {
	out := map[string][]string{}
	dirs := map[string]string{"shared": sharedStorage()}
	for n := 1; n <= nodes; n++ {
		dirs[hostname(n)] = storage(n)
	}
	for where, d := range dirs {
		m, _ := filepath.Glob(filepath.Join(d, "images", vm+".*"))
		for _, f := range m {
			out[where] = append(out[where], filepath.Base(f))
		}
	}
	return out
}

func contains(t testing.TB, what, s string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(s, w) {
			t.Errorf("%s lacks %q:\n%s", what, w, s)
		}
	}
}

func uniq(prefix string) string { return fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano()%100000) }
