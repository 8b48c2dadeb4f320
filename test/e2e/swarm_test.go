package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/kvmtest"
	"github.com/swarmvm/swarmvm/internal/procfs"
)

// swarmEnv is what a Swarm test needs on this node: a Swarm, a broker with
// its socket folder, a storage folder with the test guest, and the node's
// label state restored afterwards.
type swarmEnv struct {
	t         testing.TB
	storage   string
	brokerDir string
	broker    *lockedBuf
	node      string // this engine's node ID: the home of every VM here
}

// vmUser is a VM service's user: its own uid, derived from its name, in
// the runner's group.
var vmUser = regexp.MustCompile(`^10[0-9]{6}:10001$`)

func newSwarmEnv(t testing.TB) *swarmEnv {
	t.Helper()
	require(t)
	out, _ := exec.Command("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").Output()
	if strings.TrimSpace(string(out)) != "active" {
		t.Fatal("this engine is not in a swarm: run scripts/swarm.sh (make test does)")
	}
	store, err := os.MkdirTemp("/var/tmp", "swarmvm-e2e-store-")
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(store, "isos"), 0o755)
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		copyFile(t, guestFile(f), filepath.Join(store, "isos", f))
	}
	chownAll(t, store, runnerUID)
	os.Chmod(store, 0o755)
	dir, bout, _ := hostBroker(t)
	id, _ := exec.Command("docker", "info", "--format", "{{.Swarm.NodeID}}").Output()
	e := &swarmEnv{t: t, storage: store, brokerDir: dir, broker: bout, node: strings.TrimSpace(string(id))}
	t.Cleanup(func() {
		// The node stays labelled for the tests after this one.
		args := []string{"node", "label", "--force", "--broker-dir", dir, "--storage", store}
		if !kvmtest.Present() {
			args = append(args, "--accel", "tcg")
		}
		e.swarmvm(args...)
		os.RemoveAll(store)
	})
	return e
}

// swarmvm runs the CLI on this node and returns its output and exit code.
func (e *swarmEnv) swarmvm(args ...string) (string, int) {
	cmd := exec.Command(swarmvmBin(e.t), args...)
	out, err := cmd.CombinedOutput()
	return string(out), exitCode(err)
}

// vmArgs describe a VM booting the test guest directly, on this env's
// storage and broker.
func (e *swarmEnv) vmArgs(name, accel string, extra ...string) []string {
	a := []string{"--name", name, "--accel", accel, "--memory", "256M", "--disk-size", "1G",
		"--storage", e.storage, "--broker-dir", e.brokerDir, "--image", image, "--node", e.node,
		"--env", "KERNEL_PATH=" + e.storage + "/isos/vmlinuz", "--env", "INITRD_PATH=" + e.storage + "/isos/initrd.img",
		"--env", "KERNEL_CMDLINE=console=ttyS0 quiet"}
	if accel == "kvm" {
		a = append(a, "--boot-mode", "bios", "--cpu-model", "host,-arch-capabilities", "--shutdown-timeout", "3s")
	}
	return append(a, extra...)
}

func (e *swarmEnv) label(on bool) {
	e.t.Helper()
	verb := map[bool]string{true: "label", false: "unlabel"}[on]
	args := []string{"node", verb, "--broker-dir", e.brokerDir, "--storage", e.storage}
	if on && !kvmtest.Present() {
		// A node without KVM is labelled for TCG, as an operator's would
		// be: the probe then asks for no KVM, and only TCG VMs go there.
		args = append(args, "--accel", "tcg")
	}
	out, code := e.swarmvm(args...)
	if code != 0 {
		e.t.Fatalf("swarmvm node %s: exit %d\n%s", verb, code, out)
	}
	if on && !kvmtest.Present() && !strings.Contains(out, "vm-accel=tcg: it runs only the VMs that ask for TCG") {
		e.t.Errorf("node label --accel tcg:\n%s", out)
	}
}

// removeAfter removes the VM's service when the test ends, and the record
// of its home that deploy left in the swarm.
func (e *swarmEnv) removeAfter(service string) {
	e.t.Cleanup(func() {
		exec.Command("docker", "service", "rm", service).Run()
		waitGone(e.t, service)
		exec.Command("docker", "config", "rm", "swarmvm-home-"+service).Run()
		// The console and cloud-init secrets deploy made for it.
		ids, _ := exec.Command("docker", "secret", "ls", "-q", "--filter", "label=io.swarmvm.vm="+service).Output()
		if f := strings.Fields(string(ids)); len(f) > 0 {
			exec.Command("docker", append([]string{"secret", "rm"}, f...)...).Run()
		}
	})
}

