package swarm

import (
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/swarm"
)

var update = flag.Bool("update", false, "rewrite golden files")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		os.WriteFile(path, got, 0o644)
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test ./internal/swarm -update)", err)
	}
	if string(got) != string(want) {
		t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

func example(t *testing.T) []Resolved {
	t.Helper()
	b, _ := os.ReadFile("../../docs/vms.example.yaml")
	d, err := Load(b)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	for i := range rs { // seed files are relative to the definition, as the CLI reads them
		for j := range rs[i].Seed {
			rs[i].Seed[j].Path = filepath.Join("../../docs", rs[i].Seed[j].Path)
		}
		if err := rs[i].LoadSeed(); err != nil {
			t.Fatal(err)
		}
	}
	return rs
}

func TestStackGolden(t *testing.T) {
	rs := example(t)
	a, err := Stack(rs)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "example.stack.yml", a)
	// Deterministic: the same input renders the same bytes, whatever the
	// order maps iterate in.
	for i := 0; i < 20; i++ {
		b, _ := Stack(example(t))
		if string(b) != string(a) {
			t.Fatal("two renders of one definition differ")
		}
	}
}

func TestServiceSpecGolden(t *testing.T) {
	b, err := json.MarshalIndent(ServiceSpec(example(t)[0]), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "web-1.service.json", append(b, '\n'))
}

// The properties the seed asks of every VM service, on the spec itself.
func TestServiceSpecInvariants(t *testing.T) {
	uids := map[string]string{}
	for _, r := range example(t) {
		user := ServiceSpec(r).TaskTemplate.ContainerSpec.User
		if other, ok := uids[user]; ok {
			t.Errorf("%s and %s both run as %s", r.Name, other, user)
		}
		uids[user] = r.Name
	}
	for _, r := range example(t) {
		s := ServiceSpec(r)
		c := s.TaskTemplate.ContainerSpec
		switch {
		case *s.Mode.Replicated.Replicas != 1:
			t.Errorf("%s: replicas %d", r.Name, *s.Mode.Replicated.Replicas)
		case s.UpdateConfig.Order != "stop-first" || s.RollbackConfig.Order != "stop-first" || s.TaskTemplate.Placement.MaxReplicas != 1:
			t.Errorf("%s: update order %s, rollback %s, %d tasks a node", r.Name, s.UpdateConfig.Order, s.RollbackConfig.Order, s.TaskTemplate.Placement.MaxReplicas)
		case s.TaskTemplate.Placement.Constraints[0] != "node.labels.vm-capable==true":
			t.Errorf("%s: constraints %v", r.Name, s.TaskTemplate.Placement.Constraints)
		case !c.ReadOnly || c.User != fmt.Sprintf("%d:%d", r.UID, RunnerGID) || r.UID < UIDBase || len(c.CapabilityDrop) != 1 || c.CapabilityDrop[0] != "ALL" || len(c.CapabilityAdd) != 0:
			t.Errorf("%s: container spec %+v", r.Name, c)
		case !c.Privileges.NoNewPrivileges:
			t.Errorf("%s: no NoNewPrivileges", r.Name)
		case *c.StopGracePeriod <= r.ShutdownTimeout+15e9:
			t.Errorf("%s: grace %v does not cover the runner's stop (%v + 15s)", r.Name, *c.StopGracePeriod, r.ShutdownTimeout)
		case s.TaskTemplate.Resources.Reservations.MemoryBytes > s.TaskTemplate.Resources.Limits.MemoryBytes:
			t.Errorf("%s: reservation above limit", r.Name)
		}
	}
}

