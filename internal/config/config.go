// Package config turns the runner's environment into one typed, validated
// struct. It knows every variable the runner reads, its default and what it
// means; Validate reports every problem at once and names the variable, so an
// operator fixes a service definition in one round. It uses the standard
// library only and does no I/O: reading the cgroup limit or the disk is the
// runner's business.
//
// | variable            | default                                   | meaning |
// |---------------------|-------------------------------------------|---------|
// | VM_NAME             | (required)                                | letters, digits and '-', at most 63; names the service, files, QEMU, MAC |
// | STORAGE_DIR         | /var/lib/poc-qemu                         | storage root holding images/, isos/, logs/ |
// | IMAGE_PATH          | $STORAGE_DIR/images/$VM_NAME.qcow2        | the VM's qcow2 disk |
// | DISK_SIZE           | (unset)                                   | create IMAGE_PATH with this size when it does not exist |
// | DISK_CACHE          | none                                      | none (O_DIRECT, thread pool), writeback or writethrough |
// | ISO_PATH            | (unset)                                   | install medium, attached read-only as a CD-ROM |
// | BOOT_MODE           | uefi                                      | uefi (OVMF), uefi-secure (OVMF with Secure Boot, SMM) or bios (SeaBIOS) |
// | OVMF_CODE           | /usr/share/OVMF/OVMF_CODE_4M.fd           | firmware code, read-only (uefi-secure: OVMF_CODE_4M.ms.fd) |
// | OVMF_VARS           | $STORAGE_DIR/images/$VM_NAME.OVMF_VARS.fd | this VM's own NVRAM, created once from the template |
// | OVMF_VARS_TEMPLATE  | /usr/share/OVMF/OVMF_VARS_4M.fd           | template for a new OVMF_VARS (uefi-secure: OVMF_VARS_4M.ms.fd, Microsoft's keys) |
// | OVMF_VARS_RESET     | false                                     | true: set the existing OVMF_VARS aside and start from the template |
// | ACCEL               | kvm                                       | kvm, or tcg (emulation, only when asked for by name) |
// | KVM_BROKER          | /run/swarmvm/broker.sock if present       | broker socket to get KVM from; set: required; off: never |
// | KVM_DEVICE          | /dev/kvm                                  | KVM device opened when there is no broker |
// | TUN_DEVICE          | (unset)                                   | /dev/net/tun, for NET_MODE=tap |
// | NET_MODE            | user                                      | user, bridge (TAP from the broker), tap (made here) or none |
// | PORTS               | (unset)                                   | user mode: forwards, e.g. 22,8080:80,53/udp |
// | NET_BRIDGE          | (unset)                                   | bridge mode: the host bridge to join |
// | TAP_NAME            | tap0                                      | tap mode: the TAP made in the container |
// | TAP_ADDR            | 10.0.3.1/24                               | tap mode: the container's address on the TAP |
// | CPU_MODEL           | host (kvm), max (tcg)                     | QEMU -cpu value |
// | VM_CPUS             | 1                                         | vCPUs, 1–255 |
// | VM_MEMORY           | cgroup limit − QEMU overhead, else 1G     | guest RAM (bare number = MiB) |
// | KERNEL_PATH         | (unset)                                   | direct kernel boot |
// | INITRD_PATH         | (unset)                                   | initrd for direct kernel boot |
// | KERNEL_CMDLINE      | (unset)                                   | kernel command line for direct kernel boot |
// | SHUTDOWN_TIMEOUT    | 90s                                       | wait for an ACPI power-off before forcing |
// | START_TIMEOUT       | 30s                                       | wait for QEMU's QMP socket and KVM verification |
// | SERIAL_LOG_MAX      | 16M                                       | serial log size before it rotates (one old generation kept) |
// | QEMU_ARGS           | (unset)                                   | extra QEMU arguments from an allow-list (args.go), appended |
// | QEMU_BINARY         | qemu-system-x86_64                        | QEMU program |
// | RUN_DIR             | /run/vm                                   | runtime state: QMP sockets, state file (a tmpfs) |
// | STORAGE_MODE        | local                                     | local (the disk lives on the VM's home node) or shared (one folder on every node) |
// | HOME_NODE           | (unset)                                   | local: the node (ID or hostname) that holds the disk; elsewhere the runner refuses to start |
// | NODE_ID             | (unset)                                   | this node's Swarm ID (the service sets {{.Node.ID}}) |
// | NODE_HOSTNAME       | (unset)                                   | this node's hostname (the service sets {{.Node.Hostname}}) |
// | CONSOLE_PORT        | (unset: no console)                       | port the runner serves the web console on (VNC over a websocket, with a ticket) |
// | CONSOLE_KEY_FILE    | /run/secrets/swarmvm-console              | the key console tickets are signed with (a Swarm secret, ≥ 32 bytes) |
// | CONSOLE_TLS_CERT    | (unset: plain HTTP)                       | the console's TLS certificate chain (PEM), with CONSOLE_TLS_KEY |
// | CONSOLE_TLS_KEY     | (unset)                                   | the console certificate's private key (PEM) |
// | CLOUD_INIT          | (unset: none)                             | nocloud: give the guest a cloud-init NoCloud seed built from CLOUD_INIT_DIR |
// | CLOUD_INIT_DIR      | /run/secrets                              | holds swarmvm-user-data, swarmvm-meta-data, swarmvm-network-config (each optional) |
// | CLOUD_INIT_SSH_KEYS | (unset)                                   | public keys for the guest's default user, one per line |
// | CLOUD_INIT_BUS      | virtio                                    | virtio (a read-only disk) or cdrom (an AHCI CD-ROM, for Windows' cloudbase-init) |
// | GUEST_OS            | linux                                     | linux, or windows: Hyper-V enlightenments, RTC in local time, USB tablet, SATA disk, e1000e NIC |
// | DRIVERS_ISO         | (unset)                                   | a second CD-ROM, e.g. the virtio-win drivers for a Windows guest |
// | TPM                 | off                                       | on: a TPM 2.0 (swtpm, run by the runner) with its state kept in TPM_STATE |
// | TPM_STATE           | $STORAGE_DIR/images/$VM_NAME.tpm          | the TPM's state folder (0700, the VM's uid), created once |
// | TPM_RESET           | false                                     | true: set the existing TPM_STATE aside and start with a new TPM |
// | SWTPM_BINARY        | swtpm                                     | the TPM emulator program |
// | HEALTH              | qemu                                      | qemu; agent: also unhealthy when a guest agent that answered has been silent for HEALTH_AGENT_GRACE |
// | HEALTH_AGENT_GRACE  | 2m                                        | HEALTH=agent: how long the agent may be silent (a reboot) before the VM counts as unhealthy |
// | METRICS_PORT        | (unset: no metrics)                       | port the runner serves Prometheus metrics on (/metrics) |
// | METRICS_TOKEN_FILE  | (unset: no token)                         | a file holding the bearer token a scrape must present (a Swarm secret) |
// | GUEST_AGENT         | on                                        | on: a channel for the QEMU guest agent (its IPs and OS in health and ps, shutdown when ACPI is ignored); off: none |
// | EXPORT_PORT         | (unset: no pull-mode exports)             | port a pull-mode backup export (NBD, TLS with an export ticket) is served on; needs CONSOLE_KEY_FILE |
// | BACKUP_REPO         | (unset: no scheduled backups)             | a backup repository mounted into the task, for scheduled backups |
// | BACKUP_EVERY        | (unset)                                   | the runner backs the VM up this often (at least 1m), into BACKUP_REPO |
// | BACKUP_AT           | (unset)                                   | HH:MM (UTC): scheduled backups run at this time of day, then every BACKUP_EVERY |
// | BACKUP_FULL_EVERY   | 7                                         | a scheduled backup is full when the newest backup's chain has this many (chains are pruned whole) |
// | BACKUP_KEEP_LAST    | (unset: keep all)                         | after each scheduled backup, prune to the newest N (with BACKUP_KEEP_DAILY, _WEEKLY) |
// | BACKUP_KEEP_DAILY   | (unset)                                   | … and the newest of each of the last N days |
// | BACKUP_KEEP_WEEKLY  | (unset)                                   | … and the newest of each of the last N weeks |
// | LOG_LEVEL           | info                                      | debug, info, warn or error |
package config

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Variables lists every variable the runner reads, for tools that pass
// variables through to it and must refuse names it would ignore.
var Variables = []string{
	"ACCEL", "BOOT_MODE", "CPU_MODEL", "DISK_CACHE", "DISK_SIZE", "IMAGE_PATH", "INITRD_PATH",
	"ISO_PATH", "KERNEL_CMDLINE", "KERNEL_PATH", "KVM_BROKER", "KVM_DEVICE", "LOG_LEVEL",
	"OVMF_CODE", "OVMF_VARS", "OVMF_VARS_RESET", "OVMF_VARS_TEMPLATE", "QEMU_ARGS", "QEMU_BINARY",
	"RUN_DIR", "SERIAL_LOG_MAX", "SHUTDOWN_TIMEOUT", "START_TIMEOUT", "STORAGE_DIR", "TUN_DEVICE",
	"VM_CPUS", "VM_MEMORY", "VM_NAME", "NET_MODE", "PORTS", "NET_BRIDGE", "TAP_NAME", "TAP_ADDR",
	"STORAGE_MODE", "HOME_NODE", "NODE_ID", "NODE_HOSTNAME", "CONSOLE_PORT", "CONSOLE_KEY_FILE",
	"CONSOLE_TLS_CERT", "CONSOLE_TLS_KEY", "CLOUD_INIT", "CLOUD_INIT_DIR", "CLOUD_INIT_SSH_KEYS", "CLOUD_INIT_BUS",
	"TPM", "TPM_STATE", "TPM_RESET", "SWTPM_BINARY", "GUEST_OS", "DRIVERS_ISO",
	"GUEST_AGENT", "METRICS_PORT", "METRICS_TOKEN_FILE", "HEALTH", "HEALTH_AGENT_GRACE",
	"EXPORT_PORT", "BACKUP_REPO", "BACKUP_EVERY", "BACKUP_AT", "BACKUP_FULL_EVERY", "BACKUP_KEEP_LAST", "BACKUP_KEEP_DAILY", "BACKUP_KEEP_WEEKLY",
}