// waitGone waits until no container of the service is left.
func waitGone(t testing.TB, service string) {
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if containerOf(service) == "" {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Errorf("containers of %s still present", service)
}

// containerOf is the service's running container on this node.
func containerOf(service string) string {
	out, _ := exec.Command("docker", "ps", "-q", "--filter", "label=com.docker.swarm.service.name="+service).Output()
	return strings.TrimSpace(strings.Split(string(out), "\n")[0])
}

// taskState is the service's newest task: state and error.
func taskState(service string) string {
	out, _ := exec.Command("docker", "service", "ps", "--no-trunc", "--format", "{{.CurrentState}}|{{.Error}}", service).Output()
	return strings.TrimSpace(strings.Split(string(out), "\n")[0])
}

func waitTask(t testing.TB, service, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var st string
	for time.Now().Before(deadline) {
		st = taskState(service)
		if strings.Contains(st, want) {
			return st
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("task of %s: %q, want %q", service, st, want)
	return ""
}

func serviceLogs(service string) string {
	out, _ := exec.Command("docker", "service", "logs", "--raw", service).CombinedOutput()
	return string(out)
}

// Placement follows the vm-capable label: pending with Swarm's reason
// without it, running with it, pending again when it goes.
func TestSwarmPlacementFollowsLabel(t *testing.T) {
	e := newSwarmEnv(t)
	name := fmt.Sprintf("e2e-place-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	e.label(false)
	out, code := e.swarmvm(append([]string{"deploy", "--wait", "5s"}, e.vmArgs(name, "tcg")...)...)
	if code == 0 || !strings.Contains(out, "no suitable node") || !strings.Contains(out, "swarmvm node label") {
		t.Fatalf("deploy without a labelled node: exit %d\n%s", code, out)
	}
	t.Logf("unlabelled: %s", taskState(name))

	e.label(true)
	st := waitTask(t, name, "Running", 60*time.Second)
	t.Logf("labelled: %s", st)

	e.label(false)
	if out, err := exec.Command("docker", "service", "update", "--detach", "--force", name).CombinedOutput(); err != nil {
		t.Fatalf("service update --force: %v %s", err, out)
	}
	st = waitTask(t, name, "no suitable node", 60*time.Second)
	t.Logf("label removed, forced update: %s", st)
	if !strings.HasPrefix(st, "Pending") {
		t.Errorf("task is %q, want Pending", st)
	}
}

// An engine reached over TCP is another machine's, even when it is this
// node's: node check probes its node from a job there, not the machine the
// CLI runs on. The engine's socket is offered on a loopback TCP port.
func TestNodeCheckOfRemoteEngine(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true) // prepares the storage folder, as on an operator's node
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				d, err := net.Dial("unix", "/var/run/docker.sock")
				if err != nil {
					return
				}
				defer d.Close()
				go io.Copy(d, c)
				io.Copy(c, d)
			}()
		}
	}()
	args := []string{"node", "check", "--broker-dir", e.brokerDir, "--storage", e.storage}
	if !kvmtest.Present() {
		args = append(args, "--accel", "tcg")
	}
	cmd := exec.Command(swarmvmBin(t), args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST=tcp://"+ln.Addr().String())
	out, err := cmd.CombinedOutput()
	t.Logf("node check through tcp://%s:\n%s", ln.Addr(), out)
	if err != nil {
		t.Fatalf("node check: %v", err)
	}
	for _, want := range []string{"probing node " + e.node + " from a job there", e.node + ": this node can run VMs"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("node check output lacks %q", want)
		}
	}
}

// The seed's acceptance on a real Swarm: the VM's QEMU runs with KVM from
// the broker's descriptor, and the running task holds no privilege.
func TestSwarmKVMThroughBroker(t *testing.T) {
	kvmtest.Require(t)
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-kvm-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, e.vmArgs(name, "kvm")...)...)
	t.Logf("swarmvm deploy:\n%s", out)
	if code != 0 {
		t.Fatalf("deploy: exit %d", code)
	}
	contains(t, "deploy output", out, name+": accelerator: KVM, verified", "ok    privileged             false", "ok    qemu NoNewPrivs        1")
	if strings.Contains(out, "DRIFT") {
		t.Error("the audit found drift")
	}
	logs := serviceLogs(name)
	contains(t, "docker service logs", logs, "broker /run/swarmvm/broker.sock: KVM API 12", `KVM verified`, `query_kvm="enabled=true present=true"`)

	qemu := assertTaskConfined(t, name)
	contains(t, "QEMU's descriptors", fdTargets(t, qemu), "anon_inode:kvm-vm")
	contains(t, "broker audit", e.broker.String(), `"vm":"`+name+`"`, `"result":"granted"`)
}

