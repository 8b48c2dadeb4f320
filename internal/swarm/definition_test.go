package swarm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
)

func TestExampleDefinitionResolves(t *testing.T) {
	b, err := os.ReadFile("../../docs/vms.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d, err := Load(b)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatalf("the documented example does not resolve: %v", err)
	}
	web := rs[0]
	if web.GuestMiB != 2048 || web.LimitBytes != (2048+256)<<20 || web.ReserveBytes != web.LimitBytes {
		t.Errorf("memory: guest %d limit %d reserve %d", web.GuestMiB, web.LimitBytes, web.ReserveBytes)
	}
	if web.LimitNanoCPUs != 3e9 || web.ReserveNanoCPUs != 2e9 {
		t.Errorf("cpus: limit %d reserve %d", web.LimitNanoCPUs, web.ReserveNanoCPUs)
	}
	if web.Env["ISO_PATH"] != "/var/lib/poc-qemu/isos/debian-13.0.0-amd64-netinst.iso" || web.Env["KVM_BROKER"] != "/run/swarmvm/broker.sock" {
		t.Errorf("env %v", web.Env)
	}
	if web.StopGrace.String() != "2m0s" {
		t.Errorf("stop grace %v", web.StopGrace)
	}
	if web.Env["PORTS"] != "22/tcp,8080:80/tcp" || len(web.Ports) != 2 {
		t.Errorf("ports: env %q, %v", web.Env["PORTS"], web.Ports)
	}
	if db := rs[1]; db.Env["NET_MODE"] != "bridge" || db.Env["NET_BRIDGE"] != "br0" || db.Env["PORTS"] != "" {
		t.Errorf("db-1: %v", db.Env)
	}
	if rs[2].ReserveBytes != 4<<30 || rs[2].Env["DISK_CACHE"] != "writeback" {
		t.Errorf("ci-runner-1: %+v", rs[2])
	}
}