// A service update hands the running guest over (start-first, no cap of
// one task a node, rollback on failure) only when the VM can have a second
// task beside the first on its home (no host-mode port, TPM or broker
// TAP; local storage), its running task's runner can (the service's
// label), and nothing of its QEMU changes: only the runner's image. Every
// other update, and every new service, is stop-first with one task a node.
func TestHandOffInSpec(t *testing.T) {
	resolve := func(def string) Resolved {
		t.Helper()
		d, err := Load([]byte("vms:\n  - name: web-1\n    uid: 20001\n    " + def + "\n"))
		if err != nil {
			t.Fatalf("%s: %v", def, err)
		}
		rs, err := d.Resolve()
		if err != nil {
			t.Fatalf("%s: %v", def, err)
		}
		return rs[0]
	}
	for def, want := range map[string]bool{
		"node: n1":                      true,
		"node: n1\n    ports: [\"22\"]": true,
		"node: n1\n    ports: [\"22\"]\n    publish: host": false,
		"node: n1\n    console_port: 8006":                 false,
		"node: n1\n    metrics_port: 9100":                 false,
		"node: n1\n    tpm: true\n    boot_mode: uefi":     false,
		"node: n1\n    net: bridge\n    bridge: br0":       false,
		"storage_mode: shared":                             false,
	} {
		r := resolve(def)
		running := ServiceSpec(r)
		if u, max := running.UpdateConfig, running.TaskTemplate.Placement.MaxReplicas; u.Order != "stop-first" || running.RollbackConfig.Order != "stop-first" || max != 1 {
			t.Errorf("%q: a new service's %+v, %d per node", def, u, max)
		}
		if HandsOver(r) != want || (running.Labels[LabelHandOff] == HandOffVersion) != want {
			t.Errorf("%q: hands over %v, label %q, want %v", def, HandsOver(r), running.Labels[LabelHandOff], want)
		}
		if running.TaskTemplate.ContainerSpec.Labels[LabelHandOff] != "" {
			t.Errorf("%q: the hand-off label is on the container (a change of it would replace the task)", def)
		}
		r2 := r
		r2.Image = "swarmvm/runner:next"
		next := ServiceSpec(r2)
		if HandOff(r2, running, next) != want {
			t.Errorf("%q: an update of the image alone hands over: %v, want %v", def, !want, want)
		}
		if !want {
			continue
		}
		h := WithHandOff(next)
		if u := h.UpdateConfig; u.Order != "start-first" || u.FailureAction != "rollback" || h.RollbackConfig.Order != "start-first" || h.TaskTemplate.Placement.MaxReplicas != 0 || next.TaskTemplate.Placement.MaxReplicas != 1 {
			t.Errorf("%q: with the hand-off %+v, %d per node (and the spec it came from %d)", def, u, h.TaskTemplate.Placement.MaxReplicas, next.TaskTemplate.Placement.MaxReplicas)
		}
		// Anything of QEMU's changed: a reboot, stop-first.
		for what, change := range map[string]func(*Resolved){
			"memory":  func(r *Resolved) { r.LimitBytes += 1 << 20 },
			"env":     func(r *Resolved) { r.Env = map[string]string{"VM_CPUS": "2"} },
			"storage": func(r *Resolved) { r.Storage = "/srv/other" },
		} {
			r3 := r2
			change(&r3)
			if HandOff(r3, running, ServiceSpec(r3)) {
				t.Errorf("%q: an update of the image and %s hands over", def, what)
			}
		}
		old := running
		old.Labels = maps.Clone(old.Labels)
		delete(old.Labels, LabelHandOff)
		if HandOff(r2, old, next) {
			t.Errorf("%q: a service an earlier swarmvm made (its runner cannot hand over) is handed over", def)
		}
	}
}