// assertTaskConfined checks the running task of a VM service, whatever its
// accelerator: no privilege, device or added capability in its container,
// all dropped, a read-only root and a VM user; the runner and QEMU
// unprivileged by their /proc status; and from inside, as the task's own
// user, no KVM device to open, no TAP to make, no write to the root. It
// returns QEMU's pid.
func assertTaskConfined(t *testing.T, name string) int {
	t.Helper()
	id := containerOf(name)
	var inspect []struct {
		State      struct{ Pid int }
		Config     struct{ User string }
		HostConfig struct {
			Privileged      bool
			ReadonlyRootfs  bool
			Devices         []any
			CapAdd, CapDrop []string
		}
	}
	raw, _ := exec.Command("docker", "inspect", id).Output()
	if err := json.Unmarshal(raw, &inspect); err != nil || len(inspect) != 1 {
		t.Fatalf("docker inspect %s: %v", id, err)
	}
	c := inspect[0]
	if c.HostConfig.Privileged || len(c.HostConfig.Devices) != 0 || strings.Join(c.HostConfig.CapDrop, ",") != "ALL" ||
		len(c.HostConfig.CapAdd) != 0 || !c.HostConfig.ReadonlyRootfs || !vmUser.MatchString(c.Config.User) {
		t.Errorf("container %s: %+v", id, c)
	}
	qemu := procfs.ChildNamed(c.State.Pid, "qemu-system")
	assertUnprivileged(t, c.State.Pid, qemu)

	// From inside the task, as its own user: no KVM device to open, no TAP
	// to make, no write to the root filesystem.
	for _, probe := range []struct{ what, cmd string }{
		{"open /dev/kvm", "exec 3<>/dev/kvm"},
		{"create a TAP", "ip tuntap add dev probe0 mode tap"},
		{"write to /", "touch /probe"},
	} {
		out, err := exec.Command("docker", "exec", id, "sh", "-c", probe.cmd).CombinedOutput()
		if err == nil {
			t.Errorf("inside the task, %s succeeded", probe.what)
		}
		t.Logf("inside the task, %s: refused (%s)", probe.what, strings.TrimSpace(string(out)))
	}
	return qemu
}

// serviceRm removes the service with docker service rm and follows its
// container's log until the container stops, at most within; it returns the
// log and how long the stop took.
func serviceRm(t testing.TB, service string, within time.Duration) (string, time.Duration) {
	t.Helper()
	logs, done := followLogs(t, containerOf(service))
	began := time.Now()
	if out, err := exec.Command("docker", "service", "rm", service).CombinedOutput(); err != nil {
		t.Fatalf("docker service rm: %v %s", err, out)
	}
	select {
	case <-done:
	case <-time.After(within):
		t.Fatalf("the container outlived %v after docker service rm", within)
	}
	return logs.String(), time.Since(began)
}

// followLogs streams a container's log until it stops, into a buffer.
func followLogs(t testing.TB, id string) (*lockedBuf, chan struct{}) {
	t.Helper()
	buf, done := &lockedBuf{}, make(chan struct{})
	cmd := exec.Command("docker", "logs", "-f", id)
	cmd.Stdout, cmd.Stderr = buf, buf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(done) }()
	return buf, done
}

// Under TCG the test guest boots in the Swarm task, confined as with KVM,
// and prints its marker to the serial log on the volume; `docker service rm` then powers it off
// through ACPI, the runner exits cleanly within the grace period, and the
// disk is intact.
func TestSwarmTCGBootAndServiceRm(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-tcg-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, e.vmArgs(name, "tcg")...)...)
	if code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	contains(t, "deploy output", out, "ok    privileged             false", "ok    qemu NoNewPrivs        1")
	serial := filepath.Join(e.storage, "logs", name+".serial.log")
	waitFile(t, serial, marker, 120*time.Second)
	assertTaskConfined(t, name)

	logs, took := serviceRm(t, name, 150*time.Second)
	t.Logf("container stopped %v after docker service rm (grace period 2m)", took.Round(100*time.Millisecond))
	contains(t, "runner log", logs, "pressing the ACPI power button", "guest powered off through ACPI; QEMU exited 0", "event=exit code=0")
	waitGone(t, name)
	qemuImgCheck(t, filepath.Join(e.storage, "images", name+".qcow2"))
}