// Accelerators and boot modes the runner knows.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
	BootUEFI = "uefi"
	BootBIOS = "bios"
	// BootUEFISecure is OVMF's Secure Boot build (SMM, the flash only
	// writable from SMM) with NVRAM that has Microsoft's keys enrolled.
	BootUEFISecure = "uefi-secure"
	// Guest operating systems with a profile of their own.
	GuestLinux   = "linux"
	GuestWindows = "windows"
	// StorageLocal keeps a VM's disk on one node, its home; StorageShared
	// keeps it in a folder every node mounts, where QEMU's image locks
	// keep a second QEMU out.
	StorageLocal  = "local"
	StorageShared = "shared"
)

// Defaults that are not derived from other variables.
const (
	DefaultStorageDir       = "/var/lib/poc-qemu"
	DefaultOVMFCode         = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	DefaultOVMFVarsTemplate = "/usr/share/OVMF/OVMF_VARS_4M.fd"
	// Debian's Secure Boot pair: the secboot build (.ms.fd links to it) and
	// a template with Microsoft's KEK and db and a PK enrolled.
	DefaultOVMFSecureCode         = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"
	DefaultOVMFSecureVarsTemplate = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
	DefaultKVMDevice              = "/dev/kvm"
	DefaultSwtpmBinary            = "swtpm"
	// BrokerOff as KVM_BROKER keeps the runner from using a broker even
	// when its socket is mounted.
	BrokerOff              = "off"
	DefaultRunDir          = "/run/vm"
	DefaultQEMUBinary      = "qemu-system-x86_64"
	DefaultShutdownTimeout = 90 * time.Second
	MinShutdownTimeout     = time.Second
	MaxShutdownTimeout     = time.Hour
	DefaultStartTimeout    = 30 * time.Second
	DefaultSerialLogMax    = 16 * mib
	DefaultConsoleKeyFile  = "/run/secrets/swarmvm-console"
	DefaultCloudInitDir    = "/run/secrets"
	// CloudInitNoCloud as CLOUD_INIT gives the guest a NoCloud seed.
	CloudInitNoCloud = "nocloud"
	// DefaultMemoryMiB is the guest RAM when neither VM_MEMORY nor a cgroup
	// limit says otherwise.
	DefaultMemoryMiB = 1024
)