// A VM with a console publishes its port in host mode beside the guest's,
// tells the runner, and hands the task the key as a secret only its uid
// reads; the stack file names that secret as one the operator makes.
func TestConsoleInSpec(t *testing.T) {
	d, err := Load([]byte("vms:\n  - name: web-1\n    uid: 20001\n    node: n1\n    ports: [\"22\"]\n    console_port: 8006\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	r := rs[0]
	r.ConsoleSecret = "swarmvm-console-0123456789abcdef"
	spec := ServiceSpec(r)
	ports := spec.EndpointSpec.Ports
	if len(ports) != 2 || ports[1].TargetPort != 8006 || ports[1].PublishedPort != 8006 || ports[1].PublishMode != "host" || ports[0].PublishMode != "ingress" {
		t.Errorf("ports %+v: want 22 (ingress) and 8006 in host mode", ports)
	}
	if !slices.Contains(spec.TaskTemplate.ContainerSpec.Env, "CONSOLE_PORT=8006") {
		t.Errorf("env %v lacks CONSOLE_PORT", spec.TaskTemplate.ContainerSpec.Env)
	}
	secs := spec.TaskTemplate.ContainerSpec.Secrets
	if len(secs) != 1 || secs[0].SecretName != r.ConsoleSecret || secs[0].File.Name != ConsoleKeyTarget ||
		secs[0].File.UID != "20001" || secs[0].File.GID != "10001" || secs[0].File.Mode != 0o400 {
		t.Errorf("secrets %+v", secs)
	}
	stack, err := Stack(rs)
	if err != nil {
		t.Fatal(err)
	}
	name := StackConsoleSecret("web-1")
	for _, want := range []string{"source: " + name, "target: swarmvm-console", "mode: 256", name + ":\n    external: true", "docker secret create " + name} {
		if !strings.Contains(string(stack), want) {
			t.Errorf("stack lacks %q:\n%s", want, stack)
		}
	}
}

// A VM with metrics publishes their port in host mode and tells the
// runner; its token file becomes a secret only its uid reads, whose path
// the runner is given.
func TestMetricsInSpec(t *testing.T) {
	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("0123456789abcdef0123\n"), 0o600)
	d, err := Load([]byte("vms:\n  - name: web-1\n    uid: 20001\n    node: n1\n    metrics_port: 9177\n    metrics_token: " + token + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	r := rs[0]
	if err := r.LoadSeed(); err != nil {
		t.Fatal(err)
	}
	spec := ServiceSpec(r)
	ports := spec.EndpointSpec.Ports
	if len(ports) != 1 || ports[0].TargetPort != 9177 || ports[0].PublishedPort != 9177 || ports[0].PublishMode != "host" {
		t.Errorf("ports %+v: want 9177 in host mode", ports)
	}
	if spec.Labels[LabelMetricsPort] != "9177" {
		t.Errorf("service labels %v lack %s=9177", spec.Labels, LabelMetricsPort)
	}
	env := spec.TaskTemplate.ContainerSpec.Env
	if !slices.Contains(env, "METRICS_PORT=9177") || !slices.Contains(env, "METRICS_TOKEN_FILE=/run/secrets/"+MetricsTokenTarget) {
		t.Errorf("env %v lacks METRICS_PORT or METRICS_TOKEN_FILE", env)
	}
	secs := spec.TaskTemplate.ContainerSpec.Secrets
	if len(secs) != 1 || !strings.HasPrefix(secs[0].SecretName, "swarmvm-metrics-") || secs[0].File.Name != MetricsTokenTarget ||
		secs[0].File.UID != "20001" || secs[0].File.Mode != 0o400 {
		t.Errorf("secrets %+v", secs)
	}
	for _, bad := range []string{"    metrics_port: 8006\n    console_port: 8006\n", "    metrics_port: 22\n    ports: [\"22\"]\n", "    metrics_token: /x\n", "    metrics_port: 0\n    metrics_token: /x\n"} {
		d, err := Load([]byte("vms:\n  - name: a\n    node: n1\n" + bad))
		if err == nil {
			_, err = d.Resolve()
		}
		if err == nil || !strings.Contains(err.Error(), "metrics_") {
			t.Errorf("%q: %v, want a refusal naming metrics_…", bad, err)
		}
	}
}

// A VM with an export port publishes it in host mode, tells the runner,
// and gets the VM's key as a secret (export tickets are signed with it),
// also without a console; a stack file names that secret for the operator
// to make. A port shared with the console or the guest is refused.
func TestExportPortInSpec(t *testing.T) {
	d, err := Load([]byte("vms:\n  - name: web-1\n    uid: 20001\n    node: n1\n    export_port: 10809\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	r := rs[0]
	r.ConsoleSecret = "swarmvm-console-0123"
	spec := ServiceSpec(r)
	ports := spec.EndpointSpec.Ports
	if len(ports) != 1 || ports[0].TargetPort != 10809 || ports[0].PublishedPort != 10809 || ports[0].PublishMode != "host" {
		t.Errorf("ports %+v: want 10809 in host mode", ports)
	}
	if env := spec.TaskTemplate.ContainerSpec.Env; !slices.Contains(env, "EXPORT_PORT=10809") {
		t.Errorf("env %v lacks EXPORT_PORT", env)
	}
	secs := spec.TaskTemplate.ContainerSpec.Secrets
	if len(secs) != 1 || secs[0].SecretName != "swarmvm-console-0123" || secs[0].File.Name != ConsoleKeyTarget || secs[0].File.UID != "20001" || secs[0].File.Mode != 0o400 {
		t.Errorf("secrets %+v: want the VM's key", secs)
	}
	b, err := Stack(rs)
	if err != nil {
		t.Fatal(err)
	}
	if stack := string(b); !strings.Contains(stack, "docker secret create "+StackConsoleSecret("web-1")) || !strings.Contains(stack, "10809") {
		t.Errorf("stack file lacks the key's secret or the port:\n%s", b)
	}
	for _, bad := range []string{"    export_port: 8006\n    console_port: 8006\n", "    export_port: 22\n    ports: [\"22\"]\n", "    export_port: 70000\n", "    env: {EXPORT_PORT: \"10809\"}\n"} {
		d, err := Load([]byte("vms:\n  - name: a\n    node: n1\n" + bad))
		if err == nil {
			_, err = d.Resolve()
		}
		if err == nil || !strings.Contains(err.Error(), "export_port") && !strings.Contains(err.Error(), "EXPORT_PORT") {
			t.Errorf("%q: %v, want a refusal naming export_port", bad, err)
		}
	}
}

// A backup schedule mounts the repository into the task and sets the
// runner's BACKUP_*; the storage folder is still read back as the storage;
// a schedule without its interval or with a relative repository is refused.
func TestBackupScheduleInSpec(t *testing.T) {
	d, err := Load([]byte("vms:\n  - name: web-1\n    node: n1\n    backup:\n      repo: /srv/backup\n      every: 24h\n      at: \"02:00\"\n      keep_last: 7\n      keep_daily: 14\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	spec := ServiceSpec(rs[0])
	cs := spec.TaskTemplate.ContainerSpec
	if !slices.ContainsFunc(cs.Mounts, func(m mount.Mount) bool {
		return m.Type == mount.TypeBind && m.Source == "/srv/backup" && m.Target == "/srv/backup" && !m.ReadOnly
	}) {
		t.Errorf("mounts %+v lack the repository", cs.Mounts)
	}
	for _, want := range []string{"BACKUP_REPO=/srv/backup", "BACKUP_EVERY=24h", "BACKUP_AT=02:00", "BACKUP_KEEP_LAST=7", "BACKUP_KEEP_DAILY=14"} {
		if !slices.Contains(cs.Env, want) {
			t.Errorf("env %v lacks %s", cs.Env, want)
		}
	}
	if r, ok := readRendered(&swarm.Service{Spec: spec}); !ok || r.storage != DefaultStorage {
		t.Errorf("read back: storage %q (%v), want %s", r.storage, ok, DefaultStorage)
	}
	for bad, field := range map[string]string{
		"      repo: srv/backup\n      every: 24h\n":               "backup.repo",
		"      repo: /srv/backup\n":                                "backup.every",
		"      repo: /srv/b\n      every: 10s\n":                   "BACKUP_EVERY",
		"      repo: /srv/b\n      every: 1h\n      at: \"2pm\"\n": "BACKUP_AT",
	} {
		d, err := Load([]byte("vms:\n  - name: a\n    node: n1\n    backup:\n" + bad))
		if err == nil {
			_, err = d.Resolve()
		}
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%q: %v, want a refusal naming %s", bad, err, field)
		}
	}
}

// A VM with a cloud-init seed gets each file as a secret only its uid
// reads, named after its content, so that a changed file is a new secret;
// the runner is told to build the seed, and gets the keys.
func TestCloudInitInSpec(t *testing.T) {
	dir := t.TempDir()
	ud := filepath.Join(dir, "user-data")
	os.WriteFile(ud, []byte("#cloud-config\npassword: x\n"), 0o600)
	r := seeded(t, "vms:\n  - name: web-1\n    uid: 20001\n    node: n1\n    cloud_init: {user_data: "+ud+"}\n    ssh_authorized_keys: [\"ssh-ed25519 AAAA k@h\"]\n")
	first := r.Seed[0].Secret
	spec := ServiceSpec(r)
	secs := spec.TaskTemplate.ContainerSpec.Secrets
	if len(secs) != 1 || secs[0].SecretName != first || secs[0].File.Name != "swarmvm-user-data" || secs[0].File.UID != "20001" || secs[0].File.Mode != 0o400 {
		t.Errorf("secrets %+v", secs)
	}
	env := spec.TaskTemplate.ContainerSpec.Env
	if !slices.Contains(env, "CLOUD_INIT=nocloud") || !slices.Contains(env, "CLOUD_INIT_SSH_KEYS=ssh-ed25519 AAAA k@h") {
		t.Errorf("env %v", env)
	}
	os.WriteFile(ud, []byte("#cloud-config\npassword: y\n"), 0o600)
	r.LoadSeed()
	if r.Seed[0].Secret == first {
		t.Error("a changed user-data kept its secret's name")
	}
	if strings.Contains(r.Seed[0].Secret, "password") {
		t.Error("the secret's name shows content")
	}
}

// A console with TLS: the certificate and key reach the task as secrets of
// their own kind, and the runner is told where.
func TestConsoleTLSInSpec(t *testing.T) {
	dir := t.TempDir()
	crt, key := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	os.WriteFile(crt, []byte("CERT"), 0o600)
	os.WriteFile(key, []byte("KEY"), 0o600)
	d, _ := Load([]byte("vms:\n  - name: web-1\n    node: n1\n    console_port: 8006\n    console_tls_cert: " + crt + "\n    console_tls_key: " + key + "\n"))
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	r := rs[0]
	if err := r.LoadSeed(); err != nil {
		t.Fatal(err)
	}
	r.ConsoleSecret = "swarmvm-console-x"
	spec := ServiceSpec(r)
	var targets []string
	for _, s := range spec.TaskTemplate.ContainerSpec.Secrets {
		targets = append(targets, s.File.Name)
		if s.File.Mode != 0o400 || !strings.HasPrefix(s.SecretName, "swarmvm-") {
			t.Errorf("secret %+v", s)
		}
	}
	if strings.Join(targets, " ") != "swarmvm-console swarmvm-console-tls.crt swarmvm-console-tls.key" {
		t.Errorf("secret targets %v", targets)
	}
	env := spec.TaskTemplate.ContainerSpec.Env
	if !slices.Contains(env, "CONSOLE_TLS_CERT=/run/secrets/swarmvm-console-tls.crt") || !slices.Contains(env, "CONSOLE_TLS_KEY=/run/secrets/swarmvm-console-tls.key") {
		t.Errorf("env %v", env)
	}
	if slices.Contains(env, "CLOUD_INIT=nocloud") {
		t.Error("TLS files made the runner build a cloud-init seed")
	}
}

// A seed file may be a secret the operator made (secret:NAME): the task
// gets it under the seed's name, and deploy neither reads nor makes it.
func TestCloudInitExistingSecret(t *testing.T) {
	r := seeded(t, "vms:\n  - name: web-1\n    node: n1\n    cloud_init: {network_config: \"secret:site-net.v2\"}\n")
	secs := ServiceSpec(r).TaskTemplate.ContainerSpec.Secrets
	if len(secs) != 1 || secs[0].SecretName != "site-net.v2" || secs[0].File.Name != "swarmvm-network-config" || r.Seed[0].Data != nil {
		t.Errorf("secrets %+v, seed %+v", secs, r.Seed)
	}
	stack, err := Stack([]Resolved{r})
	if err != nil || strings.Contains(string(stack), "docker secret create site-net.v2") || !strings.Contains(string(stack), "site-net.v2:\n    external: true") {
		t.Errorf("stack (%v):\n%s", err, stack)
	}
	d, _ := Load([]byte("vms:\n  - name: web-1\n    cloud_init: {user_data: \"secret:../etc\"}\n"))
	if _, err := d.Resolve(); err == nil || !strings.Contains(err.Error(), "cloud_init.user_data") {
		t.Errorf("a bad secret name: %v", err)
	}
}

// seeded resolves a one-VM definition and loads its cloud-init seed.
func seeded(t *testing.T, def string) Resolved {
	t.Helper()
	d, err := Load([]byte(def))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	if err := rs[0].LoadSeed(); err != nil {
		t.Fatal(err)
	}
	return rs[0]
}