// swarmvm rm does the same, and shows the operator the runner's shutdown.
func TestSwarmvmRmShowsShutdown(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-rm-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, e.vmArgs(name, "tcg")...)...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), marker, 120*time.Second)
	out, code := e.swarmvm("rm", name)
	if code != 0 {
		t.Fatalf("swarmvm rm: exit %d\n%s", code, out)
	}
	contains(t, "swarmvm rm output", out, "guest powered off through ACPI; QEMU exited 0", "event=exit code=0", name+": removed")
	waitGone(t, name)
	qemuImgCheck(t, filepath.Join(e.storage, "images", name+".qcow2"))
	ps, _ := e.swarmvm("ps")
	if strings.Contains(ps, name) {
		t.Errorf("swarmvm ps still lists %s:\n%s", name, ps)
	}
}

func waitFile(t testing.TB, path, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), want) {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
	b, _ := os.ReadFile(path)
	t.Fatalf("%s lacks %q after %v:\n%s", path, want, timeout, b)
}

// The rendered stack file, deployed with docker stack deploy, gives a
// service equal in the audited fields to the one swarmvm deploy makes.
func TestStackDeployMatchesDeploy(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	suffix := time.Now().UnixNano() % 100000
	viaAPI, viaStack := fmt.Sprintf("e2e-api-%d", suffix), fmt.Sprintf("e2e-stk-%d", suffix)
	stack := fmt.Sprintf("e2es%d", suffix)
	e.removeAfter(viaAPI)
	t.Cleanup(func() {
		exec.Command("docker", "stack", "rm", stack).Run()
		waitGone(t, stack+"_"+viaStack)
	})
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, e.vmArgs(viaAPI, "tcg")...)...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	yml, code := e.swarmvm(append([]string{"render"}, e.vmArgs(viaStack, "tcg")...)...)
	if code != 0 {
		t.Fatalf("render: exit %d\n%s", code, yml)
	}
	file := filepath.Join(t.TempDir(), "stack.yml")
	os.WriteFile(file, []byte(yml), 0o644)
	out, err := exec.Command("docker", "stack", "deploy", "-c", file, stack).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Ignoring unsupported options") || strings.Contains(string(out), "gnoring") {
		t.Fatalf("docker stack deploy: %v\n%s", err, out)
	}
	waitTask(t, stack+"_"+viaStack, "Running", 90*time.Second)

	a, b := audited(t, viaAPI), audited(t, stack+"_"+viaStack)
	for k, va := range a {
		if k == "spec NoNewPrivileges" {
			continue // reported below: a stack file cannot carry it
		}
		if k == "spec User" || k == "container User" {
			// Each VM's own uid, from its name: the two differ by design.
			if !vmUser.MatchString(va) || !vmUser.MatchString(b[k]) || va == b[k] {
				t.Errorf("%s: swarmvm deploy %s, docker stack deploy %s: want two VM users", k, va, b[k])
			}
			continue
		}
		if vb := b[k]; vb != va {
			t.Errorf("%s differs: swarmvm deploy %s, docker stack deploy %s", k, va, vb)
		}
	}
	t.Logf("audited fields equal: %d", len(a))
	// The field a daemon of API < 1.44 cannot hold, and a stack file never
	// carries: no-new-privileges. The runner sets it on QEMU in both cases.
	api, _ := exec.Command("docker", "version", "--format", "{{.Server.APIVersion}}").Output()
	t.Logf("daemon API %s: NoNewPrivileges in the spec: swarmvm deploy %s, stack %s (the runner sets no_new_privs on QEMU either way)",
		strings.TrimSpace(string(api)), a["spec NoNewPrivileges"], b["spec NoNewPrivileges"])
	for _, svc := range []string{viaAPI, stack + "_" + viaStack} {
		c := containerOf(svc)
		pid, _ := exec.Command("docker", "inspect", "-f", "{{.State.Pid}}", c).Output()
		p, _ := strconv.Atoi(strings.TrimSpace(string(pid)))
		waitFor(t, "QEMU in "+svc, func() bool { return procfs.ChildNamed(p, "qemu-system") != 0 })
		assertUnprivileged(t, p, procfs.ChildNamed(p, "qemu-system"))
	}
}