// Config is everything the runner reads from its environment.
type Config struct {
	Name             string
	StorageDir       string
	ImagePath        string
	DiskSize         int64 // bytes; 0: never create
	DiskCache        string
	ISOPath          string
	BootMode         string
	OVMFCode         string
	OVMFVars         string
	OVMFVarsTemplate string
	OVMFVarsReset    bool
	// GuestOS is linux or windows (the Windows profile); DriversISO a
	// second CD-ROM.
	GuestOS    string
	DriversISO string
	// TPM gives the VM a TPM 2.0: swtpm, started and watched by the
	// runner, its state in TPMState.
	TPM         bool
	TPMState    string
	TPMReset    bool
	SwtpmBinary string
	// GuestAgent gives the VM a virtio-serial port for the QEMU guest
	// agent, which the runner talks to.
	GuestAgent bool
	// HealthAgent (HEALTH=agent) counts a VM whose guest agent answered
	// and then went silent for HealthAgentGrace as unhealthy.
	HealthAgent      bool
	HealthAgentGrace time.Duration
	Accel            string
	KVMDevice        string
	Broker           string // KVM_BROKER: a socket (then required), "off", or ""
	TUNDevice        string
	NetMode          string
	Ports            []Port
	NetBridge        string
	TAPName          string
	TAPAddr          string
	CPUModel         string
	CPUs             int
	MemoryMiB        int64 // 0: derive from the cgroup limit
	KernelPath       string
	InitrdPath       string
	KernelCmdline    string
	ShutdownTimeout  time.Duration
	StartTimeout     time.Duration
	SerialLogMax     int64
	QEMUArgs         []string
	QEMUBinary       string
	RunDir           string
	LogLevel         string
	StorageMode      string
	HomeNode         string // local mode: the node that holds the disk; "" when not under Swarm
	NodeID           string // this node, as Swarm's templates name it
	NodeHostname     string
	ConsolePort      int // 0: no console
	// MetricsPort serves Prometheus metrics (0: none), behind the bearer
	// token in MetricsTokenFile when set.
	MetricsPort int
	// ExportPort serves pull-mode backup exports (0: none).
	ExportPort       int
	MetricsTokenFile string
	ConsoleKeyFile   string
	ConsoleTLSCert   string
	ConsoleTLSKey    string
	CloudInit        string // "" or CloudInitNoCloud
	CloudInitDir     string
	CloudInitSSHKeys []string
	CloudInitBus     string
	// Backups the runner takes itself: into BackupRepo (mounted into the
	// task) every BackupEvery, on the time of day BackupAt ("HH:MM" UTC,
	// "" for none; BackupAtMinutes reads it), pruned to the BackupKeep*
	// rules (0: that rule unused).
	BackupRepo       string
	BackupEvery      time.Duration
	BackupAt         string
	BackupFullEvery  int
	BackupKeepLast   int
	BackupKeepDaily  int
	BackupKeepWeekly int

	problems []error // parse errors, reported by Validate with the rest
}

