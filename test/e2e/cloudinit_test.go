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
)

// A VM deployed with cloud-init files and an SSH key gets a NoCloud seed:
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
		args := e.vmArgs(name, "tcg", "--user-data", userData, "--meta-data", filepath.Join(dir, "meta-data"),
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
	if first[2] != "meta-data,user-data," || first[3] != "seeded-host" || !strings.HasPrefix(first[4], "iid-swarmvm-") || first[5] != digest() {
		t.Errorf("seed as the guest read it: %q", first[0])
	}
	if log, _ := os.ReadFile(serial); !strings.Contains(string(log), "SWARMVM-GUEST-SEED-KEY ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtestkeyforswarmvm") {
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
