package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	vmstatus "github.com/swarmvm/swarmvm/internal/status"
)

// A VM deployed with cloud-init files (network-config from a secret the
// operator made) and an SSH key gets a NoCloud seed:
// the guest's kernel finds the filesystem labelled CIDATA on a read-only
// disk and reads it with its long names, the hostname from meta-data, the
// key, and user-data as given (its digest is compared, never its text).
// Changing user-data and deploying again gives a new secret, a new task
// and a new instance-id (cloud-init runs again); the old secret is gone.
// The secret's text is in no log and no file under the storage folder.
func TestCloudInitSeed(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-ci-%d", time.Now().UnixNano()%100000)
	// network-config from a secret the operator made (secret:NAME): removed
	// after the service (cleanups run last first).
	netSecret := name + "-net"
	if out, err := exec.Command("sh", "-c", "printf 'version: 2\nethernets: {}\n' | docker secret create "+netSecret+" -").CombinedOutput(); err != nil {
		t.Fatalf("docker secret create: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("docker", "secret", "rm", netSecret).Run() })
	e.removeAfter(name)
	dir := t.TempDir()
	secret := fmt.Sprintf("s3cret-%d", time.Now().UnixNano())
	userData := filepath.Join(dir, "user-data")
	write := func(path, s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(userData, "#cloud-config\nchpasswd: {list: \"root:"+secret+"\"}\n")
	write(filepath.Join(dir, "meta-data"), "local-hostname: seeded-host\n")
	write(filepath.Join(dir, "key.pub"), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtestkeyforswarmvm e2e@test\n")
	deploy := func() {
		t.Helper()
		args := e.vmArgs(name, "tcg", "--user-data", userData, "--meta-data", filepath.Join(dir, "meta-data"), "--network-config", "secret:"+netSecret,
			"--ssh-key", filepath.Join(dir, "key.pub"), "--env", "KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.seed=1")
		if out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, args...)...); code != 0 {
			t.Fatalf("deploy: exit %d\n%s", code, out)
		}
	}
	serial := filepath.Join(e.storage, "logs", name+".serial.log")
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(serial)
			t.Logf("serial log:\n%s\nrunner log:\n%s", b, serviceLogs(name))
		}
	})
	seedLine := regexp.MustCompile(`SWARMVM-GUEST-SEED dev=(\S+) files=(\S+) hostname=(\S*) instance-id=(\S*) user-data-sha256=([0-9a-f]{64})`)
	seen := func(n int) []string {
		t.Helper()
		var m [][]string
		waitFor(t, fmt.Sprintf("seed line %d in the serial log", n), func() bool {
			b, _ := os.ReadFile(serial)
			m = seedLine.FindAllStringSubmatch(string(b), -1)
			return len(m) >= n
		})
		return m[n-1]
	}
	digest := func() string {
		b, _ := os.ReadFile(userData)
		h := sha256.Sum256(b)
		return hex.EncodeToString(h[:])
	}

	deploy()
	first := seen(1)
	t.Logf("guest: %s", first[0])
	if first[2] != "meta-data,network-config,user-data," || first[3] != "seeded-host" || !strings.HasPrefix(first[4], "iid-swarmvm-") || first[5] != digest() {
		t.Errorf("seed as the guest read it: %q", first[0])
	}
	// The key's line comes after the seed's (the guest greps for it then):
	// on a busy host, a moment later.
	keyLine := func() bool {
		log, _ := os.ReadFile(serial)
		return strings.Contains(string(log), "SWARMVM-GUEST-SEED-KEY ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtestkeyforswarmvm")
	}
	for deadline := time.Now().Add(30 * time.Second); !keyLine() && time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
	}
	if !keyLine() {
		t.Error("the guest did not find the SSH key in its meta-data")
	}
	secretsBefore := ciSecrets(t, name)

	write(userData, "#cloud-config\nchpasswd: {list: \"root:"+secret+"-2\"}\n")
	deploy()
	second := seen(2)
	t.Logf("guest after the change: %s", second[0])
	if second[4] == first[4] || second[5] != digest() {
		t.Errorf("after changing user-data: instance-id %s (was %s), digest %s", second[4], first[4], second[5])
	}
	// user-data's secret is replaced (and the old one removed), meta-data's
	// is kept.
	after := ciSecrets(t, name)
	kept := 0
	for _, s := range after {
		if slices.Contains(secretsBefore, s) {
			kept++
		}
	}
	if len(secretsBefore) != 2 || len(after) != 2 || kept != 1 {
		t.Errorf("cloud-init secrets before %v, after %v: want meta-data's kept and user-data's replaced", secretsBefore, after)
	}
	if err := exec.Command("docker", "secret", "inspect", netSecret).Run(); err != nil {
		t.Errorf("the operator's secret %s is gone after a deploy: %v", netSecret, err)
	}

	if strings.Contains(serviceLogs(name), secret) {
		t.Error("the service's log holds user-data")
	}
	filepath.Walk(e.storage, func(path string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			if b, _ := os.ReadFile(path); strings.Contains(string(b), secret) {
				t.Errorf("%s under the storage folder holds user-data", path)
			}
		}
		return nil
	})
}