// FromEnv reads the configuration through getenv (os.Getenv in production,
// a map in tests). Values that do not parse are kept as problems for
// Validate, so that one call reports everything.
func FromEnv(getenv func(string) string) Config {
	c := Config{
		Name:             strings.TrimSpace(getenv("VM_NAME")),
		StorageDir:       or(getenv("STORAGE_DIR"), DefaultStorageDir),
		ISOPath:          getenv("ISO_PATH"),
		GuestOS:          strings.ToLower(or(strings.TrimSpace(getenv("GUEST_OS")), GuestLinux)),
		DriversISO:       getenv("DRIVERS_ISO"),
		DiskCache:        or(getenv("DISK_CACHE"), "none"),
		BootMode:         strings.ToLower(or(getenv("BOOT_MODE"), BootUEFI)),
		OVMFCode:         getenv("OVMF_CODE"),
		OVMFVarsTemplate: getenv("OVMF_VARS_TEMPLATE"),
		Accel:            strings.ToLower(or(getenv("ACCEL"), AccelKVM)),
		KVMDevice:        or(getenv("KVM_DEVICE"), DefaultKVMDevice),
		Broker:           strings.TrimSpace(getenv("KVM_BROKER")),
		TUNDevice:        getenv("TUN_DEVICE"),
		NetMode:          strings.ToLower(or(getenv("NET_MODE"), NetUser)),
		NetBridge:        strings.TrimSpace(getenv("NET_BRIDGE")),
		TAPName:          or(getenv("TAP_NAME"), "tap0"),
		TAPAddr:          or(getenv("TAP_ADDR"), "10.0.3.1/24"),
		KernelPath:       getenv("KERNEL_PATH"),
		InitrdPath:       getenv("INITRD_PATH"),
		KernelCmdline:    getenv("KERNEL_CMDLINE"),
		QEMUBinary:       or(getenv("QEMU_BINARY"), DefaultQEMUBinary),
		RunDir:           or(getenv("RUN_DIR"), DefaultRunDir),
		LogLevel:         strings.ToLower(or(getenv("LOG_LEVEL"), "info")),
		StorageMode:      strings.ToLower(or(getenv("STORAGE_MODE"), StorageLocal)),
		HomeNode:         strings.TrimSpace(getenv("HOME_NODE")),
		NodeID:           strings.TrimSpace(getenv("NODE_ID")),
		NodeHostname:     strings.TrimSpace(getenv("NODE_HOSTNAME")),
		ConsoleKeyFile:   or(getenv("CONSOLE_KEY_FILE"), DefaultConsoleKeyFile),
		ConsoleTLSCert:   getenv("CONSOLE_TLS_CERT"),
		ConsoleTLSKey:    getenv("CONSOLE_TLS_KEY"),
		CloudInit:        strings.ToLower(strings.TrimSpace(getenv("CLOUD_INIT"))),
		CloudInitDir:     or(getenv("CLOUD_INIT_DIR"), DefaultCloudInitDir),
		CloudInitBus:     strings.ToLower(or(getenv("CLOUD_INIT_BUS"), "virtio")),
		CPUs:             1,
		ShutdownTimeout:  DefaultShutdownTimeout,
		StartTimeout:     DefaultStartTimeout,
		SerialLogMax:     DefaultSerialLogMax,
	}
	if c.BootMode == BootUEFISecure {
		c.OVMFCode = or(c.OVMFCode, DefaultOVMFSecureCode)
		c.OVMFVarsTemplate = or(c.OVMFVarsTemplate, DefaultOVMFSecureVarsTemplate)
	} else {
		c.OVMFCode = or(c.OVMFCode, DefaultOVMFCode)
		c.OVMFVarsTemplate = or(c.OVMFVarsTemplate, DefaultOVMFVarsTemplate)
	}
	c.ImagePath = or(getenv("IMAGE_PATH"), filepath.Join(c.StorageDir, "images", c.Name+".qcow2"))
	c.OVMFVars = or(getenv("OVMF_VARS"), filepath.Join(c.StorageDir, "images", c.Name+".OVMF_VARS.fd"))
	c.TPMState = or(getenv("TPM_STATE"), filepath.Join(c.StorageDir, "images", c.Name+".tpm"))
	c.SwtpmBinary = or(getenv("SWTPM_BINARY"), DefaultSwtpmBinary)
	c.CPUModel = getenv("CPU_MODEL")
	if c.CPUModel == "" {
		c.CPUModel = map[string]string{AccelTCG: "max"}[c.Accel]
		if c.CPUModel == "" {
			c.CPUModel = "host"
		}
	}
	c.parse(getenv)
	return c
}

