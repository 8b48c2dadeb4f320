package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

// vmFlags describe VMs for render and deploy: a definition file (-f), or
// one VM by flags.
type vmFlags struct {
	file    string
	def     swarm.Definition
	vm      swarm.VM
	env     []string
	ci      swarm.CloudInit
	sshKeys []string // files of public keys
	backup  swarm.BackupSchedule
}

func (v *vmFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVarP(&v.file, "file", "f", "", "VM definition file (YAML, see docs/vms.example.yaml); instead of the flags below")
	f.StringVar(&v.def.Image, "image", "", "runner image (default "+swarm.DefaultImage+")")
	f.StringVar(&v.def.Storage, "storage", "", "VM storage folder on the nodes (default "+swarm.DefaultStorage+")")
	f.StringVar(&v.def.BrokerDir, "broker-dir", "", "the broker's socket folder on the nodes (default "+swarm.DefaultBrokerDir+")")
	f.StringVar(&v.vm.Name, "name", "", "VM name (the service's name)")
	f.IntVar(&v.vm.UID, "uid", 0, fmt.Sprintf("the VM's own uid (default: derived from the name, 10000000–10999999); the group is %d", config.RunnerGID))
	f.IntVar(&v.vm.CPUs, "cpus", 0, "vCPUs (default 1)")
	f.StringVar(&v.vm.Memory, "memory", "", "guest RAM, e.g. 2G (default 1G); the container's limit adds QEMU's overhead")
	f.Float64Var(&v.vm.ReserveCPUs, "reserve-cpus", 0, "CPU reservation (default: the vCPUs)")
	f.StringVar(&v.vm.ReserveMemory, "reserve-memory", "", "memory reservation (default: the limit)")
	f.StringVar(&v.vm.DiskSize, "disk-size", "", "create the disk with this size when it does not exist, e.g. 20G")
	f.StringVar(&v.vm.ISO, "iso", "", "install medium: a path, or a name under <storage>/isos")
	f.StringVar(&v.vm.BootMode, "boot-mode", "", "uefi (default), uefi-secure (Secure Boot, Microsoft's keys) or bios")
	f.StringVar(&v.vm.OS, "os", "", "the guest's profile: linux (default) or windows (SATA disk, e1000e NIC, USB tablet, local-time RTC, Hyper-V enlightenments)")
	f.StringVar(&v.vm.DriversISO, "drivers-iso", "", "a second CD-ROM, e.g. virtio-win: a path, or a name under <storage>/isos")
	f.BoolVar(&v.vm.TPM, "tpm", false, "give the VM a TPM 2.0 (swtpm, its state kept beside the disk)")
	f.StringVar(&v.vm.GuestAgent, "guest-agent", "", "on (default): a channel for the QEMU guest agent (the guest's OS and addresses in ps, a shutdown that does not depend on ACPI); off: none")
	f.StringVar(&v.vm.Accel, "accel", "", "kvm (default) or tcg")
	f.StringVar(&v.vm.CPUModel, "cpu-model", "", "QEMU -cpu value (default host under kvm)")
	f.StringVar(&v.vm.ShutdownTimeout, "shutdown-timeout", "", "ACPI wait before forcing, e.g. 90s; stop_grace_period is this plus "+config.StopGracePeriod(0).String())
	f.StringVar(&v.vm.Net, "net", "", "networking: user (default), bridge (a TAP on a host bridge, from the broker) or none")
	f.StringVar(&v.vm.Bridge, "bridge", "", "host bridge for --net bridge (the broker must allow it)")
	f.StringSliceVar(&v.vm.Ports, "port", nil, "user mode: forward and publish PORT or PUBLISHED:GUEST[/udp] (repeatable)")
	f.StringVar(&v.vm.Publish, "publish", "", "ingress (routing mesh, default) or host")
	f.StringSliceVar(&v.vm.Constraints, "constraint", nil, "extra placement constraint (repeatable)")
	f.StringArrayVar(&v.env, "env", nil, "further runner variable KEY=VALUE (repeatable)")
	f.StringVar(&v.vm.StorageMode, "storage-mode", "", "local (default: the disk stays on the VM's home node) or shared (a filesystem every node mounts at --storage)")
	f.StringVar(&v.vm.Node, "node", "", "local storage: the VM's home node (ID or hostname); deploy picks one when unset, render needs it")
	f.IntVar(&v.vm.ConsolePort, "console-port", 0, "serve the VM's screen on this port of its node (host mode), to holders of a ticket from swarmvm console")
	f.StringVar(&v.vm.ConsoleTLSCert, "console-tls-cert", "", "the console's TLS certificate chain (PEM file), given to the task as a secret: the console is then HTTPS")
	f.StringVar(&v.vm.ConsoleTLSKey, "console-tls-key", "", "the private key of --console-tls-cert (PEM file)")
	f.IntVar(&v.vm.ExportPort, "export-port", 0, "serve pull-mode backup exports (NBD, TLS with a ticket from swarmvm backup export) on this port of its node (host mode)")
	f.IntVar(&v.vm.MetricsPort, "metrics-port", 0, "serve the runner's Prometheus metrics on this port of its node (host mode), at /metrics")
	f.StringVar(&v.vm.MetricsToken, "metrics-token", "", "a file holding the bearer token a scrape must present, given to the task as a secret")
	f.StringVar(&v.ci.UserData, "user-data", "", "cloud-init user-data file, given to the guest as a Swarm secret (secret:NAME: a secret that exists)")
	f.StringVar(&v.ci.MetaData, "meta-data", "", "cloud-init meta-data file (instance-id and local-hostname are added when it lacks them)")
	f.StringVar(&v.ci.NetworkConfig, "network-config", "", "cloud-init network-config file")
	f.StringVar(&v.ci.Bus, "cloud-init-bus", "", "how the seed is attached: virtio (default) or cdrom (Windows without virtio drivers)")
	f.StringVar(&v.backup.Repo, "backup-repo", "", "back the VM up on a schedule into this repository folder on its node (mounted into the task); with --backup-every")
	f.StringVar(&v.backup.Every, "backup-every", "", "how often the runner backs the VM up, e.g. 24h (at least 1m)")
	f.StringVar(&v.backup.At, "backup-at", "", "the time of day (UTC, HH:MM) scheduled backups fall on")
	f.IntVar(&v.backup.FullEvery, "backup-full-every", 0, "a scheduled backup is full when the chain has this many (default 7)")
	f.IntVar(&v.backup.KeepLast, "backup-keep-last", 0, "after each scheduled backup, keep the newest N (and what they build on)")
	f.IntVar(&v.backup.KeepDaily, "backup-keep-daily", 0, "... and the newest of each of the last N days")
	f.IntVar(&v.backup.KeepWeekly, "backup-keep-weekly", 0, "... and the newest of each of the last N weeks")
	f.StringArrayVar(&v.sshKeys, "ssh-key", nil, "a public key file for the guest's default user, through cloud-init (repeatable)")
}