// ciSecrets lists the VM's cloud-init secrets by name.
func ciSecrets(t *testing.T, vm string) []string {
	t.Helper()
	out, err := exec.Command("docker", "secret", "ls", "--filter", "label=io.swarmvm.vm="+vm, "--filter", "label=io.swarmvm.secret=cloud-init", "--format", "{{.Name}}").Output()
	if err != nil {
		t.Fatalf("docker secret ls: %v", err)
	}
	return strings.Fields(string(out))
}

// The same with a real cloud-init: a Debian guest (scripts/cloud-guest.sh)
// whose disk is imported on its node, deployed with user-data, meta-data
// and an SSH key, comes up with the hostname from meta-data, runs
// user-data, and takes SSH with that key through the port Swarm publishes.
// Changed user-data, deployed again, runs again in the same guest. Its
// guest agent (Debian's qemu-guest-agent) tells swarmvm ps what the guest
// runs and its address, and the metrics its root filesystem's size; and
// once the guest ignores the ACPI power button,
// swarmvm rm powers it off through the agent: exit 0, not forced.
func TestCloudInitRealGuest(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	name := fmt.Sprintf("e2e-cloud-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	guest, err := filepath.Abs("../../.cache/cloud-guest")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(guest, "disk.qcow2")); err != nil {
		t.Fatalf("the cloud-init guest is not built: %v (scripts/cloud-guest.sh; make test builds it)", err)
	}
	isos := filepath.Join(e.storage, "isos")
	for _, f := range []string{"disk.qcow2", "vmlinuz", "initrd.img"} {
		copyFile(t, filepath.Join(guest, f), filepath.Join(isos, "cloud-"+f))
		os.Chmod(filepath.Join(isos, "cloud-"+f), 0o644)
	}
	if out, code := e.swarmvm("disk", "import", name, filepath.Join(isos, "cloud-disk.qcow2"), "--node", e.node,
		"--storage", e.storage, "--image", image, "--boot-mode", "bios"); code != 0 {
		t.Fatalf("disk import: exit %d\n%s", code, out)
	}
	dir := t.TempDir()
	key := filepath.Join(dir, "id")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e@swarmvm", "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	userData := filepath.Join(dir, "user-data")
	runMark := func(n int) {
		os.WriteFile(userData, []byte(fmt.Sprintf("#cloud-config\nruncmd:\n  - [sh, -c, \"echo SWARMVM-CLOUD-INIT-RUN-%d > /var/tmp/swarmvm-mark\"]\n", n)), 0o600)
	}
	os.WriteFile(filepath.Join(dir, "meta-data"), []byte("local-hostname: cloudy\n"), 0o600)
	port, metricsPort := freePort(t), freePort(t)
	deploy := func() {
		t.Helper()
		args := []string{"deploy", "--wait", "120s", "--name", name, "--accel", "tcg", "--cpus", "2", "--memory", "768M", "--shutdown-timeout", "40s",
			"--metrics-port", fmt.Sprint(metricsPort),
			"--boot-mode", "bios", "--storage", e.storage, "--broker-dir", e.brokerDir, "--image", image, "--node", e.node,
			"--port", fmt.Sprintf("%d:22", port), "--publish", "host",
			"--user-data", userData, "--meta-data", filepath.Join(dir, "meta-data"), "--ssh-key", key + ".pub",
			"--env", "KERNEL_PATH=" + filepath.Join(isos, "cloud-vmlinuz"), "--env", "INITRD_PATH=" + filepath.Join(isos, "cloud-initrd.img"),
			"--env", "KERNEL_CMDLINE=root=/dev/vda ro console=ttyS0"}
		if out, code := e.swarmvm(args...); code != 0 {
			t.Fatalf("deploy: exit %d\n%s", code, out)
		}
	}
	serial := filepath.Join(e.storage, "logs", name+".serial.log")
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(serial)
			t.Logf("serial log (end):\n%s", tail(string(b), 6000))
		}
	})
	finished := regexp.MustCompile(`Cloud-init v\. \S+ finished at`)
	ssh := func(cmd string) string {
		t.Helper()
		var out []byte
		deadline := time.Now().Add(3 * time.Minute)
		for {
			c := exec.Command("ssh", "-i", key, "-p", fmt.Sprint(port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
				"-o", "ConnectTimeout=10", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "debian@127.0.0.1", cmd)
			var err error
			if out, err = c.CombinedOutput(); err == nil {
				return string(out)
			}
			if time.Now().After(deadline) {
				t.Fatalf("ssh %q: %v\n%s", cmd, err, out)
			}
			time.Sleep(5 * time.Second)
		}
	}
	boots := func(n int) {
		t.Helper()
		deadline := time.Now().Add(6 * time.Minute)
		for {
			b, _ := os.ReadFile(serial)
			if len(finished.FindAllIndex(b, -1)) >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("cloud-init did not finish (%d) within 6 minutes", n)
			}
			time.Sleep(2 * time.Second)
		}
	}

	runMark(1)
	began := time.Now()
	deploy()
	boots(1)
	t.Logf("cloud-init finished %v after deploy (TCG)", time.Since(began).Round(time.Second))
	if out := ssh("hostname; cat /var/tmp/swarmvm-mark"); !strings.Contains(out, "cloudy") || !strings.Contains(out, "SWARMVM-CLOUD-INIT-RUN-1") {
		t.Errorf("over SSH with the seeded key: %q; want hostname cloudy and user-data's mark", out)
	}

	// The guest agent: user networking gives the guest 10.0.2.15.
	var line string
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(5 * time.Second) {
		ps, _ := e.swarmvm("ps")
		if line = lineOf(ps, name); strings.Contains(line, "Debian GNU/Linux 12 (bookworm)") && strings.Contains(line, "10.0.2.15") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ps does not show the guest agent's OS and address within 3 minutes:\n%s\nrunner log:\n%s", ps, serviceLogs(name))
		}
	}
	t.Logf("ps: %s", line)
	// ... and the metrics have the guest's root filesystem from it
	m, code := scrape(t, metricsPort, "")
	vmLabel := `vm="` + name + `"`
	if c, ok := m.find("swarmvm_vm_filesystem_capacity_bytes", vmLabel, `mount_point="/"`, `file_system_type="ext4"`); code != 200 || !ok || c < 1<<30 {
		t.Errorf("metrics (HTTP %d): the guest's / is %v bytes (%v), want its 2G filesystem", code, c, ok)
	}
	if a, ok := m.find("swarmvm_vm_agent_connected", vmLabel); !ok || a != 1 {
		t.Errorf("metrics: swarmvm_vm_agent_connected %v (%v), want 1", a, ok)
	}

	// An online backup freezes the guest's filesystems through its agent
	// for the moment of its point.
	repo := backupRepo(t)
	if out, code := e.swarmvm("backup", name, "--repo", repo); code != 0 || !strings.Contains(out, "filesystem-consistent") || !strings.Contains(out, "filesystems frozen by the guest agent") {
		t.Errorf("backup of a guest with an agent: exit %d:\n%s", code, out)
	} else {
		t.Logf("backup:\n%s", out)
	}
	// A freeze holds the guest's writes until the thaw: a root loop in the
	// guest appends to a file on / and says so on the serial console after
	// each append.
	ssh(`cat >/tmp/writer.sh <<'EOF'
i=0
while :; do i=$((i+1)); echo $i >>/var/tmp/writer; sync /var/tmp/writer; echo "SWARMVM-WRITE $i" >/dev/ttyS0; sleep 0.05; done
EOF
sudo setsid sh /tmp/writer.sh </dev/null >/dev/null 2>&1 &`)
	writes := func() int {
		b, _ := os.ReadFile(serial)
		return strings.Count(string(b), "SWARMVM-WRITE ")
	}
	for w0 := writes(); writes() < w0+10; time.Sleep(500 * time.Millisecond) {
	}
	out, code := e.swarmvm("guest", "freeze", name, "--storage", e.storage, "--hold", "60s")
	if code != 0 || !strings.Contains(out, "filesystems frozen") {
		t.Fatalf("guest freeze: exit %d:\n%s", code, out)
	}
	frozen := writes()
	time.Sleep(5 * time.Second)
	during := writes()
	if out, code := e.swarmvm("guest", "thaw", name, "--storage", e.storage); code != 0 {
		t.Fatalf("guest thaw: exit %d:\n%s", code, out)
	}
	time.Sleep(4 * time.Second)
	after := writes()
	t.Logf("the guest's appends: %d when frozen, %d after 5 s frozen, %d 4 s after the thaw", frozen, during, after)
	if during > frozen+1 || after < during+10 {
		t.Errorf("frozen, the guest's appends went from %d to %d in 5 s (one in flight at most); thawed, to %d in 4 s (want 10 or more)", frozen, during, after)
	}
	ssh("sudo pkill -f /tmp/writer.sh")

	runMark(2)
	deploy()
	boots(2)
	if out := ssh("cat /var/tmp/swarmvm-mark"); !strings.Contains(out, "SWARMVM-CLOUD-INIT-RUN-2") {
		t.Errorf("after changing user-data: %q; want cloud-init to have run it", out)
	}

	// logind ignores the power button from now on; the agent still
	// answers (the new task's runner has heard it: its log says so).
	ssh(`sudo sh -c 'mkdir -p /etc/systemd/logind.conf.d && printf "[Login]\nHandlePowerKey=ignore\n" >/etc/systemd/logind.conf.d/ignore.conf && systemctl restart systemd-logind'`)
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(2 * time.Second) {
		logs, _ := exec.Command("docker", "logs", containerOf(name)).CombinedOutput()
		if strings.Contains(string(logs), "event="+vmstatus.AgentAnswered) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the runner's log has no event=%s after the second boot:\n%s", vmstatus.AgentAnswered, logs)
		}
	}
	out, code = e.swarmvm("rm", name)
	if code != 0 {
		t.Fatalf("rm: exit %d\n%s", code, out)
	}
	contains(t, "swarmvm rm output", out, "asking its guest agent (guest-shutdown)", "guest powered off through its guest agent; QEMU exited 0", "event=exit code=0")
}

// lineOf is the line of out that starts with name's field.
func lineOf(out, name string) string {
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == name {
			return l
		}
	}
	return ""
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