func (c *Config) parse(getenv func(string) string) {
	if v := getenv("VM_CPUS"); v != "" {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			c.problem("VM_CPUS", "%q is not a whole number", "set a vCPU count such as 2", v)
			n = 1
		}
		c.CPUs = n
	}
	if v := getenv("VM_MEMORY"); v != "" {
		n, err := ParseSize(v, mib)
		if err != nil {
			c.problem("VM_MEMORY", "%v", "write e.g. 2G or 2048 (MiB)", err)
		}
		c.MemoryMiB = n / mib
		if err == nil && n%mib != 0 {
			c.problem("VM_MEMORY", "%q is not a whole number of MiB", "write e.g. 2G or 2048 (MiB)", v)
		}
	}
	if v := getenv("DISK_SIZE"); v != "" {
		n, err := ParseSize(v, 1)
		if err != nil {
			c.problem("DISK_SIZE", "%v", "write e.g. 20G", err)
		}
		c.DiskSize = n
	}
	if v := getenv("SERIAL_LOG_MAX"); v != "" {
		n, err := ParseSize(v, 1)
		if err != nil {
			c.problem("SERIAL_LOG_MAX", "%v", "write e.g. 16M", err)
		}
		c.SerialLogMax = n
	}
	if v := strings.TrimSpace(getenv("CONSOLE_PORT")); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 65535 {
			c.problem("CONSOLE_PORT", "%q is not a port number 1–65535", "set e.g. 8006, or leave it unset for no console", v)
		}
		c.ConsolePort = n
	}
	if v := strings.TrimSpace(getenv("METRICS_PORT")); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 65535 {
			c.problem("METRICS_PORT", "%q is not a port number 1–65535", "set e.g. 9177, or leave it unset for no metrics", v)
		}
		c.MetricsPort = n
	}
	if c.MetricsPort != 0 && c.MetricsPort == c.ConsolePort {
		c.problem("METRICS_PORT", "%d is also CONSOLE_PORT", "give the metrics a port of their own, e.g. 9177", c.MetricsPort)
	}
	if v := strings.TrimSpace(getenv("EXPORT_PORT")); v != "" {
		n, err := strconv.Atoi(v)
		switch {
		case err != nil || n < 1 || n > 65535:
			c.problem("EXPORT_PORT", "%q is not a port number 1–65535", "set e.g. 10809, or leave it unset for no pull-mode exports", v)
		case n == c.ConsolePort || n == c.MetricsPort:
			c.problem("EXPORT_PORT", "%d is also the console's or the metrics' port", "give exports a port of their own, e.g. 10809", n)
		}
		c.ExportPort = n
	}
	c.MetricsTokenFile = strings.TrimSpace(getenv("METRICS_TOKEN_FILE"))
	c.backupSchedule(getenv)
	for _, k := range strings.Split(getenv("CLOUD_INIT_SSH_KEYS"), "\n") {
		if k = strings.TrimSpace(k); k != "" {
			c.CloudInitSSHKeys = append(c.CloudInitSSHKeys, k)
		}
	}
	c.ShutdownTimeout = c.duration(getenv, "SHUTDOWN_TIMEOUT", c.ShutdownTimeout)
	c.StartTimeout = c.duration(getenv, "START_TIMEOUT", c.StartTimeout)
	c.TPM = c.onOff(getenv, "TPM", false)
	c.GuestAgent = c.onOff(getenv, "GUEST_AGENT", true)
	switch v := strings.ToLower(strings.TrimSpace(getenv("HEALTH"))); v {
	case "", "qemu":
	case "agent":
		c.HealthAgent = true
		if !c.GuestAgent {
			c.problem("HEALTH", "agent needs the guest agent's channel, and GUEST_AGENT is off", "set GUEST_AGENT=on, or HEALTH=qemu")
		}
	default:
		c.problem("HEALTH", "%q is not qemu or agent", "set agent, or leave it unset for qemu", v)
	}
	c.HealthAgentGrace = c.duration(getenv, "HEALTH_AGENT_GRACE", 2*time.Minute)
	if v := getenv("TPM_RESET"); v != "" {
		b, err := strconv.ParseBool(strings.TrimSpace(v))
		if err != nil {
			c.problem("TPM_RESET", "%q is not true or false", "leave it unset, or set true once to set the TPM's state aside and start with a new TPM", v)
		}
		c.TPMReset = b
	}
	if v := getenv("OVMF_VARS_RESET"); v != "" {
		b, err := strconv.ParseBool(strings.TrimSpace(v))
		if err != nil {
			c.problem("OVMF_VARS_RESET", "%q is not true or false", "leave it unset, or set true to start from the template once", v)
		}
		c.OVMFVarsReset = b
	}
	ports, err := ParsePorts(getenv("PORTS"))
	if err != nil {
		c.problem("PORTS", "%v", "write entries like 22, 8080:80 or 53/udp, each port 1–65535 and once", err)
	}
	c.Ports = ports
	args, err := splitArgs(getenv("QEMU_ARGS"))
	if err != nil {
		c.problem("QEMU_ARGS", "%v", "quote arguments with ' or \"", err)
	}
	c.QEMUArgs = args
}

