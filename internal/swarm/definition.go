// Package swarm turns VM definitions into Swarm services: a pure Render to
// a service spec and to a stack file that `docker stack deploy` accepts,
// and, through the Engine API, deploy, list, remove and audit those
// services and label the nodes that may run them.
package swarm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/swarmvm/swarmvm/internal/config"
)

// Defaults of a definition.
const (
	DefaultImage     = "swarmvm/runner:dev"
	DefaultStorage   = config.DefaultStorageDir
	DefaultBrokerDir = config.BrokerDir
	NodeLabel        = "vm-capable"
	// AccelLabel=tcg marks a vm-capable node without KVM (swarmvm node
	// label --accel tcg): it runs only the VMs that ask for TCG.
	AccelLabel = "vm-accel"
	// LabelVM marks a service (and its containers) as swarmvm's, with the
	// VM's name.
	LabelVM = "io.swarmvm.vm"
	// LabelMetricsPort is a VM's metrics port, for Prometheus'
	// dockerswarm_sd_configs to find among the task's published ports.
	LabelMetricsPort = "io.swarmvm.metrics-port"
	// RunnerGID is every VM's group: it opens the broker's socket and the
	// storage folders. Each VM has a uid of its own (UID), so that one VM's
	// QEMU cannot open another's disk, NVRAM or log (all 0600, in folders
	// with the sticky bit).
	RunnerGID = config.RunnerGID
	// A VM without a uid gets one from its name (config.DefaultUID).
	UIDBase  = config.UIDBase
	UIDRange = config.UIDRange
)

// DefaultUID is the uid a VM without one runs as.
func DefaultUID(name string) int { return config.DefaultUID(name) }

// Definition is a file of VMs, or one VM given by flags.
type Definition struct {
	Image     string `yaml:"image,omitempty"`
	Storage   string `yaml:"storage,omitempty"`
	BrokerDir string `yaml:"broker_dir,omitempty"`
	VMs       []VM   `yaml:"vms"`
}

// VM is one virtual machine. Sizes are written as the runner reads them
// (2G, 2048 = MiB for memory). Env passes further runner variables.
type VM struct {
	Name          string  `yaml:"name"`
	UID           int     `yaml:"uid,omitempty"`
	Image         string  `yaml:"image,omitempty"`
	CPUs          int     `yaml:"cpus,omitempty"`
	Memory        string  `yaml:"memory,omitempty"`
	ReserveCPUs   float64 `yaml:"reserve_cpus,omitempty"`
	ReserveMemory string  `yaml:"reserve_memory,omitempty"`
	DiskSize      string  `yaml:"disk_size,omitempty"`
	ISO           string  `yaml:"iso,omitempty"`
	BootMode      string  `yaml:"boot_mode,omitempty"`
	// OS is the guest's profile (GUEST_OS): linux, or windows. DriversISO
	// is a second CD-ROM (a name under isos/, or a path), e.g. virtio-win.
	// TPM gives the VM a TPM 2.0 (TPM=on).
	OS         string `yaml:"os,omitempty"`
	DriversISO string `yaml:"drivers_iso,omitempty"`
	TPM        bool   `yaml:"tpm,omitempty"`
	// GuestAgent is GUEST_AGENT: on (the default) or off.
	GuestAgent      string            `yaml:"guest_agent,omitempty"`
	Accel           string            `yaml:"accel,omitempty"`
	CPUModel        string            `yaml:"cpu_model,omitempty"`
	ShutdownTimeout string            `yaml:"shutdown_timeout,omitempty"`
	Net             string            `yaml:"net,omitempty"`
	Bridge          string            `yaml:"bridge,omitempty"`
	Ports           []string          `yaml:"ports,omitempty"`
	Publish         string            `yaml:"publish,omitempty"`
	Constraints     []string          `yaml:"constraints,omitempty"`
	Env             map[string]string `yaml:"env,omitempty"`
	StorageMode     string            `yaml:"storage_mode,omitempty"`
	Node            string            `yaml:"node,omitempty"`
	Storage         string            `yaml:"storage,omitempty"`
	// ConsolePort serves the VM's screen on this port (published in host
	// mode, on the node the VM runs on), to holders of a ticket from
	// `swarmvm console`.
	ConsolePort int `yaml:"console_port,omitempty"`
	// ConsoleTLSCert and ConsoleTLSKey (PEM files where deploy runs) make
	// the console HTTPS; deploy turns them into Swarm secrets.
	ConsoleTLSCert string `yaml:"console_tls_cert,omitempty"`
	ConsoleTLSKey  string `yaml:"console_tls_key,omitempty"`
	// ExportPort serves pull-mode backup exports (NBD behind TLS, with a
	// ticket from `swarmvm backup export`) on this port, in host mode.
	ExportPort int `yaml:"export_port,omitempty"`
	// MetricsPort serves the runner's Prometheus metrics on this port
	// (published in host mode); MetricsToken, a file where deploy runs,
	// holds the bearer token a scrape must present (a Swarm secret).
	MetricsPort  int    `yaml:"metrics_port,omitempty"`
	MetricsToken string `yaml:"metrics_token,omitempty"`
	// CloudInit seeds the guest's cloud-init (NoCloud) from local files,
	// which deploy turns into Swarm secrets; SSHKeys go to the guest's
	// default user.
	CloudInit *CloudInit `yaml:"cloud_init,omitempty"`
	SSHKeys   []string   `yaml:"ssh_authorized_keys,omitempty"`
	// Backup schedules backups the runner takes itself, into a repository
	// mounted into the task.
	Backup *BackupSchedule `yaml:"backup,omitempty"`
}