func waitFor(t testing.TB, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// audited reads the fields the audit compares, from the service spec and
// the running container, with the VM's own name taken out.
func audited(t testing.TB, service string) map[string]string {
	t.Helper()
	q := func(args ...string) string {
		out, err := exec.Command("docker", args...).Output()
		if err != nil {
			t.Fatalf("docker %v: %v", args, err)
		}
		return strings.TrimSpace(string(out))
	}
	spec := map[string]string{
		"spec User":          "{{.Spec.TaskTemplate.ContainerSpec.User}}",
		"spec ReadOnly":      "{{.Spec.TaskTemplate.ContainerSpec.ReadOnly}}",
		"spec CapDrop":       "{{.Spec.TaskTemplate.ContainerSpec.CapabilityDrop}}",
		"spec CapAdd":        "{{.Spec.TaskTemplate.ContainerSpec.CapabilityAdd}}",
		"spec StopGrace":     "{{.Spec.TaskTemplate.ContainerSpec.StopGracePeriod}}",
		"spec Healthcheck":   "{{json .Spec.TaskTemplate.ContainerSpec.Healthcheck}}",
		"spec Mounts":        "{{json .Spec.TaskTemplate.ContainerSpec.Mounts}}",
		"spec Resources":     "{{json .Spec.TaskTemplate.Resources}}",
		"spec RestartPolicy": "{{json .Spec.TaskTemplate.RestartPolicy}}",
		"spec Placement":     "{{json .Spec.TaskTemplate.Placement.Constraints}} max {{.Spec.TaskTemplate.Placement.MaxReplicas}}",
		"spec Replicas":      "{{.Spec.Mode.Replicated.Replicas}}",
		"spec UpdateOrder":   "{{.Spec.UpdateConfig.Order}} {{.Spec.RollbackConfig.Order}}",
	}
	m := map[string]string{"spec NoNewPrivileges": rawNoNewPrivileges(t, service)}
	for k, f := range spec {
		m[k] = q("service", "inspect", "-f", f, service)
	}
	id := containerOf(service)
	host := map[string]string{
		"container Privileged":     "{{.HostConfig.Privileged}}",
		"container Devices":        "{{json .HostConfig.Devices}}",
		"container CapDrop":        "{{json .HostConfig.CapDrop}}",
		"container CapAdd":         "{{json .HostConfig.CapAdd}}",
		"container ReadonlyRootfs": "{{.HostConfig.ReadonlyRootfs}}",
		"container User":           "{{.Config.User}}",
		"container SecurityOpt":    "{{json .HostConfig.SecurityOpt}}",
		"container Memory":         "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}",
	}
	for k, f := range host {
		m[k] = q("inspect", "-f", f, id)
	}
	return m
}

// httpGet fetches a URL on loopback, retrying while the guest comes up.
func httpGet(t testing.TB, url string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		c := http.Client{Timeout: 3 * time.Second}
		resp, err := c.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && len(b) > 0 {
				return string(b)
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		last = err.Error()
		time.Sleep(time.Second)
	}
	t.Fatalf("GET %s: no answer within %v (%s)", url, timeout, last)
	return ""
}

// User-mode networking on a real Swarm: the port the service publishes
// reaches the guest's HTTP server through QEMU's forward. Container port 81
// is below 1024, so the service also carries the sysctl that lets QEMU, an
// unprivileged user, listen there. Both swarmvm deploy and the rendered
// stack file are exercised. The ports are published in host mode: the
// routing mesh (ingress) needs IPVS, which this machine's kernel lacks.
func TestSwarmUserModePublishedPort(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-net-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	args := e.vmArgs(name, "tcg", "--port", "81:80", "--publish", "host")
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, args...)...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), "SWARMVM-GUEST-NET", 120*time.Second)
	body := httpGet(t, "http://127.0.0.1:81/", 60*time.Second)
	contains(t, "the guest's answer through the published port", body, "SWARMVM-GUEST-HTTP")
	sysctl, _ := exec.Command("docker", "service", "inspect", "-f", "{{json .Spec.TaskTemplate.ContainerSpec.Sysctls}} {{json .Endpoint.Ports}}", name).Output()
	contains(t, "service", string(sysctl), `"net.ipv4.ip_unprivileged_port_start":"0"`, `"PublishedPort":81`, `"PublishMode":"host"`)
	if out, code := e.swarmvm("rm", name); code != 0 {
		t.Fatalf("swarmvm rm: %d %s", code, out)
	}
	waitGone(t, name)

	// The same VM from the rendered stack file: no option ignored, same answer.
	yml, code := e.swarmvm(append([]string{"render"}, args...)...)
	if code != 0 {
		t.Fatalf("render: %s", yml)
	}
	file := filepath.Join(t.TempDir(), "stack.yml")
	os.WriteFile(file, []byte(yml), 0o644)
	stack := fmt.Sprintf("e2en%d", time.Now().UnixNano()%100000)
	t.Cleanup(func() { exec.Command("docker", "stack", "rm", stack).Run(); waitGone(t, stack+"_"+name) })
	out, err := exec.Command("docker", "stack", "deploy", "-c", file, stack).CombinedOutput()
	if err != nil || strings.Contains(string(out), "gnoring") {
		t.Fatalf("docker stack deploy: %v\n%s", err, out)
	}
	waitTask(t, stack+"_"+name, "Running", 90*time.Second)
	body = httpGet(t, "http://127.0.0.1:81/", 120*time.Second)
	contains(t, "the guest's answer through the stack's published port", body, "SWARMVM-GUEST-HTTP")
}