// duration accepts Go durations ("90s", "2m") and bare seconds ("90").
func (c *Config) duration(getenv func(string) string, name string, def time.Duration) time.Duration {
	v := strings.TrimSpace(getenv(name))
	if v == "" {
		return def
	}
	d, err := ParseDuration(v)
	if err != nil {
		c.problem(name, "%q is not a duration", "write seconds or a duration such as 90s or 2m", v)
		return def
	}
	return d
}

// MinBackupEvery is the shortest schedule: a backup of an idle VM takes
// seconds, and each one is a folder in the repository.
const MinBackupEvery = time.Minute

// backupSchedule reads BACKUP_*: a schedule needs its repository, an
// interval of at least MinBackupEvery, a time of day as HH:MM, and rules
// that are counts.
func (c *Config) backupSchedule(getenv func(string) string) {
	c.BackupRepo = strings.TrimSpace(getenv("BACKUP_REPO"))
	if v := strings.TrimSpace(getenv("BACKUP_EVERY")); v != "" {
		d, err := ParseDuration(v)
		switch {
		case err != nil:
			c.problem("BACKUP_EVERY", "%q is not a duration", "write e.g. 24h or 30m", v)
		case d < MinBackupEvery:
			c.problem("BACKUP_EVERY", "%v is shorter than %v", "give at least 1m", d, MinBackupEvery)
		}
		c.BackupEvery = d
		if c.BackupRepo == "" {
			c.problem("BACKUP_EVERY", "is set without BACKUP_REPO", "mount a repository into the task and name it in BACKUP_REPO (swarmvm deploy --backup-repo does both)")
		}
	}
	if v := strings.TrimSpace(getenv("BACKUP_AT")); v != "" {
		c.BackupAt = v
		if _, ok := c.BackupAtMinutes(); !ok {
			c.problem("BACKUP_AT", "%q is not a time of day HH:MM", "write e.g. 02:00 (UTC)", v)
		}
		if c.BackupEvery == 0 {
			c.problem("BACKUP_AT", "is set without BACKUP_EVERY", "set BACKUP_EVERY too, e.g. 24h")
		}
	}
	for _, k := range []struct {
		name string
		to   *int
	}{{"BACKUP_FULL_EVERY", &c.BackupFullEvery}, {"BACKUP_KEEP_LAST", &c.BackupKeepLast}, {"BACKUP_KEEP_DAILY", &c.BackupKeepDaily}, {"BACKUP_KEEP_WEEKLY", &c.BackupKeepWeekly}} {
		if v := strings.TrimSpace(getenv(k.name)); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				c.problem(k.name, "%q is not a count of 1 or more", "write e.g. 7, or leave it unset", v)
			}
			*k.to = n
		}
	}
	if c.BackupRepo != "" && !filepath.IsAbs(c.BackupRepo) {
		c.problem("BACKUP_REPO", "%q is not an absolute path", "give the repository's path in the task, e.g. /srv/backup", c.BackupRepo)
	}
}