// resolve builds the definition from the file or the flags and checks it.
func (v *vmFlags) resolve(cmd *cobra.Command) ([]swarm.Resolved, error) {
	def := v.def
	if v.file != "" {
		for _, name := range []string{"name", "uid", "cpus", "memory", "disk-size", "iso", "boot-mode", "os", "drivers-iso", "tpm", "guest-agent", "accel", "cpu-model", "shutdown-timeout", "constraint", "env", "reserve-cpus", "reserve-memory", "net", "bridge", "port", "publish", "storage-mode", "node", "console-port", "console-tls-cert", "console-tls-key", "metrics-port", "metrics-token", "export-port", "user-data", "meta-data", "network-config", "cloud-init-bus", "ssh-key", "backup-repo", "backup-every", "backup-at", "backup-full-every", "backup-keep-last", "backup-keep-daily", "backup-keep-weekly"} {
			if cmd.Flags().Changed(name) {
				return nil, &usageError{fmt.Errorf("--%s and --file: describe the VMs in the file, or with flags, not both", name)}
			}
		}
		data, err := os.ReadFile(v.file)
		if err != nil {
			return nil, &usageError{err}
		}
		fd, err := swarm.Load(data)
		if err != nil {
			return nil, &usageError{fmt.Errorf("%s: %w", v.file, err)}
		}
		def = merge(fd, v.def)
	} else {
		vm := v.vm
		vm.Env = map[string]string{}
		for _, kv := range v.env {
			k, val, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, &usageError{fmt.Errorf("--env %q: write KEY=VALUE", kv)}
			}
			vm.Env[k] = val
		}
		if v.backup != (swarm.BackupSchedule{}) {
			b := v.backup
			vm.Backup = &b
		}
		if v.ci != (swarm.CloudInit{}) {
			ci := v.ci
			vm.CloudInit = &ci
		}
		for _, path := range v.sshKeys {
			b, err := os.ReadFile(path)
			if err != nil {
				return nil, &usageError{fmt.Errorf("--ssh-key: %w", err)}
			}
			for _, line := range strings.Split(string(b), "\n") {
				if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
					vm.SSHKeys = append(vm.SSHKeys, line)
				}
			}
		}
		def.VMs = []swarm.VM{vm}
	}
	rs, err := def.Resolve()
	if err != nil {
		return nil, &usageError{err}
	}
	for i := range rs {
		for j, f := range rs[i].Seed {
			if v.file != "" && !f.Existing && !filepath.IsAbs(f.Path) { // relative to the definition file
				rs[i].Seed[j].Path = filepath.Join(filepath.Dir(v.file), f.Path)
			}
		}
		if err := rs[i].LoadSeed(); err != nil {
			return nil, &usageError{fmt.Errorf("%s: %w", rs[i].Name, err)}
		}
	}
	return rs, nil
}

// merge lets flags override the file's top-level settings.
func merge(file, flags swarm.Definition) swarm.Definition {
	if flags.Image != "" {
		file.Image = flags.Image
	}
	if flags.Storage != "" {
		file.Storage = flags.Storage
	}
	if flags.BrokerDir != "" {
		file.BrokerDir = flags.BrokerDir
	}
	return file
}