// rawNoNewPrivileges reads the stored spec's NoNewPrivileges straight from
// the Engine API: a docker CLI older than the field (Debian's 20.10) cannot
// show it.
func rawNoNewPrivileges(t testing.TB, service string) string {
	t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", "/var/run/docker.sock")
	}}}
	resp, err := c.Get("http://docker/services/" + service)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s struct {
		Spec struct {
			TaskTemplate struct {
				ContainerSpec struct {
					Privileges *struct{ NoNewPrivileges *bool }
				}
			}
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	p := s.Spec.TaskTemplate.ContainerSpec.Privileges
	if p == nil || p.NoNewPrivileges == nil {
		return "absent"
	}
	return fmt.Sprint(*p.NoNewPrivileges)
}

// A VM whose QEMU dies (SIGKILL, as the OOM killer would; SIGSEGV, as a
// crash would) or whose guest kernel panics: the runner exits with the
// documented code naming the cause, and Swarm's restart policy brings the VM
// back healthy. The test guest panics once per disk, so the restarted VM
// runs on.
func TestSwarmRestartsCrashedVM(t *testing.T) {
	cases := []struct {
		name    string
		sig     syscall.Signal // sent to QEMU; 0: the guest panics by itself
		cmdline string
		code    int
		log     string
	}{
		{"sigkill", syscall.SIGKILL, "", 6, "QEMU ended unexpectedly (killed by signal 9"},
		{"sigsegv", syscall.SIGSEGV, "", 6, "QEMU ended unexpectedly (killed by signal 11"},
		{"panic", 0, " swarmvm.panic=2", 10, "guest kernel panicked (pvpanic)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newSwarmEnv(t)
			e.label(true)
			name := fmt.Sprintf("e2e-%s-%d", tc.name, time.Now().UnixNano()%100000)
			e.removeAfter(name)
			args := append([]string{"deploy", "--wait", "90s"}, e.vmArgs(name, "tcg", "--env", "KERNEL_CMDLINE=console=ttyS0 quiet"+tc.cmdline)...)
			if out, code := e.swarmvm(args...); code != 0 {
				t.Fatalf("deploy: exit %d\n%s", code, out)
			}
			if tc.sig != 0 {
				pid, _ := exec.Command("docker", "inspect", "-f", "{{.State.Pid}}", containerOf(name)).Output()
				p, _ := strconv.Atoi(strings.TrimSpace(string(pid)))
				qemu := procfs.ChildNamed(p, "qemu-system")
				if qemu == 0 {
					t.Fatal("no QEMU in the task")
				}
				if err := syscall.Kill(qemu, tc.sig); err != nil {
					t.Fatal(err)
				}
			}
			// The failed task's container, then a new one that is healthy.
			want := fmt.Sprintf("non-zero exit (%d)", tc.code)
			var hist []byte
			deadline := time.Now().Add(180 * time.Second)
			for {
				hist, _ = exec.Command("docker", "service", "ps", "--no-trunc", "--format", "{{.CurrentState}}|{{.Error}}", name).Output()
				if c := containerOf(name); c != "" && strings.Contains(string(hist), want) {
					out, _ := exec.Command("docker", "inspect", "-f", "{{.State.Health.Status}}", c).Output()
					if strings.TrimSpace(string(out)) == "healthy" {
						break
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("no failed task with %q and a healthy successor: %s", want, hist)
				}
				time.Sleep(500 * time.Millisecond)
			}
			exited, _ := exec.Command("docker", "ps", "-aq", "--filter", "label=com.docker.swarm.service.name="+name, "--filter", "status=exited").Output()
			ids := strings.Fields(string(exited))
			if len(ids) != 1 {
				t.Fatalf("want one exited task container, have %q", ids)
			}
			logs, _ := exec.Command("docker", "logs", ids[0]).CombinedOutput()
			contains(t, "failed task's runner log", string(logs), tc.log, fmt.Sprintf("event=exit code=%d", tc.code))
			t.Logf("task history:\n%s", hist)
		})
	}
}

// A task that fails for a reason a restart meets again (here its disk
// belongs to another uid: exit 4): deploy shows the runner's exit code and
// its own words with the fix, and stops waiting at once instead of showing
// "starting" until its wait ends; ps shows the same.
func TestDeployShowsWhyTheTaskFailed(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-failed-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	disk := filepath.Join(e.storage, "images", name+".qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	os.Chown(disk, 12345, 12345)
	began := time.Now()
	out, code := e.swarmvm(append([]string{"deploy", "--wait", "4m"}, e.vmArgs(name, "tcg")...)...)
	took := time.Since(began)
	if code == 0 {
		t.Fatalf("deploy succeeded with a disk of another uid:\n%s", out)
	}
	contains(t, "deploy output", out, "failed: exit 4 (disk, firmware or storage folder unusable)",
		"IMAGE_PATH", "belongs to uid 12345", "on the node: chown ", "a restart meets the same cause")
	if took > 2*time.Minute {
		t.Errorf("deploy took %v to give up on a failure a restart cannot fix", took)
	}
	t.Logf("deploy gave up after %v:\n%s", took.Round(time.Second), out)
	ps, _ := e.swarmvm("ps")
	contains(t, "swarmvm ps", ps, "failed: exit 4")
}

// A guest that ignores the ACPI power button, in a Swarm service: on
// docker service rm the runner forces the stop when SHUTDOWN_TIMEOUT ends,
// logs it as forced and exits 7 — before the service's stop_grace_period
// (SHUTDOWN_TIMEOUT + 30 s) would let Swarm SIGKILL it.
func TestSwarmForcedStopBeforeSIGKILL(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-noacpi-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	args := append([]string{"deploy", "--wait", "90s"}, e.vmArgs(name, "tcg", "--shutdown-timeout", "5s",
		"--env", "KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.acpi=ignore")...)
	if out, code := e.swarmvm(args...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), "ignoring the ACPI power button", 120*time.Second)
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), marker, 120*time.Second)
	grace, _ := exec.Command("docker", "service", "inspect", "-f", "{{.Spec.TaskTemplate.ContainerSpec.StopGracePeriod}}", name).Output()
	logs, took := serviceRm(t, name, 60*time.Second)
	contains(t, "runner log", logs, "guest did not power off in time; forcing", "QMP quit", "forced stop: guest did not power off within SHUTDOWN_TIMEOUT 5s", "event=exit code=7")
	if took > 30*time.Second {
		t.Errorf("stop took %v: past SHUTDOWN_TIMEOUT 5s plus the quit budget", took)
	}
	t.Logf("forced stop %v after docker service rm (SHUTDOWN_TIMEOUT 5s, stop_grace_period %s)", took.Round(100*time.Millisecond), strings.TrimSpace(string(grace)))
	waitGone(t, name)
	qemuImgCheck(t, filepath.Join(e.storage, "images", name+".qcow2"))
}