// BackupAtMinutes is BACKUP_AT as minutes after midnight (UTC); false when
// it is unset or not a time of day.
func (c Config) BackupAtMinutes() (int, bool) {
	h, m, ok := strings.Cut(c.BackupAt, ":")
	hh, err1 := strconv.Atoi(h)
	mm, err2 := strconv.Atoi(m)
	if !ok || err1 != nil || err2 != nil || hh < 0 || hh > 23 || mm < 0 || mm > 59 || len(m) != 2 {
		return 0, false
	}
	return hh*60 + mm, true
}

// ParseDuration reads a duration as every input of swarmvm takes it, a
// variable or a definition's field: whole seconds ("90") or Go's form
// ("90s", "2m").
func ParseDuration(v string) (time.Duration, error) {
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(v)
}

// Error is one problem with one variable: what is wrong and how to fix it.
type Error struct {
	Var   string
	Cause string
	Fix   string
}

func (e *Error) Error() string {
	if e.Fix == "" {
		return e.Var + ": " + e.Cause
	}
	return e.Var + ": " + e.Cause + " — " + e.Fix
}

func (c *Config) problem(name, format, fix string, args ...any) {
	c.problems = append(c.problems, &Error{Var: name, Cause: fmt.Sprintf(format, args...), Fix: fix})
}

// Validate reports every problem in the configuration, each an *Error that
// names its variable, joined with errors.Join; nil when the config is usable.
func (c Config) Validate() error {
	v := c
	v.problems = append([]error(nil), c.problems...)
	v.checkName()
	v.checkEnums()
	v.checkNumbers()
	v.checkPaths()
	v.checkBoot()
	v.checkNet()
	v.checkHome()
	if err := checkQEMUArgs(c.QEMUArgs); err != nil {
		v.problem("QEMU_ARGS", "%v", "drop it: QEMU_ARGS takes only the options docs/reference.md's variable table lists; the rest come from the runner's own variables", err)
	}
	return errors.Join(v.problems...)
}

func (c *Config) checkName() {
	switch {
	case c.Name == "":
		c.problem("VM_NAME", "is not set", "set a name of letters, digits and '-', e.g. VM_NAME=web-1")
	case !ValidVMName(c.Name):
		c.problem("VM_NAME", "%q is not a valid name", "use "+VMNameRule, c.Name)
	}
}

func (c *Config) checkEnums() {
	oneOf := func(name, val string, allowed ...string) {
		for _, a := range allowed {
			if val == a {
				return
			}
		}
		c.problem(name, "%q is not one of %s", "pick one of those", val, strings.Join(allowed, ", "))
	}
	oneOf("ACCEL", c.Accel, AccelKVM, AccelTCG)
	oneOf("BOOT_MODE", c.BootMode, BootUEFI, BootUEFISecure, BootBIOS)
	oneOf("GUEST_OS", c.GuestOS, GuestLinux, GuestWindows)
	oneOf("DISK_CACHE", c.DiskCache, "none", "writeback", "writethrough")
	oneOf("LOG_LEVEL", c.LogLevel, "debug", "info", "warn", "error")
	oneOf("STORAGE_MODE", c.StorageMode, StorageLocal, StorageShared)
	oneOf("CLOUD_INIT", c.CloudInit, "", CloudInitNoCloud)
	if (c.ConsoleTLSCert == "") != (c.ConsoleTLSKey == "") {
		c.problem("CONSOLE_TLS_CERT", "and CONSOLE_TLS_KEY must be set together", "give both files, or neither for plain HTTP")
	}
	oneOf("CLOUD_INIT_BUS", c.CloudInitBus, "virtio", "cdrom")
	if c.Accel == AccelTCG && (c.CPUModel == "host" || strings.HasPrefix(c.CPUModel, "host,")) {
		c.problem("CPU_MODEL", "%q needs KVM but ACCEL=tcg", "unset CPU_MODEL (tcg uses max) or name a model such as qemu64", c.CPUModel)
	}
	if strings.ContainsAny(c.CPUModel, " \t\n") || c.CPUModel == "" {
		c.problem("CPU_MODEL", "%q is not a CPU model", "use a QEMU -cpu value such as host or host,-arch-capabilities", c.CPUModel)
	}
}

