package runner

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

var updateSpec = flag.Bool("update", false, "rewrite the spec golden files")

// QEMU's command line for each mode, from the configuration (the runner's
// variables) and the facts preparation gathered, through buildSpec: the
// one place the spec is made, without I/O. A change to what a VM gets
// shows here (and in internal/qemu's goldens, for the argv of a spec).
func TestSpecGolden(t *testing.T) {
	both := handed{kvm: true, qmp: true, health: true, agent: true, vars: 2, disk: 2}
	cases := []struct {
		name string
		env  map[string]string
		f    facts
	}{
		{"kvm-uefi-user", map[string]string{"PORTS": "22,8080:80"}, facts{memMiB: 2048, agent: true, fds: both}},
		{"tcg-bios-kernel", map[string]string{"ACCEL": "tcg", "BOOT_MODE": "bios", "KERNEL_PATH": "/var/lib/poc-qemu/isos/vmlinuz",
			"INITRD_PATH": "/var/lib/poc-qemu/isos/initrd.img", "KERNEL_CMDLINE": "console=ttyS0"},
			facts{memMiB: 256, agent: true, fds: handed{qmp: true, health: true, agent: true, disk: 2}}},
		{"bridge-iso-empty-disk", map[string]string{"NET_MODE": "bridge", "NET_BRIDGE": "br0", "ISO_PATH": "/var/lib/poc-qemu/isos/debian.iso"},
			facts{memMiB: 1024, bootFromISO: true, agent: true, fds: handed{kvm: true, tap: true, vhost: true, qmp: true, health: true, agent: true, vars: 2, disk: 2}}},
		{"secure-tpm-console-seed", map[string]string{"BOOT_MODE": "uefi-secure", "TPM": "on", "CONSOLE_PORT": "8006", "CLOUD_INIT": "nocloud"},
			facts{memMiB: 4096, seed: true, console: true, tpm: true, agent: true, fds: both}},
		{"windows-drivers-none", map[string]string{"GUEST_OS": "windows", "DRIVERS_ISO": "/var/lib/poc-qemu/isos/virtio-win.iso", "NET_MODE": "none",
			"QEMU_ARGS": "-device virtio-rng-pci,id=rng0", "GUEST_AGENT": "off"}, facts{memMiB: 8192, fds: handed{kvm: true, qmp: true, health: true, vars: 2, disk: 2}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"VM_NAME": "web-1", "VM_CPUS": "2", "RUN_DIR": "/run/vm"}
			for k, v := range tc.env {
				env[k] = v
			}
			cfg := config.FromEnv(func(k string) string { return env[k] })
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			tc.f.uid = config.DefaultUID("web-1")
			spec := buildSpec(cfg, tc.f)
			if again := buildSpec(cfg, tc.f); strings.Join(qemu.Argv(again), " ") != strings.Join(qemu.Argv(spec), " ") {
				t.Fatal("buildSpec gave two command lines for one configuration")
			}
			got := strings.Join(qemu.Argv(spec), "\n") + "\n"
			path := filepath.Join("testdata", "spec-"+tc.name+".golden")
			if *updateSpec {
				os.MkdirAll("testdata", 0o755)
				os.WriteFile(path, []byte(got), 0o644)
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (go test ./internal/runner -run TestSpecGolden -update)", err)
			}
			if got != string(want) {
				t.Errorf("%s differs:\n%s", path, got)
			}
		})
	}
}