// BackupSchedule is a definition's backup: section (BACKUP_* in the
// runner): the repository (a folder on the VM's node, or NFS on every
// node), how often and at what time of day (UTC), and what to keep.
type BackupSchedule struct {
	Repo       string `yaml:"repo"`
	Every      string `yaml:"every,omitempty"`
	At         string `yaml:"at,omitempty"`
	FullEvery  int    `yaml:"full_every,omitempty"`
	KeepLast   int    `yaml:"keep_last,omitempty"`
	KeepDaily  int    `yaml:"keep_daily,omitempty"`
	KeepWeekly int    `yaml:"keep_weekly,omitempty"`
}

// CloudInit names the files of a VM's NoCloud seed, each optional.
type CloudInit struct {
	UserData      string `yaml:"user_data,omitempty"`
	MetaData      string `yaml:"meta_data,omitempty"`
	NetworkConfig string `yaml:"network_config,omitempty"`
	// Bus is virtio (default) or cdrom, for guests without virtio drivers.
	Bus string `yaml:"bus,omitempty"`
}

// Load reads a definition strictly: unknown keys are errors, with the line.
func Load(data []byte) (Definition, error) {
	var d Definition
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&d); err != nil {
		return d, fmt.Errorf("definition: %w", err)
	}
	return d, nil
}

// Resolved is a VM with every default applied and every value checked:
// what rendering needs.
type Resolved struct {
	Name            string
	UID             int // the container's user; the group is RunnerGID
	Image           string
	Storage         string
	BrokerDir       string
	CPUs            int
	GuestMiB        int64
	LimitBytes      int64 // container memory limit: guest RAM + QEMU's overhead
	ReserveBytes    int64
	LimitNanoCPUs   int64
	ReserveNanoCPUs int64
	ShutdownTimeout time.Duration
	StopGrace       time.Duration
	Accel           string
	Ports           []config.Port
	PublishMode     string // ingress (routing mesh) or host
	NetMode         string // net:, config.NetUser when not given
	TAP             bool   // net: tap, the less private mode: NET_ADMIN and /dev/net/tun
	Constraints     []string
	Env             map[string]string // the runner's environment
	StorageMode     string            // config.StorageLocal or config.StorageShared
	// Home is the node (ID, or hostname when given so) that holds a local
	// VM's disk: from node:, or set by deploy, which picks or finds it.
	// Empty for shared storage.
	Home string
	// ConsolePort is the web console's port, 0 for none. ConsoleSecret
	// names the Swarm secret holding its key, which deploy fills in.
	ConsolePort   int
	ConsoleSecret string
	// MetricsPort is the runner's metrics port, 0 for none.
	MetricsPort int
	// ExportPort is the pull-mode exports' port, 0 for none.
	ExportPort int
	// BackupRepo is mounted into the task for scheduled backups ("": none).
	BackupRepo string
	// Seed lists the cloud-init files the task gets as secrets; deploy
	// and render read them (LoadSeed) and name their secrets.
	Seed []SeedFile
}