// Two VMs on one node share the storage folder but not their files: each
// service runs as its own uid, its disk, NVRAM and serial log are its own
// (0600), and the folders are sticky. From inside one VM's task (as its
// user, where an escaped QEMU would be), the other's files cannot be read,
// written, removed or renamed; its own can.
func TestSwarmVMsKeepApart(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	suffix := time.Now().UnixNano() % 100000
	a, b := fmt.Sprintf("e2e-a-%d", suffix), fmt.Sprintf("e2e-b-%d", suffix)
	for _, name := range []string{a, b} {
		e.removeAfter(name)
		if out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, e.vmArgs(name, "tcg")...)...); code != 0 {
			t.Fatalf("deploy %s: exit %d\n%s", name, code, out)
		}
	}
	task := containerOf(a)
	userA, _ := exec.Command("docker", "inspect", "-f", "{{.Config.User}}", task).Output()
	userB, _ := exec.Command("docker", "inspect", "-f", "{{.Config.User}}", containerOf(b)).Output()
	if string(userA) == string(userB) {
		t.Fatalf("both VMs run as %s", userA)
	}
	images, logs := e.storage+"/images/", e.storage+"/logs/"
	for _, f := range []string{images + a + ".qcow2", images + b + ".qcow2", images + b + ".OVMF_VARS.fd", logs + b + ".serial.log"} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		uid := fi.Sys().(*syscall.Stat_t).Uid
		t.Logf("%s: uid %d mode %v", filepath.Base(f), uid, fi.Mode().Perm())
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s is mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	sh := func(cmd string) (string, error) {
		out, err := exec.Command("docker", "exec", task, "sh", "-c", cmd).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	if out, err := sh("head -c 3 " + images + a + ".qcow2"); err != nil || out != "QFI" {
		t.Fatalf("VM %s cannot read its own disk: %v %q", a, err, out)
	}
	for _, probe := range []struct{ what, cmd string }{
		{"read the other's disk", "head -c 3 " + images + b + ".qcow2"},
		{"write the other's disk", ": >>" + images + b + ".qcow2"},
		{"read the other's serial log", "cat " + logs + b + ".serial.log"},
		{"write the other's NVRAM", ": >>" + images + b + ".OVMF_VARS.fd"},
		{"remove the other's disk", "rm -f " + images + b + ".qcow2"},
		{"rename the other's disk", "mv " + images + b + ".qcow2 " + images + "taken.qcow2"},
	} {
		out, err := sh(probe.cmd)
		if err == nil {
			t.Errorf("from %s's task: %s succeeded (%s)", a, probe.what, out)
			continue
		}
		t.Logf("from %s's task: %s: %s", a, probe.what, out)
	}
	if _, err := os.Stat(images + b + ".qcow2"); err != nil {
		t.Fatalf("the other VM's disk is gone: %v", err)
	}

	// A takes the names of a VM not started yet: a valid qcow2 of its own,
	// world-writable, as that VM's disk (that VM's writes would land in a
	// file A reads), a world-writable file as its serial log. That VM
	// refuses both.
	c := fmt.Sprintf("e2e-c-%d", suffix)
	if out, err := sh(fmt.Sprintf("cp %s%s.qcow2 %s%s.qcow2 && chmod 666 %s%s.qcow2 && : >%s%s.serial.log && chmod 666 %s%s.serial.log", images, a, images, c, images, c, logs, c, logs, c)); err != nil {
		t.Fatalf("squatting from %s's task: %v %s", a, err, out)
	}
	squatted := sha(t, images+c+".qcow2")
	// Two CPUs here: B makes room for C's reservation.
	exec.Command("docker", "service", "rm", b).Run()
	waitGone(t, b)
	e.removeAfter(c)
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "30s"}, e.vmArgs(c, "tcg")...)...); code == 0 {
		t.Fatalf("deploy %s over another VM's files succeeded:\n%s", c, out)
	}
	uidA := strings.Split(strings.TrimSpace(string(userA)), ":")[0]
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(serviceLogs(c), "belongs to uid "+uidA) {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not refuse the squatted disk (task %s):\n%s", c, taskState(c), serviceLogs(c))
		}
		time.Sleep(time.Second)
	}
	if sha(t, images+c+".qcow2") != squatted {
		t.Error("the VM wrote to the disk another VM left under its name")
	}
	if fi, _ := os.Stat(logs + c + ".serial.log"); fi == nil || fi.Size() != 0 {
		t.Errorf("the squatted serial log was written: %v", fi)
	}
	t.Logf("%s refused the names %s took: %s", c, a, lastLine(serviceLogs(c), "belongs to uid"))
}

// lastLine is the last line of s that contains sub.
func lastLine(s, sub string) string {
	var last string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			last = l
		}
	}
	return last
}

// A VM with a TPM as a Swarm service: deploy's audit reads swtpm's /proc
// status on the node beside QEMU's, and finds it as unprivileged.
func TestSwarmTPMAudited(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-tpm-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	out, code := e.swarmvm(append([]string{"deploy", "--wait", "4m"}, e.vmArgs(name, "tcg", "--tpm")...)...)
	if code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	contains(t, "deploy output", out, "swtpm uid", "swtpm CapEff", "swtpm NoNewPrivs", "swtpm Seccomp")
	if fi, err := os.Stat(filepath.Join(e.storage, "images", name+".tpm")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("the TPM's state folder on the node: %v %v", fi, err)
	}
}