func (c *Config) checkNumbers() {
	if c.CPUs < 1 || c.CPUs > 255 {
		c.problem("VM_CPUS", "%d is outside 1–255", "set a vCPU count from 1 to 255", c.CPUs)
	}
	if c.MemoryMiB != 0 && (c.MemoryMiB < 64 || c.MemoryMiB > 16<<20) {
		c.problem("VM_MEMORY", "%s is outside 64M–16T", "set guest RAM such as 2G", FormatMiB(c.MemoryMiB))
	}
	if c.DiskSize < 0 || (c.DiskSize > 0 && c.DiskSize < mib) || c.DiskSize > 64*tib {
		c.problem("DISK_SIZE", "%d bytes is outside 1M–64T", "set a size such as 20G", c.DiskSize)
	}
	if c.SerialLogMax < 64*kib || c.SerialLogMax > 4*gib {
		c.problem("SERIAL_LOG_MAX", "%d bytes is outside 64K–4G", "set a size such as 16M", c.SerialLogMax)
	}
	if c.ShutdownTimeout < MinShutdownTimeout || c.ShutdownTimeout > MaxShutdownTimeout {
		c.problem("SHUTDOWN_TIMEOUT", "%s is outside 1s–1h", fmt.Sprintf("set it to the service's stop_grace_period minus %s or less, e.g. 90s for 2m", StopGracePeriod(0)), c.ShutdownTimeout)
	}
	if c.StartTimeout < time.Second || c.StartTimeout > 10*time.Minute {
		c.problem("START_TIMEOUT", "%s is outside 1s–10m", "set e.g. 30s", c.StartTimeout)
	}
}

func (c *Config) checkBoot() {
	if c.KernelPath == "" {
		if c.InitrdPath != "" {
			c.problem("INITRD_PATH", "is set without KERNEL_PATH", "set KERNEL_PATH too, or unset INITRD_PATH")
		}
		if c.KernelCmdline != "" {
			c.problem("KERNEL_CMDLINE", "is set without KERNEL_PATH", "set KERNEL_PATH too, or unset KERNEL_CMDLINE")
		}
	}
	if strings.ContainsAny(c.KernelCmdline, "\x00\n") {
		c.problem("KERNEL_CMDLINE", "contains a NUL or newline", "write the command line on one line")
	}
}

// checkHome: a home node means nothing without this node's identity to
// compare it with, and a template Swarm did not expand is no identity.
func (c *Config) checkHome() {
	for _, v := range []struct{ name, val string }{{"HOME_NODE", c.HomeNode}, {"NODE_ID", c.NodeID}, {"NODE_HOSTNAME", c.NodeHostname}} {
		if strings.Contains(v.val, "{{") {
			c.problem(v.name, "%q is a Swarm template that was not expanded", "set it in a Swarm service's env (Swarm expands {{.Node.ID}} there), or leave it unset outside Swarm", v.val)
		}
	}
	switch {
	case c.HomeNode != "" && c.StorageMode == StorageShared:
		c.problem("HOME_NODE", "is set with STORAGE_MODE=shared", "unset HOME_NODE: a VM on shared storage has no home node")
	case c.HomeNode != "" && c.NodeID == "" && c.NodeHostname == "":
		c.problem("HOME_NODE", "is set but NODE_ID and NODE_HOSTNAME are not: the runner cannot tell whether it runs on the home node", "set NODE_ID={{.Node.ID}} in the service's env (swarmvm deploy and render do)")
	}
}

func or(v, def string) string {
	if strings.TrimSpace(v) == "" {
		return def
	}
	return v
}

// UEFI reports whether the VM boots OVMF (with or without Secure Boot), and
// so has firmware code and an NVRAM file of its own.
func (c Config) UEFI() bool { return c.BootMode == BootUEFI || c.BootMode == BootUEFISecure }

// onOff reads a variable that is on or off (unset: off).
func (c *Config) onOff(getenv func(string) string, name string, unset bool) bool {
	switch v := strings.ToLower(strings.TrimSpace(getenv(name))); v {
	case "":
		return unset
	case "off":
		return false
	case "on":
		return true
	default:
		c.problem(name, "%q is not on or off", "set on or off, or leave it unset for "+map[bool]string{true: "on", false: "off"}[unset], v)
		return unset
	}
}