// Each VM runs as its own uid: given, or derived from its name (in the
// documented range, different for these names).
func TestVMUIDs(t *testing.T) {
	d, err := Load([]byte("vms:\n  - name: a\n  - name: b\n  - name: c\n    uid: 424242\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	if rs[0].UID != DefaultUID("a") || rs[1].UID != DefaultUID("b") || rs[2].UID != 424242 {
		t.Fatalf("uids %d %d %d", rs[0].UID, rs[1].UID, rs[2].UID)
	}
	if rs[0].UID == rs[1].UID || rs[0].UID < UIDBase || rs[0].UID >= UIDBase+UIDRange {
		t.Errorf("derived uids %d and %d", rs[0].UID, rs[1].UID)
	}
	if DefaultUID("web-1") == DefaultUID("web-2") {
		t.Error("web-1 and web-2 get the same uid")
	}
}

func TestBadDefinitions(t *testing.T) {
	cases := []struct {
		name, yaml string
		fields     []string
	}{
		{"unknown key", "vms:\n  - name: a\n    memroy: 2G\n", []string{"field memroy not found"}},
		{"unknown top key", "imgae: x\nvms: []\n", []string{"field imgae not found"}},
		{"no vms", "vms: []\n", []string{"vms: no VM defined"}},
		{"reservation above limit", "vms:\n  - name: a\n    memory: 1G\n    reserve_memory: 4G\n", []string{"vms[0] (a).reserve_memory: 4G is above the memory limit 1280M"}},
		{"cpu reservation above limit", "vms:\n  - name: a\n    cpus: 2\n    reserve_cpus: 8\n", []string{"vms[0] (a).reserve_cpus"}},
		{"name Swarm cannot take", "vms:\n  - name: web_1\n", []string{"vms[0] (web_1).name"}},
		{"name too long", "vms:\n  - name: " + strings.Repeat("a", 64) + "\n", []string{".name"}},
		{"duplicate", "vms:\n  - name: a\n  - name: a\n", []string{"vms[1] (a).name: defined twice"}},
		{"garbage memory", "vms:\n  - name: a\n    memory: lots\n", []string{"vms[0] (a).memory"}},
		{"unknown env", "vms:\n  - name: a\n    env: {VM_RAM: 2G}\n", []string{"vms[0] (a).env.VM_RAM: is not a variable"}},
		{"env owned by a field", "vms:\n  - name: a\n    env: {VM_MEMORY: 2G}\n", []string{"env.VM_MEMORY: is set from the VM's own field"}},
		{"env the runner refuses", "vms:\n  - name: a\n    env: {QEMU_ARGS: -sandbox off}\n", []string{"the runner would refuse it: QEMU_ARGS"}},
		{"bad accel", "vms:\n  - name: a\n    accel: hvf\n", []string{".accel"}},
		{"bad constraint", "vms:\n  - name: a\n    constraints: [ssd]\n", []string{"constraints[0]"}},
		{"bad shutdown", "vms:\n  - name: a\n    shutdown_timeout: forever\n", []string{"shutdown_timeout"}},
		{"several", "vms:\n  - name: a\n    cpus: 999\n    memory: 1K\n", []string{".cpus", ".memory"}},
		{"port out of range", "vms:\n  - name: a\n    ports: [\"70000\"]\n", []string{"vms[0] (a).ports", "outside 1–65535"}},
		{"port twice", "vms:\n  - name: a\n    ports: [\"80\", \"80:81\"]\n", []string{".ports", "given twice"}},
		{"port protocol", "vms:\n  - name: a\n    ports: [\"53/sctp\"]\n", []string{".ports", "not tcp or udp"}},
		{"ports with bridge", "vms:\n  - name: a\n    net: bridge\n    bridge: br0\n    ports: [\"22\"]\n", []string{"PORTS: is set but NET_MODE=bridge"}},
		{"unknown net", "vms:\n  - name: a\n    net: slirp\n", []string{`vms[0] (a).net: "slirp" is not one of user, bridge, tap, none`}},
		{"bridge without name", "vms:\n  - name: a\n    net: bridge\n", []string{"NET_BRIDGE"}},
		{"publish mode", "vms:\n  - name: a\n    publish: nodeport\n", []string{".publish"}},
		{"console port out of range", "vms:\n  - name: a\n    console_port: 70000\n", []string{"vms[0] (a).console_port"}},
		{"console port forwarded too", "vms:\n  - name: a\n    ports: [\"8006\"]\n    console_port: 8006\n", []string{"vms[0] (a).console_port"}},
		{"console tls without a console", "vms:\n  - name: a\n    console_tls_cert: /x.crt\n    console_tls_key: /x.key\n", []string{"vms[0] (a).console_tls_cert"}},
		{"console tls without its key", "vms:\n  - name: a\n    console_port: 8006\n    console_tls_cert: /x.crt\n", []string{"vms[0] (a).console_tls_cert"}},
		{"cloud-init bus", "vms:\n  - name: a\n    cloud_init: {bus: scsi}\n", []string{"vms[0] (a).cloud_init.bus"}},
		{"not an ssh key", "vms:\n  - name: a\n    ssh_authorized_keys: [\"hunter2\"]\n", []string{"vms[0] (a).ssh_authorized_keys[0]"}},
		{"cloud-init in env", "vms:\n  - name: a\n    env: {CLOUD_INIT: nocloud}\n", []string{"vms[0] (a).env.CLOUD_INIT"}},
		{"console port in env", "vms:\n  - name: a\n    env: {CONSOLE_PORT: \"8006\"}\n", []string{"vms[0] (a).env.CONSOLE_PORT"}},
		{"system uid", "vms:\n  - name: a\n    uid: 33\n", []string{"vms[0] (a).uid: 33 is outside 1000–"}},
		{"uid shared", "vms:\n  - name: a\n    uid: 20000\n  - name: b\n    uid: 20000\n", []string{"vms[1] (b).uid: 20000 is also a's"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := Load([]byte(tc.yaml))
			if err == nil {
				_, err = d.Resolve()
			}
			if err == nil {
				t.Fatalf("accepted:\n%s", tc.yaml)
			}
			for _, f := range tc.fields {
				if !strings.Contains(err.Error(), f) {
					t.Errorf("error %q lacks %q", err, f)
				}
			}
			var fe *FieldError
			if !strings.Contains(tc.yaml, "memroy") && !strings.Contains(tc.yaml, "imgae") && !errors.As(err, &fe) {
				t.Errorf("error %v carries no FieldError", err)
			}
		})
	}
}

// Tap mode is the less private choice: the service gets exactly NET_ADMIN
// and the TUN device, and no no-new-privileges (it would disable the
// helper's file capability); every other mode gets neither.
func TestTapModeAddsExactlyNetAdmin(t *testing.T) {
	d, err := Load([]byte("vms:\n  - name: a\n    net: tap\n    node: n1\n  - name: b\n    node: n1\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	tap, user := ServiceSpec(rs[0]).TaskTemplate.ContainerSpec, ServiceSpec(rs[1]).TaskTemplate.ContainerSpec
	if len(tap.CapabilityAdd) != 1 || tap.CapabilityAdd[0] != "NET_ADMIN" || tap.Privileges.NoNewPrivileges {
		t.Errorf("tap: cap_add %v nnp %v", tap.CapabilityAdd, tap.Privileges.NoNewPrivileges)
	}
	if m := tap.Mounts[len(tap.Mounts)-1]; m.Source != "/dev/net/tun" || m.Target != "/dev/net/tun" {
		t.Errorf("tap: last mount %+v, want /dev/net/tun", m)
	}
	if rs[0].Env["NET_MODE"] != "tap" || rs[0].Env["TUN_DEVICE"] != "/dev/net/tun" {
		t.Errorf("tap env %v", rs[0].Env)
	}
	if len(user.CapabilityAdd) != 0 || !user.Privileges.NoNewPrivileges || len(user.Mounts) != 3 {
		t.Errorf("user mode: cap_add %v nnp %v mounts %d", user.CapabilityAdd, user.Privileges.NoNewPrivileges, len(user.Mounts))
	}
	y, _ := Stack(rs)
	if !strings.Contains(string(y), "cap_add:\n      - NET_ADMIN") {
		t.Errorf("stack lacks cap_add for the tap VM:\n%s", y)
	}
}

// A definition may not mount the node's system folders, the engine's
// state or a top-level folder as storage, nor put the broker's folder
// anywhere but under /run.
func TestSaneFolders(t *testing.T) {
	for _, c := range []struct{ yml, want string }{
		{"broker_dir: /\nvms: [{name: a}]", "broker_dir: \"/\" is a top-level folder"},
		{"broker_dir: /srv/sock\nvms: [{name: a}]", "is not under /run/ or /var/run/"},
		{"broker_dir: /run/docker\nvms: [{name: a}]", "is the node's /run/docker"},
		{"storage: /etc/vms\nvms: [{name: a}]", "is the node's /etc"},
		{"storage: /var/lib/docker/volumes/x\nvms: [{name: a}]", "is the node's /var/lib/docker"},
		{"vms: [{name: a, storage: /}]", "storage: \"/\" is a top-level folder"},
		{"vms: [{name: a, storage: /srv/vms/../../proc}]", "is the node's /proc"},
	} {
		d, err := Load([]byte(c.yml))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.Resolve(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.yml, err, c.want)
		}
	}
	d, _ := Load([]byte("storage: /srv/vms\nbroker_dir: /run/swarmvm-a\nvms: [{name: a}]"))
	if _, err := d.Resolve(); err != nil {
		t.Errorf("a sane definition: %v", err)
	}
}

// The audit's non-root check reads the uid as a number.
func TestNonRoot(t *testing.T) {
	for user, want := range map[string]bool{"10001:10001": true, "0": false, "00": false, "0:0": false, "000:10001": false, "root": false, "swarmvm": false, "": false} {
		if nonRoot(user) != want {
			t.Errorf("nonRoot(%q) = %v", user, !want)
		}
	}
}

// A definition's shutdown_timeout reads as the runner's SHUTDOWN_TIMEOUT
// does (whole seconds too), and stop_grace_period covers the runner's whole
// stop budget with its margin.
func TestShutdownTimeoutAsTheRunnerReadsIt(t *testing.T) {
	for _, v := range []string{"90", "90s", "2m", "1", "3600", "0", "2h", "forever", "-5"} {
		runnerErr := config.FromEnv(func(k string) string {
			return map[string]string{"VM_NAME": "a", "SHUTDOWN_TIMEOUT": v}[k]
		}).Validate()
		runnerOK := runnerErr == nil || !strings.Contains(runnerErr.Error(), "SHUTDOWN_TIMEOUT")
		d, err := Load([]byte("vms:\n  - name: a\n    shutdown_timeout: " + v + "\n"))
		if err != nil {
			t.Fatal(err)
		}
		rs, err := d.Resolve()
		if (err == nil) != runnerOK {
			t.Errorf("%q: the runner says %v, the definition %v", v, runnerErr, err)
			continue
		}
		if err != nil {
			continue
		}
		want, _ := config.ParseDuration(v)
		if rs[0].ShutdownTimeout != want || rs[0].Env["SHUTDOWN_TIMEOUT"] != want.String() {
			t.Errorf("%q: timeout %v, env %q", v, rs[0].ShutdownTimeout, rs[0].Env["SHUTDOWN_TIMEOUT"])
		}
		if g := rs[0].StopGrace; g != config.StopBudget(want)+config.StopMargin || g-want != 30*time.Second {
			t.Errorf("%q: stop_grace_period %v for a budget of %v", v, g, config.StopBudget(want))
		}
	}
}

// A VM name and a bridge name mean the same to a definition, the runner's
// configuration and the broker's wire protocol: one grammar, in config.
func TestNamesOneGrammar(t *testing.T) {
	long := strings.Repeat("a", 63)
	for _, tc := range []struct {
		vm, bridge string
		ok         bool
	}{
		{"web-1", "br0", true}, {long, "br0", true}, {"1vm", "br_lan.5", true},
		{long + "a", "br0", false}, {"-web", "br0", false}, {"web_1", "br0", false}, {"", "br0", false},
		{"web-1", "-br0", false}, {"web-1", "br0-is-too-long-x", false}, {"web-1", "br 0", false}, {"web-1", "", false},
	} {
		d, err := Load([]byte(fmt.Sprintf("vms:\n  - name: %q\n    net: bridge\n    bridge: %q\n", tc.vm, tc.bridge)))
		if err != nil {
			t.Fatal(err)
		}
		_, defErr := d.Resolve()
		runErr := config.FromEnv(func(k string) string {
			return map[string]string{"VM_NAME": tc.vm, "NET_MODE": "bridge", "NET_BRIDGE": tc.bridge}[k]
		}).Validate()
		_, wireErr := fdpass.DecodeRequest([]byte(fmt.Sprintf(`{"version":%d,"vm":%q,"tap":{"bridge":%q}}`, fdpass.Version, tc.vm, tc.bridge)))
		for who, err := range map[string]error{"definition": defErr, "runner": runErr, "broker": wireErr} {
			if (err == nil) != tc.ok {
				t.Errorf("vm %q bridge %q: the %s says %v, want ok=%v", tc.vm, tc.bridge, who, err, tc.ok)
			}
		}
	}
}

// A Windows VM in a definition: the profile, a drivers CD-ROM under isos/,
// a TPM and Secure Boot reach the runner as its variables, which it accepts.
func TestWindowsDefinition(t *testing.T) {
	d, err := Load([]byte("vms:\n  - name: w11\n    os: windows\n    boot_mode: uefi-secure\n    tpm: true\n    iso: Win11_24H2.iso\n    drivers_iso: virtio-win.iso\n"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	env := rs[0].Env
	want := map[string]string{"GUEST_OS": "windows", "BOOT_MODE": "uefi-secure", "TPM": "on",
		"ISO_PATH": "/var/lib/poc-qemu/isos/Win11_24H2.iso", "DRIVERS_ISO": "/var/lib/poc-qemu/isos/virtio-win.iso"}
	for k, v := range want {
		if env[k] != v {
			t.Errorf("%s = %q, want %q", k, env[k], v)
		}
	}
	if err := config.FromEnv(func(k string) string { return env[k] }).Validate(); err != nil {
		t.Errorf("the runner refuses what the definition gives it: %v", err)
	}
	d, err = Load([]byte("vms:\n  - name: w\n    os: beos\n"))
	if err == nil {
		_, err = d.Resolve()
	}
	if err == nil || !strings.Contains(err.Error(), "GUEST_OS") {
		t.Errorf("os: beos: %v, want a refusal naming GUEST_OS", err)
	}
}

// Every variable the runner gets from a definition is one the runner
// reads (config.Variables): a key misspelt in runnerEnv would otherwise be
// dropped by the runner without a word. The definition uses every field
// that writes one.
func TestRunnerEnvNamesConfigVariables(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"ud.yaml", "md.yaml"} {
		os.WriteFile(filepath.Join(dir, f), []byte("#cloud-config\n"), 0o644)
	}
	def := `storage: /srv/vms
vms:
  - name: every-field
    node: node-1
    cpus: 2
    memory: 1G
    disk_size: 8G
    boot_mode: uefi-secure
    cpu_model: host
    iso: install.iso
    drivers_iso: virtio-win.iso
    os: windows
    tpm: true
    net: tap
    shutdown_timeout: 30s
    console_port: 8006
    console_tls_cert: ` + dir + `/c.crt
    console_tls_key: ` + dir + `/c.key
    cloud_init:
      user_data: ` + dir + `/ud.yaml
      meta_data: ` + dir + `/md.yaml
      bus: virtio
    ssh_authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForTheDocs ops@example"]
  - name: user-net
    accel: tcg
    ports: ["22", "8080:80"]
    storage_mode: shared
  - name: bridged
    node: node-1
    net: bridge
    bridge: br0
`
	d, err := Load([]byte(def))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := d.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, r := range rs {
		for k := range r.RunnerEnv() {
			seen[k] = true
			if !slices.Contains(config.Variables, k) {
				t.Errorf("%s: the runner is given %s, which it does not read (config.Variables)", r.Name, k)
			}
		}
	}
	// The definition reached every branch that writes a variable.
	for _, k := range []string{"DISK_SIZE", "BOOT_MODE", "CPU_MODEL", "ISO_PATH", "DRIVERS_ISO", "GUEST_OS", "TPM", "NET_MODE", "TUN_DEVICE",
		"NET_BRIDGE", "PORTS", "KVM_BROKER", "STORAGE_DIR", "STORAGE_MODE", "CONSOLE_PORT", "CONSOLE_TLS_CERT", "CONSOLE_TLS_KEY",
		"CLOUD_INIT", "CLOUD_INIT_SSH_KEYS", "CLOUD_INIT_BUS", "NODE_ID", "NODE_HOSTNAME", "HOME_NODE", "VM_NAME", "VM_CPUS", "VM_MEMORY", "ACCEL", "SHUTDOWN_TIMEOUT"} {
		if !seen[k] {
			t.Errorf("no VM of the definition was given %s: the test does not reach the branch that writes it", k)
		}
	}
}