// SeedFile is one file deploy gives the task as a secret: a file of the
// cloud-init seed, or the console's TLS certificate or key.
type SeedFile struct {
	Kind   string // "cloud-init", "console-tls" or "metrics-token"
	Target string // the file's name in the task's /run/secrets
	Path   string // on the machine that deploys
	Data   []byte // read by LoadSeed
	Secret string // the secret's name, from VM, target and content
	// Existing: Secret names a secret the operator made (secret:NAME in
	// the definition); deploy neither makes nor removes it.
	Existing bool
}

// secretName is what Swarm takes as a secret's name.
var secretName = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62}[A-Za-z0-9])?$`)

// FieldError names the field that is wrong.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

// Resolve applies defaults and checks every VM, reporting every problem at
// once, each naming its field (vms[1].memory).
func (d Definition) Resolve() ([]Resolved, error) {
	var errs []error
	if len(d.VMs) == 0 {
		errs = append(errs, &FieldError{"vms", "no VM defined"})
	}
	seen := map[string]bool{}
	uids := map[int]string{}
	var out []Resolved
	for i, vm := range d.VMs {
		field := fmt.Sprintf("vms[%d]", i)
		if vm.Name != "" {
			field = fmt.Sprintf("vms[%d] (%s)", i, vm.Name)
		}
		r, verrs := d.resolve(vm, field)
		if seen[vm.Name] && vm.Name != "" {
			verrs = append(verrs, &FieldError{field + ".name", "defined twice: two services may not share a disk"})
		}
		seen[vm.Name] = true
		if other, ok := uids[r.UID]; ok && r.UID != 0 {
			verrs = append(verrs, &FieldError{field + ".uid", fmt.Sprintf("%d is also %s's: VMs with one uid can open each other's disks; give this one its own uid", r.UID, other)})
		}
		uids[r.UID] = vm.Name
		errs = append(errs, verrs...)
		out = append(out, r)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// Folders a VM's storage or the broker's folder may not be: the node's own
// system, the container engine's state, or the root of either. A service
// bind-mounts them, read-write for storage, into a container a guest's
// escape would control.
var hostFolders = []string{"/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/root",
	"/sbin", "/sys", "/usr", "/var/lib/docker", "/var/lib/containerd", "/run/docker", "/run/containerd",
	"/var/run/docker", "/var/run/containerd", "/run/docker.sock", "/var/run/docker.sock"}

// saneFolder says what is wrong with a folder a service will bind-mount,
// or "" when nothing is. Paths are cleaned first.
func saneFolder(dir string, under ...string) string {
	if !strings.HasPrefix(dir, "/") {
		return "is not an absolute path"
	}
	clean := filepath.Clean(dir)
	if clean == "/" || clean == "/run" || clean == "/var" || clean == "/var/lib" || clean == "/var/run" || clean == "/home" || clean == "/srv" || clean == "/mnt" {
		return "is a top-level folder of the node: give it a folder of its own"
	}
	for _, h := range hostFolders {
		if clean == h || strings.HasPrefix(clean, h+"/") {
			return "is the node's " + h + ": a VM's container must not mount it"
		}
	}
	if len(under) == 0 {
		return ""
	}
	for _, u := range under {
		if strings.HasPrefix(clean, u) {
			return ""
		}
	}
	return "is not under " + strings.Join(under, " or ")
}

func (d Definition) resolve(vm VM, field string) (Resolved, []error) {
	var errs []error
	bad := func(f, format string, args ...any) {
		errs = append(errs, &FieldError{field + "." + f, fmt.Sprintf(format, args...)})
	}
	r := Resolved{
		Name: vm.Name, Image: first(vm.Image, d.Image, DefaultImage),
		Storage: first(vm.Storage, d.Storage, DefaultStorage), BrokerDir: first(d.BrokerDir, DefaultBrokerDir),
		CPUs: vm.CPUs, Accel: first(vm.Accel, config.AccelKVM), Constraints: vm.Constraints,
		StorageMode: first(vm.StorageMode, config.StorageLocal), Home: vm.Node,
	}
	switch {
	case r.StorageMode != config.StorageLocal && r.StorageMode != config.StorageShared:
		bad("storage_mode", "%q is not local or shared", vm.StorageMode)
	case r.StorageMode == config.StorageShared && vm.Node != "":
		bad("node", "%q pins a VM on shared storage, which may run on any node: drop node:, or use storage_mode: local", vm.Node)
	}
	if strings.ContainsAny(vm.Node, " =!{}") {
		bad("node", "%q is not a node ID or hostname", vm.Node)
	}
	if why := saneFolder(r.Storage); why != "" {
		bad("storage", "%q %s", r.Storage, why)
	}
	if why := saneFolder(r.BrokerDir, "/run/", "/var/run/"); why != "" {
		bad("broker_dir", "%q %s (the broker's socket folder, e.g. %s)", r.BrokerDir, why, DefaultBrokerDir)
	}
	if !config.ValidVMName(vm.Name) {
		bad("name", "%q is not a VM name: "+config.VMNameRule, vm.Name)
	}
	r.UID = vm.UID
	switch {
	case vm.UID == 0:
		r.UID = DefaultUID(vm.Name)
	case vm.UID < 1000 || vm.UID > 1<<31-2:
		bad("uid", "%d is outside 1000–%d (system users and root are not for VMs)", vm.UID, 1<<31-2)
	}
	if r.CPUs == 0 {
		r.CPUs = 1
	}
	if r.CPUs < 1 || r.CPUs > 255 {
		bad("cpus", "%d is outside 1–255", vm.CPUs)
	}
	if r.Accel != config.AccelKVM && r.Accel != config.AccelTCG {
		bad("accel", "%q is not kvm or tcg", r.Accel)
	}
	r.resolveMemory(vm, bad)
	r.resolveCPUs(vm, bad)
	r.resolveShutdown(vm, bad)
	r.resolveNet(vm, bad)
	r.resolveConsole(vm, bad)
	r.resolveMetrics(vm, bad)
	r.resolveExport(vm, bad)
	r.resolveCloudInit(vm, bad)
	if b := vm.Backup; b != nil {
		if !filepath.IsAbs(b.Repo) || filepath.Clean(b.Repo) != b.Repo || b.Repo == "/" {
			bad("backup.repo", "%q is not an absolute, clean folder path", b.Repo)
		}
		if b.Every == "" {
			bad("backup.every", "is required: how often the runner backs the VM up, e.g. 24h")
		}
		r.BackupRepo = b.Repo
	}
	for k := range vm.Env {
		if !slices.Contains(config.Variables, k) {
			bad("env."+k, "is not a variable the runner reads (see docs/reference.md)")
		}
		if slices.Contains([]string{"VM_NAME", "VM_CPUS", "VM_MEMORY", "ACCEL", "SHUTDOWN_TIMEOUT", "PORTS", "NET_MODE", "NET_BRIDGE", "STORAGE_MODE", "HOME_NODE", "NODE_ID", "NODE_HOSTNAME", "CONSOLE_PORT", "CONSOLE_KEY_FILE", "CONSOLE_TLS_CERT", "CONSOLE_TLS_KEY", "METRICS_PORT", "METRICS_TOKEN_FILE", "EXPORT_PORT", "CLOUD_INIT", "CLOUD_INIT_DIR", "CLOUD_INIT_SSH_KEYS", "CLOUD_INIT_BUS",
			"BACKUP_REPO", "BACKUP_EVERY", "BACKUP_AT", "BACKUP_FULL_EVERY", "BACKUP_KEEP_LAST", "BACKUP_KEEP_DAILY", "BACKUP_KEEP_WEEKLY"}, k) {
			bad("env."+k, "is set from the VM's own field; set that field instead")
		}
	}
	for i, c := range vm.Constraints {
		if !strings.ContainsAny(c, "=!") {
			bad(fmt.Sprintf("constraints[%d]", i), "%q is not a Swarm constraint (e.g. node.hostname==node-1)", c)
		}
	}
	r.Env = runnerEnv(vm, r)
	if cerr := config.FromEnv(func(k string) string { return r.Env[k] }).Validate(); cerr != nil {
		bad("env", "the runner would refuse it: %v", strings.ReplaceAll(cerr.Error(), "\n", "; "))
	}
	return r, errs
}

func (r *Resolved) resolveMemory(vm VM, bad func(string, string, ...any)) {
	guest, err := config.ParseSize(first(vm.Memory, "1G"), 1<<20)
	if err != nil || guest < 64<<20 {
		bad("memory", "%q is not a guest RAM size of at least 64M (write e.g. 2G)", vm.Memory)
		return
	}
	r.GuestMiB = guest >> 20
	over := config.Overhead(r.Accel)
	r.LimitBytes = guest + over<<20
	r.ReserveBytes = r.LimitBytes
	if vm.ReserveMemory != "" {
		res, err := config.ParseSize(vm.ReserveMemory, 1<<20)
		switch {
		case err != nil:
			bad("reserve_memory", "%v", err)
		case res > r.LimitBytes:
			bad("reserve_memory", "%s is above the memory limit %s (guest %s + QEMU overhead %dM)", vm.ReserveMemory, mib(r.LimitBytes), mib(guest), over)
		default:
			r.ReserveBytes = res
		}
	}
}

// resolveCPUs: the limit leaves QEMU one CPU beside its vCPUs, for its
// own threads (I/O, the main loop); the reservation is the vCPUs.
func (r *Resolved) resolveCPUs(vm VM, bad func(string, string, ...any)) {
	r.LimitNanoCPUs = int64(r.CPUs+1) * 1e9
	r.ReserveNanoCPUs = int64(r.CPUs) * 1e9
	if vm.ReserveCPUs != 0 {
		if vm.ReserveCPUs < 0 || int64(vm.ReserveCPUs*1e9) > r.LimitNanoCPUs {
			bad("reserve_cpus", "%g is outside 0–%d (the limit: vCPUs + 1)", vm.ReserveCPUs, r.CPUs+1)
			return
		}
		r.ReserveNanoCPUs = int64(vm.ReserveCPUs * 1e9)
	}
}

// resolveShutdown sets the runner's ACPI wait and a stop_grace_period that
// covers the runner's whole stop budget with a margin (config.StopBudget).
func (r *Resolved) resolveShutdown(vm VM, bad func(string, string, ...any)) {
	r.ShutdownTimeout = config.DefaultShutdownTimeout
	if vm.ShutdownTimeout != "" {
		d, err := config.ParseDuration(vm.ShutdownTimeout)
		if err != nil || d < config.MinShutdownTimeout || d > config.MaxShutdownTimeout {
			bad("shutdown_timeout", "%q is not a duration from 1s to 1h (e.g. 90s)", vm.ShutdownTimeout)
			return
		}
		r.ShutdownTimeout = d
	}
	r.StopGrace = config.StopGracePeriod(r.ShutdownTimeout)
}

// resolveNet reads ports (published by the service as they are forwarded
// by QEMU: one source of truth) and the networking mode.
func (r *Resolved) resolveNet(vm VM, bad func(string, string, ...any)) {
	ports, err := config.ParsePorts(strings.Join(vm.Ports, ","))
	if err != nil {
		bad("ports", "%v", err)
	}
	r.Ports = ports
	r.PublishMode = first(vm.Publish, "ingress")
	if r.PublishMode != "ingress" && r.PublishMode != "host" {
		bad("publish", "%q is not ingress or host", vm.Publish)
	}
	r.NetMode = first(vm.Net, config.NetUser)
	if !config.ValidNetMode(r.NetMode) {
		bad("net", "%q is not one of %s", vm.Net, config.NetModes)
	}
	r.TAP = r.NetMode == config.NetTAP
	if r.NetMode == config.NetBridge && !config.ValidIfName(vm.Bridge) {
		bad("bridge", "%q is not a bridge name: %s (net: bridge joins the host bridge named here)", vm.Bridge, config.IfNameRule)
	}
}

// resolveMetrics checks the metrics port: a TCP port of its own, apart
// from the guest's forwarded ones and the console's.
func (r *Resolved) resolveMetrics(vm VM, bad func(string, string, ...any)) {
	if vm.MetricsPort == 0 {
		if vm.MetricsToken != "" {
			bad("metrics_token", "is for metrics: set metrics_port too")
		}
		return
	}
	if !r.ownPort("metrics_port", "the metrics", vm.MetricsPort, 9177, bad) {
		return
	}
	if vm.MetricsPort == vm.ConsolePort {
		bad("metrics_port", "%d is also the console's port: give the metrics a port of their own, e.g. 9177", vm.MetricsPort)
		return
	}
	r.MetricsPort = vm.MetricsPort
	if vm.MetricsToken != "" {
		r.Seed = append(r.Seed, SeedFile{Kind: "metrics-token", Target: MetricsTokenTarget, Path: vm.MetricsToken})
	}
}

// resolveExport checks the exports' port: a TCP port of its own.
func (r *Resolved) resolveExport(vm VM, bad func(string, string, ...any)) {
	if vm.ExportPort == 0 || !r.ownPort("export_port", "exports", vm.ExportPort, 10809, bad) {
		return
	}
	if vm.ExportPort == vm.ConsolePort || vm.ExportPort == vm.MetricsPort {
		bad("export_port", "%d is also the console's or the metrics' port: give exports a port of their own, e.g. 10809", vm.ExportPort)
		return
	}
	r.ExportPort = vm.ExportPort
}

// Keyed says whether the VM has a console key (a Swarm secret): its
// console's tickets and its exports' are signed with it.
func (r Resolved) Keyed() bool { return r.ConsolePort != 0 || r.ExportPort != 0 }

// ownPort checks a port the runner serves on (field, for what): a port
// number, apart from the guest's forwarded TCP ports.
func (r *Resolved) ownPort(field, what string, port, example int, bad func(string, string, ...any)) bool {
	if port < 1 || port > 65535 {
		bad(field, "%d is not a port number 1–65535", port)
		return false
	}
	for _, p := range r.Ports {
		if p.Proto == "tcp" && p.Host == port {
			bad(field, "%d is also forwarded to the guest (ports): give %s a port of its own, e.g. %d", port, what, example)
			return false
		}
	}
	return true
}

// MetricsTokenTarget is the metrics token's file in the task.
const MetricsTokenTarget = "swarmvm-metrics-token"

// resolveConsole checks the console's port: a TCP port of its own, apart
// from the guest's forwarded ones.
func (r *Resolved) resolveConsole(vm VM, bad func(string, string, ...any)) {
	if vm.ConsolePort == 0 {
		if vm.ConsoleTLSCert != "" || vm.ConsoleTLSKey != "" {
			bad("console_tls_cert", "is for a console: set console_port too")
		}
		return
	}
	if !r.ownPort("console_port", "the console", vm.ConsolePort, 8006, bad) {
		return
	}
	r.ConsolePort = vm.ConsolePort
	switch {
	case (vm.ConsoleTLSCert == "") != (vm.ConsoleTLSKey == ""):
		bad("console_tls_cert", "and console_tls_key go together: give both PEM files, or neither for plain HTTP")
	case vm.ConsoleTLSCert != "":
		r.Seed = append(r.Seed,
			SeedFile{Kind: "console-tls", Target: "swarmvm-console-tls.crt", Path: vm.ConsoleTLSCert},
			SeedFile{Kind: "console-tls", Target: "swarmvm-console-tls.key", Path: vm.ConsoleTLSKey})
	}
}

// resolveCloudInit lists the seed's files.
func (r *Resolved) resolveCloudInit(vm VM, bad func(string, string, ...any)) {
	for i, k := range vm.SSHKeys {
		if f := strings.Fields(k); len(f) < 2 || !strings.HasPrefix(f[0], "ssh-") && !strings.HasPrefix(f[0], "ecdsa-") && !strings.HasPrefix(f[0], "sk-") {
			bad(fmt.Sprintf("ssh_authorized_keys[%d]", i), "is not an OpenSSH public key line (e.g. ssh-ed25519 AAAA… user@host)")
		}
	}
	ci := vm.CloudInit
	if ci == nil {
		return
	}
	if ci.Bus != "" && ci.Bus != "virtio" && ci.Bus != "cdrom" {
		bad("cloud_init.bus", "%q is not virtio or cdrom", ci.Bus)
	}
	for _, f := range []struct{ field, path, target string }{
		{"user_data", ci.UserData, "swarmvm-user-data"},
		{"meta_data", ci.MetaData, "swarmvm-meta-data"},
		{"network_config", ci.NetworkConfig, "swarmvm-network-config"},
	} {
		name, existing := strings.CutPrefix(f.path, "secret:")
		switch {
		case f.path == "":
		case existing && !secretName.MatchString(name):
			bad("cloud_init."+f.field, "%q is not a Swarm secret's name", name)
		case existing:
			r.Seed = append(r.Seed, SeedFile{Kind: "cloud-init", Target: f.target, Secret: name, Existing: true})
		default:
			r.Seed = append(r.Seed, SeedFile{Kind: "cloud-init", Target: f.target, Path: f.path})
		}
	}
}

// LoadSeed reads the seed's files and names their secrets: the name
// changes with the content (Swarm's secrets cannot change), so a changed
// file gives the service a new secret and the guest a new instance-id.
func (r *Resolved) LoadSeed() error {
	for i := range r.Seed {
		f := &r.Seed[i]
		if f.Existing {
			continue
		}
		b, err := os.ReadFile(f.Path)
		if err != nil {
			return fmt.Errorf("cloud_init: %v", err)
		}
		if len(b) > 400<<10 {
			return fmt.Errorf("cloud_init: %s has %d bytes; a Swarm secret holds at most 500 KB, and a seed should be far smaller", f.Path, len(b))
		}
		h := sha256.Sum256(append([]byte(r.Name+"/"+f.Target+"/"), b...))
		prefix := map[string]string{"console-tls": "swarmvm-tls-", "metrics-token": "swarmvm-metrics-"}[f.Kind]
		if prefix == "" {
			prefix = "swarmvm-ci-"
		}
		f.Data, f.Secret = b, prefix+hex.EncodeToString(h[:8])
	}
	return nil
}

// runnerEnv is the runner's environment for the VM, from its fields and
// its env map.
func runnerEnv(vm VM, r Resolved) map[string]string {
	env := map[string]string{}
	for k, v := range vm.Env {
		env[k] = v
	}
	env["VM_NAME"] = vm.Name
	env["VM_CPUS"] = fmt.Sprint(r.CPUs)
	env["VM_MEMORY"] = config.FormatMiB(r.GuestMiB)
	env["ACCEL"] = r.Accel
	env["SHUTDOWN_TIMEOUT"] = r.ShutdownTimeout.String()
	set := func(k, v string) {
		if v != "" {
			env[k] = v
		}
	}
	set("DISK_SIZE", vm.DiskSize)
	set("BOOT_MODE", vm.BootMode)
	set("CPU_MODEL", vm.CPUModel)
	if vm.ISO != "" && !strings.HasPrefix(vm.ISO, "/") {
		vm.ISO = r.Storage + "/isos/" + vm.ISO
	}
	set("ISO_PATH", vm.ISO)
	if vm.DriversISO != "" && !strings.HasPrefix(vm.DriversISO, "/") {
		vm.DriversISO = r.Storage + "/isos/" + vm.DriversISO
	}
	set("DRIVERS_ISO", vm.DriversISO)
	set("GUEST_OS", vm.OS)
	set("GUEST_AGENT", vm.GuestAgent)
	if vm.TPM {
		env["TPM"] = "on"
	}
	if vm.Net != "" && vm.Net != config.NetUser {
		env["NET_MODE"] = vm.Net
	}
	if vm.Net == config.NetTAP {
		env["TUN_DEVICE"] = "/dev/net/tun"
	}
	set("NET_BRIDGE", vm.Bridge)
	var ports []string
	for _, p := range r.Ports {
		ports = append(ports, p.String())
	}
	set("PORTS", strings.Join(ports, ","))
	if r.Accel == config.AccelKVM {
		env["KVM_BROKER"] = config.DefaultBrokerSocket // the broker folder is mounted there
	}
	if r.Storage != DefaultStorage {
		env["STORAGE_DIR"] = r.Storage
	}
	env["STORAGE_MODE"] = r.StorageMode
	if vm.ConsolePort > 0 {
		env["CONSOLE_PORT"] = fmt.Sprint(vm.ConsolePort)
		if vm.ConsoleTLSCert != "" {
			env["CONSOLE_TLS_CERT"] = "/run/secrets/swarmvm-console-tls.crt"
			env["CONSOLE_TLS_KEY"] = "/run/secrets/swarmvm-console-tls.key"
		}
	}
	if r.MetricsPort > 0 {
		env["METRICS_PORT"] = fmt.Sprint(r.MetricsPort)
		if vm.MetricsToken != "" {
			env["METRICS_TOKEN_FILE"] = "/run/secrets/" + MetricsTokenTarget
		}
	}
	if r.ExportPort > 0 {
		env["EXPORT_PORT"] = fmt.Sprint(r.ExportPort)
	}
	if b := vm.Backup; b != nil {
		env["BACKUP_REPO"] = b.Repo
		set("BACKUP_EVERY", b.Every)
		set("BACKUP_AT", b.At)
		for k, n := range map[string]int{"BACKUP_FULL_EVERY": b.FullEvery, "BACKUP_KEEP_LAST": b.KeepLast, "BACKUP_KEEP_DAILY": b.KeepDaily, "BACKUP_KEEP_WEEKLY": b.KeepWeekly} {
			if n != 0 {
				env[k] = fmt.Sprint(n)
			}
		}
	}
	if vm.CloudInit != nil || len(vm.SSHKeys) > 0 {
		env["CLOUD_INIT"] = config.CloudInitNoCloud
		set("CLOUD_INIT_SSH_KEYS", strings.Join(vm.SSHKeys, "\n"))
		if vm.CloudInit != nil {
			set("CLOUD_INIT_BUS", vm.CloudInit.Bus)
		}
	}
	return env
}

// RunnerEnv is the runner's whole environment: the VM's, plus where it
// runs (Swarm expands the node templates for each task) and, for a local
// VM, its home.
func (r Resolved) RunnerEnv() map[string]string {
	env := make(map[string]string, len(r.Env)+3)
	for k, v := range r.Env {
		env[k] = v
	}
	env["NODE_ID"] = "{{.Node.ID}}"
	env["NODE_HOSTNAME"] = "{{.Node.Hostname}}"
	if r.Home != "" {
		env["HOME_NODE"] = r.Home
	}
	return env
}

func first(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}

func mib(b int64) string { return config.FormatMiB(b >> 20) }
